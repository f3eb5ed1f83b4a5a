"""tar-split: a layer tar's bytes minus its file contents, to rebuild the tar exactly.

Docker keeps, next to each layer, ``tar-split.json.gz``: the tar's headers,
padding and trailer as they came, and for every entry a reference to its
file by name.  Rebuilding the stream from it and the files of the layer's
tree gives the original tar byte for byte, so ``docker save`` gives back the
diff ids that were loaded.  The format (vbatts/tar-split's JSON packer) is
gzip of one JSON object per line::

    {"type":2,"payload":"<base64 raw bytes>","position":0}       segment
    {"type":1,"name":"etc/motd","size":23,"payload":null,"position":1}   file

``name_raw`` (base64) replaces ``name`` when the name is not UTF-8.  Every
tar entry has a file record (size 0 for entries without data); a file with
data carries the CRC-64 (Go's ISO table, big-endian) of its contents in its
``payload``, which ``assemble`` checks as Docker does.  Callers verify the
rebuilt stream against the layer's diff id as well.

``Recorder`` wraps the uncompressed stream on its way to the driver and
records while it passes; ``assemble`` rebuilds, reading file contents from
a ``FileSource``: ``DirSource`` (a directory tree, such as a mounted layer)
or ``exttree.ExtTree`` (a layer's ext2/3/4 device read in userspace).
"""

from __future__ import annotations

import base64
import gzip
import io
import json
import os
import stat
from dataclasses import dataclass
from typing import Any, Iterator, Protocol

import fastcrc

from ..archive import ArchiveError
from ..archive.fsroot import RootDir
from .errors import ImageError

SEGMENT, FILE = 2, 1
BLOCK = 512
_META = {"x", "g", "L", "K"}
_DATA_TYPES = {"0", "\0", "7"}
_META_LIMIT = 1 << 20


@dataclass
class Entry:
    type: int
    payload: bytes = b""
    name: bytes = b""
    size: int = 0


def _octal(field: bytes) -> int:
    if field and field[0] & 0x80:
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip(b" \0")
    return int(text, 8) if text else 0


def _pax(data: bytes) -> dict[bytes, bytes]:
    out: dict[bytes, bytes] = {}
    pos = 0
    while pos < len(data):
        space = data.find(b" ", pos)
        if space < 0:
            break
        length = int(data[pos:space])
        if length <= 0:
            break
        record = data[space + 1:pos + length - 1]
        key, _, value = record.partition(b"=")
        out[key] = value
        pos += length
    return out


class Recorder:
    """A ``read(n)`` stream over an uncompressed layer tar that records its tar-split.

    Recording never fails the stream: bytes that are not a tar simply stop
    the recording (``valid`` turns False) and whoever parses the stream
    reports the error.
    """

    def __init__(self, source: Any) -> None:
        self.source = source
        self.entries: list[Entry] = []
        self.valid = True
        self._segment = bytearray()
        self._state = "header"
        self._need = BLOCK
        self._header = bytearray()
        self._meta = bytearray()
        self._meta_type = ""
        self._meta_size = 0
        self._pax: dict[bytes, bytes] = {}
        self._long_name: bytes | None = None
        self._crc: int | None = None

    def read(self, n: int = -1) -> bytes:
        data = self.source.read(n)
        if data and self.valid:
            try:
                self._feed(memoryview(data))
            except (ValueError, IndexError):
                self.valid = False
        return bytes(data)

    def drain(self, chunk: int = 1 << 20) -> None:
        """Read (and record) the rest of the stream."""
        while self.read(chunk):
            pass

    def _flush_segment(self) -> None:
        if self._segment:
            self.entries.append(Entry(SEGMENT, bytes(self._segment)))
            self._segment.clear()

    def _feed(self, data: memoryview) -> None:
        pos = 0
        while pos < len(data):
            take = min(self._need, len(data) - pos) if self._state != "trailer" else len(data) - pos
            chunk = data[pos:pos + take]
            pos += take
            if self._state == "trailer":
                self._segment += chunk
                continue
            if self._state == "data":
                self._crc = fastcrc.crc64.go_iso(chunk, initial=self._crc)
                self._need -= take
                if self._need == 0:
                    self._after_data()
                continue
            self._segment += chunk
            if self._state == "header":
                self._header += chunk
            elif self._state == "meta":
                if len(self._meta) < _META_LIMIT:
                    self._meta += chunk
            self._need -= take
            if self._need:
                continue
            if self._state == "header":
                self._on_header(bytes(self._header))
                self._header.clear()
            elif self._state == "meta":
                self._on_meta()
            elif self._state == "padding":
                self._state, self._need = "header", BLOCK

    def _on_header(self, block: bytes) -> None:
        if block.count(0) == BLOCK:
            self._state, self._need = "trailer", 0
            return
        typeflag = chr(block[156])
        size = _octal(block[124:136])
        if typeflag in _META:
            self._state, self._meta_type = "meta", typeflag
            self._meta.clear()
            self._need = size + (-size % BLOCK)
            self._meta_size = size
            if self._need == 0:
                self._on_meta()
            return
        name = block[0:100].split(b"\0", 1)[0]
        if block[257:263] == b"ustar\0":
            prefix = block[345:500].split(b"\0", 1)[0]
            if prefix:
                name = prefix + b"/" + name
        if self._long_name is not None:
            name = self._long_name
        if b"path" in self._pax:
            name = self._pax[b"path"]
        if b"size" in self._pax:
            size = int(self._pax[b"size"])
        if typeflag not in _DATA_TYPES:
            size = 0
        self._pax, self._long_name = {}, None
        self._flush_segment()
        self.entries.append(Entry(FILE, name=name, size=size))
        if size:
            self._state, self._need = "data", size
        else:
            self._state, self._need = "header", BLOCK

    def _on_meta(self) -> None:
        data = bytes(self._meta[:self._meta_size])
        if self._meta_type == "x":
            self._pax.update(_pax(data))
        elif self._meta_type == "L":
            self._long_name = data.split(b"\0", 1)[0]
        self._state, self._need = "header", BLOCK

    def _after_data(self) -> None:
        assert self._crc is not None
        self.entries[-1].payload = self._crc.to_bytes(8, "big")
        self._crc = None
        size = self.entries[-1].size
        pad = -size % BLOCK
        self._state, self._need = ("padding", pad) if pad else ("header", BLOCK)

    def finish(self) -> None:
        """Close the record at the end of the stream."""
        self._flush_segment()

    def serialize(self) -> bytes:
        """The ``tar-split.json.gz`` bytes."""
        return serialize(self.entries)


def serialize(entries: list[Entry]) -> bytes:
    """The ``tar-split.json.gz`` bytes of ``entries`` (the JSON written by hand: this runs per entry)."""
    lines = []
    b64 = base64.b64encode
    for pos, e in enumerate(entries):
        if e.type == SEGMENT:
            lines.append(f'{{"type":2,"payload":"{b64(e.payload).decode()}","position":{pos}}}')
            continue
        try:
            name = '"name":' + json.dumps(e.name.decode("utf-8"))
        except UnicodeDecodeError:
            name = f'"name_raw":"{b64(e.name).decode()}"'
        size = f',"size":{e.size}' if e.size else ""
        payload = f'"{b64(e.payload).decode()}"' if e.payload else "null"
        lines.append(f'{{"type":1,{name}{size},"payload":{payload},"position":{pos}}}')
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0, compresslevel=1) as gz:
        gz.write(("\n".join(lines) + "\n").encode())
    return buf.getvalue()


def parse(data: bytes) -> list[Entry]:
    """Entries of a ``tar-split.json.gz`` (ImageError when it is not one)."""
    try:
        text = gzip.decompress(data)
    except (OSError, EOFError, ValueError) as e:
        raise ImageError(f"tar-split record is not gzip: {e}") from None
    out: list[Entry] = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            kind = int(obj["type"])
            payload = base64.b64decode(obj["payload"]) if obj.get("payload") else b""
            if kind == SEGMENT:
                out.append(Entry(SEGMENT, payload))
            elif kind == FILE:
                name = (base64.b64decode(obj["name_raw"]) if obj.get("name_raw")
                        else str(obj.get("name", "")).encode("utf-8", "surrogateescape"))
                out.append(Entry(FILE, payload, name, int(obj.get("size", 0) or 0)))
            else:
                raise ValueError(f"unknown type {kind}")
        except (ValueError, KeyError, TypeError) as e:
            raise ImageError(f"tar-split record line {n} is invalid: {e}") from None
    return out


def _clean(name: bytes) -> list[str]:
    parts = [p for p in os.fsdecode(name).split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts) or not parts:
        raise ImageError(f"tar-split names a file outside the layer: {os.fsdecode(name)!r}")
    return parts


class Unreadable(ImageError):
    """A ``FileSource`` has no regular file at a path; the message is the reason alone."""


NOT_REGULAR = "not a regular file"


class FileSource(Protocol):
    """Where ``assemble`` reads file contents from: a layer's tree."""

    def read(self, parts: list[str], size: int) -> Iterator[bytes]:
        """The first ``size`` bytes of the regular file at the root-relative path ``parts`` (fewer
        when it is shorter), in chunks.  Intermediate symlinks resolve as in a chroot, the last
        component is never followed; no regular file there is ``Unreadable`` with the reason."""
        ...


class DirSource:
    """The files of a directory tree (a mounted layer), looked up inside it with
    ``archive.fsroot.RootDir``; a context manager (holds directory fds while open)."""

    def __init__(self, root: str, chunk: int = 1 << 20) -> None:
        self.rd = RootDir(root)
        self.chunk = chunk

    def __enter__(self) -> DirSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.rd.close()

    def read(self, parts: list[str], size: int) -> Iterator[bytes]:
        try:
            pfd, _ = self.rd.parent(parts, follow=True)
            if not stat.S_ISREG(os.stat(parts[-1], dir_fd=pfd, follow_symlinks=False).st_mode):
                raise Unreadable(NOT_REGULAR)  # never opened: a device or fifo has effects
            fd = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=pfd)
        except OSError as err:
            raise Unreadable(err.strerror) from None
        except ArchiveError as err:
            raise Unreadable(str(err)) from None
        try:
            left = size
            while left:
                data = os.read(fd, min(self.chunk, left))
                if not data:
                    return
                left -= len(data)
                yield data
        finally:
            os.close(fd)
            self.rd.collect()


def assemble(entries: list[Entry], files: FileSource) -> Iterator[bytes]:
    """The original tar: segments as recorded, file contents from ``files``.

    A missing, irregular or short file, or contents that fail the entry's
    CRC-64, is an ``ImageError`` naming the file.
    """
    for e in entries:
        if e.type == SEGMENT:
            if e.payload:
                yield e.payload
            continue
        if not e.size:
            continue
        crc: int | None = None
        got = 0
        try:
            for data in files.read(_clean(e.name), e.size):
                got += len(data)
                crc = fastcrc.crc64.go_iso(data, initial=crc)
                yield data
        except Unreadable as err:
            raise ImageError(f"layer file {os.fsdecode(e.name)!r} cannot be read: {err}") from None
        if got < e.size:
            raise ImageError(f"layer file {os.fsdecode(e.name)!r} is shorter than its {e.size} bytes")
        if e.payload and crc is not None and crc.to_bytes(8, "big") != e.payload:
            raise ImageError(f"file integrity checksum failed for {os.fsdecode(e.name)!r}")
