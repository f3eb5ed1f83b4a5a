"""Directory backends: ``overlay2`` (kernel overlayfs) and ``vfs`` (full copies, bind mounts).

Both keep snapshot ``N`` in ``ROOT/snapshots/N/``; the snapshotter returns
mount specifications and containerd mounts them, so no mount is left behind
by the snapshotter itself (containerd's own ``overlayfs`` and ``native``
snapshotters work the same way; these backends reuse the graph drivers'
tree copy and removal helpers, not their mount management, which mounts
layers itself).

* ``overlay2``: ``N/fs`` is the snapshot's upper directory and ``N/work``
  overlayfs's work directory.  An active snapshot with parents is an
  ``overlay`` mount (``lowerdir`` = the parents' ``fs``, nearest first;
  ``upperdir``, ``workdir``; ``index=off`` when the kernel has the option,
  ``userxattr`` in a user namespace); without parents, a ``bind`` mount of
  ``fs``.  A view of one parent is a read-only bind mount of the parent's
  ``fs``; of more, an overlay with ``lowerdir`` only.  Committing changes
  nothing on disk.  containerd shortens long ``lowerdir`` lists itself
  (relative paths when the options pass a page), so 128 layers mount.
* ``vfs``: ``N/fs`` is a full copy of the parent's tree (owners, modes,
  xattrs, times, hard links), reached by a bind mount (``ro`` for a view).

Removal renames ``N`` to ``.rm-N`` first, so an interrupted removal leaves
nothing that looks like a snapshot; ``.rm-*`` are finished by ``Cleanup``.
"""

from __future__ import annotations

import errno
import os

from ..linux import mounts as sysmount
from ..graph.driver import NotSupported
from ..graph.fsutil import copy_tree, remove_tree
from ..graph.overlay2 import check_overlay
from .backend import Backend, Mount, Usage, disk_usage
from .errors import FailedPrecondition, ResourceExhausted
from .store import ACTIVE, VIEW, Record

SNAPSHOTS = "snapshots"
REMOVING = ".rm-"


def _in_user_namespace() -> bool:
    try:
        with open("/proc/self/uid_map", encoding="ascii") as f:
            return f.read().split() != ["0", "0", "4294967295"]
    except OSError:
        return False


def _no_space(e: OSError, what: str) -> Exception:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return ResourceExhausted(f"{what}: no space left on the snapshotter's filesystem")
    return e


class DirBackend(Backend):
    """Shared layout and life cycle of the directory backends (which take no options)."""

    def __init__(self, root: str, options: dict[str, str]) -> None:
        if options:
            raise FailedPrecondition(f"the {self.name} backend takes no storage options (got "
                                     f"{', '.join(sorted(options))})")
        self.root = root
        self.dir = os.path.join(root, SNAPSHOTS)

    def path(self, sid: int) -> str:
        return os.path.join(self.dir, str(sid))

    def fs(self, sid: int) -> str:
        return os.path.join(self.dir, str(sid), "fs")

    def open(self, transaction: int | None) -> int | None:
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        return None

    def _make(self, rec: Record) -> str:
        """``N/`` and ``N/fs`` (mode 0755 whatever the umask)."""
        base = self.path(rec.id)
        try:
            os.mkdir(base, 0o700)
            fs = os.path.join(base, "fs")
            os.mkdir(fs, 0o755)
            os.chmod(fs, 0o755)
        except OSError as e:
            raise _no_space(e, f"creating snapshot {rec.key}") from None
        return fs

    def users(self, sid: int) -> list[str]:
        """Mount points that use snapshot ``sid``: bind mounts of its ``fs``, overlays with it
        as upper or lower directory, anything mounted inside it."""
        fs = self.fs(sid)
        out = []
        for e in sysmount.mountinfo():
            if e.fstype == "overlay":
                dirs = [d for opt in e.super_options.split(",")
                        if opt.startswith(("upperdir=", "lowerdir="))
                        for d in opt.partition("=")[2].split(":")]
                if fs in dirs:
                    out.append(e.mountpoint)
            elif e.root != "/" and fs.endswith(e.root) and \
                    e.root.endswith(f"/{SNAPSHOTS}/{sid}/fs"):
                out.append(e.mountpoint)
        return out + sysmount.mounts_below(self.path(sid))

    def check_idle(self, rec: Record) -> None:
        users = self.users(rec.id)
        if users:
            raise FailedPrecondition(f"snapshot {rec.key} is mounted at {', '.join(users)}; "
                                     "unmount it first")

    def usage(self, rec: Record, parents: list[Record]) -> Usage:
        return disk_usage(self.fs(rec.id))

    def commit(self, rec: Record, parents: list[Record]) -> Usage:
        """Nothing moves: the directory is the committed layer (containerd may commit a snapshot
        it still has mounted, as with its own overlayfs snapshotter)."""
        return disk_usage(self.fs(rec.id))

    def remove(self, sid: int) -> None:
        path = self.path(sid)
        trash = os.path.join(self.dir, f"{REMOVING}{sid}")
        try:
            os.rename(path, trash)
        except FileNotFoundError:
            pass
        remove_tree(trash)

    def stored(self) -> set[int]:
        out = set()
        for name in os.listdir(self.dir):
            if name.startswith(REMOVING) and name[len(REMOVING):].isdigit():
                out.add(int(name[len(REMOVING):]))
            elif name.isascii() and name.isdigit():
                out.add(int(name))
        return out


class OverlayBackend(DirBackend):
    """``overlay2``: overlayfs upper directories (see the module docstring)."""

    name = "overlay2"

    def __init__(self, root: str, options: dict[str, str]) -> None:
        super().__init__(root, options)
        self.base_options: tuple[str, ...] = ()

    def open(self, transaction: int | None) -> int | None:
        super().open(transaction)
        self._check_overlay()
        opts = []
        if os.path.exists("/sys/module/overlay/parameters/index"):
            opts.append("index=off")
        if _in_user_namespace():
            opts.append("userxattr")
        self.base_options = tuple(opts)
        return None

    def _check_overlay(self) -> None:
        """Mount an overlay of two lower directories in a scratch directory, or refuse."""
        try:
            check_overlay(self.root, prefix=".check-overlay-")
        except NotSupported as e:
            raise FailedPrecondition(f"overlay2 backend: the kernel refuses an overlay mount on "
                                     f"{self.root} ({e}); it needs overlayfs and a root on a "
                                     "filesystem with d_type (ext4, xfs ftype=1)") from None

    def create(self, rec: Record, parents: list[Record]) -> None:
        self._make(rec)
        if rec.kind == ACTIVE:
            try:
                os.mkdir(os.path.join(self.path(rec.id), "work"), 0o711)
            except OSError as e:
                raise _no_space(e, f"creating snapshot {rec.key}") from None

    def mounts(self, rec: Record, parents: list[Record]) -> list[Mount]:
        if not parents:
            return [Mount("bind", self.fs(rec.id), ("ro" if rec.kind == VIEW else "rw", "rbind"))]
        if rec.kind != ACTIVE and len(parents) == 1:
            return [Mount("bind", self.fs(parents[0].id), ("ro", "rbind"))]
        opts = list(self.base_options)
        if rec.kind == ACTIVE:
            opts += [f"workdir={os.path.join(self.path(rec.id), 'work')}",
                     f"upperdir={self.fs(rec.id)}"]
        opts.append("lowerdir=" + ":".join(self.fs(p.id) for p in parents))
        return [Mount("overlay", "overlay", tuple(opts))]


class VfsBackend(DirBackend):
    """``vfs``: a full copy per snapshot (see the module docstring)."""

    name = "vfs"

    def create(self, rec: Record, parents: list[Record]) -> None:
        fs = self._make(rec)
        if parents:
            try:
                copy_tree(self.fs(parents[0].id), fs)
            except OSError as e:
                raise _no_space(e, f"copying the parent of snapshot {rec.key}") from None

    def mounts(self, rec: Record, parents: list[Record]) -> list[Mount]:
        return [Mount("bind", self.fs(rec.id), ("ro" if rec.kind == VIEW else "rw", "rbind"))]
