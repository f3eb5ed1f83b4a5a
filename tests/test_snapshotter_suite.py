"""containerd's own snapshotter conformance suite against every backend.

containerd 1.6's ``snapshots/testsuite.SnapshotterSuite`` (Go, from
Debian's ``golang-github-containerd-containerd-dev``) drives ``thinpool
snapshotter serve`` through containerd's proxy snapshotter client:
``tests/containerd/suite_test.go``, built by
``tests/containerd/build-suite.sh``.  CI builds the binary once per run and
names it in ``THINPOOL_SUITE_BIN``; without it the test builds it here
(needs golang-go and Debian's package lists), or is skipped if it cannot.
Every sub-test must pass, except ``Rename``, which the suite itself always
skips ("rename test still fails on some kernels with overlay").
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

from snapshotkit import REPO, have_root_and_fuse, scratch

SUBTESTS = ["Basic", "StatActive", "StatComitted", "TransitivityTest", "PreareViewFailingtest",
            "Update", "Remove", "Walk", "LayerFileupdate", "RemoveDirectoryInLowerLayer", "Chown",
            "DirectoryPermissionOnCommit", "RemoveIntermediateSnapshot",
            "DeletedFilesInChildSnapshot", "MoveFileFromLowerLayer", "ViewReadonly",
            "StatInWalk", "CloseTwice", "RootPermission", "128LayersMount"]
OPTIONS = {"devicemapper": "dm.basesize=256M", "overlay2": "", "vfs": ""}

pytestmark = pytest.mark.skipif(not have_root_and_fuse(),
                                reason="the suite mounts snapshots: needs root and /dev/fuse")


@pytest.fixture(scope="module")
def suite_binary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    given = os.environ.get("THINPOOL_SUITE_BIN")
    if given:
        assert Path(given).is_file(), f"THINPOOL_SUITE_BIN={given} does not exist"
        return Path(given)
    if not shutil.which("go") or not shutil.which("apt-get"):
        pytest.skip("no THINPOOL_SUITE_BIN and no Go toolchain to build containerd's suite "
                    "(apt-get install golang-go)")
    out = tmp_path_factory.mktemp("suite") / "snapshotter-suite.test"
    r = subprocess.run(["bash", str(REPO / "tests/containerd/build-suite.sh"), str(out)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"could not build containerd's suite: {r.stderr.strip()[-500:]}")
    return out


@pytest.fixture
def short_tmpdir(request: pytest.FixtureRequest) -> Iterator[Path]:
    """The suite's TMPDIR (the snapshotters' sockets live below it: keep it short); what a
    failed or killed run leaves there (snapshotters, pool servers, the suite's mounts) is taken
    down afterwards."""
    yield from scratch(request, "ts-")


def run_suite(binary: Path, env: dict[str, str], timeout: float) -> tuple[int, str, str]:
    """Run the suite binary in a process group of its own (with the snapshotters it starts);
    the group is killed however this ends (a timeout, an interrupted pytest).  It runs in
    ``TMPDIR``, so that a ``clean_tree`` of it finds the suite even after a killed pytest."""
    proc = subprocess.Popen([str(binary), "-test.v", "-test.run", "TestThinpoolSnapshotter",
                             "-test.timeout", f"{timeout:.0f}s"], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True, cwd=env["TMPDIR"])  # cwd: see clean_tree
    try:
        out, err = proc.communicate(timeout=timeout + 60)
        return proc.returncode, out, err
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


@pytest.mark.parametrize("driver", ["devicemapper", "overlay2", "vfs"])
def test_containerd_snapshotter_suite(suite_binary: Path, short_tmpdir: Path,
                                      driver: str) -> None:
    env = dict(os.environ)
    env.update({
        "THINPOOL_SNAPSHOTTER": f"{sys.executable} -m thinpool.cli",
        "THINPOOL_DRIVER": driver,
        "THINPOOL_STORAGE_OPTS": OPTIONS[driver],
        "PYTHONPATH": str(REPO / "src") + (os.pathsep + env["PYTHONPATH"]
                                           if env.get("PYTHONPATH") else ""),
        "TMPDIR": str(short_tmpdir),  # the snapshotter's socket lives below it
    })
    returncode, stdout, stderr = run_suite(suite_binary, env, timeout=900)
    results = {name: outcome for outcome, name in re.findall(
        r"--- (PASS|FAIL|SKIP): TestThinpoolSnapshotter/(\S+)", stdout)}
    failed = {k: v for k, v in results.items() if v != "PASS" and k != "Rename"}
    assert returncode == 0 and not failed, (failed, stdout[-6000:], stderr[-2000:])
    assert {k for k, v in results.items() if v == "PASS"} == set(SUBTESTS)
    assert results.get("Rename") == "SKIP"
