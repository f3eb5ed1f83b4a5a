"""What a snapshotter backend does: storage for snapshots, and the mounts that reach it.

The core (``core.Snapshotter``) owns the records and the order of
operations; a backend owns the storage named by a snapshot's integer id (a
directory, a thin device).  Every method is called with the core's records,
ancestors nearest first.  A backend never tells a client anything: it
raises ``SnapshotterError`` subclasses and the core passes them on.

The crash contract: ``create`` may be interrupted at any point and is then
undone by ``remove`` of the same id (which must accept storage in any
half-made state, or none); ``remove`` may be interrupted and is then run
again.  ``stored`` lists the ids that have storage, so the core can find
what no record names (``Cleanup``).
"""

from __future__ import annotations

import os
import stat
from abc import ABC, abstractmethod
from dataclasses import dataclass

from .store import Record


@dataclass(frozen=True)
class Mount:
    """One entry of containerd's mount list (``containerd.types.Mount``)."""

    type: str
    source: str
    options: tuple[str, ...] = ()


@dataclass(frozen=True)
class Usage:
    size: int
    inodes: int


class Backend(ABC):
    """Storage for snapshots (see the module docstring)."""

    name: str = ""

    @abstractmethod
    def open(self, transaction: int | None) -> int | None:
        """Start (make what is missing); check ``transaction`` (the records' last) against the
        backend's; return the backend's transaction id now, or None if it keeps none."""

    @property
    def transaction(self) -> int | None:
        """The backend's transaction id after its last change (None: it keeps none)."""
        return None

    @abstractmethod
    def create(self, rec: Record, parents: list[Record]) -> None:
        """Storage for a new active or view snapshot ``rec`` on top of ``parents``."""

    @abstractmethod
    def mounts(self, rec: Record, parents: list[Record]) -> list[Mount]:
        """What containerd mounts to reach an active or view snapshot."""

    @abstractmethod
    def commit(self, rec: Record, parents: list[Record]) -> Usage | None:
        """Active ``rec`` becomes read-only storage of a committed snapshot; its usage, or
        None when ``usage`` will tell it later (and for good: it no longer changes)."""

    @abstractmethod
    def usage(self, rec: Record, parents: list[Record]) -> Usage:
        """Space used by ``rec`` itself (not its parents)."""

    @abstractmethod
    def check_idle(self, rec: Record) -> None:
        """``FailedPrecondition`` if ``rec``'s storage is in use (mounted) so that it cannot
        be committed or removed."""

    @abstractmethod
    def remove(self, sid: int) -> None:
        """Remove snapshot ``sid``'s storage, whatever state it is in; missing is fine."""

    @abstractmethod
    def stored(self) -> set[int]:
        """Ids of every snapshot that has storage (orphans included)."""

    def release_idle(self, committed: set[int]) -> None:
        """Let go of what is still held for ``committed`` snapshots that nothing uses any more
        (run by ``Cleanup``)."""

    def close(self) -> None:
        """Stop (the snapshotter is shutting down)."""


def disk_usage(path: str) -> Usage:
    """containerd's ``fs.DiskUsage``: allocated bytes and inodes below ``path`` (itself
    included), a hard-linked inode counted once; nothing is followed."""
    st = os.lstat(path)
    seen = {st.st_ino}
    stack = [path]
    size, inodes = st.st_blocks * 512, 1
    while stack:
        with os.scandir(stack.pop()) as it:
            for entry in it:
                st = entry.stat(follow_symlinks=False)
                if st.st_ino in seen:
                    continue
                seen.add(st.st_ino)
                inodes += 1
                size += st.st_blocks * 512
                if stat.S_ISDIR(st.st_mode):
                    stack.append(entry.path)
    return Usage(size, inodes)
