"""Tar reading and writing: ustar, GNU and PAX, as Docker layer tars use them.

``TarReader`` parses a stream entry by entry and never trusts it: every header
checksum is verified, numbers must be well-formed octal or base-256, a meta
entry (PAX record set, GNU long name) is at most ``MAX_META_SIZE`` bytes, and a
stream that ends inside a header, inside an entry's data or before the
end-of-archive marker is an ``ArchiveError``, never a silently shorter layer.
Header-only entry types (links, devices, directories, fifos) carry no data
whatever their size field says, as in Go's archive/tar, so the field only
counts towards the layer size.

``encode_header`` writes one entry's header block(s): a plain ustar block when
every field fits, preceded by a PAX extended header for long names, big
numbers and xattrs (``SCHILY.xattr.<name>`` records, values as raw bytes).

Names are ``str`` decoded from bytes with ``os.fsdecode`` (UTF-8,
surrogateescape), so any byte string survives a read/write round trip.
"""

from __future__ import annotations

import io
import os
import re
import struct
from dataclasses import dataclass, field
from typing import Iterator

from .errors import ArchiveError

BLOCK = 512
MAX_META_SIZE = 1 << 20  # bound on a PAX header or GNU long name (Go uses the same)
XATTR_PAX_PREFIX = "SCHILY.xattr."

REG, LINK, SYMLINK, CHAR, BLOCKDEV, DIR, FIFO = "0", "1", "2", "3", "4", "5", "6"
_HEADER_ONLY = {LINK, SYMLINK, CHAR, BLOCKDEV, DIR, FIFO}
_ENTRY_TYPES = _HEADER_ONLY | {REG}
_ZERO_BLOCK = bytes(BLOCK)
_OCTAL_DIGITS = b"01234567"
_CHUNK = 1 << 20
_PAX_TIME = re.compile(rb"(-?)(\d+)(?:\.(\d+))?")


@dataclass(slots=True)
class TarEntry:
    """One file entry of a tar, meta headers (PAX, GNU long names) folded in.

    ``type`` is one of REG, LINK, SYMLINK, CHAR, BLOCKDEV, DIR, FIFO (the
    regular-file aliases NUL and "7" are reported as REG). Times are
    nanoseconds since the epoch; ``atime_ns`` is None when the tar has none.
    ``size`` is the header's size (after a PAX override): the number of data
    bytes for REG, only a number for the header-only types.
    """

    name: str
    type: str
    mode: int = 0
    uid: int = 0
    gid: int = 0
    size: int = 0
    mtime_ns: int = 0
    atime_ns: int | None = None
    linkname: str = ""
    devmajor: int = 0
    devminor: int = 0
    xattrs: dict[str, bytes] = field(default_factory=dict)


def _truncated(what: str) -> ArchiveError:
    return ArchiveError(f"truncated tar archive: stream ended inside {what}")


def _cstr(field_bytes: bytes) -> bytes:
    end = field_bytes.find(b"\0")
    return field_bytes if end < 0 else field_bytes[:end]


def _number(field_bytes: bytes, what: str, offset: int) -> int:
    """An octal (space/NUL padded) or GNU base-256 header number."""
    if field_bytes and field_bytes[0] & 0x80:
        value = int.from_bytes(field_bytes[1:], "big")
        if field_bytes[0] & 0x40:  # negative, two's complement over the whole field
            value = int.from_bytes(field_bytes, "big") - (1 << (8 * len(field_bytes)))
        return value
    text = field_bytes.replace(b"\0", b" ").strip()
    if not text:
        return 0
    if text.translate(None, _OCTAL_DIGITS):
        raise ArchiveError(f"invalid tar header at offset {offset}: bad {what} field {field_bytes!r}")
    return int(text, 8)


def checksum_ok(block: bytes) -> bool:
    """Whether a 512-byte block is a tar header with a valid checksum (unsigned or signed sum)."""
    stored_field = block[148:156].replace(b"\0", b" ").strip()
    if not stored_field or stored_field.translate(None, _OCTAL_DIGITS):
        return False
    stored = int(stored_field, 8)
    unsigned = sum(block) - sum(block[148:156]) + 8 * 32
    if stored == unsigned:
        return True
    signed = unsigned - 256 * sum(1 for b in block if b >= 128) + 256 * sum(1 for b in block[148:156] if b >= 128)
    return stored == signed


def _parse_pax(data: bytes, offset: int) -> dict[str, bytes]:
    records: dict[str, bytes] = {}
    pos = 0
    while pos < len(data):
        if data[pos] == 0:  # some writers NUL-pad the record set
            if data[pos:].count(0) == len(data) - pos:
                break
        space = data.find(b" ", pos)
        if space < 0 or not data[pos:space].isdigit():
            raise ArchiveError(f"invalid PAX header at offset {offset}: bad record length")
        length = int(data[pos:space])
        end = pos + length
        if length <= space - pos + 1 or end > len(data) or data[end - 1] != 0x0A:
            raise ArchiveError(f"invalid PAX header at offset {offset}: bad record length")
        key, eq, value = data[space + 1:end - 1].partition(b"=")
        if not eq or not key:
            raise ArchiveError(f"invalid PAX header at offset {offset}: record without key=value")
        records[os.fsdecode(key)] = value
        pos = end
    return records


def _pax_int(value: bytes, key: str, offset: int) -> int:
    if not value.isdigit():
        raise ArchiveError(f"invalid PAX header at offset {offset}: bad {key} {value!r}")
    return int(value)


def _pax_time(value: bytes, key: str, offset: int) -> int:
    m = _PAX_TIME.fullmatch(value)
    if m is None:
        raise ArchiveError(f"invalid PAX header at offset {offset}: bad {key} {value!r}")
    frac = (m.group(3) or b"")[:9].ljust(9, b"0")
    ns = int(m.group(2)) * 1_000_000_000 + int(frac)
    return -ns if m.group(1) else ns


class TarReader:
    """Iterate a tar stream's entries; read or skip each entry's data before the next.

    ``offset`` is the stream position of the current header (for messages).
    ``entries()`` yields TarEntry objects; the data of a REG entry is consumed
    with ``copy_data(fd)`` or ``read_data()``, or skipped automatically when the
    next entry is requested. Global PAX headers ("g") are read and ignored.
    """

    def __init__(self, stream: io.BufferedIOBase) -> None:
        self._stream = stream
        self._buf = b""
        self._pos = 0
        self._consumed = 0  # stream bytes before self._buf
        self._remaining = 0  # data bytes of the current entry not yet consumed
        self._padding = 0
        self._scratch = bytearray(_CHUNK)
        self.offset = 0

    # -- buffered access -------------------------------------------------------------
    def _tell(self) -> int:
        return self._consumed + self._pos

    def _read_upto(self, n: int) -> bytes:
        """Up to n bytes (small n: headers, meta data); fewer only at end of stream."""
        avail = len(self._buf) - self._pos
        if avail < n:
            parts = [self._buf[self._pos:]]
            self._consumed += self._pos
            need = n - avail
            while need > 0:
                chunk = self._stream.read(max(need, _CHUNK))
                if not chunk:
                    break
                parts.append(chunk)
                need -= len(chunk)
            self._buf, self._pos = b"".join(parts), 0
        out = self._buf[self._pos:self._pos + n]
        self._pos += len(out)
        return out

    def _take(self, n: int, what: str) -> bytes:
        """Exactly n bytes or a truncation error."""
        out = self._read_upto(n)
        if len(out) < n:
            raise _truncated(what)
        return out

    def _skip(self, n: int, what: str) -> None:
        avail = len(self._buf) - self._pos
        if n <= avail:
            self._pos += n
            return
        n -= avail
        self._consumed += len(self._buf)
        self._buf, self._pos = b"", 0
        while n > 0:
            got = self._stream.readinto(memoryview(self._scratch)[:min(n, _CHUNK)])
            if not got:
                raise _truncated(what)
            n -= got
            self._consumed += got

    def _chunks(self, n: int, what: str) -> Iterator[memoryview]:
        """The next n bytes as a sequence of views (valid until the next call)."""
        avail = len(self._buf) - self._pos
        if avail:
            k = min(avail, n)
            yield memoryview(self._buf)[self._pos:self._pos + k]
            self._pos += k
            n -= k
        if n:
            self._consumed += len(self._buf)
            self._buf, self._pos = b"", 0
        view = memoryview(self._scratch)
        while n > 0:
            got = self._stream.readinto(view[:min(n, _CHUNK)])
            if not got:
                raise _truncated(what)
            self._consumed += got
            n -= got
            yield view[:got]

    # -- entry data ----------------------------------------------------------------------
    def copy_data(self, fd: int, name: str) -> None:
        """Write the current entry's remaining data to file descriptor ``fd``."""
        n, self._remaining = self._remaining, 0
        for chunk in self._chunks(n, f"the data of {name!r}"):
            while chunk:
                written = os.write(fd, chunk)
                chunk = chunk[written:]
        self._finish_data(name)

    def read_data(self, name: str) -> bytes:
        """The current entry's remaining data as bytes (for small entries)."""
        n, self._remaining = self._remaining, 0
        data = self._take(n, f"the data of {name!r}")
        self._finish_data(name)
        return data

    def _finish_data(self, name: str) -> None:
        pad, self._padding = self._padding, 0
        if pad:
            self._skip(pad, f"the padding of {name!r}")

    # -- headers ---------------------------------------------------------------------------
    def entries(self) -> Iterator[TarEntry]:
        """Yield each file entry; raises ArchiveError on any malformed or truncated input."""
        pax: dict[str, bytes] = {}
        long_name: bytes | None = None
        long_link: bytes | None = None
        first = True
        while True:
            if self._remaining or self._padding:
                self._skip(self._remaining + self._padding, "entry data")
                self._remaining = self._padding = 0
            self.offset = self._tell()
            block = self._read_upto(BLOCK)
            if len(block) < BLOCK:
                if first and self.offset == 0:
                    raise ArchiveError("not a tar archive: the stream is empty" if not block
                                       else f"not a tar archive: only {len(block)} bytes")
                if block:
                    raise _truncated(f"the tar header at offset {self.offset}")
                raise ArchiveError(f"truncated tar archive: stream ended at offset {self.offset} "
                                   "before the end-of-archive marker")
            if block == _ZERO_BLOCK:
                if pax or long_name is not None or long_link is not None:
                    raise ArchiveError(f"invalid tar: meta header without an entry at offset {self.offset}")
                self._check_second_zero_block()
                return
            if not checksum_ok(block):
                if first:
                    raise ArchiveError("not a tar archive: bad header checksum at offset 0")
                raise ArchiveError(f"invalid tar header at offset {self.offset}: bad checksum")
            first = False
            off = self.offset
            typeflag = chr(block[156]) if block[156] else REG
            size = _number(block[124:136], "size", off)
            if size < 0:
                raise ArchiveError(f"invalid tar header at offset {off}: negative size {size}")
            if typeflag in ("x", "g", "L", "K"):
                if size > MAX_META_SIZE:
                    raise ArchiveError(
                        f"invalid tar header at offset {off}: {size}-byte meta entry exceeds {MAX_META_SIZE}")
                self._remaining = size
                self._padding = -size % BLOCK
                data = self.read_data("a meta header")
                if typeflag == "x":
                    pax.update(_parse_pax(data, off))
                elif typeflag == "L":
                    long_name = _cstr(data)
                elif typeflag == "K":
                    long_link = _cstr(data)
                continue  # "g": global records are ignored, as Docker does
            yield self._entry(block, typeflag, size, pax, long_name, long_link, off)
            pax, long_name, long_link = {}, None, None

    def _check_second_zero_block(self) -> None:
        block = self._read_upto(BLOCK)
        if len(block) == BLOCK and block != _ZERO_BLOCK:
            raise ArchiveError(f"invalid tar: non-zero block after the end-of-archive marker at offset {self.offset}")

    def _entry(self, block: bytes, typeflag: str, size: int, pax: dict[str, bytes],
               long_name: bytes | None, long_link: bytes | None, off: int) -> TarEntry:
        magic = block[257:265]
        name_b = _cstr(block[0:100])
        if magic[:6] == b"ustar\0":
            prefix = _cstr(block[345:500])
            if prefix:
                name_b = prefix + b"/" + name_b
        atime: int | None = None
        if magic == b"ustar  \0":  # old GNU: atime at 345
            a = _number(block[345:357], "atime", off)
            if a:
                atime = a * 1_000_000_000
        if long_name is not None:
            name_b = long_name
        link_b = long_link if long_link is not None else _cstr(block[157:257])
        if typeflag in ("7", "\0"):
            typeflag = REG
        entry = TarEntry(
            name=os.fsdecode(name_b), type=typeflag,
            mode=_number(block[100:108], "mode", off), uid=_number(block[108:116], "uid", off),
            gid=_number(block[116:124], "gid", off), size=size,
            mtime_ns=_number(block[136:148], "mtime", off) * 1_000_000_000, atime_ns=atime,
            linkname=os.fsdecode(link_b),
        )
        if typeflag in (CHAR, BLOCKDEV) and magic[:5] == b"ustar":
            entry.devmajor = _number(block[329:337], "devmajor", off)
            entry.devminor = _number(block[337:345], "devminor", off)
        for key, value in pax.items():
            if key == "path":
                entry.name = os.fsdecode(value)
            elif key == "linkpath":
                entry.linkname = os.fsdecode(value)
            elif key == "size":
                entry.size = _pax_int(value, key, off)
            elif key == "uid":
                entry.uid = _pax_int(value, key, off)
            elif key == "gid":
                entry.gid = _pax_int(value, key, off)
            elif key == "mtime":
                entry.mtime_ns = _pax_time(value, key, off)
            elif key == "atime":
                entry.atime_ns = _pax_time(value, key, off)
            elif key.startswith(XATTR_PAX_PREFIX):
                entry.xattrs[key[len(XATTR_PAX_PREFIX):]] = value
            elif key.startswith("GNU.sparse."):
                raise ArchiveError(f"unsupported tar entry {entry.name!r}: sparse files are not supported")
        if "\0" in entry.name or "\0" in entry.linkname:
            raise ArchiveError(f"invalid tar entry at offset {off}: NUL byte in a name")
        if typeflag not in _ENTRY_TYPES:
            what = "GNU sparse file" if typeflag == "S" else f"type {typeflag!r}"
            raise ArchiveError(f"unsupported tar entry {entry.name!r}: {what}")
        self._remaining = 0 if typeflag in _HEADER_ONLY else entry.size
        self._padding = -self._remaining % BLOCK
        return entry


# -- writing -------------------------------------------------------------------------------

def _pax_record(key: str, value: bytes) -> bytes:
    body = b" " + key.encode() + b"=" + value + b"\n"
    n = len(body) + 1
    while len(str(n)) + len(body) != n:
        n = len(str(n)) + len(body)
    return str(n).encode() + body


def _split_ustar(name: bytes) -> tuple[bytes, bytes] | None:
    """(prefix, name) for a ustar header, or None if the name does not fit."""
    if len(name) <= 100:
        return b"", name
    if len(name) > 256:
        return None
    cut = name.find(b"/", len(name) - 101)
    while 0 < cut:
        if cut <= 155 and len(name) - cut - 1 <= 100 and cut < len(name) - 1:
            return name[:cut], name[cut + 1:]
        cut = name.find(b"/", cut + 1)
        if cut < 0:
            break
    return None


_USTAR = struct.Struct("100s48s8sc100s72s16s155s12x")
"""name, mode uid gid size mtime (8+8+8+12+12), chksum, typeflag, linkname, magic "ustar" version
"00" and the empty uname and gname (6+2+32+32), devmajor devminor (8+8), prefix, padding"""
_USTAR_MAGIC = b"ustar\x0000".ljust(72, b"\0")
_CHKSUM_BASE = sum(b" " * 8) + sum(_USTAR_MAGIC)
"""The checksum is computed with its own field as 8 spaces."""
_MAX8, _MAX12 = 0o7777777, 0o77777777777
_OCTAL_LIMITS = {8: _MAX8, 12: _MAX12}


def _block(name: bytes, prefix: bytes, mode: int, uid: int, gid: int, size: int, mtime: int,
           typeflag: str, linkname: bytes, devmajor: int, devminor: int) -> bytes:
    numbers = b"%07o\0%07o\0%07o\0%011o\0%011o\0" % (mode, uid, gid, size, mtime)
    devices = b"%07o\0%07o\0" % (devmajor, devminor)
    flag = typeflag.encode()
    checksum = (_CHKSUM_BASE + sum(name) + sum(numbers) + flag[0] + sum(linkname) + sum(devices)
                + sum(prefix))  # the sum of the block's bytes, without summing its zeros
    return _USTAR.pack(name, numbers, b"%06o\0 " % checksum, flag, linkname, _USTAR_MAGIC, devices, prefix)


def encode_header(name: str, typeflag: str, *, mode: int = 0, uid: int = 0, gid: int = 0, size: int = 0,
                  mtime: int = 0, linkname: str = "", devmajor: int = 0, devminor: int = 0,
                  xattrs: dict[str, bytes] | None = None) -> bytes:
    """The header block(s) of one entry: ustar, with a PAX header first when needed.

    ``mtime`` is whole seconds. PAX records are used for a name or link name
    that does not fit the ustar fields, numbers beyond their octal fields, and
    every xattr. Data and padding (``padding(size)``) are the caller's.
    """
    name_b, link_b = os.fsencode(name), os.fsencode(linkname)
    if (not xattrs and len(name_b) <= 100 and len(link_b) <= 100 and 0 <= uid <= _MAX8 and 0 <= gid <= _MAX8
            and 0 <= size <= _MAX12 and 0 <= mtime <= _MAX12 and 0 <= devmajor <= _MAX8
            and 0 <= devminor <= _MAX8):  # the common case: one ustar block
        return _block(name_b, b"", mode & 0o7777, uid, gid, size, mtime, typeflag, link_b, devmajor, devminor)
    records: list[bytes] = []
    split = _split_ustar(name_b)
    if split is None:
        records.append(_pax_record("path", name_b))
        split = (b"", name_b[:100])
    if len(link_b) > 100:
        records.append(_pax_record("linkpath", link_b))
        link_b = link_b[:100]
    nums = {"uid": (uid, 8), "gid": (gid, 8), "size": (size, 12), "mtime": (mtime, 12)}
    clipped = {}
    for key, (value, width) in nums.items():
        if 0 <= value <= _OCTAL_LIMITS[width]:
            clipped[key] = value
        else:
            records.append(_pax_record(key, str(value).encode()))
            clipped[key] = 0
    if not (0 <= devmajor <= 0o7777777 and 0 <= devminor <= 0o7777777):
        raise ArchiveError(f"cannot archive {name!r}: device number {devmajor}:{devminor} too large for tar")
    for key in sorted(xattrs or ()):
        records.append(_pax_record(XATTR_PAX_PREFIX + key, (xattrs or {})[key]))
    out = b""
    if records:
        data = b"".join(records)
        if any(_needs_binary(r) for r in records):
            data = _pax_record("hdrcharset", b"BINARY") + data
        out = _block(b"././@PaxHeader", b"", 0o644, 0, 0, len(data), max(clipped["mtime"], 0), "x", b"", 0, 0)
        out += data + padding(len(data))
    return out + _block(split[1], split[0], mode & 0o7777, clipped["uid"], clipped["gid"], clipped["size"],
                        clipped["mtime"], typeflag, link_b, devmajor, devminor)


def _needs_binary(record: bytes) -> bool:
    """A path/linkpath record whose value is not UTF-8 (xattr values are always raw)."""
    key_value = record.split(b" ", 1)[1]
    if not (key_value.startswith(b"path=") or key_value.startswith(b"linkpath=")):
        return False
    try:
        key_value.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


def padding(size: int) -> bytes:
    """Zero bytes that pad ``size`` bytes of data to a whole block."""
    return bytes(-size % BLOCK)


END_OF_ARCHIVE = bytes(2 * BLOCK)
