"""Locks of the data path.

* ``RangeLock``: the kernel's "bio prison" for one thin device.  I/O that
  only reads or overwrites provisioned blocks holds its block range shared;
  I/O that changes a block's mapping (provisioning, copy-on-write, discard,
  snapshot of the device) holds it exclusive.  Unrelated blocks and other
  devices never wait for each other.
* ``SharedExclusiveLock``: many shared holders or one exclusive holder.  The
  pool's *provision gate* is one: everything that changes mappings holds it
  shared for its whole duration (allocation, copy, data write, mapping), a
  commit holds it exclusive for the short final data sync and the metadata
  commit, so no half-made mapping is ever committed.  Reads and overwrites
  of provisioned blocks never touch it.

Lock order, to stay free of deadlocks: provision gate, then range locks,
then the metadata lock (innermost, never held across I/O that can block).
Waiting exclusive requests go first: a stream of shared holders cannot
starve them.
"""

from __future__ import annotations

import threading


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
        self._shared_guard = _Guard(self.acquire_shared, self.release_shared)
        self._exclusive_guard = _Guard(self.acquire_exclusive, self.release_exclusive)

    def shared(self) -> _Guard:
        return self._shared_guard

    def exclusive(self) -> _Guard:
        return self._exclusive_guard

    def acquire_shared(self) -> None:
        with self._cond:
            while self._exclusive or self._waiting_exclusive:
                self._cond.wait()
            self._shared += 1

    def release_shared(self) -> None:
        with self._cond:
            self._shared -= 1
            if self._shared == 0:
                self._cond.notify_all()

    def acquire_exclusive(self) -> None:
        with self._cond:
            self._waiting_exclusive += 1
            while self._exclusive or self._shared:
                self._cond.wait()
            self._waiting_exclusive -= 1
            self._exclusive = True

    def release_exclusive(self) -> None:
        with self._cond:
            self._exclusive = False
            self._cond.notify_all()


class _Hold:
    """One granted (or waiting) range: blocks [lo, hi], shared or exclusive."""

    __slots__ = ("lo", "hi", "exclusive", "granted")

    def __init__(self, lo: int, hi: int, exclusive: bool) -> None:
        self.lo, self.hi, self.exclusive, self.granted = lo, hi, exclusive, False


class RangeLock:
    """Shared/exclusive locks on inclusive block ranges of one device.

    ``acquire`` returns a token for ``release``.  A shared request waits for
    overlapping exclusive holders and for overlapping exclusive requests that
    came first; an exclusive request waits for every overlapping holder.  The
    number of holders at once is small (the I/O in flight on one device), so
    a list scan beats any tree.
    """

    WHOLE = (0, (1 << 64) - 1)

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._changed = threading.Condition(self._mutex)
        self._holds: list[_Hold] = []  # granted and waiting, in arrival order

    def _blocked(self, req: _Hold) -> bool:
        """Whether a conflicting hold is granted, or waits and came first (FIFO fairness)."""
        before = True
        for h in self._holds:
            if h is req:
                before = False
            elif (before or h.granted) and h.lo <= req.hi and req.lo <= h.hi and \
                    (req.exclusive or h.exclusive):
                return True
        return False

    def acquire(self, lo: int, hi: int, exclusive: bool) -> _Hold:
        req = _Hold(lo, hi, exclusive)
        with self._mutex:
            self._holds.append(req)
            if self._blocked(req):
                try:
                    while self._blocked(req):
                        self._changed.wait()
                except BaseException:
                    self._holds.remove(req)
                    self._changed.notify_all()
                    raise
            req.granted = True
        return req

    def try_acquire(self, lo: int, hi: int, exclusive: bool) -> _Hold | None:
        """``acquire`` if that would not wait, else None (nothing queued).  Never waiting, it
        may be called with other ranges of the device held (no lock order to keep)."""
        req = _Hold(lo, hi, exclusive)
        with self._mutex:
            self._holds.append(req)
            if self._blocked(req):
                self._holds.remove(req)
                return None
            req.granted = True
        return req

    def release(self, hold: _Hold) -> None:
        with self._mutex:
            self._holds.remove(hold)
            if self._holds:
                self._changed.notify_all()
