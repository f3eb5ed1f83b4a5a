"""Layer stream decompression, detected by magic bytes.

``open_layer_stream`` looks at the first bytes of a stream and returns a
binary stream of the uncompressed tar: plain tar (a valid first header
checksum), gzip (multi-member), zstd (multi-frame, skippable frames allowed),
bzip2 and xz, the formats Docker's DecompressStream accepts. Anything else is
an ``ArchiveError`` at once; corrupt or truncated compressed data is an
``ArchiveError`` when it is read, never a silently shorter stream. Output is
produced in bounded pieces, so a decompression bomb costs time, not memory.
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import zlib
from typing import Any, BinaryIO, Callable, cast

import zstandard

from .errors import ArchiveError
from .tarformat import BLOCK, checksum_ok

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
BZIP2_MAGIC = b"BZh"
XZ_MAGIC = b"\xfd7zXZ\x00"
_ZSTD_FEED = 4096  # compressed bytes per zstd call: bounds one call's output (RLE blocks ~ 43000:1)
_BUFFER = 1 << 20


def _zstd_skippable(head: bytes) -> bool:
    return len(head) >= 4 and head[1:4] == b"\x2a\x4d\x18" and head[0] & 0xF0 == 0x50


def detect_compression(head: bytes) -> str:
    """"tar", "gzip", "zstd", "bzip2" or "xz" for a stream starting with ``head``.

    ``head`` should hold the first 512 bytes (fewer only if the stream is
    shorter). Raises ArchiveError when the bytes are none of these.
    """
    if head.startswith(GZIP_MAGIC):
        return "gzip"
    if head.startswith(ZSTD_MAGIC) or _zstd_skippable(head):
        return "zstd"
    if head.startswith(BZIP2_MAGIC) and len(head) > 3 and head[3:4] in b"123456789":
        return "bzip2"
    if head.startswith(XZ_MAGIC):
        return "xz"
    if len(head) >= BLOCK and (checksum_ok(head[:BLOCK]) or head[:BLOCK] == bytes(BLOCK)):
        return "tar"
    if not head:
        raise ArchiveError("not a layer: the stream is empty")
    raise ArchiveError("not a layer: neither a tar archive nor gzip, zstd, bzip2 or xz compressed data")


class _Source(io.RawIOBase):
    """The already-read head, then the rest of the caller's stream; read errors become ArchiveError."""

    def __init__(self, head: bytes, fileobj: Any) -> None:
        self._head = head
        self._file = fileobj

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        view = memoryview(b).cast("B")
        if self._head:
            n = min(len(view), len(self._head))
            view[:n] = self._head[:n]
            self._head = self._head[n:]
            return n
        try:
            data = self._file.read(len(view))
        except OSError as e:
            raise ArchiveError(f"cannot read the layer stream: {e.strerror or e}") from None
        view[:len(data)] = data
        return len(data)


class _Zstd(io.RawIOBase):
    """Multi-frame zstd decoding that notices a truncated last frame."""

    def __init__(self, src: _Source) -> None:
        self._src = src
        self._dctx = zstandard.ZstdDecompressor()
        self._obj = self._dctx.decompressobj()
        self._started = False  # the current frame has consumed input
        self._out = b""
        self._done = False

    def readable(self) -> bool:
        return True

    def _feed(self, data: bytes) -> bytes:
        out = []
        while data:
            self._started = True
            out.append(self._obj.decompress(data))
            if not self._obj.eof:
                break
            data = self._obj.unused_data
            self._obj = self._dctx.decompressobj()
            self._started = False
        return b"".join(out)

    def readinto(self, b: Any) -> int:
        view = memoryview(b).cast("B")
        while not self._out:
            if self._done:
                return 0
            data = self._src.read(_ZSTD_FEED)
            if not data:
                if self._started:
                    raise ArchiveError("corrupt zstd layer stream: truncated (the last frame is incomplete)")
                self._done = True
                return 0
            self._out = self._feed(data)
        n = min(len(view), len(self._out))
        view[:n] = self._out[:n]
        self._out = self._out[n:]
        return n


class _Checked(io.RawIOBase):
    """Reads from a decompressing file object, reporting its failures as ArchiveError."""

    def __init__(self, kind: str, reader: Any) -> None:
        self._kind = kind
        self._reader = reader

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        try:
            n: int = self._reader.readinto(b)
        except ArchiveError:
            raise
        except EOFError:
            raise ArchiveError(f"corrupt {self._kind} layer stream: truncated") from None
        except (OSError, ValueError, zlib.error, lzma.LZMAError, zstandard.ZstdError) as e:
            raise ArchiveError(f"corrupt {self._kind} layer stream: {e}") from None
        return n

    def close(self) -> None:
        self._reader.close()
        super().close()


_OPENERS: dict[str, Callable[[_Source], Any]] = {
    "gzip": lambda src: gzip.GzipFile(fileobj=src, mode="rb"),
    "bzip2": lambda src: bz2.BZ2File(src, mode="rb"),
    "xz": lambda src: lzma.LZMAFile(cast(BinaryIO, src), mode="rb"),
    "zstd": _Zstd,
}


def open_layer_stream(fileobj: Any) -> io.BufferedReader:
    """A binary stream of the uncompressed tar in ``fileobj`` (any object with ``read(n)``).

    Reads the first 512 bytes at once to detect the format; raises
    ArchiveError for an empty stream or bytes that are neither a tar nor one
    of the supported compressions. Reading the result raises ArchiveError for
    corrupt or truncated compressed data and for errors of the source.
    Closing the result does not close ``fileobj``.
    """
    parts = []
    need = BLOCK
    while need > 0:
        try:
            chunk = fileobj.read(need)
        except OSError as e:
            raise ArchiveError(f"cannot read the layer stream: {e.strerror or e}") from None
        if not chunk:
            break
        parts.append(chunk)
        need -= len(chunk)
    head = b"".join(parts)
    kind = detect_compression(head)
    src = _Source(head, fileobj)
    raw: io.RawIOBase = src if kind == "tar" else _Checked(kind, _OPENERS[kind](src))
    return io.BufferedReader(raw, buffer_size=_BUFFER)
