"""The FUSE filesystem as a state machine: request bytes in, reply bytes out.

``FuseSession`` is one directory (the root, node 1) of fixed-size files, each
an ``Export``. It does no device I/O: ``handle(request, n, buffers)`` takes
one request as read from /dev/fuse and returns the reply as a sequence of
buffers to write back in one ``writev`` (or None when the request takes no
reply: FORGET, BATCH_FORGET, INTERRUPT). It calls the exports, which is where
the data goes.

Threads: ``handle`` runs in several threads at once, each with its own
``Buffers``. The hot path takes no lock: the file tables are immutable dicts
replaced whole by ``add_file``/``remove_file`` (one reference assignment),
and the open-handle table is a dict whose single operations are atomic in
CPython. ``remove_file`` and OPEN agree on "is the file open" by each
publishing its own step before checking the other's (``entry.removed`` set
before reading ``entry.handles``, a handle added before reading
``entry.removed``), so a file is never removed while open nor opened after
removal.

Semantics (see ``backend`` for the Export's side):

* INIT accepts protocol 7.28 or newer and negotiates max_write 1 MiB
  (max_pages 256), asynchronous reads and direct I/O, big writes,
  READDIRPLUS, no writeback cache.
* OPEN replies FOPEN_DIRECT_IO (the kernel keeps no page cache of the file,
  and ``losetup --direct-io=on`` gets DIO) and allows parallel direct writes;
  opening a read-only export for writing fails with EROFS.
* READ past the end returns what is left (0 bytes at or after it); WRITE at
  or past the end fails with ENOSPC, one crossing it writes the part inside
  and reports the shorter count, like a block device.
* A WRITE is FUA when the file's flags carry O_DSYNC (O_DSYNC or O_SYNC
  opens, RWF_DSYNC writes). FSYNC and FSYNCDIR flush the export(s); FLUSH
  (every close) and RELEASE (the last close, also a loop device's detach)
  flush only when that handle wrote since its last flush, so a closed
  writer's data is durable and read-only opens cost nothing.
* FALLOCATE: PUNCH_HOLE|KEEP_SIZE is ``write_zeroes(may_trim=True)`` (a
  punched range must read as zeroes), ZERO_RANGE is
  ``write_zeroes(may_trim=False)`` (fallocate(2): the range stays
  allocated); any other mode, plain allocation included (it must keep the
  data, which zeroing would not), is EOPNOTSUPP. A range past the end is
  clipped with KEEP_SIZE and ENOSPC without it.
* SETATTR refuses any change of size, mode or owner with EPERM (so does an
  O_TRUNC open); time changes are accepted and ignored.
* Any opcode not handled here gets ENOSYS.
"""

from __future__ import annotations

import errno
import itertools
import logging
import mmap
import os
import stat
import struct
import threading
import time
from typing import Callable, Sequence

from ..errors import DataPathError, ThinpoolError
from . import protocol as P
from .backend import Export

log = logging.getLogger("thinpool.fuse")

MAX_WRITE = 1 << 20
"""Largest READ or WRITE payload we negotiate (max_pages 256 x 4 KiB)."""
MAX_PAGES = MAX_WRITE // mmap.PAGESIZE
MAX_BACKGROUND = 64
"""Asynchronous requests (loop's direct I/O is asynchronous) the kernel may
have outstanding at once; the kernel's default, 12, would cap queue depth."""
ENTRY_TIMEOUT = 1
"""Seconds the kernel may cache names and attributes."""
BLOCK = 4096
"""st_blksize and statfs block size (loop devices take it as discard granularity)."""

Buffer = bytes | bytearray | memoryview
Reply = Sequence[Buffer] | None
Handler = Callable[[int, int, memoryview, int, "Buffers"], Reply]


class FuseError(ThinpoolError):
    """A FUSE mount or one of its files cannot do what was asked."""


class FileBusyError(FuseError):
    """The file is open (for example by a loop device) and cannot be removed."""


class Buffers:
    """One worker thread's buffers, reused for every request it handles.

    ``request`` is where to read a request: it starts 80 bytes before a page
    boundary, so a WRITE's payload lands page-aligned (ready for an export
    that uses O_DIRECT); ``data`` is a page-aligned buffer for READ payloads;
    ``small`` holds every other reply.
    """

    def __init__(self) -> None:
        page = mmap.PAGESIZE
        self._req_map = mmap.mmap(-1, page + MAX_WRITE + page)
        self.request = memoryview(self._req_map)[page - P.WRITE_PAYLOAD_OFFSET:]
        self._data_map = mmap.mmap(-1, MAX_WRITE)
        self.data = memoryview(self._data_map)
        self.header = bytearray(P.OUT_HEADER.size)
        self.small = bytearray(512)
        self.small_view = memoryview(self.small)
        self.write_reply = (self.small_view[:P.WRITE_REPLY.size],)


class FileEntry:
    """One file of the directory: a name, a node id, an export."""

    __slots__ = ("name", "bname", "nodeid", "export", "size", "read_only", "attr", "handles",
                 "removed", "_close_ticket")

    def __init__(self, name: str, nodeid: int, export: Export, now: int) -> None:
        self.name = name
        self.bname = name.encode()
        self.nodeid = nodeid
        self.export = export
        self.size: int = export.size
        self.read_only: bool = export.read_only
        mode = stat.S_IFREG | (0o400 if self.read_only else 0o600)
        self.attr = (nodeid, self.size, (self.size + 511) // 512, now, now, now, 0, 0, 0,
                     mode, 1, 0, 0, 0, BLOCK, 0)
        self.handles: set[int] = set()
        """fh of every open handle (set.add/discard are atomic)."""
        self.removed = False
        self._close_ticket = itertools.count()

    def close_export(self) -> None:
        """Close the export; only the first call (from any thread) does it."""
        if next(self._close_ticket) == 0:
            self.export.close()


class _Handle:
    __slots__ = ("entry", "export", "size", "writable", "dirty")

    def __init__(self, entry: FileEntry, writable: bool) -> None:
        self.entry = entry
        self.export = entry.export
        self.size = entry.size
        self.writable = writable
        self.dirty = False


def _check_name(name: object) -> bytes:
    if not isinstance(name, str):
        raise FuseError(f"file name must be a string, not {type(name).__name__}")
    try:
        b = name.encode()
    except UnicodeEncodeError:
        raise FuseError(f"file name {name!r} is not valid UTF-8") from None
    if not b or len(b) > 255 or b"/" in b or b"\0" in b or b in (b".", b".."):
        raise FuseError(f"bad file name {name!r}: 1-255 bytes, no '/' or NUL, not '.' or '..'")
    return b


class FuseSession:
    """The filesystem's state and request handling (see the module docstring).

    ``on_init(error)`` is called once INIT has been answered: with None when
    the kernel's protocol was accepted, else with the reason it was not.
    """

    def __init__(self, on_init: Callable[[str | None], None] | None = None) -> None:
        self._on_init = on_init
        self._start = int(time.time())
        self._root_attr = (P.ROOT_ID, 0, 0, self._start, self._start, self._start, 0, 0, 0,
                           stat.S_IFDIR | 0o755, 2, 0, 0, 0, BLOCK, 0)
        self._by_name: dict[bytes, FileEntry] = {}
        self._by_node: dict[int, FileEntry] = {}
        self._handles: dict[int, _Handle] = {}
        self._dirs: dict[int, list[tuple[bytes, FileEntry | None]]] = {}
        self._next_node = itertools.count(P.ROOT_ID + 1)
        self._next_fh = itertools.count(1)
        self._table_lock = threading.Lock()
        self._closed = threading.Condition()  # notified when a file's last handle is released
        self.kernel_minor = 0
        """The kernel's protocol minor version, once INIT arrived."""
        ops: dict[int, Handler] = {
            P.Op.LOOKUP: self._lookup, P.Op.FORGET: self._no_reply,
            P.Op.GETATTR: self._getattr, P.Op.SETATTR: self._setattr,
            P.Op.OPEN: self._open, P.Op.READ: self._read, P.Op.WRITE: self._write,
            P.Op.STATFS: self._statfs, P.Op.RELEASE: self._release, P.Op.FSYNC: self._fsync,
            P.Op.FLUSH: self._flush, P.Op.INIT: self._init, P.Op.OPENDIR: self._opendir,
            P.Op.READDIR: self._readdir, P.Op.RELEASEDIR: self._releasedir,
            P.Op.FSYNCDIR: self._fsyncdir, P.Op.ACCESS: self._access,
            P.Op.INTERRUPT: self._no_reply, P.Op.DESTROY: self._destroy,
            P.Op.NOTIFY_REPLY: self._no_reply, P.Op.BATCH_FORGET: self._no_reply,
            P.Op.FALLOCATE: self._fallocate, P.Op.READDIRPLUS: self._readdirplus,
        }
        self._ops_ready: list[Handler | None] = [ops.get(i) for i in range(max(ops) + 1)]
        self._ops: list[Handler | None] = [None] * (P.Op.INIT + 1)  # before INIT: only INIT
        self._ops[P.Op.INIT] = self._init
        self._min_len = [P.IN_HEADER.size] * len(self._ops_ready)
        """Shortest valid request per opcode: header plus fixed body."""
        for op, body in ((P.Op.LOOKUP, 2), (P.Op.FORGET, 8), (P.Op.GETATTR, 16),
                         (P.Op.SETATTR, P.SETATTR_IN.size), (P.Op.OPEN, P.OPEN_IN.size),
                         (P.Op.READ, P.READ_IN.size), (P.Op.WRITE, P.WRITE_IN.size),
                         (P.Op.RELEASE, P.RELEASE_IN.size), (P.Op.FSYNC, P.FSYNC_IN.size),
                         (P.Op.FLUSH, P.FLUSH_IN.size), (P.Op.INIT, P.INIT_IN.size),
                         (P.Op.OPENDIR, P.OPEN_IN.size), (P.Op.READDIR, P.READ_IN.size),
                         (P.Op.RELEASEDIR, P.RELEASE_IN.size), (P.Op.FSYNCDIR, P.FSYNC_IN.size),
                         (P.Op.ACCESS, P.ACCESS_IN.size), (P.Op.INTERRUPT, 8),
                         (P.Op.BATCH_FORGET, P.BATCH_FORGET_IN.size),
                         (P.Op.FALLOCATE, P.FALLOCATE_IN.size),
                         (P.Op.READDIRPLUS, P.READ_IN.size)):
            self._min_len[op] += body

    # ---- the file table (called by the mount, any thread) ----

    def add_file(self, name: str, export: Export) -> FileEntry:
        """Publish ``export`` as file ``name``; FuseError if the name is bad or taken."""
        bname = _check_name(name)
        size, read_only = getattr(export, "size", None), getattr(export, "read_only", None)
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise FuseError(f"export for {name!r} has no valid size (got {size!r})")
        if not isinstance(read_only, bool):
            raise FuseError(f"export for {name!r} has no boolean read_only (got {read_only!r})")
        with self._table_lock:
            if bname in self._by_name:
                raise FuseError(f"a file named {name!r} already exists")
            entry = FileEntry(name, next(self._next_node), export, int(time.time()))
            by_name = dict(self._by_name)
            by_name[bname] = entry
            by_node = dict(self._by_node)
            by_node[entry.nodeid] = entry
            self._by_node = by_node  # node first: a name that can be seen has its node
            self._by_name = by_name
        return entry

    def remove_file(self, name: str) -> FileEntry:
        """Unpublish file ``name`` and return its entry (the caller closes the
        export); FileBusyError while a handle is open, FuseError if absent."""
        bname = _check_name(name)
        with self._table_lock:
            entry = self._by_name.get(bname)
            if entry is None:
                raise FuseError(f"no file named {name!r}")
            entry.removed = True
            if entry.handles:
                entry.removed = False
                raise FileBusyError(
                    f"file {name!r} is open ({len(entry.handles)} handle(s), for example a loop "
                    f"device); detach or close it first")
            by_name = dict(self._by_name)
            del by_name[bname]
            by_node = dict(self._by_node)
            del by_node[entry.nodeid]
            self._by_name = by_name  # name first: a name that can be seen has its node
            self._by_node = by_node
        return entry

    def wait_closed(self, name: str, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds until file ``name`` has no open handle (or is gone);
        whether it has none."""
        entry = self._by_name.get(_check_name(name))
        with self._closed:
            return self._closed.wait_for(lambda: entry is None or not entry.handles, timeout)

    def files(self) -> dict[str, FileEntry]:
        """The current files by name."""
        return {e.name: e for e in self._by_name.values()}

    def open_handles(self, name: str) -> int:
        """How many open handles file ``name`` has (0 if there is no such file)."""
        entry = self._by_name.get(name.encode())
        return len(entry.handles) if entry is not None else 0

    # ---- requests ----

    def handle(self, req: memoryview, n: int, buf: Buffers) -> Reply:
        """Handle the ``n``-byte request at the start of ``req``; the reply to write."""
        if n < P.IN_HEADER.size:
            log.error("fuse: short request of %d bytes dropped", n)
            return None
        length, opcode, unique, nodeid = P.IN_HEADER_ROUTE.unpack_from(req)
        if length != n:
            log.error("fuse: request says %d bytes, got %d; dropped", length, n)
            return None
        ops = self._ops
        op = ops[opcode] if opcode < len(ops) else None
        if op is None:
            return self._error(buf, unique, errno.ENOSYS)
        if n < self._min_len[opcode]:
            log.error("fuse: %s request of %d bytes is too short", _opname(opcode), n)
            return self._error(buf, unique, errno.EINVAL)
        try:
            return op(unique, nodeid, req, n, buf)
        except DataPathError as e:
            err = e.errno if isinstance(e.errno, int) and 0 < e.errno < 4096 else errno.EIO
            if err == errno.EIO:
                log.warning("fuse: %s failed: %s", _opname(opcode), e)
            return self._error(buf, unique, err)
        except Exception:
            log.exception("fuse: internal error in %s, answered EIO", _opname(opcode))
            return self._error(buf, unique, errno.EIO)

    @staticmethod
    def _error(buf: Buffers, unique: int, err: int) -> Reply:
        P.OUT_HEADER.pack_into(buf.header, 0, P.OUT_HEADER.size, -err, unique)
        return (buf.header,)

    @staticmethod
    def _small(buf: Buffers, unique: int, st: struct.Struct, *values: int) -> Reply:
        n = P.OUT_HEADER.size + st.size
        P.OUT_HEADER.pack_into(buf.small, 0, n, 0, unique)
        st.pack_into(buf.small, P.OUT_HEADER.size, *values)
        return (buf.small_view[:n],)

    @staticmethod
    def _ok(buf: Buffers, unique: int) -> Reply:
        P.OUT_HEADER.pack_into(buf.header, 0, P.OUT_HEADER.size, 0, unique)
        return (buf.header,)

    def _no_reply(self, unique: int, nodeid: int, req: memoryview, n: int, buf: Buffers) -> Reply:
        return None

    def _init(self, unique: int, nodeid: int, req: memoryview, n: int, buf: Buffers) -> Reply:
        major, minor, max_readahead, flags = P.INIT_IN.unpack_from(req, P.IN_HEADER.size)
        if major > P.KERNEL_MAJOR:  # the kernel retries INIT with our major
            return self._small(buf, unique, P.INIT_OUT, P.KERNEL_MAJOR, P.OUR_MINOR,
                               0, 0, 0, 0, 0, 0, 0, 0, 0)
        if major < P.KERNEL_MAJOR or minor < P.MIN_MINOR:
            reason = (f"kernel FUSE protocol {major}.{minor} is too old "
                      f"(need {P.KERNEL_MAJOR}.{P.MIN_MINOR} or newer)")
            log.error("fuse: %s", reason)
            if self._on_init is not None:
                self._on_init(reason)
            return self._error(buf, unique, errno.EPROTO)
        self.kernel_minor = minor
        want = (P.FUSE_ASYNC_READ | P.FUSE_BIG_WRITES | P.FUSE_ASYNC_DIO | P.FUSE_MAX_PAGES
                | P.FUSE_DO_READDIRPLUS)
        reply = self._small(buf, unique, P.INIT_OUT, P.KERNEL_MAJOR, P.OUR_MINOR, max_readahead,
                            flags & want, MAX_BACKGROUND, MAX_BACKGROUND * 3 // 4, MAX_WRITE, 1,
                            MAX_PAGES, 0, 0)
        self._ops = self._ops_ready
        if self._on_init is not None:
            self._on_init(None)
        return reply

    def _destroy(self, unique: int, nodeid: int, req: memoryview, n: int, buf: Buffers) -> Reply:
        return self._ok(buf, unique)

    def _attr(self, nodeid: int) -> tuple[int, ...] | None:
        if nodeid == P.ROOT_ID:
            return self._root_attr
        entry = self._by_node.get(nodeid)
        return entry.attr if entry is not None else None

    def _lookup(self, unique: int, nodeid: int, req: memoryview, n: int, buf: Buffers) -> Reply:
        if nodeid != P.ROOT_ID:
            return self._error(buf, unique, errno.ENOTDIR)
        entry = self._by_name.get(bytes(req[P.IN_HEADER.size:n]).rstrip(b"\0"))
        if entry is None:
            return self._error(buf, unique, errno.ENOENT)
        return self._small(buf, unique, P.ENTRY_OUT, entry.nodeid, 0, ENTRY_TIMEOUT,
                           ENTRY_TIMEOUT, 0, 0, *entry.attr)

    def _getattr(self, unique: int, nodeid: int, req: memoryview, n: int, buf: Buffers) -> Reply:
        attr = self._attr(nodeid)
        if attr is None:
            return self._error(buf, unique, errno.ENOENT)
        return self._small(buf, unique, P.ATTR_OUT, ENTRY_TIMEOUT, 0, 0, *attr)

    def _setattr(self, unique: int, nodeid: int, req: memoryview, n: int, buf: Buffers) -> Reply:
        attr = self._attr(nodeid)
        if attr is None:
            return self._error(buf, unique, errno.ENOENT)
        f = P.SETATTR_IN.unpack_from(req, P.IN_HEADER.size)
        valid, size, mode, uid, gid = f[0], f[3], f[11], f[13], f[14]
        if ((valid & P.FATTR_SIZE and size != attr[1])
                or (valid & P.FATTR_MODE and stat.S_IMODE(mode) != stat.S_IMODE(attr[9]))
                or (valid & P.FATTR_UID and uid != attr[11])
                or (valid & P.FATTR_GID and gid != attr[12])):
            return self._error(buf, unique, errno.EPERM)
        return self._small(buf, unique, P.ATTR_OUT, ENTRY_TIMEOUT, 0, 0, *attr)

    def _open(self, unique: int, nodeid: int, req: memoryview, n: int, buf: Buffers) -> Reply:
        entry = self._by_node.get(nodeid)
        if entry is None:
            return self._error(buf, unique, errno.EISDIR if nodeid == P.ROOT_ID else errno.ENOENT)
        flags = P.OPEN_IN.unpack_from(req, P.IN_HEADER.size)[0]
        writable = flags & P.O_ACCMODE != os.O_RDONLY
        if writable and entry.read_only:
            return self._error(buf, unique, errno.EROFS)
        fh = next(self._next_fh)
        entry.handles.add(fh)
        if entry.removed:  # lost the race against remove_file
            entry.handles.discard(fh)
            return self._error(buf, unique, errno.ENOENT)
        self._handles[fh] = _Handle(entry, writable)
        return self._small(buf, unique, P.OPEN_OUT, fh,
                           P.FOPEN_DIRECT_IO | P.FOPEN_PARALLEL_DIRECT_WRITES, 0)

    def _release(self, unique: int, nodeid: int, req: memoryview, n: int, buf: Buffers) -> Reply:
        fh = P.RELEASE_IN.unpack_from(req, P.IN_HEADER.size)[0]
        h = self._handles.pop(fh, None)
        if h is not None:
            try:
                if h.dirty:  # a loop device is released without a FLUSH
                    h.export.flush()
            except Exception:  # nobody waits for a RELEASE's answer: log it
                log.exception("fuse: flushing %r on its last close failed", h.entry.name)
            finally:
                h.entry.handles.discard(fh)
                if not h.entry.handles:
                    with self._closed:
                        self._closed.notify_all()
        return self._ok(buf, unique)

    def _read(self, unique: int, nodeid: int, req: memoryview, n: int, buf: Buffers) -> Reply:
        fh, offset, size = P.READ_IN_HOT.unpack_from(req, P.IN_HEADER.size)
        h = self._handles.get(fh)
        if h is None:
            return self._error(buf, unique, errno.EBADF)
        if size > MAX_WRITE:
            return self._error(buf, unique, errno.EINVAL)
        count = min(size, h.size - offset) if offset < h.size else 0
        data = buf.data[:count]
        if count:
            h.export.readinto(offset, data)
        P.OUT_HEADER.pack_into(buf.header, 0, P.OUT_HEADER.size + count, 0, unique)
        return (buf.header, data)

    def _write(self, unique: int, nodeid: int, req: memoryview, n: int, buf: Buffers) -> Reply:
        fh, offset, size, flags = P.WRITE_IN_HOT.unpack_from(req, P.IN_HEADER.size)
        h = self._handles.get(fh)
        if h is None:
            return self._error(buf, unique, errno.EBADF)
        if not h.writable:
            return self._error(buf, unique, errno.EBADF)
        if n - P.WRITE_PAYLOAD_OFFSET < size:
            return self._error(buf, unique, errno.EINVAL)
        if offset >= h.size:
            return self._error(buf, unique, errno.ENOSPC)
        count = min(size, h.size - offset)
        h.dirty = True
        h.export.write(offset, req[P.WRITE_PAYLOAD_OFFSET:P.WRITE_PAYLOAD_OFFSET + count],
                       bool(flags & P.O_DSYNC))
        P.WRITE_REPLY.pack_into(buf.small, 0, P.WRITE_REPLY.size, 0, unique, count, 0)
        return buf.write_reply

    def _flush(self, unique: int, nodeid: int, req: memoryview, n: int, buf: Buffers) -> Reply:
        h = self._handles.get(P.FLUSH_IN.unpack_from(req, P.IN_HEADER.size)[0])
        if h is not None and h.dirty:
            h.dirty = False
            try:
                h.export.flush()
            except BaseException:
                h.dirty = True
                raise
        return self._ok(buf, unique)

    def _fsync(self, unique: int, nodeid: int, req: memoryview, n: int, buf: Buffers) -> Reply:
        h = self._handles.get(P.FSYNC_IN.unpack_from(req, P.IN_HEADER.size)[0])
        if h is None:
            return self._error(buf, unique, errno.EBADF)
        h.dirty = False
        try:
            h.export.flush()
        except BaseException:
            h.dirty = True
            raise
        return self._ok(buf, unique)

    def _fsyncdir(self, unique: int, nodeid: int, req: memoryview, n: int, buf: Buffers) -> Reply:
        for entry in self._by_name.values():
            if not entry.read_only:
                entry.export.flush()
        return self._ok(buf, unique)

    def _fallocate(self, unique: int, nodeid: int, req: memoryview, n: int, buf: Buffers) -> Reply:
        fh, offset, length, mode = P.FALLOCATE_IN.unpack_from(req, P.IN_HEADER.size)[:4]
        h = self._handles.get(fh)
        if h is None or not h.writable:
            return self._error(buf, unique, errno.EBADF)
        kind = mode & ~P.FALLOC_FL_KEEP_SIZE
        if kind == P.FALLOC_FL_PUNCH_HOLE and mode & P.FALLOC_FL_KEEP_SIZE:
            may_trim = True
        elif kind == P.FALLOC_FL_ZERO_RANGE:
            may_trim = False
        else:
            return self._error(buf, unique, errno.EOPNOTSUPP)
        end = offset + length
        if end > h.size:
            if not mode & P.FALLOC_FL_KEEP_SIZE:
                return self._error(buf, unique, errno.ENOSPC)
            end = h.size
        if end > offset:
            h.dirty = True
            h.export.write_zeroes(offset, end - offset, may_trim, False, False)
        return self._ok(buf, unique)

    def _statfs(self, unique: int, nodeid: int, req: memoryview, n: int, buf: Buffers) -> Reply:
        files = self._by_name.values()
        blocks = sum((e.size + BLOCK - 1) // BLOCK for e in files)
        return self._small(buf, unique, P.STATFS_OUT, blocks, 0, 0, len(files) + 1, 0,
                           BLOCK, 255, BLOCK, 0)

    def _access(self, unique: int, nodeid: int, req: memoryview, n: int, buf: Buffers) -> Reply:
        mask = P.ACCESS_IN.unpack_from(req, P.IN_HEADER.size)[0]
        entry = self._by_node.get(nodeid)
        if entry is None and nodeid != P.ROOT_ID:
            return self._error(buf, unique, errno.ENOENT)
        if entry is not None and entry.read_only and mask & os.W_OK:
            return self._error(buf, unique, errno.EROFS)
        return self._ok(buf, unique)

    def _opendir(self, unique: int, nodeid: int, req: memoryview, n: int, buf: Buffers) -> Reply:
        if nodeid != P.ROOT_ID:
            return self._error(buf, unique,
                               errno.ENOTDIR if nodeid in self._by_node else errno.ENOENT)
        listing: list[tuple[bytes, FileEntry | None]] = [(b".", None), (b"..", None)]
        listing += sorted(self._by_name.items())
        fh = next(self._next_fh)
        self._dirs[fh] = listing
        return self._small(buf, unique, P.OPEN_OUT, fh, 0, 0)

    def _releasedir(self, unique: int, nodeid: int, req: memoryview, n: int, buf: Buffers) -> Reply:
        self._dirs.pop(P.RELEASE_IN.unpack_from(req, P.IN_HEADER.size)[0], None)
        return self._ok(buf, unique)

    def _readdir(self, unique: int, nodeid: int, req: memoryview, n: int, buf: Buffers) -> Reply:
        return self._list(unique, req, buf, plus=False)

    def _readdirplus(self, unique: int, nodeid: int, req: memoryview, n: int,
                     buf: Buffers) -> Reply:
        return self._list(unique, req, buf, plus=True)

    def _list(self, unique: int, req: memoryview, buf: Buffers, plus: bool) -> Reply:
        fh, offset, size = P.READ_IN.unpack_from(req, P.IN_HEADER.size)[:3]
        listing = self._dirs.get(fh)
        if listing is None:
            return self._error(buf, unique, errno.EBADF)
        out = bytearray()
        for index in range(offset, len(listing)):
            name, entry = listing[index]
            rec = P.dirent_size(len(name), plus)
            if len(out) + rec > size:
                break
            start = len(out)
            out += bytes(rec)
            attr = entry.attr if entry is not None else self._root_attr
            pos = start
            if plus:
                if entry is not None:  # "." and ".." get a zero entry: no lookup is counted
                    P.ENTRY_OUT.pack_into(out, pos, entry.nodeid, 0, ENTRY_TIMEOUT,
                                          ENTRY_TIMEOUT, 0, 0, *attr)
                pos += P.ENTRY_OUT.size
            P.DIRENT.pack_into(out, pos, attr[0], index + 1, len(name), P.dirent_type(attr[9]))
            pos += P.DIRENT.size
            out[pos:pos + len(name)] = name
        P.OUT_HEADER.pack_into(buf.header, 0, P.OUT_HEADER.size + len(out), 0, unique)
        return (buf.header, out)


def _opname(opcode: int) -> str:
    try:
        return P.Op(opcode).name
    except ValueError:
        return f"opcode {opcode}"
