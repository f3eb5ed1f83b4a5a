"""Loop devices on files: attach with direct I/O, detach, find by backing file.

A loop device turns a file (here: a volume on a FUSE mount) into a kernel
block device. With direct I/O on, the loop driver reads and writes the file
with O_DIRECT, so the kernel keeps no second copy of the data in the page
cache. Attaching and detaching are the loop driver's ioctls, as ``losetup``
makes them (LOOP_CTL_GET_FREE on /dev/loop-control, then LOOP_CONFIGURE on
the device; LOOP_CLR_FD to detach) without the cost of a ``losetup``
process. The state is read from sysfs (``/sys/block/loopN/loop/
{backing_file,dio}``), which exists only while a file is attached.

Attaching races with other programs that take free loop devices: a device
taken between LOOP_CTL_GET_FREE and LOOP_CONFIGURE answers EBUSY, and the
attach asks for another one. Detaching a device that is still open (say,
mounted) succeeds at once but takes effect only when its last user closes
it (the kernel's autoclear). Thread safe (no state).
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import stat
import struct
from pathlib import Path

from ..errors import ThinpoolError

__all__ = ["LoopError", "attach", "attached", "backing_file", "detach", "direct_io", "find"]

SYS_BLOCK = Path("/sys/block")
LOOP_CONTROL = "/dev/loop-control"
_DEVICE = re.compile(r"/dev/(loop\d+)")

LOOP_CLR_FD = 0x4C01
LOOP_CONFIGURE = 0x4C0A
LOOP_CTL_GET_FREE = 0x4C82
LO_FLAGS_READ_ONLY = 1
LO_FLAGS_DIRECT_IO = 16
# struct loop_config: fd, block_size, struct loop_info64 (5 u64, 4 u32, file name[64],
# crypt name[64], key[32], 2 u64), 8 reserved u64 (include/uapi/linux/loop.h)
_LOOP_CONFIG = struct.Struct("=II5Q4I64s64s32s2Q8Q")
_ATTEMPTS = 16  # free devices taken by someone else before we give up


class LoopError(ThinpoolError):
    """A loop device cannot be attached, detached or inspected."""


def _sysdir(device: str) -> Path:
    m = _DEVICE.fullmatch(device)
    if m is None:
        raise LoopError(f"{device!r} is not a loop device path (/dev/loopN)")
    return SYS_BLOCK / m.group(1) / "loop"


def _free_device(path: str) -> int:
    try:
        ctl = os.open(LOOP_CONTROL, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        raise LoopError(f"attaching {path}: {LOOP_CONTROL}: {e.strerror} (is the loop module "
                        "loaded?)") from None
    try:
        return fcntl.ioctl(ctl, LOOP_CTL_GET_FREE)
    except OSError as e:
        raise LoopError(f"attaching {path}: no free loop device: {e.strerror}") from None
    finally:
        os.close(ctl)


def _open_device(device: str, access: int) -> int:
    """Open ``/dev/loopN``, making its node from sysfs where /dev has none (a /dev without
    devtmpfs, as in some containers: what losetup does there too)."""
    try:
        return os.open(device, access | os.O_CLOEXEC)
    except FileNotFoundError:
        try:
            major, minor = (SYS_BLOCK / device[5:] / "dev").read_text().strip().split(":")
            os.mknod(device, stat.S_IFBLK | 0o660, os.makedev(int(major), int(minor)))
            return os.open(device, access | os.O_CLOEXEC)
        except (OSError, ValueError) as e:
            raise LoopError(f"{device} has no device node and none could be made: {e}") \
                from None
    except OSError as e:
        raise LoopError(f"{device}: {e.strerror}") from None


def attach(path: str | os.PathLike[str], *, read_only: bool = False) -> str:
    """Attach ``path`` to a free loop device with direct I/O on; its path.

    Fails (and leaves nothing attached) unless the kernel really turned
    direct I/O on, i.e. sysfs ``dio`` reads 1.
    """
    path = os.path.abspath(path)
    access = os.O_RDONLY if read_only else os.O_RDWR
    try:
        backing = os.open(path, access | os.O_DIRECT | os.O_CLOEXEC)
    except OSError as e:
        raise LoopError(f"attaching {path}: {e.strerror}") from None
    try:
        config = _LOOP_CONFIG.pack(
            backing, 0, 0, 0, 0, 0, 0, 0, 0, 0,
            LO_FLAGS_DIRECT_IO | (LO_FLAGS_READ_ONLY if read_only else 0),
            os.fsencode(path)[:63], b"", b"", 0, 0, *[0] * 8)
        for _ in range(_ATTEMPTS):
            device = f"/dev/loop{_free_device(path)}"
            fd = _open_device(device, access)
            try:
                fcntl.ioctl(fd, LOOP_CONFIGURE, config)
            except OSError as e:
                if e.errno == errno.EBUSY:
                    continue  # taken meanwhile by another program: ask for another
                raise LoopError(f"attaching {path} to {device}: {e.strerror}") from None
            finally:
                os.close(fd)
            break
        else:
            raise LoopError(f"attaching {path}: every free loop device was taken by another "
                            f"program before we could configure it ({_ATTEMPTS} tries)")
    finally:
        os.close(backing)
    if not direct_io(device):
        detach(device)
        raise LoopError(f"{device} on {path}: the kernel did not enable direct I/O")
    return device


def detach(device: str) -> None:
    """Detach ``device`` (LOOP_CLR_FD); see the module docstring for busy devices."""
    _sysdir(device)
    try:
        fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise LoopError(f"detaching {device}: {e.strerror}") from None
    try:
        fcntl.ioctl(fd, LOOP_CLR_FD)
    except OSError as e:
        if e.errno == errno.ENXIO:
            raise LoopError(f"detaching {device}: it is not attached") from None
        raise LoopError(f"detaching {device}: {e.strerror}") from None
    finally:
        os.close(fd)


_DETACHED = (errno.ENOENT, errno.ENODEV, errno.ENXIO)


def _attribute(sysdir: Path, name: str) -> str | None:
    """A loop device's sysfs attribute, or None when the device is not attached.  While a
    detach is under way the attribute files still exist but reading them fails with ENODEV."""
    try:
        return (sysdir / name).read_text().strip("\n")
    except OSError as e:
        if e.errno in _DETACHED:
            return None
        raise


def backing_file(device: str) -> str | None:
    """The file ``device`` is attached to, or None when it is not attached (or being detached)."""
    return _attribute(_sysdir(device), "backing_file")


def direct_io(device: str) -> bool:
    """Whether ``device`` is attached with direct I/O (sysfs ``dio`` is 1)."""
    return _attribute(_sysdir(device), "dio") == "1"


def attached() -> list[tuple[str, str]]:
    """Every attached loop device and its backing file as the kernel reports it (absolute,
    symlinks resolved, `` (deleted)`` appended once the file is gone), sorted by number."""
    found = []
    for sysdir in SYS_BLOCK.glob("loop*/loop"):
        backing = _attribute(sysdir, "backing_file")
        if backing is not None:
            found.append((int(sysdir.parent.name[4:]), backing))
    return [(f"/dev/loop{n}", backing) for n, backing in sorted(found)]


def find(path: str | os.PathLike[str]) -> list[str]:
    """Every loop device attached to ``path`` (compared as absolute paths with
    symlinks resolved, as the kernel reports them), sorted by number."""
    want = os.path.realpath(path)
    return [device for device, backing in attached() if backing == want]
