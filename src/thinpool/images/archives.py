"""Image archives: ``docker save`` tarballs and OCI image layouts, read and written.

Reading (``ImageArchive``) accepts:

* the ``docker save`` format: ``manifest.json`` (``[{"Config", "RepoTags",
  "Layers"}]``), the configs and per-layer tars it names (``<id>/layer.tar``
  or, from Docker 25, ``blobs/sha256/<hex>``), ``repositories`` (ignored);
* an OCI image layout: ``oci-layout``, ``index.json`` (nested indexes
  followed; manifests for another platform skipped), ``blobs/sha256/<hex>``;
  layers plain, gzip or zstd (the bytes decide, not the media type).  Tags
  come from ``io.containerd.image.name`` or a full
  ``org.opencontainers.image.ref.name``.

The archive is a tar read with random access (a file, not a pipe); every
name it gives is looked up as a member, nothing is extracted.  Every blob a
digest names is verified when it is read (``BlobReader.verify``); configs
must name their layers' diff ids (checked by the store as layers apply).

Writing (``write_docker_save``) produces Docker 20.10's ``docker save``
layout (``<layer id>/{VERSION,json,layer.tar}``, ``<config hex>.json``,
``manifest.json``, ``repositories``) into a temporary file next to the
output, renamed into place only when complete.
"""

from __future__ import annotations

import ctypes
import hashlib
import io
import json
import os
import platform
import secrets
import tarfile
from dataclasses import dataclass, field
from typing import IO, Any, Callable, Iterable, Iterator

from ..archive.tarformat import REG, DIR, encode_header, padding, END_OF_ARCHIVE
from ..linux import libc
from .digest import check_digest, hex_of, sha256_of
from .errors import DigestMismatch, ImageError
from .imagedb import decode_config

MAX_JSON = 16 << 20
WRITEBACK_EVERY = 8 << 20
"""``write_atomically`` starts the disk writes of every this many bytes as soon as they are written."""

_sync_file_range = libc.function("sync_file_range", ctypes.c_int,
                                 [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint])
_SYNC_FILE_RANGE_WRITE = 2


def _start_writeback(fd: int, offset: int, length: int) -> None:
    """Start writing ``length`` bytes at ``offset`` of ``fd`` to disk without waiting
    (sync_file_range(2) SYNC_FILE_RANGE_WRITE), so that a final fsync has little left to do.
    A failure is ignored: the fsync still makes everything durable (and reports errors)."""
    _sync_file_range(fd, offset, length, _SYNC_FILE_RANGE_WRITE)


@dataclass
class LayerRef:
    """One layer blob in an archive."""

    member: str
    size: int
    digest: str | None = None  # the blob's own digest (OCI), verified when read


@dataclass
class ArchiveImage:
    config: bytes
    repo_tags: list[str]
    layers: list[LayerRef]
    diff_ids: list[str] = field(default_factory=list)


class BlobReader:
    """``read(n)`` over an archive member that hashes what it reads, to check a blob digest."""

    def __init__(self, f: IO[bytes], digest: str | None, what: str) -> None:
        self.f = f
        self.digest = digest
        self.what = what
        self._h = hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        try:
            data = self.f.read(n)
        except (OSError, tarfile.TarError) as e:
            raise ImageError(f"{self.what}: cannot read: {e}") from None
        if self.digest is not None:
            self._h.update(data)
        return data

    def verify(self) -> None:
        """Read to the end; ``DigestMismatch`` if the blob is not the one named."""
        while self.read(1 << 20):
            pass
        if self.digest is not None and "sha256:" + self._h.hexdigest() != self.digest:
            raise DigestMismatch(f"{self.what}: blob digest mismatch (sha256:{self._h.hexdigest()} "
                                 f"instead of {self.digest})")


def _goarch() -> str:
    machine = platform.machine().lower()
    return {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "i686": "386"}.get(machine, machine)


class ImageArchive:
    """An image archive open for reading (see the module docstring).  A context manager."""

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            self.tar = tarfile.open(path, "r:")
            self.members = {m.name.removeprefix("./"): m for m in self.tar.getmembers()}
        except FileNotFoundError:
            raise ImageError(f"{path}: no such file") from None
        except IsADirectoryError:
            raise ImageError(f"{path}: is a directory, not an image archive") from None
        except (tarfile.TarError, OSError, EOFError) as e:
            raise ImageError(f"{path}: not an image archive (a tar): {e}") from None

    def __enter__(self) -> ImageArchive:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.tar.close()

    def _file(self, name: str) -> IO[bytes]:
        name = os.path.normpath(name).removeprefix("./")
        m = self.members.get(name)
        if m is None:
            raise ImageError(f"{self.path}: the archive has no {name!r}")
        if not m.isreg():
            raise ImageError(f"{self.path}: {name!r} is not a regular file")
        f = self.tar.extractfile(m)
        assert f is not None
        return f

    def read_small(self, name: str) -> bytes:
        m = self.members.get(os.path.normpath(name).removeprefix("./"))
        if m is not None and m.size > MAX_JSON:
            raise ImageError(f"{self.path}: {name!r} is too big for a JSON document")
        try:
            return self._file(name).read()
        except (OSError, tarfile.TarError, EOFError) as e:
            raise ImageError(f"{self.path}: cannot read {name!r}: {e}") from None

    def _json(self, name: str) -> Any:
        try:
            return json.loads(self.read_small(name))
        except (ValueError, UnicodeDecodeError) as e:
            raise ImageError(f"{self.path}: {name!r} is not JSON: {e}") from None

    def open_layer(self, ref: LayerRef, what: str) -> BlobReader:
        return BlobReader(self._file(ref.member), ref.digest, what)

    def size_of(self, name: str) -> int:
        m = self.members.get(os.path.normpath(name).removeprefix("./"))
        return m.size if m is not None else 0

    # -- the two formats -----------------------------------------------------------------------
    def images(self) -> list[ArchiveImage]:
        if "manifest.json" in self.members:
            out = self._docker_save()
        elif "index.json" in self.members:
            out = self._oci()
        else:
            raise ImageError(f"{self.path}: neither a docker save archive (manifest.json) nor an "
                             "OCI image layout (index.json)")
        if not out:
            raise ImageError(f"{self.path}: the archive holds no image")
        return out

    def _config(self, name: str, digest: str | None) -> tuple[bytes, list[str]]:
        raw = self.read_small(name)
        if digest is not None and sha256_of(raw) != digest:
            raise DigestMismatch(f"{self.path}: config {name} has digest {sha256_of(raw)}, "
                                 f"not {digest}")
        config = decode_config(raw, f"{self.path}: {name}")
        return raw, list(config["rootfs"]["diff_ids"])

    def _docker_save(self) -> list[ArchiveImage]:
        manifest = self._json("manifest.json")
        if not isinstance(manifest, list):
            raise ImageError(f"{self.path}: manifest.json is not a list of images")
        out = []
        for n, entry in enumerate(manifest):
            if not isinstance(entry, dict) or not isinstance(entry.get("Config"), str) \
                    or not isinstance(entry.get("Layers"), list):
                raise ImageError(f"{self.path}: manifest.json entry {n} has no Config and Layers")
            name = entry["Config"]
            digest = None
            base = os.path.basename(name).removesuffix(".json")
            if len(base) == 64 and all(c in "0123456789abcdef" for c in base):
                digest = "sha256:" + base
            raw, diff_ids = self._config(name, digest)
            layers = [LayerRef(str(p), self.size_of(str(p))) for p in entry["Layers"]]
            if len(layers) != len(diff_ids):
                raise ImageError(f"{self.path}: image {n} lists {len(layers)} layers but its config "
                                 f"{len(diff_ids)} diff ids")
            tags = entry.get("RepoTags") or []
            out.append(ArchiveImage(raw, [str(t) for t in tags], layers, diff_ids))
        return out

    def _blob(self, digest: str) -> str:
        return f"blobs/sha256/{hex_of(check_digest(digest, f'{self.path}: descriptor digest'))}"

    def _oci(self) -> list[ArchiveImage]:
        layout = self._json("oci-layout") if "oci-layout" in self.members else {}
        if not isinstance(layout, dict) or not str(layout.get("imageLayoutVersion", "1.0.0")).startswith("1."):
            raise ImageError(f"{self.path}: unsupported OCI layout version")
        out: list[ArchiveImage] = []
        self._walk_index(self._json("index.json"), out, None, depth=0)
        return out

    def _walk_index(self, index: Any, out: list[ArchiveImage], name: str | None, depth: int) -> None:
        if depth > 8 or not isinstance(index, dict) or not isinstance(index.get("manifests"), list):
            raise ImageError(f"{self.path}: an OCI index has no manifests list")
        want = ("linux", _goarch())
        for desc in index["manifests"]:
            if not isinstance(desc, dict):
                raise ImageError(f"{self.path}: an OCI descriptor is not an object")
            annotations = desc.get("annotations") or {}
            ref = annotations.get("io.containerd.image.name") or name
            ref_name = annotations.get("org.opencontainers.image.ref.name")
            if ref is None and isinstance(ref_name, str) and (":" in ref_name or "/" in ref_name):
                ref = ref_name
            plat = desc.get("platform")
            if isinstance(plat, dict) and (plat.get("os"), plat.get("architecture")) != want:
                continue
            media = str(desc.get("mediaType", ""))
            digest = check_digest(desc.get("digest"), f"{self.path}: descriptor digest")
            doc = self._verified_json(digest)
            if "index" in media or "manifest.list" in media or "manifests" in doc:
                self._walk_index(doc, out, ref, depth + 1)
                continue
            out.append(self._manifest(doc, ref))

    def _verified_json(self, digest: str) -> Any:
        raw = self.read_small(self._blob(digest))
        if sha256_of(raw) != digest:
            raise DigestMismatch(f"{self.path}: blob {digest} has digest {sha256_of(raw)}")
        try:
            return json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise ImageError(f"{self.path}: blob {digest} is not JSON: {e}") from None

    def _manifest(self, doc: Any, ref: str | None) -> ArchiveImage:
        if not isinstance(doc, dict) or not isinstance(doc.get("config"), dict) \
                or not isinstance(doc.get("layers"), list):
            raise ImageError(f"{self.path}: an OCI manifest has no config and layers")
        cdigest = check_digest(doc["config"].get("digest"), f"{self.path}: config digest")
        raw, diff_ids = self._config(self._blob(cdigest), cdigest)
        layers = []
        for d in doc["layers"]:
            digest = check_digest(d.get("digest") if isinstance(d, dict) else None,
                                  f"{self.path}: layer digest")
            member = self._blob(digest)
            layers.append(LayerRef(member, self.size_of(member), digest))
        if len(layers) != len(diff_ids):
            raise ImageError(f"{self.path}: manifest lists {len(layers)} layers but its config "
                             f"{len(diff_ids)} diff ids")
        return ArchiveImage(raw, [ref] if ref else [], layers, diff_ids)


# -- writing ---------------------------------------------------------------------------------------
@dataclass
class SaveLayer:
    chain_id: str
    size: int                                 # bytes of the layer tar
    chunks: Callable[[], Iterator[bytes]]     # the layer tar (verified by whoever makes it)


@dataclass
class SaveImage:
    config: bytes
    repo_tags: list[str]
    layers: list[SaveLayer]


MTIME = 0


def _v1_id(chain: str, parent: str) -> str:
    return hashlib.sha256(f"{parent} {chain}".encode()).hexdigest()


def _member(name: str, data: bytes) -> bytes:
    return encode_header(name, REG, mode=0o644, size=len(data), mtime=MTIME) + data + padding(len(data))


def docker_save_stream(images: list[SaveImage], progress: Callable[[int], None] | None = None
                       ) -> Iterator[bytes]:
    """The ``docker save`` tar of ``images`` (layers shared between them written once)."""
    manifest = []
    repositories: dict[str, dict[str, str]] = {}
    written: set[str] = set()
    for image in images:
        config_name = hex_of(sha256_of(image.config)) + ".json"
        parent = ""
        names = []
        for layer in image.layers:
            v1 = _v1_id(layer.chain_id, parent)
            names.append(f"{v1}/layer.tar")
            if v1 not in written:
                written.add(v1)
                yield encode_header(v1 + "/", DIR, mode=0o755, mtime=MTIME)
                yield _member(f"{v1}/VERSION", b"1.0")
                v1_json = {"id": v1, "created": "1970-01-01T00:00:00Z", "container_config": {}}
                if parent:
                    v1_json["parent"] = parent
                yield _member(f"{v1}/json", json.dumps(v1_json).encode())
                yield encode_header(f"{v1}/layer.tar", REG, mode=0o644, size=layer.size, mtime=MTIME)
                n = 0
                for chunk in layer.chunks():
                    n += len(chunk)
                    if n > layer.size:
                        raise ImageError(f"layer {layer.chain_id} is longer than its {layer.size} bytes")
                    if progress is not None:
                        progress(len(chunk))
                    yield chunk
                if n != layer.size:
                    raise ImageError(f"layer {layer.chain_id} is {n} bytes, not {layer.size}")
                yield padding(layer.size)
            parent = v1
        if config_name not in written:
            written.add(config_name)
            yield _member(config_name, image.config)
        manifest.append({"Config": config_name, "RepoTags": image.repo_tags or None, "Layers": names})
        for ref in image.repo_tags:
            repo, _, tag = ref.rpartition(":")
            repositories.setdefault(repo, {})[tag] = parent
    yield _member("manifest.json", json.dumps(manifest).encode())
    if repositories:
        yield _member("repositories", json.dumps(repositories).encode())
    yield END_OF_ARCHIVE


def write_atomically(path: str, chunks: Iterable[bytes], mode: int = 0o644) -> int:
    """Write ``chunks`` to a temporary file beside ``path``, fsync, rename; the byte count.

    The disk writes start while the chunks are produced (every ``WRITEBACK_EVERY``
    bytes), so the final fsync waits for little more than the last of them.

    On any failure the temporary file is removed and ``path`` is untouched.
    """
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{secrets.token_hex(4)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    except OSError as e:
        raise ImageError(f"cannot write {path}: {e.strerror}") from None
    total = started = 0
    try:
        with io.FileIO(fd, "w") as f:
            for chunk in chunks:
                view = memoryview(chunk)
                while view:
                    view = view[f.write(view):]
                total += len(chunk)
                if total - started >= WRITEBACK_EVERY:  # the disk works while the rest is produced
                    _start_writeback(fd, started, total - started)
                    started = total
            os.fsync(fd)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return total
