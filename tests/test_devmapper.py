"""The devicemapper graph driver on thinpool: Docker's layout, transactions, ids, options.

The driver contract itself is tested for every driver in test_graph_contract.py; this
file checks what only devicemapper has.  Needs root, /dev/fuse and loop devices.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

from graphkit import TEST_OPTIONS, unmount_tree
from thinmodel import assert_thin_check_clean
from thinpool.graph import registry
from thinpool.graph.devmapper import DevmapperDriver, human_size, parse_options
from thinpool.graph.driver import BadOption, CreateOpts, GraphError, LayerBusy
from thinpool.server.control import request
from thinpool.server.daemon import control_path

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/dev/fuse") or shutil.which("losetup") is None,
    reason="needs root, /dev/fuse and losetup")

OPTS = TEST_OPTIONS["devicemapper"]


class Drivers:
    """Drivers on one root; every one is cleaned up (pool server stopped) at the end."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.made: list[DevmapperDriver] = []

    def new(self, *extra: str) -> DevmapperDriver:
        d = registry.new_driver(str(self.root), "devicemapper", [*OPTS, *extra])
        assert isinstance(d, DevmapperDriver)
        self.made.append(d)
        return d

    @property
    def home(self) -> Path:
        return self.root / "devicemapper"

    def pool_call(self, command: str, **args: object) -> dict:
        return request(control_path(str(self.home / "devicemapper")), command, args)


@pytest.fixture
def drivers(tmp_path: Path) -> Iterator[Drivers]:
    ds = Drivers(tmp_path / "root")
    try:
        yield ds
    finally:
        for d in reversed(ds.made):
            d.cleanup()
        unmount_tree(tmp_path)


def record(home: Path, name: str) -> dict:
    return json.loads((home / "metadata" / name).read_text())


def test_dockers_layout_and_records(drivers: Drivers) -> None:
    d = drivers.new()
    home = drivers.home
    data, meta = home / "devicemapper" / "data", home / "devicemapper" / "metadata"
    assert data.stat().st_size == 4 << 30 and data.stat().st_blocks * 512 < 64 << 20
    assert meta.stat().st_size == 64 << 20
    base = record(home, "base")
    assert set(base) == {"device_id", "size", "transaction_id", "initialized", "deleted"}
    assert base["initialized"] and base["size"] == 256 << 20
    ds = record(home, "deviceset-metadata")
    assert ds["BaseDeviceFilesystem"] == "ext4" and len(ds["BaseDeviceUUID"]) == 36
    d.create("layer1", None)
    d.create_rw("ctr", "layer1")
    rec = record(home, "ctr")
    assert rec["device_id"] not in (base["device_id"], record(home, "layer1")["device_id"])
    tx = record(home, "transaction-metadata")
    assert tx["device_hash"] == "ctr" and tx["device_id"] == rec["device_id"]
    status = drivers.pool_call("status")["status"]
    assert tx["open_transaction_id"] == status["transaction_id"] == 3  # base, layer1, ctr
    path = d.get("ctr")
    assert path == str(home / "mnt" / "ctr" / "rootfs") and os.path.isdir(path)
    assert (home / "mnt" / "ctr" / "id").read_text() == "ctr"
    assert d.get_metadata("ctr") == {"DeviceId": str(rec["device_id"]),
                                     "DeviceSize": str(256 << 20),
                                     "DeviceName": f"{d.prefix}-ctr"}
    keys = [k for k, _ in d.status()]
    assert keys == ["Pool Name", "Pool Blocksize", "Base Device Size", "Backing Filesystem",
                    "Udev Sync Supported", "Data file", "Metadata file", "Data loop file",
                    "Metadata loop file", "Data Space Used", "Data Space Total",
                    "Data Space Available", "Metadata Space Used", "Metadata Space Total",
                    "Metadata Space Available", "Thin Pool Minimum Free Space",
                    "Deferred Removal Enabled", "Deferred Deletion Enabled",
                    "Deferred Deleted Device Count", "Library Version"]
    assert dict(d.status())["Pool Blocksize"] == "65.54kB"
    d.put("ctr")
    d.remove("ctr")
    assert not (home / "metadata" / "ctr").exists() and not d.exists("ctr")
    pending = record(home, f"deleted:{rec['device_id']}")  # deleted in the background
    assert pending["deleted"] and pending["device_id"] == rec["device_id"]
    d.finish_deletions()
    assert not (home / "metadata" / f"deleted:{rec['device_id']}").exists()
    assert drivers.pool_call("status")["status"]["transaction_id"] == 4  # the delete too


def test_interrupted_create_is_rolled_back(drivers: Drivers) -> None:
    d = drivers.new()
    d.create("a", None)
    home = drivers.home
    tid = drivers.pool_call("status")["status"]["transaction_id"]
    # a crash between the pool message and set_transaction_id: the device is in the pool,
    # the transaction file says it was being made, the pool's id was not moved on
    (home / "metadata" / "transaction-metadata").write_text(json.dumps(
        {"open_transaction_id": tid + 1, "device_hash": "half", "device_id": 777}))
    drivers.pool_call("message", text=f"create_snap 777 {record(home, 'a')['device_id']}")
    (home / "metadata" / "half").write_text(json.dumps(
        {"device_id": 777, "size": 256 << 20, "transaction_id": tid + 1, "initialized": False,
         "deleted": False}))
    d.cleanup()
    d2 = drivers.new()
    assert not d2.exists("half") and not (home / "metadata" / "half").exists()
    ids = [v["dev_id"] for v in drivers.pool_call("list")["volumes"]]
    assert 777 not in ids and d2.exists("a")


def test_interrupted_delete_is_finished_on_restart(drivers: Drivers) -> None:
    d = drivers.new()
    d.create("a", None)
    d.create("b", "a")
    home = drivers.home
    tid = drivers.pool_call("status")["status"]["transaction_id"]
    dev_b = record(home, "b")["device_id"]
    # a crash inside a delete: the transaction is open and the record gone, the pool's delete
    # (and with it the transaction id swap) never committed
    (home / "metadata" / "transaction-metadata").write_text(json.dumps(
        {"open_transaction_id": tid + 1, "device_hash": "b", "device_id": dev_b}))
    (home / "metadata" / "b").unlink()
    d.cleanup()
    d2 = drivers.new()
    assert not d2.exists("b") and d2.exists("a")
    assert dev_b not in [v["dev_id"] for v in drivers.pool_call("list")["volumes"]]
    d2.create("c", "a")  # the next transaction goes on from the pool's id
    assert drivers.pool_call("status")["status"]["transaction_id"] == tid + 1


def test_failed_delete_keeps_the_record_and_closes_the_transaction(drivers: Drivers) -> None:
    d = drivers.new("dm.use_deferred_deletion=false")
    d.create("a", None)
    dev_a = record(drivers.home, "a")["device_id"]
    drivers.pool_call("attach", id=dev_a)  # open behind the driver's back: the pool says EBUSY
    try:
        with pytest.raises(GraphError, match="Error deleting device a"):
            d.remove("a")
    finally:
        drivers.pool_call("detach", target=str(dev_a))
    assert record(drivers.home, "a")["device_id"] == dev_a and d.exists("a")
    tid = drivers.pool_call("status")["status"]["transaction_id"]
    assert record(drivers.home, "transaction-metadata")["open_transaction_id"] == tid
    d.remove("a")
    assert not d.exists("a") and not (drivers.home / "metadata" / "a").exists()


def test_device_id_taken_behind_the_drivers_back_is_skipped(drivers: Drivers) -> None:
    d = drivers.new()
    nxt = d.next_device_id + 1
    drivers.pool_call("message", text=f"create_thin {nxt}")  # EEXIST for the driver
    d.create("x", None)
    assert record(drivers.home, "x")["device_id"] not in (nxt, d.devices[""].device_id)
    d.remove("x")


def test_base_uuid_is_checked(drivers: Drivers) -> None:
    d = drivers.new()
    d.cleanup()
    ds = drivers.home / "metadata" / "deviceset-metadata"
    raw = json.loads(ds.read_text())
    raw["BaseDeviceUUID"] = "00000000-1111-2222-3333-444444444444"
    ds.write_text(json.dumps(raw))
    with pytest.raises(GraphError, match="does not match with stored UUID"):
        drivers.new()


def test_size_option_grows_the_filesystem(drivers: Drivers) -> None:
    d = drivers.new()
    d.create("img", None)
    d.create_rw("big", "img", CreateOpts(storage_opt={"size": "600M"}))
    assert record(drivers.home, "big")["size"] == 600 << 20
    path = d.get("big")
    st = os.statvfs(path)
    assert st.f_blocks * st.f_frsize > 500 << 20
    d.put("big")
    with pytest.raises(GraphError, match="cannot be smaller"):
        d.create_rw("small", "img", CreateOpts(storage_opt={"size": "100M"}))
    with pytest.raises(BadOption, match="Unknown option"):
        d.create_rw("odd", "img", CreateOpts(storage_opt={"inodes": "5"}))


def test_busy_device_is_deleted_later(drivers: Drivers) -> None:
    d = drivers.new()
    d.create("busy", None)
    dev_id = record(drivers.home, "busy")["device_id"]
    drivers.pool_call("attach", id=dev_id)  # held by something else (a loop device)
    d.remove("busy")  # the layer is gone; its device waits
    assert not d.exists("busy") and not (drivers.home / "metadata" / "busy").exists()
    d.finish_deletions()  # EBUSY: stays pending
    assert record(drivers.home, f"deleted:{dev_id}")["deleted"] is True
    assert dict(d.status())["Deferred Deleted Device Count"] == "1"
    d.create("busy", None)  # the id is free at once; the new layer has a new device
    assert record(drivers.home, "busy")["device_id"] != dev_id
    d.remove("busy")
    d.finish_deletions()
    drivers.pool_call("detach", target=str(dev_id))
    d.cleanup()
    d2 = drivers.new()  # a start retries marked devices
    assert not d2.exists("busy") and not (drivers.home / "metadata" / f"deleted:{dev_id}").exists()
    assert dev_id not in [v["dev_id"] for v in drivers.pool_call("list")["volumes"]]


def test_options(drivers: Drivers) -> None:
    o = parse_options(["dm.basesize=20G", "DM.MkfsArg=-O ^has_journal", "dm.mountopt=nodiscard",
                       "dm.min_free_space=5%", "dm.blkdiscard=false", "dm.fs=ext4"])
    assert o.basesize == 20 << 30 and o.mkfsargs == ("-O ^has_journal",) and \
        o.min_free_space == 5 and not o.blkdiscard
    assert parse_options(["dm.thinpooldev=/dev/mapper/x"]).blkdiscard is False
    for bad, match in (("dm.frob=1", "Unknown option dm.frob"),
                       ("dm.fs=btrfs", "Unsupported filesystem"),
                       ("dm.min_free_space=10", "must end in %"),
                       ("dm.blocksize=100K", "invalid block size"),
                       ("dm.directlvm_device=/dev/sdb", "direct-lvm"),
                       ("dm.use_deferred_removal=false", "Deferred deletion can not be enabled")):
        with pytest.raises(BadOption, match=match):
            parse_options([bad])
    with pytest.raises(BadOption):
        drivers.new("dm.nonsense=1")
    assert human_size(65536) == "65.54kB" and human_size(10737418240) == "10.74GB"


def test_min_free_space_refuses_snapshots(drivers: Drivers, tmp_path: Path) -> None:
    d = drivers.new("dm.min_free_space=99%")
    tid = drivers.pool_call("status")["status"]["transaction_id"]
    with pytest.raises(GraphError, match="free (data|metadata) blocks which is less than minimum"):
        d.create("x", None)
    # refused by the pool server before any change: no record, no device, nothing left open
    assert not d.exists("x") and not (drivers.home / "metadata" / "x").exists()
    assert record(drivers.home, "transaction-metadata")["open_transaction_id"] == tid
    assert drivers.pool_call("status")["status"]["transaction_id"] == tid
    assert d.check() == []


def test_thinpooldev_uses_an_existing_pool(drivers: Drivers, tmp_path: Path) -> None:
    pool = tmp_path / "mypool"
    subprocess.run([sys.executable, "-m", "thinpool.cli", "pool", "create", str(pool),
                    "--data-size", "2G", "--metadata-size", "64M"], check=True,
                   capture_output=True)
    d = drivers.new(f"dm.thinpooldev={pool}")
    d.create("l", None)
    assert dict(d.status())["Pool Name"] == str(pool)
    assert "Data loop file" not in dict(d.status())
    d.cleanup()
    shutil.rmtree(drivers.root)
    with pytest.raises(GraphError, match="Unable to take ownership"):
        drivers.new(f"dm.thinpooldev={pool}")  # a fresh root on a pool already in use


def test_pre_012_json_is_migrated(drivers: Drivers) -> None:
    d = drivers.new()
    d.create("old", None)
    rec = record(drivers.home, "old")
    d.cleanup()
    os.unlink(drivers.home / "metadata" / "old")
    (drivers.home / "devicemapper" / "json").write_text(json.dumps({"Devices": {
        "old": {"device_id": rec["device_id"], "size": rec["size"],
                "transaction_id": rec["transaction_id"], "initialized": False}}}))
    d2 = drivers.new()
    assert d2.exists("old")
    assert (drivers.home / "devicemapper" / "json.migrated").exists()
    assert record(drivers.home, "old")["device_id"] == rec["device_id"]


def test_pool_stays_consistent(drivers: Drivers) -> None:
    d = drivers.new()
    d.create("a", None)
    p = d.get("a")
    Path(p, "file").write_bytes(os.urandom(1 << 20))
    d.put("a")
    d.create_rw("b", "a")
    d.remove("b")
    d.cleanup()
    assert_thin_check_clean(drivers.home / "devicemapper" / "metadata")
    r = subprocess.run(["thin_ls", "--no-headers", "-o", "DEV",
                        str(drivers.home / "devicemapper" / "metadata")],
                       capture_output=True, text=True, check=True)
    assert sorted(int(x) for x in r.stdout.split()) == sorted(
        json.loads((drivers.home / "metadata" / n).read_text())["device_id"] for n in ("base", "a"))
    with pytest.raises(LayerBusy, match="child"):
        d2 = drivers.new()
        d2.create_rw("c", "a")
        d2.remove("a")


def test_check_finds_and_repairs(drivers: Drivers, monkeypatch: pytest.MonkeyPatch) -> None:
    from thinpool.graph import devmapper

    monkeypatch.setattr(devmapper, "DELETION_QUIET", 600.0)  # the worker stays out of it
    monkeypatch.setattr(devmapper, "DELETION_LATEST", 600.0)
    d = drivers.new()
    d.create("keep", None)
    d.create("gone", None)
    d.create("busy", None)
    assert d.check() == []
    home = drivers.home
    gone_id = record(home, "gone")["device_id"]
    busy_id = record(home, "busy")["device_id"]
    drivers.pool_call("message", text=f"delete {gone_id}")  # record without a device
    drivers.pool_call("message", text="create_thin 4242")  # device without a record
    drivers.pool_call("attach", id=busy_id)
    d.remove("busy")  # busy: its deletion stays pending
    (home / "mnt" / "stray").mkdir(parents=True)
    tid = drivers.pool_call("status")["status"]["transaction_id"]
    (home / "metadata" / "transaction-metadata").write_text(json.dumps(
        {"open_transaction_id": tid + 1, "device_hash": "never", "device_id": 9999}))
    problems = [f.problem for f in d.check()]
    assert any("opened but never closed" in p for p in problems), problems
    assert any(f"layer gone: device {gone_id} is not in the pool" in p for p in problems)
    assert any("device 4242 is in the pool but no layer records it" in p for p in problems)
    assert any(f"device {busy_id} of a removed layer is marked for deferred deletion" in p
               for p in problems)
    assert any("mnt/stray belongs to no layer" in p for p in problems)
    drivers.pool_call("detach", target=str(busy_id))
    fixed = d.check(repair=True)
    assert all(f.repaired for f in fixed), [f.problem for f in fixed if not f.repaired]
    assert d.check() == []
    assert d.exists("keep") and not d.exists("gone") and not d.exists("busy")
    usage = d.layer_usage()
    assert set(usage) == {"base", "keep"} and usage["keep"]["mapped"] > 0
    d.cleanup()
    assert_thin_check_clean(home / "devicemapper" / "metadata")


def test_graph_check_and_status_on_the_command_line(drivers: Drivers) -> None:
    from test_cli import tp

    args = ["graph", "--root", str(drivers.root), "--driver", "devicemapper",
            *[a for o in OPTS for a in ("--storage-opt", o)]]
    d = drivers.new()
    d.create("l1", None)
    r = tp(*args, "check")
    assert r.returncode == 0 and r.stdout.decode().strip() == "clean", r.stderr
    drivers.pool_call("message", text="create_thin 5000")
    r = tp(*args, "check")
    assert r.returncode == 1 and b"problem: device 5000 is in the pool" in r.stdout
    r = tp(*args, "check", "--repair")
    assert r.returncode == 0 and b"repaired: device 5000" in r.stdout
    out = json.loads(tp(*args, "status", "--json").stdout)
    assert out["Driver"] == "devicemapper" and set(out["Layers"]) == {"base", "l1"}
    assert out["Layers"]["l1"]["mapped"] >= out["Layers"]["l1"]["exclusive"]


@pytest.mark.parametrize("blkdiscard", [True, False])
def test_blkdiscard_gives_a_removed_layers_space_back(drivers: Drivers, blkdiscard: bool) -> None:
    """dm.blkdiscard (Docker's default for loop files) discards a layer before deleting it, so
    the data file gets its holes back; a pool without block zeroing must not hand a later layer
    an old layer's bytes."""
    d = drivers.new(f"dm.blkdiscard={str(blkdiscard).lower()}")
    data = drivers.home / "devicemapper" / "data"
    d.create("big", None)
    Path(d.get("big"), "blob").write_bytes(os.urandom(64 << 20))
    d.put("big")
    before = data.stat().st_blocks * 512
    d.remove("big")
    d.finish_deletions()
    freed = before - data.stat().st_blocks * 512
    if blkdiscard:
        assert freed >= 60 << 20
    else:
        assert freed < 1 << 20
