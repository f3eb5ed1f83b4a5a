"""Loop devices on files: attach with direct I/O, detach, find by backing file.

A loop device turns a file (here: a volume on a FUSE mount) into a kernel
block device. With ``--direct-io=on`` the loop driver reads and writes the
file with O_DIRECT, so the kernel keeps no second copy of the data in the
page cache. Attaching runs util-linux ``losetup``; the state is read from
sysfs (``/sys/block/loopN/loop/{backing_file,dio}``), which exists only
while a file is attached.

Detaching a device that is still open (say, mounted) succeeds at once but
takes effect only when its last user closes it (the kernel's autoclear).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

from ..errors import ThinpoolError

__all__ = ["LoopError", "attach", "backing_file", "detach", "direct_io", "find"]

SYS_BLOCK = Path("/sys/block")
_DEVICE = re.compile(r"/dev/(loop\d+)")


class LoopError(ThinpoolError):
    """A loop device cannot be attached, detached or inspected."""


def _losetup() -> str:
    path = shutil.which("losetup")
    if path is None:
        raise LoopError("losetup not found (install util-linux)")
    return path


def _sysdir(device: str) -> Path:
    m = _DEVICE.fullmatch(device)
    if m is None:
        raise LoopError(f"{device!r} is not a loop device path (/dev/loopN)")
    return SYS_BLOCK / m.group(1) / "loop"


def attach(path: str | os.PathLike[str], *, read_only: bool = False) -> str:
    """Attach ``path`` to the first free loop device with direct I/O on; its path.

    Fails (and leaves nothing attached) unless the kernel really turned
    direct I/O on, i.e. sysfs ``dio`` reads 1.
    """
    args = [_losetup(), "-f", "--show", "--direct-io=on"]
    if read_only:
        args.append("--read-only")
    r = subprocess.run(args + ["--", os.fspath(path)], capture_output=True, text=True)
    if r.returncode != 0:
        raise LoopError(f"losetup {os.fspath(path)}: {r.stderr.strip() or f'exit {r.returncode}'}")
    device = r.stdout.strip()
    if not direct_io(device):
        detach(device)
        raise LoopError(f"{device} on {os.fspath(path)}: the kernel did not enable direct I/O")
    return device


def detach(device: str) -> None:
    """Detach ``device`` (``losetup -d``); see the module docstring for busy devices."""
    _sysdir(device)
    r = subprocess.run([_losetup(), "-d", device], capture_output=True, text=True)
    if r.returncode != 0:
        raise LoopError(f"losetup -d {device}: {r.stderr.strip() or f'exit {r.returncode}'}")


def backing_file(device: str) -> str | None:
    """The file ``device`` is attached to, or None when it is not attached."""
    try:
        return (_sysdir(device) / "backing_file").read_text().rstrip("\n")
    except FileNotFoundError:
        return None


def direct_io(device: str) -> bool:
    """Whether ``device`` is attached with direct I/O (sysfs ``dio`` is 1)."""
    try:
        return (_sysdir(device) / "dio").read_text().strip() == "1"
    except FileNotFoundError:
        return False


def find(path: str | os.PathLike[str]) -> list[str]:
    """Every loop device attached to ``path`` (compared as absolute paths with
    symlinks resolved, as the kernel reports them), sorted by number."""
    want = os.path.realpath(path)
    found = []
    for sysdir in SYS_BLOCK.glob("loop*/loop"):
        try:
            backing = (sysdir / "backing_file").read_text().rstrip("\n")
        except OSError:  # detached meanwhile
            continue
        if backing == want:
            found.append(sysdir.parent.name)
    return [f"/dev/{name}" for name in sorted(found, key=lambda n: int(n[4:]))]
