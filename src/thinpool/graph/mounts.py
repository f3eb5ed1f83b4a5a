"""Mounts for the graph drivers: mount(2), umount2(2), statfs(2) and /proc/self/mountinfo.

Python's standard library has none of these calls; they are made through
libc with ctypes. Failures are ``OSError`` with the errno (callers turn them
into ``GraphError``s with their own context).
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
from dataclasses import dataclass

MS_RDONLY = 1
MS_BIND = 4096
MS_REC = 16384
MNT_DETACH = 2

FS_MAGIC_BTRFS = 0x9123683E
FS_MAGIC_OVERLAY = 0x794C7630
FS_MAGIC_XFS = 0x58465342
FS_MAGIC_EXTFS = 0xEF53
FS_MAGIC_TMPFS = 0x01021994

FS_NAMES: dict[int, str] = {
    # Docker's FsNames (daemon/graphdriver/driver_linux.go): the "Backing Filesystem" status value
    0x61756673: "aufs", FS_MAGIC_BTRFS: "btrfs", 0x28CD3D45: "cramfs", 0xF15F: "ecryptfs",
    FS_MAGIC_EXTFS: "extfs", 0xF2F52010: "f2fs", 0x65735546: "fuse", 0x47504653: "gpfs",
    0x000072B6: "jffs2", 0x3153464A: "jfs", 0x00006969: "nfs", FS_MAGIC_OVERLAY: "overlayfs",
    0x858458F6: "ramfs", 0x52654973: "reiserfs", 0x0000517B: "smb", 0x73717368: "squashfs",
    FS_MAGIC_TMPFS: "tmpfs", 0xA501FCF5: "vxfs", FS_MAGIC_XFS: "xfs", 0x2FC12FC1: "zfs",
}

_libc = ctypes.CDLL(None, use_errno=True)  # the C library the interpreter runs on
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.statfs.argtypes = [ctypes.c_char_p, ctypes.c_void_p]


def _raise(path: str) -> None:
    err = ctypes.get_errno()
    raise OSError(err, os.strerror(err), path)


def mount(source: str, target: str, fstype: str, flags: int = 0, data: str = "") -> None:
    """mount(2); OSError on failure."""
    if _libc.mount(os.fsencode(source), os.fsencode(target), os.fsencode(fstype), flags,
                   os.fsencode(data) if data else None) != 0:
        _raise(target)


def unmount(target: str, flags: int = 0) -> None:
    """umount2(2); OSError on failure (EINVAL: not a mount point)."""
    if _libc.umount2(os.fsencode(target), flags) != 0:
        _raise(target)


def fs_magic(path: str) -> int:
    """statfs(2) f_type of the filesystem holding ``path``."""
    buf = ctypes.create_string_buffer(256)  # struct statfs is 120 bytes on 64-bit Linux
    if _libc.statfs(os.fsencode(path), buf) != 0:
        _raise(path)
    return ctypes.c_long.from_buffer(buf).value & 0xFFFFFFFF


def fs_name(path: str) -> str:
    """Docker's name of the filesystem holding ``path`` ("extfs", "xfs", "btrfs", ...)."""
    magic = fs_magic(path)
    return FS_NAMES.get(magic, f"<unknown {magic:#x}>")


@dataclass(frozen=True)
class MountEntry:
    """One line of /proc/self/mountinfo."""

    mount_id: int
    parent_id: int
    root: str
    mountpoint: str
    options: str  # per-mount options (rw, nosuid, ...)
    fstype: str
    source: str
    super_options: str  # per-superblock options (lowerdir=..., upperdir=...)


_ESCAPE = re.compile(r"\\([0-7]{3})")


def _unescape(field: str) -> str:
    return _ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), field)


def mountinfo() -> list[MountEntry]:
    """The mounts this process sees, in /proc/self/mountinfo order (later ones on top)."""
    out = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-", 6)
            out.append(MountEntry(int(fields[0]), int(fields[1]), _unescape(fields[3]), _unescape(fields[4]),
                                  fields[5], fields[sep + 1], _unescape(fields[sep + 2]),
                                  fields[sep + 3] if len(fields) > sep + 3 else ""))
    return out


def mount_entry(path: str) -> MountEntry | None:
    """The topmost mount whose mount point is exactly ``path`` (resolved), or None."""
    real = os.path.realpath(path)
    found = None
    for entry in mountinfo():
        if entry.mountpoint == real:
            found = entry
    return found


def is_mountpoint(path: str) -> bool:
    """Whether something is mounted exactly on ``path`` (per /proc/self/mountinfo)."""
    return mount_entry(path) is not None


def mounts_below(path: str) -> list[str]:
    """Mount points at or below ``path`` (resolved), deepest first (the order to unmount them)."""
    real = os.path.realpath(path)
    prefix = real.rstrip("/") + "/"
    points = [e.mountpoint for e in mountinfo() if e.mountpoint == real or e.mountpoint.startswith(prefix)]
    return sorted(set(points), key=lambda p: (-p.count("/"), p))


def unmount_all_below(path: str) -> None:
    """Detach every mount at or below ``path`` (Docker's RecursiveUnmount); stacked mounts too."""
    for _ in range(64):  # a mount point can carry several stacked mounts
        points = mounts_below(path)
        if not points:
            return
        for point in points:
            try:
                unmount(point, MNT_DETACH)
            except OSError as e:
                if e.errno not in (errno.EINVAL, errno.ENOENT):  # already gone
                    raise
    raise OSError(errno.EBUSY, "mounts keep reappearing", path)
