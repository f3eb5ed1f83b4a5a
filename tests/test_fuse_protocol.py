"""FuseSession byte by byte: requests as the kernel writes them, replies parsed
back with the structure layouts of include/uapi/linux/fuse.h. No kernel needed."""

from __future__ import annotations

import errno
import os
import struct
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from thinpool.errors import DataPathError
from thinpool.fuse import protocol as P
from thinpool.fuse.session import Buffers, FileBusyError, FuseError, FuseSession

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fuse_file_export import FileExport  # noqa: E402

MiB = 1 << 20
O_DSYNC = os.O_DSYNC


class Wire:
    """A session plus one worker's buffers; ``call`` returns (error, payload bytes)."""

    def __init__(self, session: FuseSession) -> None:
        self.s = session
        self.buf = Buffers()
        self.unique = 100

    def raw(self, data: bytes) -> list[bytes] | None:
        self.buf.request[:len(data)] = data
        reply = self.s.handle(self.buf.request, len(data), self.buf)
        return None if reply is None else [bytes(b) for b in reply]

    def call(self, opcode: int, body: bytes = b"", nodeid: int = P.ROOT_ID) -> tuple[int, bytes]:
        self.unique += 2
        hdr = P.IN_HEADER.pack(P.IN_HEADER.size + len(body), opcode, self.unique, nodeid,
                               0, 0, 1234, 0, 0)
        parts = self.raw(hdr + body)
        assert parts is not None, "no reply"
        out = b"".join(parts)
        length, err, unique = P.OUT_HEADER.unpack_from(out)
        assert length == len(out) and unique == self.unique
        return -err, out[P.OUT_HEADER.size:]

    def init(self, minor: int = 45, flags: int = 0x3FFFFFFF) -> tuple[int, bytes]:
        return self.call(P.Op.INIT, P.INIT_IN.pack(7, minor, 131072, flags) + bytes(48))

    def lookup(self, name: bytes) -> tuple[int, bytes]:
        return self.call(P.Op.LOOKUP, name + b"\0")

    def open(self, nodeid: int, flags: int = os.O_RDWR) -> int:
        err, body = self.call(P.Op.OPEN, P.OPEN_IN.pack(flags, 0), nodeid)
        assert err == 0, os.strerror(err)
        fh, open_flags, _ = P.OPEN_OUT.unpack(body)
        assert open_flags & P.FOPEN_DIRECT_IO
        return int(fh)

    def read(self, fh: int, offset: int, size: int) -> tuple[int, bytes]:
        return self.call(P.Op.READ, P.READ_IN.pack(fh, offset, size, 0, 0, os.O_RDWR, 0))

    def write(self, fh: int, offset: int, data: bytes, flags: int = os.O_RDWR) -> tuple[int, bytes]:
        return self.call(P.Op.WRITE, P.WRITE_IN.pack(fh, offset, len(data), 0, 0, flags, 0) + data)

    def fallocate(self, fh: int, offset: int, length: int, mode: int) -> int:
        return self.call(P.Op.FALLOCATE, P.FALLOCATE_IN.pack(fh, offset, length, mode, 0))[0]

    def release(self, fh: int) -> int:
        return self.call(P.Op.RELEASE, P.RELEASE_IN.pack(fh, 0, 0, 0))[0]


@pytest.fixture
def wire() -> Wire:
    w = Wire(FuseSession())
    assert w.init()[0] == 0
    return w


@pytest.fixture
def vol(tmp_path: Path) -> FileExport:
    p = tmp_path / "vol.img"
    with open(p, "wb") as f:
        f.truncate(4 * MiB)
    return FileExport(p)


def nodeid_of(w: Wire, name: bytes) -> int:
    err, body = w.lookup(name)
    assert err == 0
    return int(P.ENTRY_OUT.unpack(body)[0])


def test_init_negotiation() -> None:
    seen: list[str | None] = []
    w = Wire(FuseSession(on_init=seen.append))
    assert w.lookup(b"x")[0] == errno.ENOSYS  # nothing but INIT before INIT
    err, body = w.init(flags=0x3FFFFFFF)
    assert err == 0 and seen == [None] and w.s.kernel_minor == 45
    (major, minor, readahead, flags, max_bg, congestion, max_write, time_gran, max_pages, _,
     flags2) = P.INIT_OUT.unpack(body)
    assert (major, minor, readahead) == (7, P.OUR_MINOR, 131072)
    assert max_write == MiB and max_pages == 256 and max_bg >= 16 and congestion < max_bg
    assert flags & P.FUSE_ASYNC_DIO and flags & P.FUSE_BIG_WRITES and flags & P.FUSE_MAX_PAGES
    assert not flags & P.FUSE_WRITEBACK_CACHE and flags2 == 0
    # Flags the kernel did not offer are not claimed.
    w2 = Wire(FuseSession())
    _, body = w2.init(flags=P.FUSE_BIG_WRITES)
    assert P.INIT_OUT.unpack(body)[3] == P.FUSE_BIG_WRITES


def test_init_refuses_old_kernels_and_answers_newer_majors() -> None:
    seen: list[str | None] = []
    w = Wire(FuseSession(on_init=seen.append))
    assert w.init(minor=27)[0] == errno.EPROTO
    assert seen and "7.27 is too old" in str(seen[0])
    w = Wire(FuseSession())
    err, body = w.call(P.Op.INIT, P.INIT_IN.pack(8, 0, 0, 0))
    assert err == 0 and P.INIT_OUT.unpack(body)[:2] == (7, P.OUR_MINOR)
    assert w.lookup(b"x")[0] == errno.ENOSYS  # still waiting for a 7.x INIT


def test_lookup_getattr_and_listing(wire: Wire, vol: FileExport, tmp_path: Path) -> None:
    wire.s.add_file("vol", vol)
    ro = FileExport(tmp_path / "vol.img", read_only=True)
    wire.s.add_file("ro", ro)
    err, body = wire.lookup(b"vol")
    entry = P.ENTRY_OUT.unpack(body)
    assert err == 0 and entry[0] > 1 and entry[6 + 1] == 4 * MiB  # attr.size
    assert entry[6 + 9] == 0o100600 and entry[6 + 11:6 + 13] == (0, 0)  # mode, uid, gid
    assert P.ENTRY_OUT.unpack(wire.lookup(b"ro")[1])[6 + 9] == 0o100400
    assert wire.lookup(b"nope")[0] == errno.ENOENT
    assert wire.call(P.Op.LOOKUP, b"vol\0", nodeid=entry[0])[0] == errno.ENOTDIR
    err, body = wire.call(P.Op.GETATTR, bytes(16))
    assert err == 0 and P.ATTR_OUT.unpack(body)[3 + 9] == 0o40755
    assert wire.call(P.Op.GETATTR, bytes(16), nodeid=999)[0] == errno.ENOENT
    # READDIRPLUS in pages of one entry at a time: offsets chain.
    err, body = wire.call(P.Op.OPENDIR, P.OPEN_IN.pack(0, 0))
    fh = P.OPEN_OUT.unpack(body)[0]
    names, offset = [], 0
    while True:
        err, body = wire.call(P.Op.READDIRPLUS, P.READ_IN.pack(fh, offset, 200, 0, 0, 0, 0))
        assert err == 0
        if not body:
            break
        nodeid = P.ENTRY_OUT.unpack_from(body)[0]
        ino, offset, namelen, dtype = P.DIRENT.unpack_from(body, P.ENTRY_OUT.size)
        name = body[P.ENTRY_OUT.size + P.DIRENT.size:][:namelen]
        names.append(name)
        assert dtype == (4 if name in (b".", b"..") else 8)
        assert nodeid == (0 if name in (b".", b"..") else ino)
        assert len(body) == P.dirent_size(namelen, plus=True)
    assert names == [b".", b"..", b"ro", b"vol"]
    err, body = wire.call(P.Op.READDIR, P.READ_IN.pack(fh, 0, 4096, 0, 0, 0, 0))
    assert err == 0 and len(body) == sum(P.dirent_size(len(n), False) for n in names)
    assert wire.call(P.Op.RELEASEDIR, P.RELEASE_IN.pack(fh, 0, 0, 0))[0] == 0
    assert wire.call(P.Op.READDIR, P.READ_IN.pack(fh, 0, 4096, 0, 0, 0, 0))[0] == errno.EBADF
    err, body = wire.call(P.Op.STATFS)
    blocks, bfree, _, files, _, bsize, namelen = P.STATFS_OUT.unpack(body)[:7]
    assert (blocks, bfree, files, bsize, namelen) == (2 * MiB // 1024, 0, 3, 4096, 255)


def test_read_write_ranges(wire: Wire, vol: FileExport) -> None:
    wire.s.add_file("vol", vol)
    node = nodeid_of(wire, b"vol")
    fh = wire.open(node)
    err, body = wire.write(fh, 100, b"hello")
    assert err == 0 and P.WRITE_OUT.unpack(body) == (5, 0)
    assert wire.read(fh, 99, 7) == (0, b"\0hello\0")
    assert vol.counts["write"] == 1 and vol.counts["write_fua"] == 0
    assert wire.write(fh, 0, b"x", flags=os.O_RDWR | O_DSYNC)[0] == 0
    assert vol.counts["write_fua"] == 1
    assert wire.read(fh, 4 * MiB - 3, 100) == (0, b"\0\0\0")
    assert wire.read(fh, 4 * MiB, 100) == (0, b"")
    err, body = wire.write(fh, 4 * MiB - 2, b"abcd")
    assert err == 0 and P.WRITE_OUT.unpack(body)[0] == 2
    assert wire.write(fh, 4 * MiB, b"a")[0] == errno.ENOSPC
    assert wire.read(fh, 0, MiB + 1)[0] == errno.EINVAL
    assert wire.read(fh + 100, 0, 1)[0] == errno.EBADF
    # A WRITE whose payload is shorter than it claims is refused.
    short = P.WRITE_IN.pack(fh, 0, 10, 0, 0, os.O_RDWR, 0) + b"abc"
    assert wire.call(P.Op.WRITE, short)[0] == errno.EINVAL
    big = os.urandom(MiB)
    assert P.WRITE_OUT.unpack(wire.write(fh, MiB, big)[1])[0] == MiB
    assert wire.read(fh, MiB, MiB) == (0, big)
    assert wire.release(fh) == 0
    assert wire.read(fh, 0, 1)[0] == errno.EBADF


def test_write_payload_is_page_aligned() -> None:
    b = Buffers()
    payload = b.request[P.WRITE_PAYLOAD_OFFSET:]
    import ctypes
    addr = ctypes.addressof(ctypes.c_char.from_buffer(payload))
    assert addr % 4096 == 0
    assert ctypes.addressof(ctypes.c_char.from_buffer(b.data)) % 4096 == 0


def test_flush_fsync_and_read_only(wire: Wire, vol: FileExport, tmp_path: Path) -> None:
    wire.s.add_file("vol", vol)
    wire.s.add_file("ro", FileExport(tmp_path / "vol.img", read_only=True))
    fh = wire.open(nodeid_of(wire, b"vol"))
    flush = P.FLUSH_IN.pack(fh, 0, 0, 0)
    assert wire.call(P.Op.FLUSH, flush)[0] == 0 and vol.counts["flush"] == 0
    wire.write(fh, 0, b"a")
    assert wire.call(P.Op.FLUSH, flush)[0] == 0 and vol.counts["flush"] == 1
    assert wire.call(P.Op.FLUSH, flush)[0] == 0 and vol.counts["flush"] == 1
    assert wire.call(P.Op.FSYNC, P.FSYNC_IN.pack(fh, 1, 0))[0] == 0 and vol.counts["flush"] == 2
    assert wire.call(P.Op.FSYNCDIR, P.FSYNC_IN.pack(0, 0, 0))[0] == 0
    assert vol.counts["flush"] == 3  # only the writable export
    vol.fail["flush"] = DataPathError(errno.EIO, "gone")
    wire.write(fh, 0, b"a")
    assert wire.call(P.Op.FLUSH, flush)[0] == errno.EIO
    vol.fail.clear()
    assert wire.call(P.Op.FLUSH, flush)[0] == 0 and vol.counts["flush"] == 5  # still dirty: retried
    ro = nodeid_of(wire, b"ro")
    assert wire.call(P.Op.OPEN, P.OPEN_IN.pack(os.O_WRONLY, 0), ro)[0] == errno.EROFS
    assert wire.call(P.Op.OPEN, P.OPEN_IN.pack(os.O_RDWR, 0), ro)[0] == errno.EROFS
    wire.write(fh, 0, b"a")
    assert wire.release(fh) == 0 and vol.counts["flush"] == 6  # dirty on release: flushed
    fh = wire.open(nodeid_of(wire, b"vol"))
    wire.write(fh, 0, b"a")
    vol.fail["flush"] = DataPathError(errno.EIO, "gone")
    assert wire.release(fh) == 0 and wire.s.open_handles("vol") == 0  # logged, not answered
    vol.fail.clear()
    rfh = wire.open(ro, os.O_RDONLY)
    assert wire.write(rfh, 0, b"x")[0] == errno.EBADF
    assert wire.fallocate(rfh, 0, 4096, 3) == errno.EBADF
    assert wire.call(P.Op.ACCESS, P.ACCESS_IN.pack(os.W_OK, 0), ro)[0] == errno.EROFS
    assert wire.call(P.Op.ACCESS, P.ACCESS_IN.pack(os.R_OK, 0), ro)[0] == 0
    assert wire.call(P.Op.OPEN, P.OPEN_IN.pack(0, 0))[0] == errno.EISDIR


def test_fallocate_modes(wire: Wire, vol: FileExport) -> None:
    wire.s.add_file("vol", vol)
    fh = wire.open(nodeid_of(wire, b"vol"))
    punch = P.FALLOC_FL_PUNCH_HOLE | P.FALLOC_FL_KEEP_SIZE
    assert wire.fallocate(fh, 4096, 8192, punch) == 0
    assert vol.counts["zero_trim"] == 1 and vol.counts["bytes_zero_trim"] == 8192
    assert wire.fallocate(fh, 0, 4096, P.FALLOC_FL_ZERO_RANGE) == 0
    assert wire.fallocate(fh, 0, 4096, P.FALLOC_FL_ZERO_RANGE | P.FALLOC_FL_KEEP_SIZE) == 0
    assert vol.counts["zero"] == 2
    # Past the end: clipped with KEEP_SIZE, refused without (the file cannot grow).
    assert wire.fallocate(fh, 4 * MiB - 4096, 1 << 40, punch) == 0
    assert vol.counts["bytes_zero_trim"] == 8192 + 4096
    assert wire.fallocate(fh, 4 * MiB, 4096, punch) == 0 and vol.counts["zero_trim"] == 2
    assert wire.fallocate(fh, 4 * MiB - 4096, 8192, P.FALLOC_FL_ZERO_RANGE) == errno.ENOSPC
    for mode in (0, P.FALLOC_FL_KEEP_SIZE, P.FALLOC_FL_PUNCH_HOLE, 0x08, 0x20, 0x40, 0x80):
        assert wire.fallocate(fh, 0, 4096, mode) == errno.EOPNOTSUPP
    vol.fail["zero_trim"] = DataPathError(errno.ENOSPC, "full")
    assert wire.fallocate(fh, 0, 4096, punch) == errno.ENOSPC


def test_setattr(wire: Wire, vol: FileExport) -> None:
    wire.s.add_file("vol", vol)
    node = nodeid_of(wire, b"vol")

    def setattr(valid: int, size: int = 0, mode: int = 0, uid: int = 0) -> int:
        body = P.SETATTR_IN.pack(valid, 0, 0, size, 0, 0, 0, 0, 0, 0, 0, mode, 0, uid, 0, 0)
        return wire.call(P.Op.SETATTR, body, node)[0]

    assert setattr(P.FATTR_SIZE, size=0) == errno.EPERM
    assert setattr(P.FATTR_SIZE, size=8 * MiB) == errno.EPERM
    assert setattr(P.FATTR_SIZE, size=4 * MiB) == 0
    assert setattr(P.FATTR_MODE, mode=0o100644) == errno.EPERM
    assert setattr(P.FATTR_MODE, mode=0o100600) == 0
    assert setattr(P.FATTR_UID, uid=1000) == errno.EPERM
    assert setattr(1 << 4 | 1 << 5 | 1 << 7 | 1 << 8) == 0  # atime/mtime (now): ignored


def test_errors_and_oddities(wire: Wire, vol: FileExport, caplog: pytest.LogCaptureFixture) -> None:
    wire.s.add_file("vol", vol)
    fh = wire.open(nodeid_of(wire, b"vol"))
    for opcode in (P.Op.FORGET, P.Op.BATCH_FORGET, P.Op.INTERRUPT, P.Op.NOTIFY_REPLY):
        hdr = P.IN_HEADER.pack(P.IN_HEADER.size + 16, opcode, 7, 2, 0, 0, 0, 0, 0)
        assert wire.raw(hdr + bytes(16)) is None
    for opcode in (5, 6, 9, 10, 12, 21, 22, 35, 39, 46, 47, 52, 4096, 2 ** 32 - 1):
        assert wire.call(opcode, bytes(64))[0] == errno.ENOSYS
    assert wire.call(P.Op.DESTROY)[0] == 0
    assert wire.raw(b"\x01\x02") is None  # shorter than a header: dropped
    assert wire.raw(P.IN_HEADER.pack(99, P.Op.READ, 1, 1, 0, 0, 0, 0, 0)) is None  # wrong length
    assert "dropped" in caplog.text
    vol.fail["write"] = DataPathError(errno.ENOSPC, "out of data space")
    assert wire.write(fh, 0, b"x")[0] == errno.ENOSPC
    vol.fail["write"] = DataPathError(99999, "nonsense errno")
    assert wire.write(fh, 0, b"x")[0] == errno.EIO
    vol.fail["write"] = ZeroDivisionError("bug")  # type: ignore[assignment]
    assert wire.write(fh, 0, b"x")[0] == errno.EIO
    assert "internal error in WRITE" in caplog.text
    vol.fail.clear()
    assert wire.write(fh, 0, b"x")[0] == 0
    # A body shorter than its structure is refused.
    assert wire.call(P.Op.READ, b"\0" * 8)[0] == errno.EINVAL
    assert wire.call(P.Op.LOOKUP)[0] == errno.EINVAL
    assert "too short" in caplog.text


@settings(max_examples=300, deadline=None)
@given(opcode=st.integers(0, 60), body=st.binary(max_size=200), nodeid=st.integers(0, 5))
def test_garbage_never_escapes(opcode: int, body: bytes, nodeid: int) -> None:
    w = Wire(FuseSession())
    w.init()
    w.s.add_file("vol", _MemExport())
    hdr = P.IN_HEADER.pack(P.IN_HEADER.size + len(body), opcode, 5, nodeid, 0, 0, 0, 0, 0)
    parts = w.raw(hdr + body)
    if parts is not None:
        out = b"".join(parts)
        length, err, unique = P.OUT_HEADER.unpack_from(out)
        assert length == len(out) and unique == 5 and -4096 < err <= 0


class _MemExport:
    size = 1 << 16
    read_only = False

    def __init__(self) -> None:
        self.data = bytearray(self.size)

    def readinto(self, offset: int, buf: memoryview) -> None:
        buf[:] = self.data[offset:offset + len(buf)]

    def write(self, offset: int, data: memoryview, fua: bool) -> None:
        self.data[offset:offset + len(data)] = data

    def flush(self) -> None:
        pass

    def write_zeroes(self, offset: int, length: int, may_trim: bool, fast_only: bool,
                     fua: bool) -> None:
        self.data[offset:offset + length] = bytes(length)

    def close(self) -> None:
        pass


def test_file_table(vol: FileExport) -> None:
    s = FuseSession()
    w = Wire(s)
    w.init()
    s.add_file("vol", vol)
    with pytest.raises(FuseError, match="already exists"):
        s.add_file("vol", vol)
    for bad in ("", ".", "..", "a/b", "nul\0", "\udcff", "é" * 128):
        with pytest.raises(FuseError, match="file name"):
            s.add_file(bad, vol)
    with pytest.raises(FuseError, match="file name must be a string"):
        s.add_file(b"vol", vol)  # type: ignore[arg-type]

    class NoSize:
        size = -1
        read_only = False

    with pytest.raises(FuseError, match="no valid size"):
        s.add_file("x", NoSize())  # type: ignore[arg-type]
    NoSize.size, NoSize.read_only = 10, "no"  # type: ignore[assignment]
    with pytest.raises(FuseError, match="boolean read_only"):
        s.add_file("x", NoSize())  # type: ignore[arg-type]
    node = nodeid_of(w, b"vol")
    fh = w.open(node)
    assert s.open_handles("vol") == 1
    with pytest.raises(FileBusyError, match="is open"):
        s.remove_file("vol")
    assert w.lookup(b"vol")[0] == 0
    w.release(fh)
    assert s.remove_file("vol").export is vol
    assert w.lookup(b"vol")[0] == errno.ENOENT
    assert w.call(P.Op.OPEN, P.OPEN_IN.pack(0, 0), node)[0] == errno.ENOENT
    with pytest.raises(FuseError, match="no file named"):
        s.remove_file("vol")
    s.add_file("vol", vol)
    assert nodeid_of(w, b"vol") != node  # node ids are never reused


def test_notify_inval_entry_layout() -> None:
    msg = P.notify_inval_entry(1, b"vol")
    length, code, unique = P.OUT_HEADER.unpack_from(msg)
    assert (length, code, unique) == (len(msg), 3, 0)
    assert struct.unpack_from("<QII", msg, 16) == (1, 3, 0) and msg[32:] == b"vol\0"
