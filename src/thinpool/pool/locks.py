"""One process at a time opens a pool read-write.

``PoolLock`` is an flock on DIR/lock, which also records the owner's pid for
the error message.  (The data path's thread-level locks are in ``block.locks``.)
"""

from __future__ import annotations

import fcntl
import os
from ..errors import ThinpoolError


class PoolBusyError(ThinpoolError):
    pass


class PoolLock:
    def __init__(self, directory: str) -> None:
        self.path = os.path.join(directory, "lock")
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(self.fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(self.fd)
            raise PoolBusyError(f"pool {directory} is in use by pid {owner}") from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        if self.fd >= 0:
            os.ftruncate(self.fd, 0)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = -1
