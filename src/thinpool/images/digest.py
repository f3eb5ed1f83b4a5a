"""Docker's content identifiers: digests, diff ids, chain ids, and a hashing reader.

* A **diff id** is ``sha256:<hex>`` of a layer's uncompressed tar stream, every
  byte of it (the zero blocks after the end-of-archive marker included).
* A **chain id** names a layer together with everything under it:
  ``chain(L0) = diff(L0)``, ``chain(Ln) = sha256("<chain(Ln-1)> <diff(Ln)>")``
  (the text of the two ids separated by one space), as Docker's
  ``layer.CreateChainID``.
* An **image id** is ``sha256:<hex>`` of the image's config JSON bytes.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any, Iterable

from .errors import ImageError

_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")


def check_digest(value: object, what: str) -> str:
    """``value`` if it is a ``sha256:<64 hex>`` digest, else ``ImageError`` naming ``what``."""
    if not isinstance(value, str) or not _DIGEST.fullmatch(value):
        raise ImageError(f"{what}: {value!r} is not a sha256 digest")
    return value


def sha256_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def chain_id(parent_chain: str | None, diff_id: str) -> str:
    """The chain id of a layer with diff id ``diff_id`` on top of ``parent_chain``."""
    if parent_chain is None:
        return diff_id
    return sha256_of(f"{parent_chain} {diff_id}".encode())


def chain_ids(diff_ids: Iterable[str]) -> list[str]:
    """Chain ids of a stack of layers (bottom first)."""
    out: list[str] = []
    for d in diff_ids:
        out.append(chain_id(out[-1] if out else None, d))
    return out


def hex_of(digest: str) -> str:
    """The hex part of ``sha256:<hex>``."""
    return digest.split(":", 1)[1]


class HashingReader:
    """A ``read(n)`` stream over ``source`` that hashes (sha256) and counts what passes.

    ``drain()`` reads the rest so that the digest covers the whole stream;
    ``digest`` is ``sha256:<hex>`` of everything read so far.
    """

    def __init__(self, source: Any) -> None:
        self.source = source
        self._hash = hashlib.sha256()
        self.count = 0

    def read(self, n: int = -1) -> bytes:
        data = self.source.read(n)
        if data:
            self._hash.update(data)
            self.count += len(data)
        return bytes(data)

    def drain(self, chunk: int = 1 << 20) -> None:
        while self.read(chunk):
            pass

    @property
    def digest(self) -> str:
        return "sha256:" + self._hash.hexdigest()
