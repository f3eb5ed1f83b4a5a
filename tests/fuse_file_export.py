"""A raw sparse file as a FUSE export: the tests' (and fuse_bench's) backend.

Reads and writes are pread/pwrite on the file (through the host page cache),
FUA writes use RWF_DSYNC, flush is fdatasync, write_zeroes punches a hole
(may_trim) or uses FALLOC_FL_ZERO_RANGE (stays allocated). Every call but
reads is counted in ``counts``; ``fail`` makes chosen methods raise a given
DataPathError. Not a test module.
"""

from __future__ import annotations

import ctypes
import errno
import os
import threading
from collections import Counter

from thinpool.errors import DataPathError

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
    """A raw file served as one volume."""

    def __init__(self, path: str | os.PathLike[str], *, read_only: bool = False,
                 count: bool = True) -> None:
        self.fd = os.open(path, os.O_RDONLY if read_only else os.O_RDWR)
        self.size = os.fstat(self.fd).st_size
        self.read_only = read_only
        self.counts: Counter[str] = Counter()
        """Calls by kind: write, write_fua, flush, zero_trim, zero, plus bytes_zero_trim."""
        self.fail: dict[str, DataPathError] = {}
        """Method name -> the error it raises instead of working."""
        self.closed = 0
        self._count = count
        self._lock = threading.Lock()

    def _note(self, what: str, nbytes: int = 0) -> None:
        if self._count:
            with self._lock:
                self.counts[what] += 1
                if nbytes:
                    self.counts["bytes_" + what] += nbytes
        err = self.fail.get(what)
        if err is not None:
            raise err

    def readinto(self, offset: int, buf: memoryview) -> None:
        if self.fail:
            self._note("read")
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
        self._note("write_fua" if fua else "write")
        flags = os.RWF_DSYNC if fua else 0
        done = 0
        try:
            while done < len(data):
                done += os.pwritev(self.fd, [data[done:]], offset + done, flags)
        except OSError as e:
            raise _fail(e, "write") from None

    def flush(self) -> None:
        self._note("flush")
        try:
            os.fdatasync(self.fd)
        except OSError as e:
            raise _fail(e, "flush") from None

    def write_zeroes(self, offset: int, length: int, may_trim: bool, fast_only: bool,
                     fua: bool) -> None:
        self._note("zero_trim" if may_trim else "zero", length)
        mode = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE if may_trim else FALLOC_FL_ZERO_RANGE
        try:
            fallocate(self.fd, mode, offset, length)
            if fua:
                os.fdatasync(self.fd)
        except OSError as e:
            raise _fail(e, "zero") from None

    def close(self) -> None:
        self.closed += 1
        if self.closed == 1:
            os.close(self.fd)
