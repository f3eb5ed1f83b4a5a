"""Volumes as kernel block devices: FUSE files, loop devices, and the mounts thinpool made.

The kernel here has no device-mapper, nbd or ublk; a volume reaches it as a
file on the pool server's FUSE mount (``DIR/.fuse/<id>``) attached to a loop
device with direct I/O (no second copy of the data in the page cache).  The
pool server owns the FUSE mount, the loop devices and the filesystems it
mounted for ``thinpool mount``; it records them in ``server.json`` so that a
server that died can be cleaned up (``recover``).

The kernel's rule for snapshots of an active device (suspend the origin
first) becomes ``frozen``: every filesystem mounted on the volume's loop
device is frozen (FIFREEZE: synced, writes blocked) and the device is
flushed before the snapshot, and thawed after.

Thread safety: one lock serializes attach, detach, mount and umount.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import shutil
import subprocess
import threading
from contextlib import ExitStack, contextmanager
from typing import Any, Callable, Iterator

from ..errors import ThinpoolError
from ..fuse import FuseMount
from ..fuse.session import FileBusyError
from ..linux import fsprobe, loop
from ..linux.mounts import (MNT_DETACH, mount, mount_options, mountinfo, mounts_of_device,
                            unmount)
from ..pool.engine import Pool
from .exports import VolumeExport

log = logging.getLogger("thinpool.kernel")

FUSE_DIR = ".fuse"
FIFREEZE = 0xC0045877
FITHAW = 0xC0045878
FILESYSTEMS = ("ext4", "xfs")


class KernelError(ThinpoolError):
    pass


def _umount(mountpoint: str, lazy: bool = False) -> None:
    try:
        unmount(mountpoint, MNT_DETACH if lazy else 0)
    except OSError as e:
        raise KernelError(f"umount {mountpoint}: {e.strerror}"
                          + (" (something still uses it)" if e.errno == errno.EBUSY else "")) \
            from None


def _mount(device: str, mountpoint: str, fstype: str, options: list[str]) -> None:
    """mount(2) as ``mount -t FSTYPE -o OPTIONS DEVICE MOUNTPOINT`` would make it."""
    flags, data = mount_options(",".join(options))
    try:
        mount(device, mountpoint, fstype, flags, data)
    except OSError as e:
        if e.errno == errno.ENODEV and fstype in ("ext2", "ext3"):
            _mount(device, mountpoint, "ext4", options)  # ext4 serves ext2/3 on this kernel
            return
        hint = " (a bad option, or a damaged filesystem: see dmesg)" \
            if e.errno == errno.EINVAL else ""
        raise KernelError(f"mount {device} {mountpoint}: {e.strerror}{hint}") from None


def _filesystem(device: str) -> str:
    """The filesystem on ``device`` ("" for none); blkid names what fsprobe does not know."""
    try:
        found = fsprobe.filesystem(device)
    except OSError as e:
        raise KernelError(f"reading {device}: {e.strerror}") from None
    if found:
        return found
    if shutil.which("blkid") is None:
        return ""
    r = subprocess.run(["blkid", "-p", "-o", "value", "-s", "TYPE", device],
                       capture_output=True, text=True)
    return r.stdout.strip() if r.returncode == 0 else ""


class KernelDevices:
    """The pool server's attached volumes and its mounts (see the module docstring)."""

    def __init__(self, pool: Pool, directory: str, on_change: Callable[[], None]) -> None:
        self.pool = pool
        self.directory = directory
        self.fuse_dir = os.path.join(directory, FUSE_DIR)
        self.on_change = on_change
        self.attached: dict[int, str] = {}  # volume -> /dev/loopN
        self.mounted: dict[str, dict[str, Any]] = {}  # mount point -> {"id", "attached_here"}
        self._fuse: FuseMount | None = None
        self._lock = threading.RLock()

    # -- state --------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {"attached": {str(k): v for k, v in self.attached.items()},
                "mounts": self.mounted, "fuse_dir": self.fuse_dir}

    def _fuse_mount(self) -> FuseMount:
        if self._fuse is None:
            os.makedirs(self.fuse_dir, mode=0o700, exist_ok=True)
            fuse = FuseMount(self.fuse_dir)
            fuse.start()
            self._fuse = fuse
        return self._fuse

    # -- attach / detach ----------------------------------------------------------------------
    def attach(self, dev_id: int) -> str:
        """Attach a volume as a loop device; its path."""
        with self._lock:
            if dev_id in self.attached:
                raise KernelError(f"volume {dev_id} is already attached as "
                                  f"{self.attached[dev_id]}")
            dev = self.pool.volume(dev_id)  # raises for a missing volume
            fuse = self._fuse_mount()
            rec = self.pool.registry.volumes.get(dev_id)
            desc = f"thin volume {dev_id}" + (f" ({rec.name})" if rec and rec.name else "")
            fuse.add_file(str(dev_id), VolumeExport(dev, self.pool.read_only, desc))
            try:
                device = loop.attach(fuse.path(str(dev_id)), read_only=self.pool.read_only)
            except BaseException:
                fuse.remove_file(str(dev_id))
                raise
            self.attached[dev_id] = device
            self.on_change()
            return device

    def resolve(self, target: str) -> int:
        """A volume id from ``ID`` or an attached ``/dev/loopN``."""
        if target.isascii() and target.isdigit():
            return int(target)
        for dev_id, device in self.attached.items():
            if device == target or os.path.realpath(target) == device:
                return dev_id
        raise KernelError(f"{target} is not a volume attached to this pool")

    def detach(self, dev_id: int) -> None:
        with self._lock:
            device = self.attached.get(dev_id)
            if device is None:
                raise KernelError(f"volume {dev_id} is not attached")
            where = mounts_of_device(device)
            if where:
                raise KernelError(f"{device} (volume {dev_id}) is mounted at {', '.join(where)}: "
                                  "unmount it first ('thinpool umount MOUNTPOINT')")
            self._detach(dev_id, device)

    def _detach(self, dev_id: int, device: str) -> None:
        loop.detach(device)
        assert self._fuse is not None
        try:
            self._fuse.remove_file(str(dev_id), wait=10.0)
        except FileBusyError:
            raise KernelError(f"{device} was detached but volume {dev_id}'s file is still "
                              "open; try again in a moment") from None
        del self.attached[dev_id]
        self.on_change()

    # -- mount / umount -----------------------------------------------------------------------
    def mount(self, dev_id: int, mountpoint: str, mkfs: str | None = None,
              options: str | None = None, force: bool = False) -> dict[str, Any]:
        """Attach (if needed), optionally make a filesystem, mount; what was done."""
        mountpoint = os.path.realpath(mountpoint)
        if mkfs is not None and mkfs not in FILESYSTEMS:
            raise KernelError(f"--mkfs takes one of {', '.join(FILESYSTEMS)}, not {mkfs!r}")
        if not os.path.isdir(mountpoint):
            raise KernelError(f"mount point {mountpoint} is not a directory")
        if os.path.ismount(mountpoint):
            raise KernelError(f"{mountpoint} is already a mount point")
        with self._lock:
            attached_here = dev_id not in self.attached
            if not attached_here and mounts_of_device(self.attached[dev_id]):
                raise KernelError(f"volume {dev_id} is already mounted at "
                                  f"{', '.join(mounts_of_device(self.attached[dev_id]))}")
            device = self.attach(dev_id) if attached_here else self.attached[dev_id]
            try:
                fstype = _filesystem(device)
                if mkfs is not None:
                    if fstype and not force:
                        raise KernelError(f"volume {dev_id} already holds a {fstype} "
                                          "filesystem; pass --force to format it anyway")
                    if shutil.which(f"mkfs.{mkfs}") is None:
                        raise KernelError(f"mkfs.{mkfs} is not installed")
                    r = subprocess.run([f"mkfs.{mkfs}", "-F" if mkfs == "ext4" else "-f", "-q",
                                        device], capture_output=True, text=True)
                    if r.returncode != 0:
                        raise KernelError(f"mkfs.{mkfs} {device}: {r.stderr.strip()}")
                    fstype = mkfs
                if not fstype:
                    raise KernelError(f"volume {dev_id} holds no filesystem (use --mkfs ext4 "
                                      "or --mkfs xfs)")
                opts = [o for o in (options or "").split(",") if o]
                if fstype == "xfs" and "nouuid" not in opts:
                    opts.append("nouuid")  # snapshots share the origin's UUID
                _mount(device, mountpoint, fstype, opts)
            except BaseException:
                if attached_here and dev_id in self.attached:
                    self._detach(dev_id, self.attached[dev_id])
                raise
            self.mounted[mountpoint] = {"id": dev_id, "attached_here": attached_here,
                                        "fstype": fstype, "options": ",".join(opts)}
            self.on_change()
            return {"device": device, "mountpoint": mountpoint, "fstype": fstype}

    def umount(self, mountpoint: str) -> None:
        mountpoint = os.path.realpath(mountpoint)
        with self._lock:
            entry = self.mounted.get(mountpoint)
            if entry is None:
                raise KernelError(f"{mountpoint} is not a filesystem thinpool mounted from this "
                                  "pool")
            _umount(mountpoint)
            del self.mounted[mountpoint]
            if entry["attached_here"] and entry["id"] in self.attached and \
                    not mounts_of_device(self.attached[entry["id"]]):
                self._detach(entry["id"], self.attached[entry["id"]])
            self.on_change()

    # -- snapshots of active volumes ----------------------------------------------------------
    @contextmanager
    def frozen(self, dev_id: int) -> Iterator[None]:
        """Freeze the filesystems on an attached volume and flush it (the kernel's suspend)."""
        device = self.attached.get(dev_id)
        if device is None:
            yield
            return
        with ExitStack() as stack:
            for mp in mounts_of_device(device):
                fd = os.open(mp, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                stack.callback(os.close, fd)
                fcntl.ioctl(fd, FIFREEZE, 0)
                stack.callback(fcntl.ioctl, fd, FITHAW, 0)
            fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.fsync(fd)  # buffered writes to the device reach the pool
            finally:
                os.close(fd)
            yield

    # -- shutdown -----------------------------------------------------------------------------
    def foreign_mounts(self) -> list[str]:
        """Mounts of attached volumes that thinpool did not make."""
        out = []
        for dev_id, device in self.attached.items():
            out += [f"{mp} (volume {dev_id}, {device})" for mp in mounts_of_device(device)
                    if mp not in self.mounted]
        return out

    def shutdown(self, force: bool = False) -> None:
        """Unmount what thinpool mounted, detach every volume, unmount FUSE.

        Without ``force`` it refuses while an attached volume is mounted
        somewhere thinpool did not mount it; with ``force`` such mounts are
        unmounted lazily.
        """
        with self._lock:
            foreign = self.foreign_mounts()
            if foreign and not force:
                raise KernelError("refusing to stop: mounted by something else: "
                                  + "; ".join(foreign) + " (unmount them, or stop --force)")
            for mp in list(self.mounted):
                try:
                    _umount(mp, lazy=force)
                except KernelError as e:
                    if not force:
                        raise
                    log.warning("%s", e)
                del self.mounted[mp]
            for dev_id, device in list(self.attached.items()):
                for mp in mounts_of_device(device):
                    _umount(mp, lazy=True)
                try:
                    self._detach(dev_id, device)
                except (KernelError, loop.LoopError) as e:
                    log.warning("%s", e)
            if self._fuse is not None:
                self._fuse.stop()
                self._fuse = None
            self.on_change()


def leftovers(directory: str, state: dict[str, Any] | None) -> dict[str, list[str]]:
    """What a dead server left: its mounts, loop devices on its FUSE files, its FUSE mount."""
    fuse_dir = os.path.join(os.path.abspath(directory), FUSE_DIR)
    loops = _loops_on(fuse_dir)
    fs_mounts = {mp for device in loops for mp in mounts_of_device(device)}
    recorded = [mp for mp in (state or {}).get("mounts", {}) if mp in fs_mounts]
    fuse = [e.mountpoint for e in mountinfo()
            if e.mountpoint == fuse_dir and e.fstype.startswith("fuse")]
    return {"mounts": recorded + sorted(fs_mounts - set(recorded)), "loops": loops, "fuse": fuse}


def _loops_on(fuse_dir: str) -> list[str]:
    """Loop devices whose backing file is on ``fuse_dir`` (which may be a dead mount)."""
    return [device for device, backing in loop.attached()
            if os.path.dirname(backing.removesuffix(" (deleted)")) == fuse_dir]


def clean_up_leftovers(directory: str, state: dict[str, Any] | None) -> list[str]:
    """Unmount (lazily) and detach what a dead server left; one line per action."""
    found = leftovers(directory, state)
    done = []
    for mp in found["mounts"]:
        _umount(mp, lazy=True)
        done.append(f"unmounted {mp}")
    for device in found["loops"]:
        try:
            loop.detach(device)
            done.append(f"detached {device}")
        except loop.LoopError as e:
            done.append(f"could not detach {device}: {e}")
    for mp in found["fuse"]:
        _umount(mp, lazy=True)
        done.append(f"unmounted the dead FUSE mount {mp}")
    return done
