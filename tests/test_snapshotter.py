"""``thinpool snapshotter serve`` as containerd sees it: real processes, real mounts, gRPC.

What containerd's own suite (test_snapshotter_suite.py) never calls -
Mounts, Usage, Cleanup - and what it does not try: bad input with the right
gRPC codes while the server keeps serving, a client that goes away in the
middle of List, a full pool, SIGKILL at random points of a workload and
the state after a restart (records and pool agree, nothing committed lost,
nothing half-made left), and the pool judged by thin_check afterwards.
"""

from __future__ import annotations

import os
import random
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

import grpc
import pytest

from snapshotkit import (Snapshotter, have_root_and_fuse, mount_all, mounts_under, scratch,
                         umount)
from thinpool.snapshotter.proto import snapshots_pb2 as pb

pytestmark = pytest.mark.skipif(not have_root_and_fuse(),
                                reason="the snapshotter mounts: needs root and /dev/fuse")

DRIVERS = ["devicemapper", "overlay2", "vfs"]


@pytest.fixture
def short_tmp(request: pytest.FixtureRequest) -> Iterator[Path]:
    """A short directory (unix socket paths are limited to 107 bytes); whatever the test
    leaves running or mounted there is taken down afterwards (see ``snapshotkit.scratch``)."""
    yield from scratch(request, "tps-")


def _code(fn, *args):  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as e:
        fn(*args)
    return e.value.code(), e.value.details()


def _pool_devices(root: Path) -> set[int]:
    r = subprocess.run([sys.executable, "-m", "thinpool.cli", "list", str(root / "pool"),
                        "--json"], capture_output=True, text=True, check=True)
    import json

    return {v["dev_id"] for v in json.loads(r.stdout)}


def _records(root: Path) -> dict[str, tuple[int, str, int]]:
    """key -> (id, state, kind), straight from the database (read-only)."""
    db = sqlite3.connect(f"file:{root / 'snapshots.db'}?mode=ro", uri=True)
    try:
        return {k: (i, s, kind) for i, k, s, kind in
                db.execute("SELECT id, key, state, kind FROM snapshots")}
    finally:
        db.close()


def _eventually(cond, timeout: float = 15.0) -> bool:  # type: ignore[no-untyped-def]
    """Whether ``cond()`` comes true within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _write_layer(sn: Snapshotter, key: str, work: Path, files: dict[str, bytes],
                 parent: str = "") -> None:
    target = work / key
    target.mkdir(parents=True, exist_ok=True)
    mount_all(sn.prepare(key, parent), target)
    try:
        for name, data in files.items():
            (target / name).write_bytes(data)
    finally:
        umount(target)


def _read_view(sn: Snapshotter, key: str, parent: str, work: Path, name: str) -> bytes:
    target = work / key
    target.mkdir(parents=True, exist_ok=True)
    mount_all(sn.view(key, parent), target)
    try:
        return (target / name).read_bytes()
    finally:
        umount(target)
        sn.remove(key)


# -- Mounts ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("driver", DRIVERS)
def test_mounts_of_active_and_view_snapshots(short_tmp: Path, driver: str) -> None:
    sn = Snapshotter(short_tmp / "r", driver).start()
    try:
        _write_layer(sn, "base-a", short_tmp / "w", {"f": b"base\n"})
        sn.commit("base", "base-a")
        prepared = sn.prepare("top", "base")
        assert list(sn.mounts("top")) == list(prepared)  # Mounts repeats what Prepare said
        view = sn.view("v", "base")
        assert list(sn.mounts("v")) == list(view)
        assert "ro" in view[0].options
        if driver == "devicemapper":
            assert prepared[0].type == "ext4" and prepared[0].source.startswith("/dev/loop")
            assert view[0].type == "ext4" and view[0].source != prepared[0].source
        target = short_tmp / "w" / "view"
        target.mkdir()
        mount_all(sn.mounts("v"), target)
        try:
            assert (target / "f").read_bytes() == b"base\n"
            with pytest.raises(OSError):
                (target / "new").write_bytes(b"x")  # a view is read-only
        finally:
            umount(target)
        assert _code(sn.mounts, "base")[0] == grpc.StatusCode.FAILED_PRECONDITION  # committed
        assert _code(sn.mounts, "nope")[0] == grpc.StatusCode.NOT_FOUND
        # After a restart (for devicemapper the pool server lives on, or is restarted) Mounts
        # reaches the same content.
        assert sn.stop() == 0
        sn.start()
        target = short_tmp / "w" / "top2"
        target.mkdir()
        mount_all(sn.mounts("top"), target)
        try:
            assert (target / "f").read_bytes() == b"base\n"
            (target / "g").write_bytes(b"top\n")
        finally:
            umount(target)
        sn.commit("top-c", "top")
        assert _read_view(sn, "check", "top-c", short_tmp / "w", "g") == b"top\n"
    finally:
        sn.stop()


def test_an_xfs_base_on_request_and_its_snapshots_mounted_side_by_side(short_tmp: Path) -> None:
    """dm.fs=xfs: every snapshot shares the base's filesystem UUID, so the mounts carry
    ``nouuid`` and two of them can be mounted at once."""
    sn = Snapshotter(short_tmp / "r", options=("dm.basesize=512M", "dm.fs=xfs")).start()
    try:
        _write_layer(sn, "a", short_tmp / "w", {"f": b"xfs layer\n"})
        sn.commit("a-c", "a")
        top, view = sn.prepare("top", "a-c"), sn.view("v", "a-c")
        assert (top[0].type, view[0].type) == ("xfs", "xfs")
        assert "nouuid" in top[0].options and {"ro", "nouuid"} <= set(view[0].options)
        t1, t2 = short_tmp / "t1", short_tmp / "t2"
        t1.mkdir()
        t2.mkdir()
        mount_all(top, t1)
        try:
            mount_all(view, t2)
            try:
                (t1 / "g").write_bytes(b"top\n")
                assert (t2 / "f").read_bytes() == b"xfs layer\n" and not (t2 / "g").exists()
            finally:
                umount(t2)
        finally:
            umount(t1)
        sn.commit("top-c", "top")
        assert _read_view(sn, "check", "top-c", short_tmp / "w", "g") == b"top\n"
    finally:
        assert sn.stop() == 0
    r = subprocess.run(["thin_check", str(short_tmp / "r" / "pool" / "metadata")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


# -- Usage ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("driver", DRIVERS)
def test_usage_counts_a_layer_s_own_data(short_tmp: Path, driver: str) -> None:
    sn = Snapshotter(short_tmp / "r", driver).start()
    mib = 1 << 20
    try:
        _write_layer(sn, "a", short_tmp / "w", {"big": os.urandom(4 * mib)})
        active = sn.usage("a")
        assert 4 * mib <= active.size < 6 * mib
        sn.commit("a-c", "a")
        committed = sn.usage("a-c")
        assert 4 * mib <= committed.size < 6 * mib
        # a child that adds 1 MiB uses about 1 MiB, not its parent's 4 (vfs copies the parent)
        _write_layer(sn, "b", short_tmp / "w", {"small": os.urandom(mib)}, parent="a-c")
        child = sn.usage("b")
        if driver == "vfs":
            assert child.size >= 5 * mib
        else:
            assert mib <= child.size < 2 * mib
        if driver == "devicemapper":
            assert committed.inodes == 0  # not known without mounting
        else:
            assert committed.inodes >= 2 and child.inodes >= 2
        sn.view("v", "a-c")
        assert sn.usage("v").size == 0  # a view holds nothing of its own
        assert _code(sn.usage, "nope")[0] == grpc.StatusCode.NOT_FOUND
        assert sn.stop() == 0
        sn.start()  # a committed snapshot's usage is recorded, and survives a restart
        again = sn.usage("a-c")
        assert (again.size, again.inodes) == (committed.size, committed.inodes)
    finally:
        sn.stop()


# -- Cleanup ----------------------------------------------------------------------------------------
def test_cleanup_deletes_pool_devices_no_record_names(short_tmp: Path) -> None:
    root = short_tmp / "r"
    sn = Snapshotter(root).start()
    try:
        _write_layer(sn, "a", short_tmp / "w", {"f": b"1"})
        sn.commit("a-c", "a")
        sn.prepare("b", "a-c")
        ids = {k: v[0] for k, v in _records(root).items()}
        cli = [sys.executable, "-m", "thinpool.cli"]
        # devices no record names: a thin volume and a snapshot of a layer (via the pool server)
        subprocess.run([*cli, "create-thin", str(root / "pool"), "700", "--size", "16M"],
                       check=True)
        subprocess.run([*cli, "create-snap", str(root / "pool"), "701", str(ids["a-c"])],
                       check=True)
        assert {700, 701} <= _pool_devices(root)
        sn.cleanup()
        assert _pool_devices(root) == {0, ids["a-c"], ids["b"]}
        assert sn.names() == ["a-c", "b"]  # records untouched
        sn.cleanup()  # nothing left to do
        assert _pool_devices(root) == {0, ids["a-c"], ids["b"]}
    finally:
        sn.stop()


def test_cleanup_detaches_a_layer_committed_while_mounted(short_tmp: Path) -> None:
    sn = Snapshotter(short_tmp / "r").start()
    try:
        target = short_tmp / "m"
        target.mkdir()
        mounts = sn.prepare("a")
        mount_all(mounts, target)
        (target / "f").write_bytes(b"written before commit")
        sn.commit("a-c", "a")  # containerd may commit before it unmounts
        umount(target)
        device = mounts[0].source
        assert os.path.exists(f"/sys/block/{os.path.basename(device)}/loop")
        sn.cleanup()
        assert not os.path.exists(f"/sys/block/{os.path.basename(device)}/loop/backing_file") \
            or "a-c" not in open(f"/sys/block/{os.path.basename(device)}/loop/backing_file").read()
        assert _read_view(sn, "v", "a-c", short_tmp / "w", "f") == b"written before commit"
    finally:
        sn.stop()


@pytest.mark.parametrize("driver", ["overlay2", "vfs"])
def test_cleanup_removes_directories_no_record_names(short_tmp: Path, driver: str) -> None:
    root = short_tmp / "r"
    sn = Snapshotter(root, driver).start()
    try:
        sn.prepare("a")
        (root / "snapshots" / "999" / "fs").mkdir(parents=True)
        (root / "snapshots" / ".rm-998").mkdir()
        sn.cleanup()
        assert sorted(os.listdir(root / "snapshots")) == [str(_records(root)["a"][0])]
    finally:
        sn.stop()


# -- check -----------------------------------------------------------------------------------------
def _check(root: Path, *extra: str, graph: bool = False) -> subprocess.CompletedProcess[str]:
    cmd = ["graph", "--root", str(root), "check"] if graph else \
        ["snapshotter", "check", "--root", str(root)]
    return subprocess.run([sys.executable, "-m", "thinpool.cli", *cmd, *extra],
                          capture_output=True, text=True, timeout=300)


def test_check_finds_what_a_crash_or_a_leak_left_in_a_pool_and_repairs_it(short_tmp: Path
                                                                            ) -> None:
    import json

    root = short_tmp / "r"
    sn = Snapshotter(root).start()
    try:
        sn.prepare("a")
        sn.commit("a-c", "a")
        sn.prepare("b", "a-c")
        sn.prepare("gone")
        r = _check(root)
        assert r.returncode == 1 and "in use by another snapshotter" in r.stderr
    finally:
        assert sn.stop() == 0
    r = _check(root)
    assert (r.returncode, r.stdout) == (0, "clean\n"), r.stderr
    ids = {k: v[0] for k, v in _records(root).items()}
    cli = [sys.executable, "-m", "thinpool.cli"]
    subprocess.run([*cli, "create-thin", str(root / "pool"), "700", "--size", "16M"], check=True)
    subprocess.run([*cli, "delete", str(root / "pool"), str(ids["gone"])], check=True)
    db = sqlite3.connect(root / "snapshots.db")
    db.execute("UPDATE snapshots SET state = 'creating' WHERE key = 'b'")  # a crash mid-Prepare
    db.commit()
    db.close()
    expected = {f"snapshot b (#{ids['b']}): an interrupted creation (the next start rolls it "
                "back)",
                "thin device 700 belongs to no snapshot (Cleanup removes it)",
                f"snapshot #{ids['gone']}: thin device {ids['gone']} is not in the pool"}
    for graph in (False, True):  # 'thinpool graph check' on a snapshotter root: the same
        r = _check(root, graph=graph)
        assert r.returncode == 1, r.stderr
        assert set(r.stdout.splitlines()) == {f"problem: {p}" for p in expected}
    r = _check(root, "--repair", "--json")
    assert r.returncode == 1, r.stderr  # a snapshot's lost device cannot be brought back
    assert {(f["problem"], f["repaired"]) for f in json.loads(r.stdout)} == \
        {(p, "is not in the pool" not in p) for p in expected}
    sn.start()
    try:
        assert sn.names() == ["a-c", "gone"]
        sn.remove("gone")  # what containerd's collector would do with it
    finally:
        assert sn.stop() == 0
    r = _check(root)
    assert (r.returncode, r.stdout) == (0, "clean\n"), r.stdout + r.stderr
    assert _pool_devices(root) == {0, ids["a-c"]}
    r = subprocess.run(["thin_check", str(root / "pool" / "metadata")], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_check_of_a_directory_backend_and_of_what_is_no_snapshotter_root(short_tmp: Path
                                                                         ) -> None:
    import shutil

    root = short_tmp / "r"
    sn = Snapshotter(root, "vfs").start()
    sn.prepare("a")
    sn.prepare("b")
    assert sn.stop() == 0
    ids = {k: v[0] for k, v in _records(root).items()}
    shutil.rmtree(root / "snapshots" / str(ids["b"]))
    (root / "snapshots" / "999" / "fs").mkdir(parents=True)
    (root / "snapshots" / ".rm-998").mkdir()
    r = _check(root, "--repair")
    assert r.returncode == 1
    assert sorted(r.stdout.splitlines()) == sorted([
        f"problem: snapshot #{ids['b']}: its directory snapshots/{ids['b']} is missing",
        "repaired: snapshots/999 belongs to no snapshot (Cleanup removes it)",
        "repaired: snapshots/.rm-998: a removal left half done (Cleanup finishes it)"])
    assert sorted(os.listdir(root / "snapshots")) == [str(ids["a"])]
    r = _check(short_tmp)
    assert r.returncode == 1 and "is not a thinpool snapshotter root" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    r = _check(short_tmp / "missing")
    assert r.returncode == 2 and "does not exist" in r.stderr and "Traceback" not in r.stderr


# -- bad input --------------------------------------------------------------------------------------
@pytest.mark.parametrize("driver", DRIVERS)
def test_bad_requests_get_containerd_s_codes_and_the_server_keeps_serving(
        short_tmp: Path, driver: str) -> None:
    sn = Snapshotter(short_tmp / "r", driver).start()
    C = grpc.StatusCode
    try:
        sn.prepare("a")
        sn.commit("c", "a")
        sn.prepare("child", "c")
        sn.view("v", "c")
        target = short_tmp / "m"
        target.mkdir()
        mount_all(sn.mounts("child"), target)
        cases = [
            (sn.stat, ("nope",), C.NOT_FOUND, "nope"),
            (sn.mounts, ("nope",), C.NOT_FOUND, "nope"),
            (sn.remove, ("nope",), C.NOT_FOUND, "nope"),
            (sn.usage, ("nope",), C.NOT_FOUND, "nope"),
            (sn.commit, ("x", "nope"), C.NOT_FOUND, "nope"),
            (sn.prepare, ("p", "missing-parent"), C.NOT_FOUND, "missing-parent"),
            (sn.view, ("p", "missing-parent"), C.NOT_FOUND, "missing-parent"),
            (sn.prepare, ("p", "child"), C.INVALID_ARGUMENT, "not a committed"),
            (sn.prepare, ("child",), C.ALREADY_EXISTS, "child"),
            (sn.prepare, ("",), C.INVALID_ARGUMENT, "empty"),
            (sn.prepare, ("big", "", {"k": "v" * 5000}), C.INVALID_ARGUMENT, "maximum size"),
            (sn.commit, ("c2", "v"), C.FAILED_PRECONDITION, "not active"),
            (sn.commit, ("c", "child"), C.ALREADY_EXISTS, "already exists"),
            (sn.remove, ("c",), C.FAILED_PRECONDITION, "remove"),
            (sn.remove, ("child",), C.FAILED_PRECONDITION, "mounted"),
            (sn.mounts, ("c",), C.FAILED_PRECONDITION, "not active or view"),
            (sn.list, ("name==",), C.INVALID_ARGUMENT, "filters"),
            (sn.list, ("kind==view,",), C.INVALID_ARGUMENT, "filters"),
            (sn.list, ('labels."x',), C.INVALID_ARGUMENT, "filters"),
        ]
        for fn, args, code, text in cases:
            got, details = _code(fn, *args)
            assert (got, text in details) == (code, True), (fn.__name__, args, details)
        info = sn.stat("c")
        for path in ("parent", "name", "kind", "created_at"):
            got, details = _code(sn.stub.Update, pb.UpdateSnapshotRequest(
                info=info, update_mask={"paths": [path]}))
            assert got == C.INVALID_ARGUMENT and path in details
        umount(target)
        sn.remove("child")  # now it can go
        assert sn.names() == ["c", "v"]  # nothing else changed, and it still answers
    finally:
        sn.stop()


def test_update_changes_labels_only(short_tmp: Path) -> None:
    sn = Snapshotter(short_tmp / "r", "vfs").start()
    try:
        sn.prepare("a", labels={"keep": "1", "drop": "2"})
        before = sn.stat("a")
        info = pb.Info(name="a", labels={"new": "3", "drop": ""})
        after = sn.stub.Update(pb.UpdateSnapshotRequest(
            info=info, update_mask={"paths": ["labels.new", "labels.drop"]})).info
        assert dict(after.labels) == {"keep": "1", "new": "3"}
        assert after.created_at == before.created_at and after.updated_at != before.updated_at
        after = sn.stub.Update(pb.UpdateSnapshotRequest(info=pb.Info(name="a",
                                                                     labels={"x": "y"}))).info
        assert dict(after.labels) == {"x": "y"}
        assert dict(sn.stat("a").labels) == {"x": "y"}
        sn.commit("a-c", "a", labels={"containerd.io/gc.root": "x", "empty": ""})
        info = sn.stat("a-c")  # a commit's labels replace the active snapshot's; "" is none
        assert (dict(info.labels), info.kind) == ({"containerd.io/gc.root": "x"}, pb.COMMITTED)
        assert sn.names("labels.\"containerd.io/gc.root\"==x") == ["a-c"]
    finally:
        sn.stop()


def test_a_client_that_goes_away_mid_list_leaves_the_server_serving(short_tmp: Path) -> None:
    sn = Snapshotter(short_tmp / "r", "overlay2").start()
    try:
        for i in range(350):
            sn.prepare(f"k{i:04d}", labels={"i": str(i)})
        for _ in range(5):
            call = sn.stub.List(pb.ListSnapshotsRequest())
            first = next(iter(call))
            assert len(first.info) == 100  # streamed in batches
            call.cancel()
        # a client that disconnects its whole channel mid-stream
        ch = grpc.insecure_channel(f"unix:{sn.socket}")
        from thinpool.snapshotter.proto import snapshots_pb2_grpc as pb_grpc

        stream = pb_grpc.SnapshotsStub(ch).List(pb.ListSnapshotsRequest())
        next(iter(stream))
        ch.close()
        assert len(sn.list()) == 350
        assert sn.names("labels.i==349") == ["k0349"]
    finally:
        sn.stop()


def test_a_full_pool_refuses_new_snapshots_and_recovers(short_tmp: Path) -> None:
    sn = Snapshotter(short_tmp / "r", options=("dm.basesize=256M", "dm.loopdatasize=96M",
                                               "dm.min_free_space=20%")).start()
    try:
        target = short_tmp / "m"
        target.mkdir()
        mount_all(sn.prepare("filler"), target)
        try:
            with open(target / "data", "wb") as f:
                f.write(os.urandom(80 << 20))
                f.flush()
                os.fsync(f.fileno())
        finally:
            umount(target)
        code, details = _code(sn.prepare, "more")
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "free data blocks" in details and "dm.min_free_space" in details
        assert "more" not in sn.names()  # nothing half-made
        assert sn.names() == ["filler"]
        sn.remove("filler")
        sn.prepare("more")  # room again
        assert sn.names() == ["more"]
    finally:
        sn.stop()


# -- start-up refusals ---------------------------------------------------------------------------
def test_serve_refuses_bad_options_a_busy_root_and_another_driver(short_tmp: Path) -> None:
    cli = [sys.executable, "-m", "thinpool.cli", "snapshotter", "serve"]
    sock = str(short_tmp / "x.sock")
    r = subprocess.run([*cli, "--socket", sock, "--root", str(short_tmp / "r"),
                        "--storage-opt", "dm.nosuch=1"], capture_output=True, text=True)
    assert r.returncode == 1 and "unknown devicemapper option" in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = subprocess.run([*cli, "--socket", sock, "--root", str(short_tmp / "r"), "--driver",
                        "vfs", "--storage-opt", "novalue"], capture_output=True, text=True)
    assert r.returncode == 1 and "KEY=VALUE" in r.stderr
    for driver in ("vfs", "overlay2"):
        r = subprocess.run([*cli, "--socket", sock, "--root", str(short_tmp / "r"), "--driver",
                            driver, "--storage-opt", "size=1G"], capture_output=True, text=True)
        assert r.returncode == 1 and f"the {driver} backend takes no storage options (got size)" \
            in r.stderr, r.stderr
    sn = Snapshotter(short_tmp / "r", "vfs").start()
    try:
        r = subprocess.run([*cli, "--socket", sock, "--root", str(short_tmp / "r"), "--driver",
                            "vfs"], capture_output=True, text=True)
        assert r.returncode == 1 and "in use by another snapshotter" in r.stderr
        r = subprocess.run([*cli, "--socket", str(sn.socket), "--root", str(short_tmp / "r2"),
                            "--driver", "vfs"], capture_output=True, text=True)
        assert r.returncode == 1 and "another server is listening" in r.stderr
    finally:
        sn.stop()
    r = subprocess.run([*cli, "--socket", sock, "--root", str(short_tmp / "r"), "--driver",
                        "overlay2"], capture_output=True, text=True)
    assert r.returncode == 1 and "holds snapshots of the vfs driver" in r.stderr
    assert oct(os.stat(short_tmp / "r" / "snapshots.db").st_mode & 0o777) == "0o600"


def test_socket_is_private(short_tmp: Path) -> None:
    sn = Snapshotter(short_tmp / "r", "vfs").start()
    try:
        assert os.stat(sn.socket).st_mode & 0o777 == 0o600
    finally:
        sn.stop()
    assert not sn.socket.exists()  # removed on a clean stop


def _blocks_sigterm(pid: int, tid: int) -> bool:
    with open(f"/proc/{pid}/task/{tid}/status", encoding="ascii") as f:
        mask = next(int(line.split()[1], 16) for line in f if line.startswith("SigBlk:"))
    return bool(mask & (1 << (15 - 1)))


def test_sigterm_delivered_to_any_thread_stops_the_server(short_tmp: Path) -> None:
    """The kernel hands a process-directed signal to any thread that does not block it, often
    one of gRPC's; the server must stop all the same (it once waited for ever)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    sys_tgkill = 234  # x86_64
    for round_ in range(3):
        sn = Snapshotter(short_tmp / "r", "vfs").start()
        assert sn.proc is not None
        sn.prepare(f"a{round_}")  # gRPC's threads are up
        pid = sn.proc.pid
        others = [t for t in sorted(int(t) for t in os.listdir(f"/proc/{pid}/task"))
                  if t != pid and not _blocks_sigterm(pid, t)]
        assert others
        target = others[round_ % len(others)]
        assert libc.syscall(sys_tgkill, pid, target, 15) == 0, ctypes.get_errno()
        try:
            assert sn.proc.wait(30) == 0
        finally:
            if sn.proc.poll() is None:
                sn.stop()


# -- crashes ------------------------------------------------------------------------------------------
def _workload(sn: Snapshotter, work: Path, committed: dict[str, bytes], stop: threading.Event,
              rng: random.Random) -> None:
    """Prepare, write, commit, view, remove, until the server goes away."""
    n = 0
    try:
        while not stop.is_set():
            n += 1
            key = f"k{rng.randrange(1 << 30)}"
            parent = rng.choice(sorted(committed)) if committed and rng.random() < 0.6 else ""
            data = os.urandom(rng.randrange(1, 200_000))
            _write_layer(sn, key, work, {"f": data}, parent)
            name = f"c-{key}"
            sn.commit(name, key)
            committed[name] = data
            if rng.random() < 0.3:
                sn.view(f"v-{key}", name)
                sn.remove(f"v-{key}")
            if rng.random() < 0.3:
                victim = rng.choice(sorted(committed))
                try:
                    sn.remove(victim)
                    del committed[victim]
                except grpc.RpcError as e:
                    if e.code() != grpc.StatusCode.FAILED_PRECONDITION:
                        raise
    except (grpc.RpcError, ValueError, subprocess.CalledProcessError, OSError):
        return  # the server was killed under us


@pytest.mark.parametrize("driver", ["devicemapper", "vfs"])
def test_sigkill_at_random_points_then_restart_loses_nothing_and_leaks_nothing(
        short_tmp: Path, driver: str) -> None:
    rng = random.Random(1234)
    root = short_tmp / "r"
    sn = Snapshotter(root, driver).start()
    committed: dict[str, bytes] = {}
    work = short_tmp / "w"
    try:
        for round_ in range(6 if driver == "devicemapper" else 3):  # vfs: the records' side
            stop = threading.Event()
            t = threading.Thread(target=_workload, args=(sn, work, committed, stop, rng))
            t.start()
            time.sleep(rng.uniform(0.5, 3.0))
            sn.kill()
            stop.set()
            t.join(60)
            for mp in sorted(mounts_under(work), key=len, reverse=True):
                subprocess.run(["umount", mp], check=True)  # what the client had mounted
            sn.start()
            records = _records(root)
            assert {s for _, s, _ in records.values()} <= {"ready"}, records
            names = set(sn.names())
            assert names == set(records)
            # every commit that returned is there with its content (a commit or removal the
            # kill cut short may or may not have happened)
            for name, data in list(committed.items()):
                if name not in names:
                    del committed[name]  # its removal had been sent when the kill came
                    continue
            for name in list(committed)[:3]:
                assert _read_view(sn, f"check{round_}", name, work, "f") == committed[name]
            ids = {i for i, _, _ in records.values()}
            # the views' storage goes in the background, once the snapshotter is quiet
            if driver == "devicemapper":
                assert _eventually(lambda: _pool_devices(root) == ids | {0}), \
                    "pool and records disagree"
            else:
                def settled() -> bool:
                    names = os.listdir(root / "snapshots")
                    return {int(n) for n in names if n.isdigit()} <= ids and \
                        not [n for n in names if n.startswith(".rm-")]
                assert _eventually(settled), os.listdir(root / "snapshots")
                sn.cleanup()
                assert {int(n) for n in os.listdir(root / "snapshots")} == ids
        assert committed, "the workload never got a commit through"
    finally:
        sn.stop()
    if driver == "devicemapper":
        r = subprocess.run(["thin_check", str(root / "pool" / "metadata")], capture_output=True,
                           text=True)
        assert r.returncode == 0, r.stdout + r.stderr


def test_a_half_made_base_and_pool_are_made_again(short_tmp: Path) -> None:
    root = short_tmp / "r"
    sn = Snapshotter(root).start()
    assert sn.stop() == 0
    (root / "devicemapper.json").unlink()  # as if the kill came before the base was recorded
    sn.start()
    try:
        _write_layer(sn, "a", short_tmp / "w", {"f": b"ok"})
        sn.commit("c", "a")
        assert _read_view(sn, "v", "c", short_tmp / "w", "f") == b"ok"
    finally:
        sn.stop()
    r = subprocess.run(["thin_check", str(root / "pool" / "metadata")], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr


def test_records_that_do_not_belong_to_the_pool_are_refused(short_tmp: Path) -> None:
    root = short_tmp / "r"
    sn = Snapshotter(root).start()
    sn.prepare("a")
    assert sn.stop() == 0
    for name in ("snapshots.db", "snapshots.db-wal", "snapshots.db-shm"):
        if (root / name).exists():
            (root / name).unlink()
    r = subprocess.run([sys.executable, "-m", "thinpool.cli", "snapshotter", "serve", "--socket",
                        str(short_tmp / "s.sock"), "--root", str(root)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "no snapshot record knows" in r.stderr
    subprocess.run([sys.executable, "-m", "thinpool.cli", "stop", str(root / "pool")],
                   capture_output=True)


def test_device_changes_can_swap_the_transaction_id_in_the_same_commit(tmp_path: Path) -> None:
    """What the devicemapper backend relies on: a create_snap or delete and the pool's
    transaction id move together, or neither does."""
    from thinpool.errors import DeviceError
    from thinpool.pool.engine import Pool

    Pool.create(str(tmp_path / "p"), data_size="64M", metadata_size="8M")
    with Pool(str(tmp_path / "p")) as pool:
        pool.create_thin(0, size=1 << 20)
        pool.create_snap(1, 0, transaction=(0, 1))
        assert pool.status().transaction_id == 1 and pool.md.exists(1)
        with pytest.raises(DeviceError, match="transaction id mismatch"):
            pool.create_snap(2, 0, transaction=(0, 1))
        assert not pool.md.exists(2) and pool.status().transaction_id == 1
        with pytest.raises(DeviceError, match="ENODATA"):
            pool.delete(7, transaction=(1, 2))
        assert pool.status().transaction_id == 1
        pool.delete(1, transaction=(1, 2))
        assert not pool.md.exists(1)
    with Pool(str(tmp_path / "p"), read_only=True) as pool:  # committed
        assert pool.status().transaction_id == 2 and pool.md.device_ids() == [0]
    r = subprocess.run(["thin_check", str(tmp_path / "p" / "metadata")], capture_output=True)
    assert r.returncode == 0


# -- Remove in the background --------------------------------------------------------------------
@pytest.mark.parametrize("driver", ["devicemapper", "overlay2"])
def test_remove_frees_the_key_at_once_and_survives_a_kill(short_tmp: Path, driver: str) -> None:
    """Remove answers once the record is gone (the storage goes in the background): the key
    is free at once (a new Prepare gets a new id); a SIGKILL right after Remove leaves the
    removal queued, and the restarted snapshotter finishes it; check and thin_check agree."""
    root = short_tmp / "r"
    sn = Snapshotter(root, driver).start()
    try:
        _write_layer(sn, "a", short_tmp / "w", {"f": b"1" * 100000})
        sn.commit("a-c", "a")
        seen_queued = False
        for round_ in range(3):
            sn.prepare("ctr", "a-c")
            old = _records(root)["ctr"][0]
            sn.remove("ctr")
            sn.prepare("ctr", "a-c")  # the same key, right away: a new snapshot
            new = _records(root)["ctr"][0]
            assert new != old
            sn.remove("ctr")
            if round_ < 2:
                sn.kill()  # within the quiet time: both removals still queued
                db = sqlite3.connect(f"file:{root / 'snapshots.db'}?mode=ro", uri=True)
                try:
                    queued = {i for (i,) in db.execute("SELECT id FROM removals")}
                finally:
                    db.close()
                seen_queued |= {old, new} <= queued  # (unless the kill came late)
                sn.start()  # finishes them before it serves
            else:
                assert _eventually(lambda: not sqlite3.connect(
                    f"file:{root / 'snapshots.db'}?mode=ro", uri=True).execute(
                    "SELECT id FROM removals").fetchall())
            assert sn.names() == ["a-c"]
            ids = {i for i, _, _ in _records(root).values()}
            if driver == "devicemapper":
                assert _pool_devices(root) == ids | {0}
            else:
                assert {int(n) for n in os.listdir(root / "snapshots")} == ids
        assert seen_queued
    finally:
        assert sn.stop() == 0
    for graph in (False, True):  # 'thinpool graph check' on a snapshotter root too
        r = _check(root, graph=graph)
        assert (r.returncode, r.stdout) == (0, "clean\n"), r.stdout + r.stderr
    if driver == "devicemapper":
        r = subprocess.run(["thin_check", str(root / "pool" / "metadata")],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr
