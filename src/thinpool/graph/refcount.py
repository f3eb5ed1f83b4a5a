"""Reference counting of get/put, and per-layer locks (Docker's RefCounter and locker).

``RefCounter`` counts holds per key (a layer's mount path). The first time a
key is seen, or again after its count dropped to zero, the checker is asked
whether the path is already mounted (a mount left by an earlier process: a
``thinpool graph get``, a restarted plugin): if it is, counting starts at 1.
So a driver mounts on 0 -> 1 and unmounts on 1 -> 0, also across restarts.
For drivers that never mount, the checker says "not mounted" and the
counts live only in the process.

``KeyedLock`` serializes operations on one layer id while different ids
proceed in parallel.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Callable, Iterator


class RefCounter:
    """Counts keyed by mount path, seeded from ``is_mounted(path)`` (thread-safe)."""

    def __init__(self, is_mounted: Callable[[str], bool]) -> None:
        self._is_mounted = is_mounted
        self._counts: dict[str, int] = {}
        self._lock = threading.Lock()

    def _current(self, path: str) -> int:
        count = self._counts.get(path)
        if count is None:
            count = 1 if self._is_mounted(path) else 0
        return count

    def increment(self, path: str) -> int:
        """Add a hold; the new count (1 means the caller must mount)."""
        with self._lock:
            count = self._current(path) + 1
            self._counts[path] = count
            return count

    def decrement(self, path: str) -> int:
        """Drop a hold; the new count (0 means the caller must unmount; never below 0)."""
        with self._lock:
            count = max(self._current(path) - 1, 0)
            if count:
                self._counts[path] = count
            else:
                self._counts.pop(path, None)
            return count

    def count(self, path: str) -> int:
        """The current count (seeding it from the mount table if the path is new)."""
        with self._lock:
            count = self._current(path)
            if count:
                self._counts[path] = count
            return count

    def forget(self, path: str) -> None:
        """Drop the count (after the path was unmounted behind the counter's back, e.g. cleanup)."""
        with self._lock:
            self._counts.pop(path, None)


class KeyedLock:
    """One lock per key, created on demand and dropped when nobody uses it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._locks: dict[str, tuple[threading.RLock, int]] = {}

    @contextmanager
    def hold(self, *keys: str) -> Iterator[None]:
        """Hold the locks of ``keys`` (taken in sorted order, so two callers cannot deadlock)."""
        ordered = sorted(set(keys))
        taken: list[str] = []
        try:
            for key in ordered:
                with self._lock:
                    lock, users = self._locks.get(key, (threading.RLock(), 0))
                    self._locks[key] = (lock, users + 1)
                lock.acquire()
                taken.append(key)
            yield
        finally:
            for key in reversed(taken):
                with self._lock:
                    lock, users = self._locks[key]
                    lock.release()
                    if users == 1:
                        del self._locks[key]
                    else:
                        self._locks[key] = (lock, users - 1)
