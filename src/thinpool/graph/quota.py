"""Project quotas for layer directories (Docker's quota.Control), for vfs ``size`` and overlay2 ``size``.

A layer directory gets its own project id (``FS_IOC_FSSETXATTR`` with the
inherit flag, so everything created below it is charged to it) and a block
hard and soft limit for that project (``quotactl(Q_XSETPQLIM)``). quotactl
names the filesystem by a block device node: like Docker, a node
``<home>/backingFsBlockDev`` with the device number of the home's
filesystem is (re)created (and removed again when quotas turn out to be
unsupported). This works on xfs mounted with ``pquota`` /
``prjquota`` and on ext4 with the ``project`` feature and ``prjquota``
mount option; anything else is ``QuotaNotSupported``.

Project ids: the home's own project id is a floor chosen by the
administrator (``xfs_quota project -s``); layers get ids above it and above
every id already used by a directory in the layer directory's parent (which
is rescanned, under an flock on that directory, for every new quota, so
two processes on one home do not hand out the same id).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import stat
import struct

from ..linux import libc
from .driver import GraphError

_quotactl_call = libc.function("quotactl", ctypes.c_int,
                               [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_void_p])

_PRJQUOTA = 2
_Q_XGETQSTAT_PRJ = (((ord("X") << 8) + 5) << 8) | _PRJQUOTA
_Q_XSETQLIM_PRJ = (((ord("X") << 8) + 4) << 8) | _PRJQUOTA
_Q_XGETQUOTA_PRJ = (((ord("X") << 8) + 3) << 8) | _PRJQUOTA
_FS_QUOTA_PDQ_ACCT = 1 << 4
_FS_QUOTA_PDQ_ENFD = 1 << 5
_FS_DQUOT_VERSION = 1
_FS_PROJ_QUOTA = 2
_FS_DQ_BSOFT = 1 << 2
_FS_DQ_BHARD = 1 << 3
_DISK_QUOTA = struct.Struct("<bbHIQQQQQQiiHHbbbbQQQiHh8s")  # struct fs_disk_quota
_FSXATTR = struct.Struct("<IIIII8s")  # struct fsxattr
_FS_IOC_FSGETXATTR = (2 << 30) | (_FSXATTR.size << 16) | (ord("X") << 8) | 31
_FS_IOC_FSSETXATTR = (1 << 30) | (_FSXATTR.size << 16) | (ord("X") << 8) | 32
_FS_XFLAG_PROJINHERIT = 0x200
BACKING_DEV = "backingFsBlockDev"


class QuotaNotSupported(GraphError):
    """Docker's quota.ErrQuotaNotSupported."""

    MESSAGE = "Filesystem does not support, or has not enabled quotas"

    def __init__(self, detail: str = "") -> None:
        super().__init__(self.MESSAGE + (f" ({detail})" if detail else ""))


def _quotactl(cmd: int, dev: str, id: int, buf: ctypes.Array[ctypes.c_char]) -> None:
    if _quotactl_call(cmd, os.fsencode(dev), id, buf) != 0:
        raise libc.os_error(dev)


def _fsxattr(fd: int) -> tuple[int, int, int, int, int, bytes]:
    buf = bytearray(_FSXATTR.size)
    fcntl.ioctl(fd, _FS_IOC_FSGETXATTR, buf)
    values: tuple[int, int, int, int, int, bytes] = _FSXATTR.unpack(bytes(buf))
    return values


def project_id(path: str) -> int:
    """The project id of a file or directory (0 when none was set)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        return _fsxattr(fd)[3]
    finally:
        os.close(fd)


def _set_project_id(path: str, projid: int) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        xflags, extsize, nextents, _, cowextsize, pad = _fsxattr(fd)
        fcntl.ioctl(fd, _FS_IOC_FSSETXATTR, _FSXATTR.pack(
            xflags | _FS_XFLAG_PROJINHERIT, extsize, nextents, projid, cowextsize, pad))
    finally:
        os.close(fd)


class ProjectQuota:
    """Quota control for layer directories created in ``base`` (a directory inside ``home``)."""

    def __init__(self, home: str, base: str) -> None:
        self.base = base
        st = os.stat(home)
        self.dev = os.path.join(home, BACKING_DEV)
        try:
            os.unlink(self.dev)  # re-made: the home may have been copied to another filesystem
        except FileNotFoundError:
            pass
        try:
            os.mknod(self.dev, stat.S_IFBLK | 0o600, st.st_dev)
        except OSError as e:
            if e.errno in (errno.EPERM, errno.ENOSYS, errno.EACCES):
                raise QuotaNotSupported(f"cannot make {self.dev}: {e.strerror}") from None
            raise GraphError(f"cannot make {self.dev}: {e.strerror}") from None
        try:
            qstat = ctypes.create_string_buffer(256)
            try:
                _quotactl(_Q_XGETQSTAT_PRJ, self.dev, 0, qstat)
            except OSError as e:
                raise QuotaNotSupported(e.strerror or str(e)) from None
            flags = struct.unpack_from("<H", qstat.raw, 2)[0]
            if not (flags & _FS_QUOTA_PDQ_ACCT and flags & _FS_QUOTA_PDQ_ENFD):
                raise QuotaNotSupported("project quotas are not enforced on this filesystem")
            try:
                self.floor = project_id(home)
            except OSError as e:
                raise QuotaNotSupported(f"cannot read project ids: {e.strerror}") from None
        except QuotaNotSupported:
            os.unlink(self.dev)  # unlike Docker, no device node is left where it is of no use
            raise

    def _next_id(self) -> int:
        used = self.floor
        with os.scandir(self.base) as it:
            for entry in it:
                if entry.is_dir(follow_symlinks=False):
                    try:
                        used = max(used, project_id(entry.path))
                    except FileNotFoundError:
                        continue
        return used + 1

    def set_quota(self, path: str, size: int) -> int:
        """Give the directory ``path`` (in ``base``) a new project id limited to ``size`` bytes; the id."""
        lock = os.open(self.base, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            projid = self._next_id()
            try:
                _set_project_id(path, projid)
            except OSError as e:
                raise GraphError(f"cannot set the project id of {path}: {e.strerror}") from None
        finally:
            os.close(lock)
        self.set_limit(projid, size)
        return projid

    def set_limit(self, projid: int, size: int) -> None:
        """Block hard and soft limit of project ``projid`` (bytes, rounded down to 512; 0 = no limit)."""
        blocks = size // 512
        buf = ctypes.create_string_buffer(_DISK_QUOTA.pack(
            _FS_DQUOT_VERSION, _FS_PROJ_QUOTA, _FS_DQ_BHARD | _FS_DQ_BSOFT, projid, blocks, blocks,
            0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, b""), _DISK_QUOTA.size)
        try:
            _quotactl(_Q_XSETQLIM_PRJ, self.dev, projid, buf)
        except OSError as e:
            raise GraphError(f"cannot set the quota of project {projid} on {self.dev}: {e.strerror}") from None

    def limit(self, path: str) -> int:
        """The block hard limit (bytes) of the project of ``path``; 0 when it has none."""
        projid = project_id(path)
        if not projid:
            return 0
        buf = ctypes.create_string_buffer(_DISK_QUOTA.size)
        try:
            _quotactl(_Q_XGETQUOTA_PRJ, self.dev, projid, buf)
        except OSError as e:
            if e.errno in (errno.ENOENT, errno.ESRCH):
                return 0
            raise GraphError(f"cannot read the quota of project {projid}: {e.strerror}") from None
        hard: int = _DISK_QUOTA.unpack(buf.raw)[4]
        return hard * 512
