"""A real containerd (Debian's 1.6) with thinpool as its proxy snapshotter.

``ctr image import --snapshotter thinpool`` of a docker-save image built here
from Debian's static busybox, ``ctr run --snapshotter thinpool``, ``ctr image
rm``: containerd's garbage collector then removes every snapshot through
the snapshotter, and the pool is left with its base device alone; it passes
thin_check, and ``thinpool snapshotter check`` (and ``thinpool graph check``
on the same root) find records and storage in agreement.  A snapshotter
SIGKILLed in the middle of an import comes back, the import is done again,
and nothing is lost or leaked.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

from snapshotkit import (BUSYBOX, Containerd, Snapshotter, busybox_image, containerd_available,
                         have_root_and_fuse, scratch)

pytestmark = [
    pytest.mark.skipif(not have_root_and_fuse(), reason="needs root and /dev/fuse"),
    pytest.mark.skipif(not containerd_available(), reason="containerd, ctr and runc are not "
                       "installed (apt-get install containerd)"),
    pytest.mark.skipif(not shutil.which("busybox") and not Path(BUSYBOX).exists(),
                       reason="busybox-static is not installed"),
]


@pytest.fixture
def short_tmp(request: pytest.FixtureRequest) -> Iterator[Path]:
    """A short directory (unix socket paths are limited to 107 bytes); whatever the test
    leaves running or mounted there is taken down afterwards (see ``snapshotkit.scratch``)."""
    yield from scratch(request, "tpc-")


def _pool_devices(root: Path) -> set[int]:
    r = subprocess.run([sys.executable, "-m", "thinpool.cli", "list", str(root / "pool"),
                        "--json"], capture_output=True, text=True, check=True)
    return {v["dev_id"] for v in json.loads(r.stdout)}


def _wait_for(condition, what: str, timeout: float = 60):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def _retry_ctr(ctr: Containerd, *args: str, timeout: float = 60) -> str:
    """A ctr command, again while containerd's connection to a restarted snapshotter heals."""
    deadline = time.monotonic() + timeout
    while True:
        r = ctr.ctr(*args, check=False)
        if r.returncode == 0:
            return r.stdout
        if time.monotonic() > deadline:
            raise AssertionError(f"ctr {' '.join(args)}: {r.stderr}")
        time.sleep(0.5)


def _assert_checks_clean(root: Path) -> None:
    """The stopped snapshotter's records agree with its storage ('thinpool snapshotter check',
    and 'thinpool graph check' on the same root), and a pool passes thin_check."""
    for cmd in (["snapshotter", "check", "--root", str(root)],
                ["graph", "--root", str(root), "check"]):
        r = subprocess.run([sys.executable, "-m", "thinpool.cli", *cmd], capture_output=True,
                           text=True, timeout=300)
        assert (r.returncode, r.stdout) == (0, "clean\n"), (cmd, r.stdout, r.stderr)
    if (root / "pool").exists():
        r = subprocess.run(["thin_check", str(root / "pool" / "metadata")],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr


def _run_and_check(ctr: Containerd, ref: str, layers: int, name: str) -> None:
    out = ctr.ctr("run", "--rm", "--snapshotter", "thinpool", ref, name, "/bin/sh", "-c",
                  f"cat /layer{layers}.txt; ls /etc; echo written > /tmp/x; cat /tmp/x").stdout
    assert out.split() == ["layer", str(layers), "written"]  # /etc/motd was whited out


@pytest.mark.parametrize("driver", ["devicemapper", "overlay2"])
def test_import_run_and_remove_an_image(short_tmp: Path, driver: str) -> None:
    root = short_tmp / "r"
    sn = Snapshotter(root, driver).start()
    ctr = Containerd(short_tmp / "c", sn.socket).start()
    try:
        image = busybox_image(short_tmp / "img.tar", extra_layers=2)
        ctr.ctr("image", "import", "--snapshotter", "thinpool", str(short_tmp / "img.tar"))
        committed = sn.list("kind==committed")
        assert len(committed) == image["layers"]
        chain = {i.name.split("/")[-1]: i.parent.split("/")[-1] for i in committed}
        assert sorted(chain) and [p for p in chain.values() if p == ""] == [""]  # one chain
        listed = ctr.ctr("snapshots", "--snapshotter", "thinpool", "ls").stdout
        assert listed.count("Committed") == image["layers"]
        _run_and_check(ctr, image["ref"], 3, "t1")
        ctr.ctr("image", "rm", "--sync", image["ref"])
        _wait_for(lambda: not sn.list(), "containerd's collector to remove every snapshot")
        # the storage goes in the background, once the snapshotter is quiet
        if driver == "devicemapper":
            _wait_for(lambda: _pool_devices(root) == {0}, "only the base device to be left")
        else:
            _wait_for(lambda: not list((root / "snapshots").iterdir()), "no directory left")
    finally:
        ctr.stop()
        assert sn.stop() == 0
    _assert_checks_clean(root)


def test_sigkill_in_the_middle_of_an_import_loses_and_leaks_nothing(short_tmp: Path) -> None:
    root = short_tmp / "r"
    sn = Snapshotter(root).start()
    ctr = Containerd(short_tmp / "c", sn.socket).start()
    rng = random.Random(7)
    try:
        small = busybox_image(short_tmp / "small.tar", "thinpool.test/small:1", extra_layers=1)
        ctr.ctr("image", "import", "--snapshotter", "thinpool", str(short_tmp / "small.tar"))
        image = busybox_image(short_tmp / "img.tar", extra_layers=6, payload=6 << 20)
        cut_short = 0
        for attempt in range(3):
            proc = subprocess.Popen(["ctr", "--address", str(ctr.address), "-n", "thinpool-test",
                                     "image", "import", "--snapshotter", "thinpool",
                                     str(short_tmp / "img.tar")],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            time.sleep(rng.uniform(0.3, 1.5))
            sn.kill()
            proc.communicate(timeout=120)
            cut_short += proc.returncode != 0
            sn.start()
            # whatever the kill cut short was finished or undone: no half-made records
            r = subprocess.run([sys.executable, "-c",
                                "import sqlite3,sys; db=sqlite3.connect(sys.argv[1]);"
                                "print(db.execute(\"SELECT count(*) FROM snapshots WHERE "
                                "state != 'ready'\").fetchone()[0])",
                                str(root / "snapshots.db")], capture_output=True, text=True,
                               check=True)
            assert r.stdout.strip() == "0"
            _retry_ctr(ctr, "image", "import", "--snapshotter", "thinpool",
                       str(short_tmp / "img.tar"))
            _run_and_check(ctr, image["ref"], 7, f"run{attempt}")
            _run_and_check(ctr, small["ref"], 2, f"small{attempt}")  # the earlier image is whole
            ctr.ctr("image", "rm", "--sync", image["ref"])
        assert cut_short, "no import was cut short by the kill"
        ctr.ctr("image", "rm", "--sync", small["ref"])
        _wait_for(lambda: not sn.list(), "containerd's collector to remove every snapshot")
        sn.cleanup()
        _wait_for(lambda: _pool_devices(root) == {0}, "the removed snapshots' devices to go")
    finally:
        ctr.stop()
        assert sn.stop() == 0
    _assert_checks_clean(root)
