"""A raw sparse file as an NBD export: the tests' (and nbd_bench's) backend.

Extents come from SEEK_DATA/SEEK_HOLE, TRIM punches holes, WRITE_ZEROES
punches (may_trim) or uses FALLOC_FL_ZERO_RANGE (stays allocated), FUA
writes use RWF_DSYNC. Not a test module.
"""

from __future__ import annotations

import ctypes
import errno
import os
import threading
from pathlib import Path

from thinpool.errors import DataPathError
from thinpool.nbd.backend import NBD_STATE_HOLE, NBD_STATE_ZERO, ExportNotFound

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _libc.fallocate(fd, mode, offset, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def _fail(e: OSError, what: str) -> DataPathError:
    return DataPathError(e.errno or errno.EIO, f"{what}: {e.strerror}")


class FileExport:
    """One connection's view of a raw file (own fd; the page cache is shared,
    so multi-conn holds)."""

    def __init__(self, path: str | os.PathLike[str], *, read_only: bool = False,
                 block_sizes: tuple[int, int, int] = (1, 4096, 32 << 20),
                 description: str = "", calls: list[tuple[str, int, int]] | None = None) -> None:
        self.fd = os.open(path, os.O_RDONLY if read_only else os.O_RDWR)
        self.size = os.fstat(self.fd).st_size
        self.read_only = read_only
        self.can_trim = self.can_zero = self.can_fast_zero = not read_only
        self.can_cache = True
        self.can_multi_conn = True
        self.block_sizes = block_sizes
        self.description = description
        self.calls = calls  # a shared log of (method, offset, length) when given
        self.closed = False

    def _log(self, what: str, offset: int, length: int) -> None:
        if self.calls is not None:
            self.calls.append((what, offset, length))

    def readinto(self, offset: int, buf: memoryview) -> None:
        got = 0
        try:
            while got < len(buf):
                n = os.preadv(self.fd, [buf[got:]], offset + got)
                if n == 0:
                    buf[got:] = bytes(len(buf) - got)
                    break
                got += n
        except OSError as e:
            raise _fail(e, "read") from None

    def write(self, offset: int, data: memoryview, fua: bool) -> None:
        self._log("write_fua" if fua else "write", offset, len(data))
        flags = os.RWF_DSYNC if fua else 0
        done = 0
        try:
            while done < len(data):
                done += os.pwritev(self.fd, [data[done:]], offset + done, flags)
        except OSError as e:
            raise _fail(e, "write") from None

    def flush(self) -> None:
        self._log("flush", 0, 0)
        try:
            os.fdatasync(self.fd)
        except OSError as e:
            raise _fail(e, "flush") from None

    def trim(self, offset: int, length: int, fua: bool) -> None:
        self._log("trim", offset, length)
        try:
            fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
            if fua:
                os.fdatasync(self.fd)
        except OSError as e:
            raise _fail(e, "trim") from None

    def write_zeroes(self, offset: int, length: int, may_trim: bool, fast_only: bool,
                     fua: bool) -> None:
        self._log("zero_trim" if may_trim else "zero", offset, length)
        mode = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE if may_trim else FALLOC_FL_ZERO_RANGE
        try:
            try:
                fallocate(self.fd, mode, offset, length)
            except OSError as e:
                if e.errno != errno.EOPNOTSUPP:
                    raise
                if fast_only:
                    raise DataPathError(errno.EOPNOTSUPP, "cannot zero fast here") from None
                zeros = bytes(min(length, 1 << 20))
                done = 0
                while done < length:
                    done += os.pwrite(self.fd, zeros[:length - done], offset + done)
            if fua:
                os.fdatasync(self.fd)
        except OSError as e:
            raise _fail(e, "zero") from None

    def extents(self, offset: int, length: int) -> list[tuple[int, int]]:
        end = min(offset + length, self.size)
        out: list[tuple[int, int]] = []
        pos = offset
        try:
            while pos < end and len(out) < 1024:
                try:
                    data = os.lseek(self.fd, pos, os.SEEK_DATA)
                except OSError as e:
                    if e.errno != errno.ENXIO:
                        raise
                    data = end
                if data > pos:
                    n = min(data, end) - pos
                    out.append((n, NBD_STATE_HOLE | NBD_STATE_ZERO))
                    pos += n
                    continue
                hole = os.lseek(self.fd, pos, os.SEEK_HOLE)
                n = min(hole, end) - pos
                out.append((n, 0))
                pos += n
        except OSError as e:
            raise _fail(e, "extents") from None
        return out

    def cache(self, offset: int, length: int) -> None:
        self._log("cache", offset, length)
        os.posix_fadvise(self.fd, offset, length, os.POSIX_FADV_WILLNEED)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            os.close(self.fd)


class FileCatalog:
    """Exports = files in a mapping name -> path; tracks open exports.  A subclass may set
    ``export_type`` to serve its exports with a subclass of ``FileExport``."""

    export_type: type[FileExport] = FileExport

    def __init__(self, files: dict[str, Path], *, read_only: frozenset[str] = frozenset(),
                 block_sizes: tuple[int, int, int] = (1, 4096, 32 << 20)) -> None:
        self.files = files
        self.read_only = read_only
        self.block_sizes = block_sizes
        self.calls: list[tuple[str, int, int]] = []
        self.opened: list[FileExport] = []
        self._lock = threading.Lock()

    def list_exports(self) -> list[tuple[str, str]]:
        return [(name, f"raw file {path.name}") for name, path in self.files.items()]

    def open_export(self, name: str) -> FileExport:
        path = self.files.get(name)
        if path is None:
            raise ExportNotFound(f"no export named {name!r}")
        export = self.export_type(path, read_only=name in self.read_only, block_sizes=self.block_sizes,
                            description=f"raw file {path.name}", calls=self.calls)
        with self._lock:
            self.opened.append(export)
        return export

    def open_count(self) -> int:
        with self._lock:
            return sum(not e.closed for e in self.opened)
