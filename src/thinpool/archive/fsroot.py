"""Path resolution confined to a directory tree, with directory file descriptors.

``RootDir`` opens a root directory once and resolves root-relative paths
component by component with ``openat(O_NOFOLLOW)``; nothing is ever looked up
by an absolute path below the root, the process never changes directory, and
no operation can follow a link out of the root:

* ``parent(parts)`` returns a directory fd for all but the last component.
  With ``follow=True`` an intermediate symlink is resolved with chroot
  semantics: an absolute target restarts at the root, ``..`` stops at the root
  (which is how Docker's chrooted untar treats layer paths). With
  ``follow=False`` an intermediate symlink is an error (for walking a tree
  that must not have changed).
* The last component is never followed: callers act on it through
  ``*at(dir_fd, name)`` calls with ``follow_symlinks=False``, or through
  ``proc_path(dir_fd, name)`` (``/proc/self/fd/N/name``) for the xattr calls,
  which have no ``*at`` form; the kernel resolves ``N`` to the directory
  itself, and the ``l*xattr`` calls do not follow ``name``.

Directory fds are cached by path; any removal of a directory or symlink
drops the cache, so a cached fd never stands for a path that now means
something else. Dropped fds are closed only by ``collect()``, which callers
run when they hold no fd from this object, so an fd in use is never closed
(and its number never reused) under them.
"""

from __future__ import annotations

import os
import shutil
import stat
from typing import Sequence

from .errors import ArchiveError, UnsafeArchiveError

MAX_SYMLINKS = 40
_PATH_DIR = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_READ_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_CACHE_LIMIT = 512
IMPLIED_DIR_MODE = 0o755


def proc_path(dir_fd: int, name: str | None = None) -> str:
    """A path naming ``name`` in the directory ``dir_fd`` (or the directory itself) via /proc."""
    return f"/proc/self/fd/{dir_fd}" if name is None else f"/proc/self/fd/{dir_fd}/{name}"


class RootDir:
    """A directory tree root; every lookup stays inside it.

    Use as a context manager (closes every fd it opened). Directories that
    ``parent(create=True)`` creates because they are missing get mode 0755
    and belong to the caller.
    """

    def __init__(self, path: str) -> None:
        try:
            self.fd = os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as e:
            raise ArchiveError(f"cannot open directory {path}: {e.strerror}") from None
        self.path = path
        self._cache: dict[str, tuple[int, tuple[str, ...]]] = {}
        self._owned: set[int] = set()
        self._dropped: set[int] = set()

    def __enter__(self) -> RootDir:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the root and every directory fd this object opened."""
        self.forget()
        self.collect()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def forget(self) -> None:
        """Drop the cache (after a directory or symlink was removed); the fds stay open until collect()."""
        self._dropped |= self._owned
        self._owned.clear()
        self._cache.clear()

    def collect(self) -> None:
        """Close the fds dropped from the cache; call only while holding no fd from parent()."""
        for fd in self._dropped:
            os.close(fd)
        self._dropped.clear()

    def _remember(self, key: str, fd: int, real: tuple[str, ...]) -> None:
        if len(self._cache) >= _CACHE_LIMIT:
            self.forget()
        if fd != self.fd:
            self._dropped.discard(fd)
            self._owned.add(fd)
        self._cache[key] = (fd, real)

    def _real_dir(self, real: tuple[str, ...]) -> int:
        """The fd of a path known to consist of real directories (no symlink)."""
        fd, _ = self.parent(list(real) + [""], create=False, follow=False)
        return fd

    def parent(self, parts: Sequence[str], *, create: bool = False,
               follow: bool = True) -> tuple[int, tuple[str, ...]]:
        """(fd, real path) of the directory holding the last of ``parts``.

        ``parts`` are clean components (no "", ".", ".."). Missing
        directories are created when ``create`` (else FileNotFoundError);
        a non-directory in the way is an ArchiveError; see the module
        docstring for symlinks. The fd belongs to this RootDir.
        """
        dirs = parts[:-1]
        if not dirs:
            return self.fd, ()
        key = "/".join(dirs)
        hit = self._cache.get(key)
        if hit is not None and (follow or hit[1] == tuple(dirs)):
            return hit
        # longest cached prefix (only plain real paths when not following)
        start = len(dirs) - 1
        fd: int = self.fd
        real: tuple[str, ...] = ()
        while start > 0:
            hit = self._cache.get("/".join(dirs[:start]))
            if hit is not None and (follow or hit[1] == tuple(dirs[:start])):
                fd, real = hit
                break
            start -= 1
        todo = list(reversed(dirs[start:]))
        links = 0
        while todo:
            comp = todo.pop()
            if comp in ("", "."):
                continue
            if comp == "..":
                real = real[:-1]
                fd = self._real_dir(real) if real else self.fd
                continue
            try:
                nfd = os.open(comp, _PATH_DIR, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    raise
                self._mkdir_implied(fd, comp)
                nfd = os.open(comp, _PATH_DIR, dir_fd=fd)
            except NotADirectoryError:
                st = os.stat(comp, dir_fd=fd, follow_symlinks=False)
                shown = "/".join(real + (comp,))
                if not stat.S_ISLNK(st.st_mode):
                    raise ArchiveError(f"{shown!r} is not a directory") from None
                if not follow:
                    raise ArchiveError(f"{shown!r} is a symlink where a directory was expected") from None
                links += 1
                if links > MAX_SYMLINKS:
                    raise UnsafeArchiveError(f"too many levels of symlinks resolving {key!r}") from None
                target = os.readlink(comp, dir_fd=fd)
                if not target:
                    raise ArchiveError(f"{shown!r} is an empty symlink") from None
                if target.startswith("/"):
                    fd, real = self.fd, ()
                todo.extend(reversed(target.split("/")))
                continue
            real = real + (comp,)
            fd = nfd
            rkey = "/".join(real)
            if rkey in self._cache:  # already known under this path: keep one fd
                os.close(nfd)
                fd = self._cache[rkey][0]
            else:
                self._remember(rkey, fd, real)
        self._remember(key, fd, real)
        return fd, real

    @staticmethod
    def _mkdir_implied(fd: int, name: str) -> None:
        os.mkdir(name, IMPLIED_DIR_MODE, dir_fd=fd)
        os.chmod(name, IMPLIED_DIR_MODE, dir_fd=fd, follow_symlinks=False)  # whatever the umask

    def remove_all(self, dir_fd: int, name: str, st: os.stat_result) -> None:
        """Remove ``name`` in ``dir_fd`` (whose lstat is ``st``) and everything below it.

        Never follows a symlink (shutil.rmtree's fd-based walk). Removing a
        directory or a symlink drops the fd cache.
        """
        if stat.S_ISDIR(st.st_mode):
            shutil.rmtree(name, dir_fd=dir_fd)
            self.forget()
        else:
            os.unlink(name, dir_fd=dir_fd)
            if stat.S_ISLNK(st.st_mode):
                self.forget()

    def open_dir(self, dir_fd: int, name: str | None = None) -> int:
        """A readable fd (for listing) of directory ``name`` in ``dir_fd``, or of ``dir_fd`` itself."""
        return os.open("." if name is None else name, _READ_DIR, dir_fd=dir_fd)
