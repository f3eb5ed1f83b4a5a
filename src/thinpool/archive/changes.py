"""Changes between two directory trees (Docker's ChangesDirs) and their size (ChangesSize).

The trees are walked in parallel through directory fds (no symlink is ever
followed). A path only in the new tree is an Add, only in the old tree a
Delete (a deleted directory is one Delete, its contents are not listed). A
path in both is a Modify when mode (type and permission bits), uid, gid, rdev
or the ``security.capability`` xattr differ, or, unless the old entry is a
directory, when size or mtime differ; mtimes are equal when identical or when
they share the second and either has zero nanoseconds (tar keeps whole
seconds). Below an added directory every path is an Add; below a path whose
new entry is not a directory nothing of the old subtree is listed. A
directory (never the root) that is not itself added or modified but has any
change below it is a Modify. Entries with the same device and inode on both
sides (hard-linked or shared trees) are unchanged without being compared.
The result is sorted by path (bytewise), each path absolute with a leading "/".
"""

from __future__ import annotations

import enum
import os
import stat
from dataclasses import dataclass
from typing import Iterable

from .errors import ArchiveError
from .fsroot import RootDir, proc_path

CAPABILITY_XATTR = "security.capability"


class ChangeKind(enum.IntEnum):
    """Docker's ChangeType values (they travel as these integers in plugin JSON)."""

    MODIFY = 0
    ADD = 1
    DELETE = 2

    def __str__(self) -> str:
        return "CAD"[self.value]


@dataclass(frozen=True, slots=True)
class Change:
    """One changed path: ``path`` is absolute within the layer ("/etc/hosts")."""

    path: str
    kind: ChangeKind

    def __str__(self) -> str:
        return f"{self.kind} {self.path}"


def same_fs_time(a_ns: int, b_ns: int) -> bool:
    """Docker's sameFsTime: equal, or the same second with either side at zero nanoseconds."""
    if a_ns == b_ns:
        return True
    return a_ns // 1_000_000_000 == b_ns // 1_000_000_000 and (
        a_ns % 1_000_000_000 == 0 or b_ns % 1_000_000_000 == 0)


def _capability(dir_fd: int, name: str) -> bytes | None:
    try:
        return os.getxattr(proc_path(dir_fd, name), CAPABILITY_XATTR, follow_symlinks=False)
    except OSError:
        return None  # ENODATA, or no xattr support: no capability


def _differs(old: os.stat_result, new: os.stat_result) -> bool:
    if (old.st_mode != new.st_mode or old.st_uid != new.st_uid or old.st_gid != new.st_gid
            or old.st_rdev != new.st_rdev):
        return True
    return not stat.S_ISDIR(old.st_mode) and (
        old.st_size != new.st_size or not same_fs_time(old.st_mtime_ns, new.st_mtime_ns))


def _listing(dir_fd: int) -> dict[str, os.DirEntry[str]]:
    """name -> directory entry (its lstat is taken, and cached, on first use)."""
    with os.scandir(dir_fd) as it:
        return {entry.name: entry for entry in it}


def _open_child(dir_fd: int, name: str) -> int:
    return os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)


class _Walker:
    def __init__(self) -> None:
        self.out: list[Change] = []

    def walk(self, new_fd: int, old_fd: int | None, path: str) -> None:
        """Append the changes below the directory pair (old_fd None: everything is new)."""
        new = _listing(new_fd)
        old = _listing(old_fd) if old_fd is not None else {}
        same_dev = old_fd is not None and os.fstat(new_fd).st_dev == os.fstat(old_fd).st_dev
        for name, entry in new.items():
            child = f"{path}/{name}"
            prev = old.pop(name, None)
            if prev is not None and same_dev and prev.inode() == entry.inode():
                continue  # the very same inode: unchanged, not even walked
            nst = entry.stat(follow_symlinks=False)
            mark = len(self.out)
            reported = prev is None
            old_is_dir = False
            if prev is None:
                self.out.append(Change(child, ChangeKind.ADD))
            else:
                assert old_fd is not None
                pst = prev.stat(follow_symlinks=False)
                old_is_dir = stat.S_ISDIR(pst.st_mode)
                if _differs(pst, nst) or _capability(old_fd, name) != _capability(new_fd, name):
                    self.out.append(Change(child, ChangeKind.MODIFY))
                    reported = True
            if stat.S_ISDIR(nst.st_mode):
                self._descend(new_fd, old_fd if old_is_dir else None, name, child)
                if len(self.out) > mark and not reported:
                    self.out.append(Change(child, ChangeKind.MODIFY))
        for name in old:
            self.out.append(Change(f"{path}/{name}", ChangeKind.DELETE))

    def _descend(self, new_parent: int, old_parent: int | None, name: str, path: str) -> None:
        nfd = _open_child(new_parent, name)
        ofd = None
        try:
            if old_parent is not None:
                ofd = _open_child(old_parent, name)
            self.walk(nfd, ofd, path)
        finally:
            os.close(nfd)
            if ofd is not None:
                os.close(ofd)


def _sort_key(change: Change) -> bytes:
    return os.fsencode(change.path)


def changes(new_root: str, old_root: str | None) -> list[Change]:
    """The changes of ``new_root`` relative to ``old_root`` (None: every path is an Add).

    Docker's ChangesDirs semantics (see the module docstring), sorted by path.
    Raises ArchiveError if a tree cannot be read (or changes under the walk).
    """
    walker = _Walker()
    try:
        with RootDir(new_root) as new:
            new_fd = new.open_dir(new.fd)
            try:
                if old_root is None:
                    walker.walk(new_fd, None, "")
                else:
                    with RootDir(old_root) as old:
                        old_fd = old.open_dir(old.fd)
                        try:
                            walker.walk(new_fd, old_fd, "")
                        finally:
                            os.close(old_fd)
            finally:
                os.close(new_fd)
    except OSError as e:
        raise ArchiveError(f"cannot compare {new_root} with {old_root}: {e.strerror or e}"
                           f"{' (' + e.filename + ')' if isinstance(e.filename, str) else ''}") from None
    return sorted(walker.out, key=_sort_key)


def change_parts(path: str) -> list[str]:
    """The components of a Change path; ArchiveError unless it is a clean absolute path."""
    parts = path.split("/")
    if path == "/" or parts[0] != "" or any(p in ("", ".", "..") for p in parts[1:]):
        raise ArchiveError(f"invalid change path {path!r}")
    return parts[1:]


def changes_size(root: str, changes: Iterable[Change]) -> int:
    """Docker's ChangesSize: bytes of the added or modified non-directories under ``root``.

    Sizes are lstat sizes; a hard-linked inode counts once; a path that no
    longer exists is skipped (Docker logs it).
    """
    total = 0
    seen: set[tuple[int, int]] = set()
    with RootDir(root) as rd:
        for change in changes:
            if change.kind == ChangeKind.DELETE:
                continue
            parts = change_parts(change.path)
            try:
                pfd, _ = rd.parent(parts, follow=False)
                st = os.stat(parts[-1], dir_fd=pfd, follow_symlinks=False)
            except FileNotFoundError:
                continue
            except OSError as e:
                raise ArchiveError(f"cannot stat {change.path}: {e.strerror}") from None
            if stat.S_ISDIR(st.st_mode):
                continue
            if st.st_nlink > 1:
                if (st.st_dev, st.st_ino) in seen:
                    continue
                seen.add((st.st_dev, st.st_ino))
            total += st.st_size
    return total
