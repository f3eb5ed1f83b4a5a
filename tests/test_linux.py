"""thinpool.linux: mount(8)'s option split, superblock probes, loop devices by ioctl.

Loop devices need root and /dev/loop-control; the probes run on files made by
the real mkfs programs.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
from pathlib import Path

import pytest

from thinpool.linux import fsprobe, loop
from thinpool.linux.mounts import MS_NODEV, MS_NOSUID, MS_RDONLY, mount_options, mounts_of_device

LOOPS = os.geteuid() == 0 and os.path.exists("/dev/loop-control")
needs_loops = pytest.mark.skipif(not LOOPS, reason="needs root and /dev/loop-control")


def test_mount_options_split_flags_from_data() -> None:
    assert mount_options("") == (0, "")
    assert mount_options("ro,nosuid,discard,nodev") == (MS_RDONLY | MS_NOSUID | MS_NODEV,
                                                        "discard")
    assert mount_options("ro,rw") == (0, "")  # the last one wins, as in mount(8)
    assert mount_options('context="system_u:object_r:x:s0,c1",nouuid,defaults') == \
        (0, 'context="system_u:object_r:x:s0,c1",nouuid')


@pytest.mark.parametrize("fs", ["ext2", "ext3", "ext4", "xfs", "btrfs"])
def test_probe_names_what_mkfs_made(fs: str, tmp_path: Path) -> None:
    mkfs = shutil.which(f"mkfs.{fs}")
    if mkfs is None:
        pytest.skip(f"mkfs.{fs} is not installed")
    img = tmp_path / "fs.img"
    with open(img, "wb") as f:
        f.truncate(320 << 20)
    subprocess.run([mkfs, "-q", "-f" if fs in ("xfs", "btrfs") else "-F", str(img)],
                   check=True, capture_output=True)
    assert fsprobe.filesystem(str(img)) == fs
    blkid = subprocess.run(["blkid", "-p", "-o", "value", "-s", "TYPE", str(img)],
                           capture_output=True, text=True)
    if blkid.returncode == 0:
        assert blkid.stdout.strip() == fs  # the same verdict as util-linux


def test_probe_of_zeros_garbage_and_a_short_file(tmp_path: Path) -> None:
    zeros, short = tmp_path / "zeros", tmp_path / "short"
    zeros.write_bytes(bytes(1 << 20))
    short.write_bytes(b"XFS")
    assert fsprobe.filesystem(str(zeros)) == "" and fsprobe.filesystem(str(short)) == ""
    with pytest.raises(OSError):
        fsprobe.filesystem(str(tmp_path / "missing"))


@needs_loops
def test_attach_detach_read_only_and_errors(tmp_path: Path) -> None:
    img = tmp_path / "disk.img"
    with open(img, "wb") as f:
        f.truncate(16 << 20)
    device = loop.attach(img)
    try:
        assert loop.backing_file(device) == str(img) and loop.direct_io(device)
        assert device in loop.find(img)
        with open(device, "r+b") as f:  # the device writes reach the file
            f.write(b"hello")
        with open(img, "rb") as f:
            assert f.read(5) == b"hello"
        assert mounts_of_device(device) == []
    finally:
        loop.detach(device)
    assert loop.backing_file(device) is None and loop.find(img) == []
    with pytest.raises(loop.LoopError, match="it is not attached"):
        loop.detach(device)
    ro = loop.attach(img, read_only=True)
    try:
        assert Path(f"/sys/block/{ro[5:]}/ro").read_text().strip() == "1"
    finally:
        loop.detach(ro)
    with pytest.raises(loop.LoopError, match="No such file"):
        loop.attach(tmp_path / "missing")
    with pytest.raises(loop.LoopError, match="not a loop device"):
        loop.detach("/dev/null")


@needs_loops
def test_attach_makes_a_missing_device_node(tmp_path: Path) -> None:
    """Where /dev is not devtmpfs the node of a new loop device may be missing."""
    img = tmp_path / "disk.img"
    with open(img, "wb") as f:
        f.truncate(1 << 20)
    first = loop.attach(img)  # the free device the next attach will get is not this one
    try:
        probe = loop.attach(img)
        loop.detach(probe)  # free again: the next attach takes it
        moved = probe + ".thinpool-test"
        os.rename(probe, moved)
        try:
            device = loop.attach(img)
            try:
                if device != probe:
                    pytest.skip("another program took the free loop device meanwhile")
                assert os.stat(device).st_rdev == os.stat(moved).st_rdev
            finally:
                loop.detach(device)
        finally:
            if os.path.exists(probe):
                os.unlink(probe)
            os.rename(moved, probe)
    finally:
        loop.detach(first)


@needs_loops
def test_a_device_being_detached_reads_as_not_attached(tmp_path: Path) -> None:
    """While a detach is under way the device's sysfs files exist but reading them fails
    (ENODEV): backing_file, direct_io, attached and find answer "not attached", never raise."""
    image = tmp_path / "img"
    image.write_bytes(b"")
    os.truncate(image, 1 << 20)
    current: list[str] = []
    errors: list[BaseException] = []
    answers: set[str | None] = set()
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            for dev in current[-1:]:
                try:
                    answers.add(loop.backing_file(dev))
                    loop.direct_io(dev)
                    loop.find(image)
                    loop.attached()
                except BaseException as e:  # noqa: BLE001  # reported by the test
                    errors.append(e)
                    return

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        for _ in range(200):
            dev = loop.attach(image)
            current.append(dev)
            try:
                assert loop.backing_file(dev) == str(image)
                assert (dev, str(image)) in loop.attached() and loop.find(image) == [dev]
            finally:
                loop.detach(dev)
            if errors:
                break
    finally:
        done.set()
        watcher.join()
    assert errors == []
    assert str(image) in answers  # the watcher saw attached devices too
    assert loop.find(image) == []
