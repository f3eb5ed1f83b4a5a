"""Volumes as kernel block devices: attach, mkfs, mount, snapshots of mounted filesystems,
fsync and fstrim reaching the pool, stop, and recovery after the server died.

Real loop devices, FUSE, ext4 and xfs; needs root.  Every test tears down its mounts,
loop devices and servers, also on failure (``cleanup`` fixture).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

from serverkit import short_tmp
from test_cli import fails, ok, tp
from thinmodel import assert_thin_check_clean

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/dev/fuse") or shutil.which("losetup") is None,
    reason="needs root, /dev/fuse and losetup")

MiB = 1 << 20


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(args, capture_output=True, text=True, timeout=300)
    if check and r.returncode:
        raise AssertionError(f"{' '.join(args)}: {r.stdout}{r.stderr}")
    return r


def mounted_under(root: Path) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [line.split()[4] for line in f if line.split()[4].startswith(str(root))]


def loops_under(root: Path) -> list[str]:
    out = sh("losetup", "-a").stdout
    return [line for line in out.splitlines() if str(root) in line]


def force_clean(root: Path) -> None:
    """Last-resort cleanup: servers, mounts and loop devices under ``root``."""
    for pool in root.glob("*/pool.json"):
        subprocess.run([sys.executable, "-m", "thinpool.cli", "stop", "--force", str(pool.parent)],
                       capture_output=True, timeout=120)
    for mp in sorted(mounted_under(root), reverse=True):
        subprocess.run(["umount", "-l", mp], capture_output=True)
    for line in loops_under(root):
        subprocess.run(["losetup", "-d", line.split(":")[0]], capture_output=True)


@pytest.fixture
def root() -> Iterator[Path]:
    d = short_tmp("tk")
    try:
        yield d
    finally:
        force_clean(d)
        leaked = mounted_under(d) + loops_under(d)
        shutil.rmtree(d, ignore_errors=True)
        assert not leaked, f"left behind: {leaked}"


@pytest.fixture
def pool(root: Path) -> Path:
    d = root / "p"
    ok("pool", "create", d, "--data-size", "2G", "--metadata-size", "64M")
    ok("create-thin", d, "0", "--size", "512M", "--name", "base")
    return d


def server_pid(pool: Path) -> int:
    return json.loads((pool / "server.json").read_text())["pid"]


def thin_mapped(pool: Path, dev: int) -> int:
    return int(ok("status", pool, "--thin", str(dev)).split()[0])


def test_demo_walks_through_on_real_ext4(root: Path) -> None:
    out = ok("demo", root / "demo")
    lines = out.splitlines()
    assert "$ thinpool mount pool 0 mnt0 --mkfs ext4" in lines
    i = lines.index("$ cat mnt0/id.txt")
    assert lines[i + 1] == "    hello world, I am a base" and lines[i + 2].startswith("$ cat mnt1")
    i = lines.index("$ cat mnt2/id.txt")
    assert lines[i + 1:i + 3] == ["    hello world, I am a base", "    I am snap1"]
    assert "    id.txt  lost+found  snap1.txt" in lines and "    exit 0" in lines
    assert not mounted_under(root) and not loops_under(root)
    assert_thin_check_clean(root / "demo" / "pool" / "metadata")


def test_attach_detach_and_errors(pool: Path, root: Path) -> None:
    dev = ok("attach", pool, "0").strip()
    assert dev.startswith("/dev/loop")
    name = dev.rsplit("/", 1)[1]
    assert Path(f"/sys/block/{name}/loop/dio").read_text().strip() == "1"
    assert int(Path(f"/sys/block/{name}/size").read_text()) * 512 == 512 * MiB
    sh("dd", "if=/dev/urandom", f"of={root / 'blob'}", "bs=1M", "count=3")
    sh("dd", f"if={root / 'blob'}", f"of={dev}", "bs=1M", "seek=7", "oflag=direct", "conv=fsync")
    r = tp("read", pool, "0", "--offset", "7M", "--length", "3M")
    assert r.stdout == (root / "blob").read_bytes()
    fails("attach", pool, "0", match="already attached")
    fails("attach", pool, "9", match="does not exist")
    (root / "m").mkdir()
    sh("mkfs.ext4", "-q", dev)
    sh("mount", dev, str(root / "m"))  # mounted by hand: thinpool does not own this mount
    try:
        fails("detach", pool, "0", match="is mounted at")
        fails("stop", pool, match="mounted by something else")
        assert (root / "m").is_mount()
    finally:
        sh("umount", str(root / "m"))
    ok("detach", pool, dev)
    assert not loops_under(root)
    fails("detach", pool, "0", match="not attached")
    ok("stop", pool)


def test_create_snap_attached_in_one_request_and_its_free_space_check(pool: Path) -> None:
    """The control request create-snap with ``attach`` makes the snapshot and attaches it
    (one round trip); ``min_free_percent`` refuses it with ENOSPC on a pool short of space
    and leaves nothing behind; bad values are one-line errors."""
    from thinpool.server.control import RemoteError, request
    from thinpool.server.daemon import control_path

    ok("attach", pool, "0")  # starts the server
    ok("detach", pool, "0")
    ctl = control_path(str(pool))
    r = request(ctl, "create-snap", {"id": 1, "origin_id": 0, "attach": True,
                                     "min_free_percent": 10, "transaction": [0, 1]})
    assert r["device"].startswith("/dev/loop")
    assert request(ctl, "server-info", {})["attached"] == {"1": r["device"]}
    assert request(ctl, "status", {})["status"]["transaction_id"] == 1
    with pytest.raises(RemoteError, match=r"free metadata blocks which is less than minimum "
                                          r"required \d+ free metadata blocks \(99%\) \(ENOSPC\)"):
        request(ctl, "create-snap", {"id": 2, "origin_id": 0, "attach": True,
                                     "min_free_percent": 99})
    for bad in (100, -1, "10", True):
        with pytest.raises(RemoteError, match="min_free_percent must be an integer"):
            request(ctl, "create-snap", {"id": 2, "origin_id": 0, "min_free_percent": bad})
    assert [v["dev_id"] for v in request(ctl, "list", {})["volumes"]] == [0, 1]
    request(ctl, "detach", {"target": "1"})
    request(ctl, "delete", {"id": 1, "discard": True})
    with pytest.raises(RemoteError, match="discard must be true or false"):
        request(ctl, "delete", {"id": 0, "discard": "yes"})
    ok("stop", pool)
    assert_thin_check_clean(pool / "metadata")


def test_mount_snapshot_beside_origin_and_fsck(pool: Path, root: Path) -> None:
    for m in ("m0", "m1", "busy"):
        (root / m).mkdir()
    ok("mount", pool, "0", root / "m0", "--mkfs", "ext4")
    fails("mount", pool, "0", root / "m1", "--mkfs", "ext4", match="already mounted at")
    data = os.urandom(5 * MiB)
    (root / "m0" / "big").write_bytes(data)
    (root / "m0" / "dir").mkdir()
    (root / "m0" / "dir" / "small").write_text("x" * 1000)
    # a writer keeps going while the snapshot is taken: the filesystem is frozen meanwhile
    writer = subprocess.Popen(["sh", "-c", f"i=0; while [ $i -lt 400 ]; do echo $i >> "
                                           f"{root / 'm0' / 'log'}; i=$((i+1)); done"])
    ok("create-snap", pool, "1", "0", "--name", "snap")
    writer.wait(60)
    ok("mount", pool, "1", root / "m1")
    assert (root / "m1" / "big").read_bytes() == data
    assert (root / "m1" / "dir" / "small").read_text() == "x" * 1000
    (root / "m1" / "only-in-snap").write_text("new")
    assert not (root / "m0" / "only-in-snap").exists()
    fails("mount", pool, "0", root / "m1", match="already a mount point")
    fails("mount", pool, "9", root / "busy", match="does not exist")
    fails("umount", root / "busy", match="not a mount point")
    ok("umount", root / "m1")
    # the snapshot's filesystem is consistent (it was frozen, not torn)
    dev = ok("attach", pool, "1").strip()
    r = sh("e2fsck", "-fn", dev, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    ok("detach", pool, "1")
    ok("stop", pool)
    assert not mounted_under(root) and not loops_under(root)
    assert_thin_check_clean(pool / "metadata")


def test_fsync_reaches_the_pool_and_survives_a_server_kill(pool: Path, root: Path) -> None:
    (root / "m").mkdir()
    ok("mount", pool, "0", root / "m", "--mkfs", "ext4")
    payload = os.urandom(2 * MiB)
    with open(root / "m" / "durable", "wb") as f:
        f.write(payload)
        f.flush()
        os.fsync(f.fileno())
    os.sync()
    os.kill(server_pid(pool), signal.SIGKILL)
    time.sleep(0.5)
    assert_thin_check_clean(pool / "metadata")
    r = tp("attach", pool, "0")
    assert r.returncode == 1 and b"died and left" in r.stderr and b"--recover" in r.stderr
    out = ok("attach", pool, "--recover")
    assert f"at {root / 'm'}" in out
    assert (root / "m" / "durable").read_bytes() == payload
    ok("umount", root / "m")
    ok("stop", pool)


def test_fstrim_gives_space_back_to_the_pool(pool: Path, root: Path) -> None:
    (root / "m").mkdir()
    ok("mount", pool, "0", root / "m", "--mkfs", "ext4")
    before = thin_mapped(pool, 0)
    (root / "m" / "big").write_bytes(os.urandom(64 * MiB))
    os.sync()
    full = thin_mapped(pool, 0)
    assert full >= before + 60 * MiB // 512
    (root / "m" / "big").unlink()
    os.sync()
    sh("fstrim", str(root / "m"))
    time.sleep(1.5)  # the periodic commit punches the freed blocks
    assert thin_mapped(pool, 0) <= before + 4 * MiB // 512
    ok("umount", root / "m")
    ok("stop", pool)
    assert_thin_check_clean(pool / "metadata")


def test_xfs_snapshot_mounts_beside_origin(pool: Path, root: Path) -> None:
    if shutil.which("mkfs.xfs") is None:
        pytest.skip("xfsprogs is not installed")
    (root / "a").mkdir()
    (root / "b").mkdir()
    ok("mount", pool, "0", root / "a", "--mkfs", "xfs")
    (root / "a" / "f").write_text("xfs data")
    ok("create-snap", pool, "1", "0")
    ok("mount", pool, "1", root / "b")  # same UUID: thinpool mounts xfs with nouuid
    assert (root / "b" / "f").read_text() == "xfs data"
    ok("stop", pool)
    assert not mounted_under(root) and not loops_under(root)


def test_mkfs_refuses_to_format_over_a_filesystem(pool: Path, root: Path) -> None:
    (root / "m").mkdir()
    ok("mount", pool, "0", root / "m", "--mkfs", "ext4")
    (root / "m" / "keep").write_text("precious")
    ok("umount", root / "m")
    fails("mount", pool, "0", root / "m", "--mkfs", "xfs", match="already holds a ext4")
    ok("mount", pool, "0", root / "m")
    assert (root / "m" / "keep").read_text() == "precious"
    ok("umount", root / "m")
    fails("mount", pool, "0", root / "m", "--mkfs", "nope", match="Invalid value")
    # mount(8)'s options reach mount(2): flags as flags, the rest as the filesystem's data
    fails("mount", pool, "0", root / "m", "-o", "nosuchoption=1",
          match="Invalid argument (a bad option")
    assert not mounted_under(root / "m") and not any("/.fuse/0" in l for l in loops_under(pool))
    ok("mount", pool, "0", root / "m", "-o", "ro,noatime,nodelalloc")
    with open("/proc/self/mountinfo") as f:
        line = next(l for l in f if l.split()[4] == str(root / "m"))
    assert line.split()[5].startswith("ro,") and "noatime" in line.split()[5]
    assert "nodelalloc" in line.split(" - ")[1]
    with pytest.raises(OSError):
        (root / "m" / "new").write_text("x")
    ok("umount", root / "m")
    ok("stop", pool)


def test_stop_force_cleans_up_after_a_dead_server(pool: Path, root: Path) -> None:
    (root / "m").mkdir()
    ok("mount", pool, "0", root / "m", "--mkfs", "ext4")
    os.kill(server_pid(pool), signal.SIGKILL)
    time.sleep(0.5)
    fails("stop", pool, match="not serving")
    out = tp("stop", "--force", pool)
    assert out.returncode == 0 and b"detached /dev/loop" in out.stderr
    assert not mounted_under(root) and not loops_under(root)
    ok("attach", pool, "0")  # a new server starts cleanly
    ok("stop", pool)
