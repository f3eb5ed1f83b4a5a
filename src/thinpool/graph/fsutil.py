"""Filesystem helpers of the graph drivers: tree copy, directory size, removal, staging.

* ``copy_tree(src, dst)``: vfs's full copy of a parent layer. Every entry
  type (directories, regular files, symlinks, hard links, character and block
  devices, fifos, sockets), owners, permission bits including
  setuid/setgid/sticky, all xattrs (``security.capability`` included: the
  owner is set before the xattrs and the mode after them, because chown
  clears both capabilities and setuid bits), atime and mtime in nanoseconds
  (directories after their contents). Hard links inside ``src`` stay hard
  links. File data goes through copy_file_range, which the kernel turns into
  a reflink on btrfs and xfs. Nothing is followed: the walk uses directory
  fds and ``O_NOFOLLOW``.
* ``dir_size(path)``: Docker's directory.Size (bytes of the non-directories,
  a hard-linked inode counted once).
* ``remove_tree(path)``: Docker's EnsureRemoveAll: detach anything mounted
  below ``path``, then remove it; a missing path is fine.
* ``staging_dir`` / ``clean_stale_staging``: drivers build a layer under a
  hidden name ``.tmp-<pid>-<id>`` next to its final place and rename it in,
  so a crash leaves no half layer; a later driver start removes the staging
  directories of processes that are gone.
* ``write_file``: small record files (written and fsync-ed).
* ``supports_d_type(dir)``: whether readdir on that filesystem reports file
  types (overlayfs needs it; xfs formatted with ftype=0 does not).
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import stat
import tempfile

from ..linux import libc, mounts
from ..linux.procs import process_exists

_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY
_READ_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_CHUNK = 1 << 30
STAGING_PREFIX = ".tmp-"


def _proc(dir_fd: int, name: str) -> str:
    return f"/proc/self/fd/{dir_fd}/{name}"


def _copy_xattrs(src: int | str, dst: int | str) -> None:
    """Every xattr of ``src`` onto ``dst`` (fds, or /proc paths that are not followed)."""
    try:
        keys = os.listxattr(src) if isinstance(src, int) else os.listxattr(src, follow_symlinks=False)
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            return
        raise
    for key in keys:
        try:
            if isinstance(src, int):
                value = os.getxattr(src, key)
            else:
                value = os.getxattr(src, key, follow_symlinks=False)
        except OSError as e:
            if e.errno == errno.ENODATA:
                continue  # removed meanwhile
            raise
        try:
            if isinstance(dst, int):
                os.setxattr(dst, key, value)
            else:
                os.setxattr(dst, key, value, follow_symlinks=False)
        except PermissionError:
            pass  # not settable on this kind of file (user.* on a device or a symlink)


def _copy_data(sfd: int, dfd: int, size: int) -> None:
    left = size
    try:
        while left > 0:
            n = os.copy_file_range(sfd, dfd, min(left, _CHUNK))
            if n == 0:
                break  # the source shrank: copy what there is
            left -= n
        return
    except OSError as e:
        if e.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise
    while True:  # copy_file_range refused (e.g. across filesystems on old kernels)
        data = os.read(sfd, 1 << 20)
        if not data:
            return
        view = memoryview(data)
        while view:
            view = view[os.write(dfd, view):]


class _TreeCopy:
    def __init__(self, dst_root_fd: int) -> None:
        self.dst_root = dst_root_fd
        self.links: dict[tuple[int, int], str] = {}  # (dev, ino) -> first copy, relative to dst

    def copy_dir(self, sfd: int, dfd: int, rel: str) -> None:
        with os.scandir(sfd) as it:
            entries = list(it)
        for entry in entries:
            name = entry.name
            st = entry.stat(follow_symlinks=False)
            path = f"{rel}{name}"
            if stat.S_ISDIR(st.st_mode):
                os.mkdir(name, 0o700, dir_fd=dfd)
                csfd = os.open(name, _READ_DIR, dir_fd=sfd)
                try:
                    cdfd = os.open(name, _READ_DIR, dir_fd=dfd)
                    try:
                        self.copy_dir(csfd, cdfd, path + "/")
                        self.fd_metadata(csfd, cdfd, st)
                    finally:
                        os.close(cdfd)
                finally:
                    os.close(csfd)
                continue
            if st.st_nlink > 1:
                first = self.links.get((st.st_dev, st.st_ino))
                if first is not None:
                    os.link(first, name, src_dir_fd=self.dst_root, dst_dir_fd=dfd, follow_symlinks=False)
                    continue
                self.links[(st.st_dev, st.st_ino)] = path
            if stat.S_ISREG(st.st_mode):
                self.copy_file(sfd, dfd, name, st)
            elif stat.S_ISLNK(st.st_mode):
                os.symlink(os.readlink(name, dir_fd=sfd), name, dir_fd=dfd)
                os.chown(name, st.st_uid, st.st_gid, dir_fd=dfd, follow_symlinks=False)
                _copy_xattrs(_proc(sfd, name), _proc(dfd, name))
                os.utime(name, ns=(st.st_atime_ns, st.st_mtime_ns), dir_fd=dfd, follow_symlinks=False)
            else:  # device, fifo, socket
                os.mknod(name, stat.S_IFMT(st.st_mode) | 0o600, st.st_rdev, dir_fd=dfd)
                os.chown(name, st.st_uid, st.st_gid, dir_fd=dfd, follow_symlinks=False)
                _copy_xattrs(_proc(sfd, name), _proc(dfd, name))
                os.chmod(name, stat.S_IMODE(st.st_mode), dir_fd=dfd, follow_symlinks=False)
                os.utime(name, ns=(st.st_atime_ns, st.st_mtime_ns), dir_fd=dfd, follow_symlinks=False)

    def copy_file(self, sfd: int, dfd: int, name: str, st: os.stat_result) -> None:
        src = os.open(name, _READ, dir_fd=sfd)
        try:
            dst = os.open(name, _NEW, 0o600, dir_fd=dfd)
            try:
                _copy_data(src, dst, st.st_size)
                self.fd_metadata(src, dst, st)
            finally:
                os.close(dst)
        finally:
            os.close(src)

    @staticmethod
    def fd_metadata(src: int, dst: int, st: os.stat_result) -> None:
        os.fchown(dst, st.st_uid, st.st_gid)
        _copy_xattrs(src, dst)
        os.fchmod(dst, stat.S_IMODE(st.st_mode))
        os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns))


def copy_tree(src: str, dst: str) -> None:
    """Copy everything below the directory ``src`` into the empty directory ``dst``.

    The root's own owner, mode, xattrs and times are copied too. Raises
    OSError on any failure (``dst`` then holds part of the copy).
    """
    sfd = os.open(src, _READ_DIR)
    try:
        dfd = os.open(dst, _READ_DIR)
        try:
            copier = _TreeCopy(dfd)
            copier.copy_dir(sfd, dfd, "")
            copier.fd_metadata(sfd, dfd, os.fstat(sfd))
        finally:
            os.close(dfd)
    finally:
        os.close(sfd)


def dir_size(path: str) -> int:
    """Bytes of every non-directory below ``path`` (lstat sizes; a hard-linked inode once)."""
    total = 0
    seen: set[tuple[int, int]] = set()
    stack = [path]
    while stack:
        with os.scandir(stack.pop()) as it:
            for entry in it:
                st = entry.stat(follow_symlinks=False)
                if stat.S_ISDIR(st.st_mode):
                    stack.append(entry.path)
                    continue
                if st.st_nlink > 1:
                    if (st.st_dev, st.st_ino) in seen:
                        continue
                    seen.add((st.st_dev, st.st_ino))
                total += st.st_size
    return total


def remove_tree(path: str) -> None:
    """Remove ``path`` and everything below it, detaching mounts below it first; missing is fine."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(path)
        return
    if mounts.mounts_below(path):
        mounts.unmount_all_below(path)
    try:
        shutil.rmtree(path)
    except FileNotFoundError:
        pass


def staging_dir(parent: str, id: str) -> str:
    """The hidden name under which layer ``id`` is built in ``parent`` before its rename."""
    return os.path.join(parent, f"{STAGING_PREFIX}{os.getpid()}-{id}")


def clean_stale_staging(parent: str) -> None:
    """Remove the staging directories in ``parent`` left by processes that no longer run."""
    try:
        names = os.listdir(parent)
    except FileNotFoundError:
        return
    for name in names:
        if not name.startswith(STAGING_PREFIX):
            continue
        pid_text = name[len(STAGING_PREFIX):].partition("-")[0]
        if pid_text.isdigit() and int(pid_text) != os.getpid() and not process_exists(int(pid_text)):
            remove_tree(os.path.join(parent, name))


def write_file(path: str, data: bytes, mode: int) -> None:
    """Create (or replace) a small file with ``data`` and ``mode``, synced to disk."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_dir(path: str) -> None:
    """fsync a directory (making a rename or a new entry in it durable)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _Dirent(ctypes.Structure):
    _fields_ = [("d_ino", ctypes.c_uint64), ("d_off", ctypes.c_int64), ("d_reclen", ctypes.c_ushort),
                ("d_type", ctypes.c_ubyte), ("d_name", ctypes.c_char * 256)]  # glibc's struct dirent (64-bit)


_opendir = libc.function("opendir", ctypes.c_void_p, [ctypes.c_char_p])
_readdir = libc.function("readdir", ctypes.POINTER(_Dirent), [ctypes.c_void_p])
_closedir = libc.function("closedir", ctypes.c_int, [ctypes.c_void_p])
_DT_UNKNOWN = 0


def supports_d_type(path: str) -> bool:
    """Whether readdir in the directory ``path``'s filesystem fills in d_type (tested with a scratch file)."""
    scratch = tempfile.mkdtemp(prefix="d_type-check", dir=path)
    try:
        open(os.path.join(scratch, "f"), "wb").close()
        dirp = _opendir(os.fsencode(scratch))
        if not dirp:
            raise libc.os_error(scratch)
        try:
            while True:
                ent = _readdir(dirp)
                if not ent:
                    return False
                if ent.contents.d_name == b"f":
                    return bool(ent.contents.d_type != _DT_UNKNOWN)
        finally:
            _closedir(dirp)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
