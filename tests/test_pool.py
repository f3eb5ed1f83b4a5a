"""The pool engine: volumes, copy-on-write, discard, out-of-space, locking, status."""

from __future__ import annotations

import errno
import os
import threading
import time
from pathlib import Path

import pytest

from thinpool.errors import DataPathError, DeviceError, ThinpoolError
from thinpool.pool.config import ConfigError, PoolConfig, parse_size, parse_table
from thinpool.pool.engine import Pool, PoolError
from thinpool.pool.images import export_image, import_image
from thinpool.pool.locks import PoolBusyError
from thinpool.pool.registry import JOURNAL
from thinpool.block.device import RangeError as VolumeRangeError

from thinmodel import assert_thin_check_clean

BS = 64 * 1024


def make_pool(tmp_path: Path, data: str = "64M", meta: str = "8M", **features) -> str:
    d = str(tmp_path / "pool")
    Pool.create(d, data, meta, PoolConfig(**features))
    return d


def allocated(path: str) -> int:
    return os.stat(path).st_blocks * 512


def test_parse_size_and_table() -> None:
    assert parse_size("64K") == 65536 and parse_size("2g") == 2 << 30 and parse_size("512") == 512
    assert parse_size("1GiB") == 1 << 30
    for bad in ("", "12X", "-1", "1.5G"):
        with pytest.raises(ConfigError):
            parse_size(bad)
    t = parse_table("0 20971520 thin-pool /m /d 128 32768 1 skip_block_zeroing")
    assert t.length_sectors == 20971520 and t.config.skip_block_zeroing
    assert t.config.low_water_mark == 32768 and t.config.data_block_sectors == 128
    t = parse_table("0 2048 thin-pool m d 1024 0 2 ERROR_IF_NO_SPACE no_discard_passdown")
    assert t.config.error_if_no_space and t.config.no_discard_passdown
    bad_tables = {
        "0 2048 thin-pool m d 100 0": "Invalid block size",
        "0 2048 thin-pool m d 64 0": "Invalid block size",
        "0 2048 thin-pool m d 4194304 0": "Invalid block size",
        "0 2048 thin-pool m d 128 0 1 frobnicate": "Unrecognised pool feature",
        "0 2048 thin-pool m m 128 0": "must differ",
        "0 2048 thin-pool m d 128 0 2 read_only": "does not match",
        "0 2048 linear m d 128 0": "unknown target",
        "0 2048 thin-pool m d": "needs",
    }
    for line, msg in bad_tables.items():
        with pytest.raises(ConfigError, match=msg):
            parse_table(line)


def test_create_pool_is_sparse_and_checkable(tmp_path: Path) -> None:
    d = make_pool(tmp_path, "1G", "16M")
    assert os.path.getsize(f"{d}/data") == 1 << 30 and allocated(f"{d}/data") == 0
    assert os.path.getsize(f"{d}/metadata") == 16 << 20
    assert allocated(f"{d}/metadata") < 1 << 20
    assert_thin_check_clean(f"{d}/metadata")
    with pytest.raises(PoolError, match="already holds a pool"):
        Pool.create(d, "1G", "16M")
    with pytest.raises(PoolError, match="not a thinpool pool"):
        Pool(str(tmp_path))


def test_seed_walkthrough(tmp_path: Path) -> None:
    d = make_pool(tmp_path)
    with Pool(d) as pool:
        pool.message("create_thin 0")
        with pool.volume(0) as v0:
            v0.write(0, b"hello world, I am a base\n")
        pool.message("create_snap 1 0")
        with pool.volume(1) as v1:
            v1.write(25, b"I am snap1\n")
        pool.message("create_snap 2 1")
        with pool.volume(0) as v0, pool.volume(1) as v1, pool.volume(2) as v2:
            assert bytes(v0.read(0, 40)).rstrip(b"\0") == b"hello world, I am a base\n"
            assert bytes(v1.read(0, 40)).rstrip(b"\0") == b"hello world, I am a base\nI am snap1\n"
            assert bytes(v2.read(0, 40)) == bytes(v1.read(0, 40))
        st = pool.status()
        assert st.line().startswith("0 ") and " 2/1024 - rw discard_passdown queue_if_no_space - " \
            in st.line()
        assert pool.thin_status(1).line() == "128 127"
    assert_thin_check_clean(f"{d}/metadata")
    with Pool(d) as pool:  # durable after reopen
        with pool.volume(2) as v2:
            assert bytes(v2.read(25, 11)) == b"I am snap1\n"


def test_message_errors(tmp_path: Path) -> None:
    d = make_pool(tmp_path)
    with Pool(d) as pool:
        pool.message("create_thin 0")
        cases = {
            "create_thin 0": "EEXIST", "create_snap 1 5": "ENODATA", "delete 9": "ENODATA",
            "create_thin": "EINVAL", "create_thin x": "EINVAL", "create_thin 16777216": "EINVAL",
            "create_thin -1": "EINVAL", "set_transaction_id 5 6": "EINVAL",
            "set_transaction_id 1": "EINVAL", "frob 1": "EINVAL", "": "EINVAL",
            "release_metadata_snap": "EINVAL", "delete 0 1": "EINVAL",
        }
        for text, name in cases.items():
            with pytest.raises(DeviceError, match=name):
                pool.message(text)
        tid = pool.status().transaction_id
        pool.message(f"set_transaction_id {tid} 100")
        pool.message("reserve_metadata_snap")
        with pytest.raises(DeviceError, match="EBUSY"):
            pool.message("reserve_metadata_snap")
        assert pool.status().held_root
        pool.message("release_metadata_snap")
        with pool.volume(0):
            with pytest.raises(DeviceError, match="EBUSY"):
                pool.message("delete 0")
        pool.message("delete 0")
        assert pool.status().transaction_id >= 100
    assert_thin_check_clean(f"{d}/metadata")


def test_io_any_offset_and_length(tmp_path: Path) -> None:
    d = make_pool(tmp_path)
    model = bytearray(4 << 20)
    with Pool(d) as pool:
        pool.create_thin(0, size=len(model))
        with pool.volume(0) as vol:
            import random

            rng = random.Random(7)
            for _ in range(200):
                off = rng.randrange(len(model) - 1)
                n = rng.randrange(1, min(len(model) - off, 3 * BS) + 1)
                data = rng.randbytes(n)
                vol.write(off, data)
                model[off:off + n] = data
            for _ in range(100):
                off = rng.randrange(len(model))
                n = rng.randrange(0, len(model) - off + 1)
                assert bytes(vol.read(off, n)) == bytes(model[off:off + n])
            assert bytes(vol.read(0, len(model))) == bytes(model)
            for off, n in ((0, 1), (BS - 3, 7), (5, 3 * BS + 11), (len(model) - BS, BS)):
                buf = bytearray(b"\xee" * n)  # readinto must overwrite holes too
                vol.readinto(off, memoryview(buf))
                assert bytes(buf) == bytes(model[off:off + n])
            with pytest.raises(VolumeRangeError):
                vol.read(len(model) - 1, 2)
            with pytest.raises(VolumeRangeError):
                vol.write(-1, b"x")
            with pytest.raises(VolumeRangeError):
                vol.read(0, -5)
    assert_thin_check_clean(f"{d}/metadata")


def test_cow_and_zeroing_of_reused_blocks(tmp_path: Path) -> None:
    d = make_pool(tmp_path, data="1M")  # 16 blocks: reuse is forced
    with Pool(d) as pool:
        pool.create_thin(0, size=1 << 20)
        with pool.volume(0) as vol:
            vol.write(0, b"\xff" * (1 << 20))  # every block provisioned with 0xff
            pool.commit()
            vol.discard(0, 1 << 20)
            pool.commit()
            vol.write(10, b"abc")  # a reused block: the rest must read as zeros
            got = bytes(vol.read(0, BS))
            assert got[:10] == bytes(10) and got[10:13] == b"abc" and got[13:] == bytes(BS - 13)
        pool.create_snap(1, 0)
        with pool.volume(1) as snap, pool.volume(0) as origin:
            snap.write(5, b"Z")
            assert bytes(snap.read(0, 14)) == bytes(5) + b"Z" + bytes(4) + b"abc" + b"\0"
            assert bytes(origin.read(0, 14)) == bytes(10) + b"abc" + b"\0"
    assert_thin_check_clean(f"{d}/metadata")


def test_discard_passdown_punches_holes_after_commit(tmp_path: Path) -> None:
    d = make_pool(tmp_path)
    with Pool(d) as pool:
        pool.create_thin(0, size=8 << 20)
        with pool.volume(0) as vol:
            vol.write(0, os.urandom(8 << 20))
            vol.flush()
            before = allocated(f"{d}/data")
            assert before >= 8 << 20
            vol.discard(BS // 2, 4 << 20)  # partial first block is kept
            assert allocated(f"{d}/data") == before  # nothing punched before the commit
            vol.flush()
            assert allocated(f"{d}/data") <= before - (4 << 20) + 2 * BS
            assert pool.thin_status(0).mapped_sectors == (128 - 63) * 128
            assert bytes(vol.read(BS, BS)) == bytes(BS)


def test_delete_with_discard_punches_only_what_the_device_held(tmp_path: Path) -> None:
    """delete(discard=True) frees and punches the blocks only the deleted device mapped (what a
    whole-device discard before the delete would), never a block a snapshot still shares."""
    d = make_pool(tmp_path)
    with Pool(d) as pool:
        pool.create_thin(0, size=8 << 20)
        with pool.volume(0) as vol:
            vol.write(0, os.urandom(4 << 20))
            vol.flush()
        pool.create_snap(1, 0)
        with pool.volume(1) as snap:
            snap.write(4 << 20, os.urandom(2 << 20))  # 32 blocks of its own
            snap.write(0, b"x" * BS)  # one copied block; the origin keeps the shared original
            snap.flush()
        base = allocated(f"{d}/data")
        used = pool.status().used_data
        pool.create_snap(2, 1)
        pool.delete(1, discard=True)  # all shared with snapshot 2: nothing freed
        assert pool.status().used_data == used and allocated(f"{d}/data") == base
        pool.delete(2, discard=True)  # the 33 blocks of its own go back, as holes
        assert pool.status().used_data == used - 33
        assert allocated(f"{d}/data") <= base - 33 * BS
        pool.create_snap(3, 0)
        pool.delete(3)  # without discard nothing is punched (the kernel's delete)
        with pool.volume(0) as vol:
            assert pool.thin_status(0).mapped_sectors == 64 * 128
            vol.read(0, BS)
    assert_thin_check_clean(f"{d}/metadata")
    d2 = make_pool(tmp_path / "b", no_discard_passdown=True)
    with Pool(d2) as pool:
        pool.create_thin(0, size=1 << 20)
        with pool.volume(0) as vol:
            vol.write(0, os.urandom(1 << 20))
            vol.flush()
        before = allocated(f"{d2}/data")
        pool.delete(0, discard=True)
        assert allocated(f"{d2}/data") == before and pool.status().used_data == 0


def test_no_passdown_and_ignore_discard(tmp_path: Path) -> None:
    d = make_pool(tmp_path, no_discard_passdown=True)
    with Pool(d) as pool:
        pool.create_thin(0, size=1 << 20)
        with pool.volume(0) as vol:
            vol.write(0, os.urandom(1 << 20))
            vol.flush()
            before = allocated(f"{d}/data")
            vol.discard(0, 1 << 20)
            vol.flush()
            assert allocated(f"{d}/data") == before
            assert pool.thin_status(0).line() == "0 -"
    d2 = make_pool(tmp_path / "b", ignore_discard=True)
    with Pool(d2) as pool:
        pool.create_thin(0, size=1 << 20)
        with pool.volume(0) as vol:
            with pytest.raises(OSError) as e:
                vol.discard(0, BS)
            assert e.value.errno == errno.EOPNOTSUPP
            vol.write_zeroes(0, BS)  # still works: unmaps


def test_external_origin(tmp_path: Path) -> None:
    d = make_pool(tmp_path)
    base = tmp_path / "base.raw"
    content = os.urandom(3 * BS + 100)
    base.write_bytes(content)
    with Pool(d) as pool:
        pool.create_thin(0, size=4 * BS, origin=str(base))
        with pool.volume(0) as vol:
            assert bytes(vol.read(0, len(content))) == content
            assert bytes(vol.read(len(content), 4 * BS - len(content))) == bytes(4 * BS - len(content))
            vol.write(BS + 1, b"XY")
            expect = bytearray(content)
            expect[BS + 1:BS + 3] = b"XY"
            assert bytes(vol.read(0, len(content))) == bytes(expect)
        pool.create_snap(1, 0)
        with pool.volume(1) as snap:
            assert bytes(snap.read(0, len(content))) == bytes(expect)
            snap.write(0, b"S")
            assert bytes(snap.read(2 * BS, BS)) == content[2 * BS:3 * BS]
        assert base.read_bytes() == content
        assert pool.list_volumes()[1].origin == str(base)
    assert_thin_check_clean(f"{d}/metadata")


def test_error_if_no_space(tmp_path: Path) -> None:
    d = make_pool(tmp_path, data="256K", error_if_no_space=True)
    with Pool(d) as pool:
        pool.create_thin(0, size=1 << 20)
        with pool.volume(0) as vol:
            vol.write(0, bytes([1]) * (4 * BS))
            with pytest.raises(OSError) as e:
                vol.write(4 * BS, b"x")
            assert e.value.errno == errno.ENOSPC
            assert pool.status().mode == "out_of_data_space"
            vol.write(0, b"still writable")  # provisioned, unshared blocks keep working
            assert pool.status().line().split()[4] == "out_of_data_space"
            pool.resize(data_size="512K")
            vol.write(4 * BS, b"x")
            assert pool.status().mode == "rw"
    assert_thin_check_clean(f"{d}/metadata")


def test_queue_if_no_space_waits_for_resize(tmp_path: Path) -> None:
    d = make_pool(tmp_path, data="128K", no_space_timeout=30.0)
    with Pool(d) as pool:
        pool.create_thin(0, size=1 << 20)
        with pool.volume(0) as vol:
            vol.write(0, bytes(2 * BS))
            done = threading.Event()

            def writer() -> None:
                vol.write(2 * BS, b"queued")
                done.set()

            t = threading.Thread(target=writer)
            t.start()
            time.sleep(0.3)
            assert not done.is_set()
            pool.resize(data_size="1M")
            t.join(10)
            assert done.is_set()
            assert bytes(vol.read(2 * BS, 6)) == b"queued"


def test_writers_queued_for_space_into_one_block_both_land(tmp_path: Path) -> None:
    """Two writers wait for space to provision the same block (different bytes of it).
    Whichever wakes second must see the first one's mapping, not overwrite it."""
    d = make_pool(tmp_path, data="128K", no_space_timeout=30.0)
    with Pool(d) as pool:
        pool.create_thin(0, size=1 << 20)
        with pool.volume(0) as vol:
            vol.write(0, bytes(2 * BS))  # the pool is full
            writers = [threading.Thread(target=vol.write, args=(5 * BS + off, text))
                       for off, text in ((100, b"first writer"), (BS - 200, b"second writer"))]
            for t in writers:
                t.start()
            deadline = time.monotonic() + 10
            while pool.space_waits < 2 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert pool.space_waits >= 2
            pool.resize(data_size="1M")
            for t in writers:
                t.join(10)
            block = bytes(vol.read(5 * BS, BS))
            assert block[100:112] == b"first writer"
            assert block[BS - 200:BS - 187] == b"second writer"
            assert block.count(0) == BS - 25
            pool.commit()
            assert pool.status().used_data == 3
    assert_thin_check_clean(f"{d}/metadata")


def test_queue_timeout(tmp_path: Path) -> None:
    d = make_pool(tmp_path, data="64K", no_space_timeout=0.2)
    with Pool(d) as pool:
        pool.create_thin(0, size=1 << 20)
        with pool.volume(0) as vol:
            vol.write(0, b"a")
            t0 = time.monotonic()
            with pytest.raises(OSError) as e:
                vol.write(BS, b"b")
            assert e.value.errno == errno.ENOSPC and time.monotonic() - t0 >= 0.2


def test_low_water_mark_hook(tmp_path: Path) -> None:
    marker = tmp_path / "fired"
    d = str(tmp_path / "pool")
    Pool.create(d, "1M", "8M", PoolConfig(low_water_mark=10,
                                          low_water_hook=f"touch {marker}"))
    with Pool(d) as pool:
        pool.create_thin(0, size=1 << 20)
        with pool.volume(0) as vol:
            vol.write(0, bytes(5 * BS))
            assert not marker.exists()
            vol.write(5 * BS, b"x" * BS)
    for _ in range(50):
        if marker.exists():
            break
        time.sleep(0.05)
    assert marker.exists()


def test_metadata_exhaustion_goes_read_only(tmp_path: Path) -> None:
    d = make_pool(tmp_path, data="1G", meta="256K")
    with Pool(d) as pool:
        pool.create_thin(0, size=1 << 30)
        with pool.volume(0) as vol:
            with pytest.raises(DataPathError, match="metadata") as e:
                for i in range(16384):
                    vol.write(i * BS, b"m")
            assert e.value.errno == errno.ENOSPC
            assert pool.status().mode == "ro"
            assert bytes(vol.read(0, 1)) == b"m"
            with pytest.raises(DeviceError, match="EOPNOTSUPP"):
                pool.message("create_thin 1")
    assert_thin_check_clean(f"{d}/metadata")
    with Pool(d) as pool:  # grows back into rw
        pool.resize(metadata_size="8M")
        assert pool.status().mode == "rw"
        pool.message("create_thin 1")
    assert_thin_check_clean(f"{d}/metadata")


def test_exclusive_open_and_read_only_open(tmp_path: Path) -> None:
    d = make_pool(tmp_path)
    with Pool(d) as pool:
        pool.create_thin(0, size=1 << 20)
        with pytest.raises(PoolBusyError, match=f"in use by pid {os.getpid()}"):
            Pool(d)
        with Pool(d, read_only=True) as ro:
            assert [v.dev_id for v in ro.list_volumes()] == [0]
            with pytest.raises(PoolError, match="read-only"):
                ro.create_thin(1)


def test_concurrent_io(tmp_path: Path) -> None:
    d = make_pool(tmp_path)
    with Pool(d) as pool:
        for i in range(4):
            pool.create_thin(i, size=2 << 20)
        vols = [pool.volume(i) for i in range(4)]
        errors: list[BaseException] = []

        def work(idx: int) -> None:
            try:
                vol = vols[idx % 4]
                for j in range(64):
                    off = (j * 4096 * 7 + idx * 512) % ((2 << 20) - 512)
                    vol.write(off, bytes([idx]) * 512)
            except BaseException as e:  # pragma: no cover - reported below
                errors.append(e)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
        # Threads idx and idx+4 share a volume with disjoint 512-byte slots: both must be there.
        for idx in range(8):
            vol = vols[idx % 4]
            for j in range(64):
                off = (j * 4096 * 7 + idx * 512) % ((2 << 20) - 512)
                assert bytes(vol.read(off, 512)) == bytes([idx]) * 512
        for v in vols:
            v.close()
    assert_thin_check_clean(f"{d}/metadata")


def test_transaction_id_changes_only_by_set_transaction_id(tmp_path: Path) -> None:
    """Docker's bracket: record the next id, send the message, then set_transaction_id old new."""
    d = make_pool(tmp_path)
    with Pool(d) as pool:
        pool.message("create_thin 0")
        pool.create_thin(5, size=1 << 20, name="five")
        pool.resize(data_size="128M")
        assert pool.status().transaction_id == 0
        pool.message("set_transaction_id 0 1")
        pool.message("create_snap 1 0")
        pool.message("delete 5")
        assert pool.status().transaction_id == 1
        pool.message("set_transaction_id 1 2")
        with pytest.raises(DeviceError, match="current is 2, not 1"):
            pool.message("set_transaction_id 1 3")
    with Pool(d) as pool:
        assert pool.status().transaction_id == 2
        assert [v.dev_id for v in pool.list_volumes()] == [0, 1]
    assert_thin_check_clean(f"{d}/metadata")


def test_registry_commit_point(tmp_path: Path) -> None:
    d = make_pool(tmp_path)
    with Pool(d) as pool:
        pool.create_thin(0, size=1 << 20, name="base")
    journal = Path(d) / JOURNAL
    committed = journal.read_bytes()
    # A last line whose metadata commit never happened (device 1 does not exist) is ignored
    # by a read-only open and cut, with a message, by a read-write open.
    ghost = b'{"op":"create","id":1,"record":{"size":4096,"name":"ghost"}}\n'
    for uncommitted in (ghost, b'{"op":"delete","id":0}\n', b'{"op":"create","id":1,"rec'):
        with open(journal, "ab") as f:
            f.write(uncommitted)
        with Pool(d, read_only=True) as ro:
            assert [(v.dev_id, v.name) for v in ro.list_volumes()] == [(0, "base")]
            assert journal.read_bytes() == committed + uncommitted
        with Pool(d) as pool:
            assert [(v.dev_id, v.name) for v in pool.list_volumes()] == [(0, "base")]
            assert len(pool.registry.problems) == 1 and "cut" in pool.registry.problems[0]
        assert journal.read_bytes() == committed
    with Pool(d) as pool:
        assert pool.registry.problems == []
        pool.create_snap(1, 0, name="snap")
    # Compaction folds the journal into the base file; the state survives.
    with Pool(d) as pool:
        pool.registry.compact()
    assert journal.read_bytes() == b""
    with Pool(d) as pool:
        assert [(v.dev_id, v.name, v.size) for v in pool.list_volumes()] == \
            [(0, "base", 1 << 20), (1, "snap", 1 << 20)]


def test_registry_damaged_line_keeps_later_records(tmp_path: Path) -> None:
    """An unreadable line in the middle drops only itself: said, copied aside, folded in."""
    d = make_pool(tmp_path)
    with Pool(d) as pool:
        for i in range(4):
            pool.create_thin(i, size=(i + 1) << 20, name=f"v{i}")
    journal = Path(d) / JOURNAL
    lines = journal.read_bytes().split(b"\n")
    lines[1] = b"\xff" * len(lines[1])  # volume 1's record is unreadable
    damaged = b"\n".join(lines)
    journal.write_bytes(damaged)
    with Pool(d, read_only=True) as ro:  # read-only: reports, changes nothing
        assert ro.registry.problems == [
            f"volumes.log line 2 ({len(lines[1])} bytes, "
            f"'{chr(0xfffd) * 40}...'): " + ro.registry.problems[0].split("): ", 1)[1]]
        assert journal.read_bytes() == damaged
    with Pool(d) as pool:
        vols = {v.dev_id: (v.name, v.size) for v in pool.list_volumes()}
        problems = pool.registry.problems
    default = 64 << 20  # a volume without a record gets the pool's data size
    assert vols == {0: ("v0", 1 << 20), 1: (None, default), 2: ("v2", 3 << 20), 3: ("v3", 4 << 20)}
    assert "line 2" in problems[0] and "skipped" in problems[0]
    copies = list(Path(d).glob(JOURNAL + ".damaged-*"))
    assert len(copies) == 1 and copies[0].read_bytes() == damaged
    assert str(copies[0]) in problems[1]
    assert journal.read_bytes() == b""  # folded into volumes.json
    with Pool(d) as pool:
        assert pool.registry.problems == []
        assert {v.dev_id: (v.name, v.size) for v in pool.list_volumes()} == vols


def test_registry_reads_transaction_stamped_journal(tmp_path: Path) -> None:
    """Pools written before the registry had its own commit point still open."""
    d = make_pool(tmp_path)
    with Pool(d) as pool:
        pool.message("create_thin 0")
        pool.message("create_thin 1")
    (Path(d) / JOURNAL).write_bytes(
        b'{"tid":1,"set":{"0":{"size":1048576,"name":"old"}},"del":[]}\n'
        b'{"tid":2,"set":{"1":{"size":2097152,"name":null}},"del":[]}\n'
        b'{"tid":3,"set":{},"del":[1]}\n')  # not committed: device 1 still exists
    with Pool(d) as pool:
        assert [(v.dev_id, v.name, v.size) for v in pool.list_volumes()] == \
            [(0, "old", 1 << 20), (1, None, 2 << 20)]


def test_registry_device_change_is_constant_cost(tmp_path: Path) -> None:
    """Each device change appends one journal line, whatever the number of volumes."""
    d = make_pool(tmp_path)
    with Pool(d) as pool:
        for i in range(50):
            pool.create_thin(i, size=1 << 20)
        journal = Path(d) / JOURNAL
        before = journal.stat().st_size
        pool.create_snap(100, 3)
        assert 0 < journal.stat().st_size - before < 200


def test_image_export_import_roundtrip_sparse(tmp_path: Path) -> None:
    d = make_pool(tmp_path)
    img = tmp_path / "in.raw"
    with open(img, "wb") as f:
        f.truncate(8 << 20)
        f.seek(BS * 3 + 17)
        f.write(os.urandom(100_000))
        f.seek(6 << 20)
        f.write(b"tail" * 1000)
    with Pool(d) as pool:
        pool.create_thin(0, size=8 << 20)
        with open(img, "rb") as f:
            import_image(pool, 0, f.fileno(), str(img))
        mapped = pool.thin_status(0).mapped_sectors // 128
        assert mapped == 3  # only blocks with data were provisioned
        out = tmp_path / "out.raw"
        with open(out, "wb") as f:
            export_image(pool, 0, f.fileno(), str(out))
    assert out.read_bytes() == img.read_bytes()
    assert allocated(str(out)) <= 4 * BS
    with Pool(d) as pool:
        pool.create_thin(1, size=1 << 20)
        with pytest.raises(ThinpoolError, match="larger than volume"):
            with open(img, "rb") as f:
                import_image(pool, 1, f.fileno(), str(img))
