"""Process and thread coordination for a pool.

* ``PoolLock``: one process at a time opens a pool read-write (flock on
  DIR/lock, which also records the owner's pid for the error message).
* ``SharedExclusiveLock``: volume I/O runs shared; commits, snapshots and
  deletes run exclusive, so no read or write is in flight while a data block
  could change owner (a block freed in a transaction becomes reusable only
  after the commit, and the commit waits for every in-flight I/O).
"""

from __future__ import annotations

import fcntl
import os
import threading
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


class _Guard:
    """Reusable context manager for one side of a SharedExclusiveLock (no generator cost)."""

    __slots__ = ("_acquire", "_release")

    def __init__(self, acquire, release) -> None:  # type: ignore[no-untyped-def]
        self._acquire, self._release = acquire, release

    def __enter__(self) -> None:
        self._acquire()

    def __exit__(self, *exc: object) -> None:
        self._release()


class SharedExclusiveLock:
    """Many shared holders or one exclusive holder; exclusive waiters go first."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._shared = 0
        self._exclusive = False
        self._waiting_exclusive = 0
        self._shared_guard = _Guard(self._acquire_shared, self._release_shared)
        self._exclusive_guard = _Guard(self._acquire_exclusive, self._release_exclusive)

    def shared(self) -> _Guard:
        return self._shared_guard

    def exclusive(self) -> _Guard:
        return self._exclusive_guard

    def _acquire_shared(self) -> None:
        with self._cond:
            while self._exclusive or self._waiting_exclusive:
                self._cond.wait()
            self._shared += 1

    def _release_shared(self) -> None:
        with self._cond:
            self._shared -= 1
            if self._shared == 0:
                self._cond.notify_all()

    def _acquire_exclusive(self) -> None:
        with self._cond:
            self._waiting_exclusive += 1
            while self._exclusive or self._shared:
                self._cond.wait()
            self._waiting_exclusive -= 1
            self._exclusive = True

    def _release_exclusive(self) -> None:
        with self._cond:
            self._exclusive = False
            self._cond.notify_all()
