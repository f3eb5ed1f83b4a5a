"""Mounts: mount(2), umount2(2), statfs(2), mount options and /proc/self/mountinfo.

Python's standard library has none of these calls; they are made through
libc with ctypes (no ``mount``/``umount`` processes: a fork and exec cost
more than the mount itself). Failures are ``OSError`` with the errno;
callers add their own context. Thread safe (no state).
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
from dataclasses import dataclass

from . import libc

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_BIND = 4096
MS_REC = 16384
MNT_DETACH = 2

# mount(8)'s options that are mount(2) flags: name -> (flags set, flags cleared)
_FLAG_OPTIONS: dict[str, tuple[int, int]] = {
    "ro": (MS_RDONLY, 0), "rw": (0, MS_RDONLY), "nosuid": (MS_NOSUID, 0), "suid": (0, MS_NOSUID),
    "nodev": (MS_NODEV, 0), "dev": (0, MS_NODEV), "noexec": (8, 0), "exec": (0, 8),
    "sync": (16, 0), "async": (0, 16), "dirsync": (128, 0), "mand": (64, 0), "nomand": (0, 64),
    "noatime": (1024, 0), "atime": (0, 1024), "nodiratime": (2048, 0), "diratime": (0, 2048),
    "relatime": (1 << 21, 0), "norelatime": (0, 1 << 21), "strictatime": (1 << 24, 1024),
    "lazytime": (1 << 25, 0), "nolazytime": (0, 1 << 25), "silent": (32768, 0),
    "loud": (0, 32768), "defaults": (0, 0),
}

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

_mount = libc.function("mount", ctypes.c_int, [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p,
                                                 ctypes.c_ulong, ctypes.c_char_p])
_umount2 = libc.function("umount2", ctypes.c_int, [ctypes.c_char_p, ctypes.c_int])
_statfs = libc.function("statfs", ctypes.c_int, [ctypes.c_char_p, ctypes.c_void_p])


def mount(source: str, target: str, fstype: str, flags: int = 0, data: str = "") -> None:
    """mount(2); OSError on failure."""
    if _mount(os.fsencode(source), os.fsencode(target), os.fsencode(fstype), flags,
                   os.fsencode(data) if data else None) != 0:
        raise libc.os_error(target)


def mount_options(options: str) -> tuple[int, str]:
    """mount(8)'s ``-o`` list as mount(2)'s flags and data, as mount(8) splits it.

    Flag options (``ro``, ``nosuid``, ``noatime``, ...) become flags; the rest
    (``discard``, ``nouuid``, ``context="..."``) is the filesystem's data, in
    order. A comma inside double quotes does not split (SELinux contexts).
    """
    flags, data = 0, []
    for option in re.findall(r'(?:[^,"]|"[^"]*")+', options):
        known = _FLAG_OPTIONS.get(option)
        if known is None:
            data.append(option)
        else:
            flags = (flags | known[0]) & ~known[1]
    return flags, ",".join(data)


def unmount(target: str, flags: int = 0) -> None:
    """umount2(2); OSError on failure (EINVAL: not a mount point)."""
    if _umount2(os.fsencode(target), flags) != 0:
        raise libc.os_error(target)


def fs_magic(path: str) -> int:
    """statfs(2) f_type of the filesystem holding ``path``."""
    buf = ctypes.create_string_buffer(256)  # struct statfs is 120 bytes on 64-bit Linux
    if _statfs(os.fsencode(path), buf) != 0:
        raise libc.os_error(path)
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
    device: int  # st_dev of the files on it (os.makedev of the major:minor field)
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
            major, minor = fields[2].split(":")
            out.append(MountEntry(int(fields[0]), int(fields[1]), os.makedev(int(major), int(minor)),
                                  _unescape(fields[3]), _unescape(fields[4]),
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


def mounts_of_device(device: str) -> list[str]:
    """Mount points of the block device ``device`` (``/dev/loopN``), in mount order."""
    try:
        rdev = os.stat(device).st_rdev
    except OSError:
        return []
    return [e.mountpoint for e in mountinfo() if e.device == rdev]


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
