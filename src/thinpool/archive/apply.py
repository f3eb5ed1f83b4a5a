"""Applying a layer tar onto a directory tree (Docker's UnpackLayer / ApplyDiff).

Semantics, entry by entry in tar order:

* The name is cleaned like a POSIX path; a leading "/" is dropped (the entry
  stays inside the root) and a name that still climbs out with ".." is an
  UnsafeArchiveError. The root entry itself ("." or "/") is skipped.
* Every path is resolved inside the root (fsroot.RootDir): a symlink met on
  the way is followed with chroot semantics, so an entry written "through" a
  symlink (even an absolute one, or one from this same tar) lands inside the
  root; the entry's own last component is never followed. Missing parent
  directories are created (0755, owned by the caller, like Docker's implied
  directories).
* ``DIR/.wh..wh..opq`` (opaque directory): everything below DIR is removed
  except the entries this tar applied before the marker and the directories
  on the way to them (Docker would also remove such a directory when it was
  only implied, losing the entries inside it). ``DIR/.wh.NAME`` removes
  DIR/NAME (and its subtree); ``.wh.``, ``.wh..`` and ``.wh...`` are
  UnsafeArchiveError. Other names with a
  ``.wh..wh.`` component are AUFS metadata and are skipped, except regular
  files directly under ``.wh..wh.plnk/``: they are kept as unnamed files
  (O_TMPFILE on the root's filesystem, never visible in the tree) so that a
  hard link whose target is ``.wh..wh.plnk/X`` becomes a link to that file,
  with the plnk entry's metadata (Docker instead makes a copy per link).
* Any other entry replaces an existing path, except that a directory entry
  merges into an existing directory (only its metadata is applied). A hard
  link entry's metadata applies to the linked inode (as in Docker), but its
  owner is not set again when already right, since chown clears file
  capabilities that a tar writer stored only with the inode's first path.
* Entry types: regular file, directory, symlink (target stored verbatim),
  hard link (target resolved inside the root like a name; the link's last
  component is not followed; a directory target is an error), character and
  block device, fifo. Ownership (lchown, skipped with ``chown=False``), mode
  including setuid/setgid/sticky, xattrs from ``SCHILY.xattr.*`` PAX records
  (EPERM is ignored as Docker does: e.g. user.* xattrs cannot be set on
  devices), mtime and atime (atime = max(atime, mtime); times outside
  [epoch, 2**63 ns) become the epoch). Directory times are set after the last
  entry, so files created inside do not disturb them.
* Xattrs in the ``trusted.overlay.`` / ``user.overlay.`` namespaces are never
  applied from a tar: they would change how overlayfs reads the layer (the tar
  format has ``.wh..wh..opq`` for opaque directories).
* ``whiteouts="overlay"`` (overlay2's native ApplyDiff into an upper ``diff/``
  directory): ``.wh.NAME`` also leaves a 0:0 character device NAME (owned
  like the whiteout entry), and an opaque marker also sets the xattr
  ``trusted.overlay.opaque=y`` (``opaque_xattr``) on DIR.

Nothing outside the root is ever created, removed, chmod-ed, chown-ed or
otherwise modified; a failure is an ArchiveError naming the entry, after which
the tree holds the entries before it (callers discard a failed layer).
"""

from __future__ import annotations

import os
import posixpath
import stat
from typing import Any, Callable, Literal

from .compression import open_layer_stream
from .errors import ArchiveError, UnsafeArchiveError
from .fsroot import RootDir, proc_path
from .tarformat import BLOCKDEV, CHAR, DIR, FIFO, LINK, REG, SYMLINK, TarEntry, TarReader

WHITEOUT_PREFIX = ".wh."
WHITEOUT_META_PREFIX = ".wh..wh."
WHITEOUT_OPAQUE = ".wh..wh..opq"
WHITEOUT_LINK_DIR = ".wh..wh.plnk"
OPAQUE_XATTR = "trusted.overlay.opaque"
OVERLAY_XATTR_PREFIXES = ("trusted.overlay.", "user.overlay.")
_MAX_TIME_NS = (1 << 63) - 1
_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_NODE_TYPES = {CHAR: stat.S_IFCHR, BLOCKDEV: stat.S_IFBLK, FIFO: stat.S_IFIFO}


def clean_name(name: str) -> list[str] | None:
    """The components of a tar entry name inside the root, or None for the root itself.

    A leading "/" is dropped; a name that leaves the root is an UnsafeArchiveError.
    """
    stripped = name.lstrip("/")
    norm = posixpath.normpath(stripped) if stripped else "."
    if norm == ".":
        return None
    if norm == ".." or norm.startswith("../"):
        raise UnsafeArchiveError(f"tar entry {name!r} points outside the layer root")
    return norm.split("/")


def _link_target(linkname: str, entry: str) -> list[str]:
    cleaned = posixpath.normpath(linkname.lstrip("/")) if linkname.lstrip("/") else "."
    if cleaned == "." or cleaned == ".." or cleaned.startswith("../"):
        raise UnsafeArchiveError(f"hard link {entry!r} has a target outside the layer root: {linkname!r}")
    return cleaned.split("/")


def _bound(ns: int) -> int:
    return ns if 0 <= ns <= _MAX_TIME_NS else 0


def _times(entry: TarEntry) -> tuple[int, int]:
    mtime = entry.mtime_ns
    atime = mtime if entry.atime_ns is None else max(entry.atime_ns, mtime)
    return _bound(atime), _bound(mtime)


def apply_layer(root: str, stream: Any, *, whiteouts: Literal["delete", "overlay"] = "delete",
                chown: bool = True, opaque_xattr: str = OPAQUE_XATTR) -> int:
    """Apply the layer tar read from ``stream`` onto the directory ``root``.

    ``stream`` is any object with ``read(n)``: a plain tar, or gzip / zstd /
    bzip2 / xz compressed (detected by magic bytes). Returns the sum of the
    tar headers' size fields (Docker's ApplyDiff value). Semantics and
    guarantees are in the module docstring; every failure is an ArchiveError
    (UnsafeArchiveError for entries trying to leave the root). Reading stops
    at the end-of-archive marker: a caller that needs the whole stream (a
    digest, an HTTP body) drains the rest itself.
    """
    if whiteouts not in ("delete", "overlay"):
        raise ArchiveError(f"unknown whiteout format {whiteouts!r} (use 'delete' or 'overlay')")
    reader = TarReader(open_layer_stream(stream))
    with RootDir(root) as rd:
        return _Applier(rd, whiteouts == "overlay", chown, opaque_xattr).run(reader)


class _Applier:
    def __init__(self, rd: RootDir, overlay: bool, chown: bool, opaque_xattr: str) -> None:
        self.rd = rd
        self.overlay = overlay
        self.chown = chown
        self.opaque_xattr = opaque_xattr
        self.unpacked: set[str] = set()  # real paths of this tar's entries
        self.kept: set[str] = set()  # their ancestors (implied ones too): an opaque marker keeps these
        self.dir_times: dict[str, tuple[int, int]] = {}
        self.plnk: dict[str, int] = {}  # .wh..wh.plnk basename -> O_TMPFILE fd

    def run(self, reader: TarReader) -> int:
        size = 0
        try:
            for entry in reader.entries():
                size += entry.size
                self.rd.collect()
                try:
                    self._entry(entry, reader)
                except OSError as e:
                    raise ArchiveError(f"cannot apply tar entry {entry.name!r}: {e.strerror or e}") from None
                except (ValueError, OverflowError) as e:  # e.g. a NUL in an xattr name, a huge device number
                    raise ArchiveError(f"cannot apply tar entry {entry.name!r}: {e}") from None
            self._set_dir_times()
        finally:
            for fd in self.plnk.values():
                os.close(fd)
        return size

    # -- per entry -------------------------------------------------------------------------
    def _entry(self, entry: TarEntry, reader: TarReader) -> None:
        parts = clean_name(entry.name)
        if parts is None:
            return
        base = parts[-1]
        special = WHITEOUT_PREFIX in entry.name
        if special and (any(p.startswith(WHITEOUT_META_PREFIX) for p in parts[:-1]) or (
                base.startswith(WHITEOUT_META_PREFIX) and base != WHITEOUT_OPAQUE)):
            if len(parts) == 2 and parts[0] == WHITEOUT_LINK_DIR and entry.type == REG:
                self._keep_plnk(base, entry, reader)
            return
        pfd, preal = self.rd.parent(parts, create=True)
        if special and base == WHITEOUT_OPAQUE:
            self._opaque(pfd, "/".join(preal))
            return
        if special and base.startswith(WHITEOUT_PREFIX):
            self._whiteout(pfd, preal, base[len(WHITEOUT_PREFIX):], entry)
            return
        real = "/".join(preal + (base,))
        if entry.type == DIR:
            self._make_dir(pfd, base, entry)
            self.dir_times[real] = _times(entry)
        else:
            self.dir_times.pop(real, None)
            if entry.type == REG:
                self._make_file(pfd, base, real, entry, reader)
            elif entry.type == LINK:
                self._make_link(pfd, base, real, entry)
            elif entry.type == SYMLINK:
                self._replace(pfd, base, real, lambda: os.symlink(entry.linkname, base, dir_fd=pfd))
                self._metadata(pfd, base, entry, chmod=False)
            else:
                self._make_node(pfd, base, real, entry)
        self._mark(real)

    def _mark(self, real: str) -> None:
        self.unpacked.add(real)
        parent = real.rpartition("/")[0]
        while parent and parent not in self.kept:
            self.kept.add(parent)
            parent = parent.rpartition("/")[0]

    def _replace(self, pfd: int, base: str, real: str, create: Callable[[], object]) -> None:
        """Run create(); if the name exists, remove it (with its subtree) and retry."""
        try:
            create()
        except FileExistsError:
            self._remove(pfd, base, real)
            create()

    def _remove(self, pfd: int, name: str, real: str) -> None:
        """Remove ``name`` (real path ``real``) with its subtree; FileNotFoundError if absent."""
        st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
        if stat.S_ISDIR(st.st_mode):
            prefix = real + "/"
            for key in [k for k in self.dir_times if k == real or k.startswith(prefix)]:
                del self.dir_times[key]
        self.rd.remove_all(pfd, name, st)

    def _make_dir(self, pfd: int, base: str, entry: TarEntry) -> None:
        try:
            os.mkdir(base, 0o700, dir_fd=pfd)
        except FileExistsError:
            st = os.stat(base, dir_fd=pfd, follow_symlinks=False)
            if not stat.S_ISDIR(st.st_mode):
                self.rd.remove_all(pfd, base, st)
                os.mkdir(base, 0o700, dir_fd=pfd)
        self._metadata(pfd, base, entry, times=False)

    def _make_file(self, pfd: int, base: str, real: str, entry: TarEntry, reader: TarReader) -> None:
        try:
            fd = os.open(base, _NEW_FILE, 0o600, dir_fd=pfd)
        except FileExistsError:
            self._remove(pfd, base, real)
            fd = os.open(base, _NEW_FILE, 0o600, dir_fd=pfd)
        try:
            reader.copy_data(fd, entry.name)
            self._fd_metadata(fd, entry)
        finally:
            os.close(fd)

    def _fd_metadata(self, fd: int, entry: TarEntry) -> None:
        if self.chown:
            os.fchown(fd, entry.uid, entry.gid)
        for key, value in entry.xattrs.items():
            if not key.startswith(OVERLAY_XATTR_PREFIXES):
                self._setxattr(fd, key, value)
        os.fchmod(fd, entry.mode & 0o7777)  # always: a umask or a default ACL may have taken bits
        os.utime(fd, ns=_times(entry))

    def _setxattr(self, target: int | str, key: str, value: bytes) -> None:
        """Set an xattr on an fd, or on a path without following its last component."""
        try:
            if isinstance(target, int):
                os.setxattr(target, key, value)
            else:
                os.setxattr(target, key, value, follow_symlinks=False)
        except PermissionError:
            pass  # not settable here (e.g. user.* on a device); Docker ignores EPERM too
        except OSError as e:
            raise ArchiveError(f"cannot set xattr {key}: {e.strerror}") from None

    def _metadata(self, pfd: int, base: str, entry: TarEntry, *, chown: bool = True, chmod: bool = True,
                  times: bool = True) -> None:
        """lchown, xattrs, chmod, times of ``base`` in ``pfd``, never following it."""
        if self.chown and chown:
            os.chown(base, entry.uid, entry.gid, dir_fd=pfd, follow_symlinks=False)
        for key, value in entry.xattrs.items():
            if not key.startswith(OVERLAY_XATTR_PREFIXES):
                self._setxattr(proc_path(pfd, base), key, value)
        if chmod:
            os.chmod(base, entry.mode & 0o7777, dir_fd=pfd, follow_symlinks=False)
        if times:
            os.utime(base, ns=_times(entry), dir_fd=pfd, follow_symlinks=False)

    def _make_node(self, pfd: int, base: str, real: str, entry: TarEntry) -> None:
        kind = _NODE_TYPES[entry.type]
        device = os.makedev(entry.devmajor, entry.devminor) if entry.type != FIFO else 0
        try:
            self._replace(pfd, base, real, lambda: os.mknod(base, kind | 0o600, device, dir_fd=pfd))
        except PermissionError:
            what = "fifo" if entry.type == FIFO else "device node"
            raise ArchiveError(f"cannot create {what} {entry.name!r}: permission denied (needs root)") from None
        self._metadata(pfd, base, entry)

    def _make_link(self, pfd: int, base: str, real: str, entry: TarEntry) -> None:
        target = _link_target(entry.linkname, entry.name)
        if target[0] == WHITEOUT_LINK_DIR:
            fd = self.plnk.get(target[-1])
            if fd is None:
                raise ArchiveError(f"invalid AUFS hard link {entry.name!r}: no {entry.linkname!r} in this layer")
            self._replace(pfd, base, real, lambda: os.link(proc_path(fd), base, dst_dir_fd=pfd, follow_symlinks=True))
            return
        try:
            tfd, _ = self.rd.parent(target)
            tst = os.stat(target[-1], dir_fd=tfd, follow_symlinks=False)
        except FileNotFoundError:
            raise ArchiveError(f"hard link {entry.name!r}: target {entry.linkname!r} does not exist") from None
        if stat.S_ISDIR(tst.st_mode):
            raise ArchiveError(f"hard link {entry.name!r}: target {entry.linkname!r} is a directory")
        try:
            dst = os.stat(base, dir_fd=pfd, follow_symlinks=False)
            if (dst.st_dev, dst.st_ino) == (tst.st_dev, tst.st_ino):
                raise ArchiveError(f"hard link {entry.name!r} is its own target")
            self._remove(pfd, base, real)
        except FileNotFoundError:
            pass
        os.link(target[-1], base, src_dir_fd=tfd, dst_dir_fd=pfd, follow_symlinks=False)
        # The link header's metadata applies to the shared inode (as in Docker), but an owner
        # that is already right is not set again: chown would clear file capabilities that a
        # writer (GNU tar) stored only with the first path of the inode.
        symlink = stat.S_ISLNK(tst.st_mode)
        same_owner = (tst.st_uid, tst.st_gid) == (entry.uid, entry.gid)
        self._metadata(pfd, base, entry, chown=not same_owner, chmod=not symlink, times=not symlink)

    def _keep_plnk(self, base: str, entry: TarEntry, reader: TarReader) -> None:
        try:
            fd = os.open(".", os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600, dir_fd=self.rd.fd)
        except OSError as e:
            raise ArchiveError(f"cannot keep AUFS hard-link file {entry.name!r}: {e.strerror}") from None
        old = self.plnk.pop(base, None)
        if old is not None:
            os.close(old)
        self.plnk[base] = fd
        reader.copy_data(fd, entry.name)
        self._fd_metadata(fd, entry)

    # -- whiteouts ---------------------------------------------------------------------------
    def _whiteout(self, pfd: int, preal: tuple[str, ...], name: str, entry: TarEntry) -> None:
        if name in ("", ".", ".."):
            raise UnsafeArchiveError(f"invalid whiteout entry {entry.name!r}")
        real = "/".join(preal + (name,))
        try:
            self._remove(pfd, name, real)
        except FileNotFoundError:
            pass
        self.dir_times.pop(real, None)
        if self.overlay:
            os.mknod(name, stat.S_IFCHR, os.makedev(0, 0), dir_fd=pfd)
            if self.chown and (entry.uid or entry.gid):
                os.chown(name, entry.uid, entry.gid, dir_fd=pfd, follow_symlinks=False)

    def _opaque(self, dfd: int, real: str) -> None:
        self._empty_except_unpacked(dfd, real)
        if self.overlay:
            try:
                os.setxattr(proc_path(dfd), self.opaque_xattr, b"y")
            except OSError as e:
                raise ArchiveError(f"cannot mark {real or '/'} opaque ({self.opaque_xattr}): {e.strerror}") from None

    def _empty_except_unpacked(self, dfd: int, real: str) -> None:
        lfd = self.rd.open_dir(dfd)
        try:
            names = os.listdir(lfd)
            for name in names:
                path = f"{real}/{name}" if real else name
                if path in self.unpacked or path in self.kept:
                    st = os.stat(name, dir_fd=lfd, follow_symlinks=False)
                    if stat.S_ISDIR(st.st_mode):
                        cfd = self.rd.open_dir(lfd, name)
                        try:
                            self._empty_except_unpacked(cfd, path)
                        finally:
                            os.close(cfd)
                else:
                    self._remove(lfd, name, path)
        finally:
            os.close(lfd)

    def _set_dir_times(self) -> None:
        self.rd.collect()
        for real, ns in self.dir_times.items():
            parts = real.split("/")
            try:
                pfd, _ = self.rd.parent(parts, follow=False)
                os.utime(parts[-1], ns=ns, dir_fd=pfd, follow_symlinks=False)
            except (FileNotFoundError, ArchiveError):
                continue  # removed or replaced by a later entry of this tar
            except OSError as e:
                raise ArchiveError(f"cannot set the times of {real!r}: {e.strerror}") from None
