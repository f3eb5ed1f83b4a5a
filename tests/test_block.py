"""The data path layer: range locks, what a commit stops and what it does not, concurrency."""

from __future__ import annotations

import errno
import os
import random
import threading
import time
from pathlib import Path

import pytest

from thinpool.block.locks import RangeLock
from thinpool.errors import DataPathError
from thinpool.pool.config import PoolConfig
from thinpool.pool.engine import Pool

from thinmodel import assert_thin_check_clean

BS = 64 * 1024


def make_pool(tmp_path: Path, data: str = "256M", **features) -> str:
    d = str(tmp_path / "pool")
    Pool.create(d, data, "16M", PoolConfig(**features))
    return d


def run(fn, *args) -> threading.Thread:
    t = threading.Thread(target=fn, args=args, daemon=True)
    t.start()
    return t


# -- RangeLock ------------------------------------------------------------------------------------

def test_range_lock_shared_overlap_and_exclusive_wait() -> None:
    lock = RangeLock()
    a = lock.acquire(0, 10, False)
    b = lock.acquire(5, 15, False)  # shared holders overlap freely
    got = threading.Event()

    def excl() -> None:
        h = lock.acquire(8, 8, True)
        got.set()
        lock.release(h)

    t = run(excl)
    assert not got.wait(0.2)  # blocked by both shared holders
    c = lock.acquire(20, 30, True)  # a disjoint exclusive range does not wait
    lock.release(a)
    assert not got.wait(0.1)
    lock.release(b)
    assert got.wait(5)
    t.join(5)
    lock.release(c)


def test_range_lock_waiting_exclusive_is_not_starved() -> None:
    """A shared request that comes after a waiting exclusive one waits behind it."""
    lock = RangeLock()
    first = lock.acquire(0, 0, False)
    order: list[str] = []
    ex_waiting = threading.Event()

    def excl() -> None:
        ex_waiting.set()
        h = lock.acquire(0, 0, True)
        order.append("exclusive")
        lock.release(h)

    def shared() -> None:
        h = lock.acquire(0, 0, False)
        order.append("shared")
        lock.release(h)

    t1 = run(excl)
    ex_waiting.wait(5)
    time.sleep(0.1)  # the exclusive request is queued
    t2 = run(shared)
    time.sleep(0.1)
    assert order == []
    lock.release(first)
    t1.join(5)
    t2.join(5)
    assert order == ["exclusive", "shared"]


def test_range_lock_try_acquire_never_waits() -> None:
    """try_acquire grants what acquire would grant at once and queues nothing otherwise."""
    lock = RangeLock()
    a = lock.acquire(0, 10, False)
    b = lock.try_acquire(5, 20, False)  # shared beside shared
    assert b is not None
    assert lock.try_acquire(10, 10, True) is None  # exclusive over shared holders
    assert lock.try_acquire(11, 30, True) is None  # ... over b
    lock.release(b)
    waiting = threading.Event()

    def excl() -> None:
        waiting.set()
        h = lock.acquire(8, 8, True)
        lock.release(h)

    t = run(excl)
    waiting.wait(5)
    time.sleep(0.1)  # the exclusive request is queued behind a
    assert lock.try_acquire(0, 100, False) is None  # a shared request would wait behind it
    c = lock.try_acquire(9, 100, False)  # not overlapping block 8: granted
    assert c is not None
    lock.release(a)
    t.join(5)
    assert not t.is_alive()  # the failed tries left nothing in the queue
    lock.release(c)
    d = lock.try_acquire(0, 100, True)
    assert d is not None
    lock.release(d)


# -- what a commit stops --------------------------------------------------------------------------

def test_gated_commit_stops_only_provisioning(tmp_path: Path) -> None:
    """While the gate is closed (a commit's final sync), reads and overwrites of provisioned
    blocks go on, on every volume; only writes that need a new block wait."""
    d = make_pool(tmp_path)
    with Pool(d) as pool:
        pool.create_thin(0, size=4 << 20)
        pool.create_thin(1, size=4 << 20)
        with pool.volume(0) as v0, pool.volume(1) as v1:
            v0.write(0, b"a" * BS)
            v1.write(0, b"b" * BS)
            pool.commit()
            pool.dp.gate.acquire_exclusive()
            try:
                done: dict[str, bool] = {}

                def io(name: str, fn) -> None:  # type: ignore[no-untyped-def]
                    fn()
                    done[name] = True

                fast = [run(io, "read0", lambda: v0.read(0, BS)),
                        run(io, "overwrite1", lambda: v1.write(100, b"x" * 1000)),
                        run(io, "readinto1", lambda: v1.readinto(0, memoryview(bytearray(BS))))]
                for t in fast:
                    t.join(5)
                assert done == {"read0": True, "overwrite1": True, "readinto1": True}
                slow = run(io, "provision", lambda: v0.write(3 * BS, b"new block"))
                slow.join(0.3)
                assert slow.is_alive() and "provision" not in done
            finally:
                pool.dp.gate.release_exclusive()
            slow.join(5)
            assert done["provision"]
            assert bytes(v1.read(100, 1000)) == b"x" * 1000
    assert_thin_check_clean(f"{d}/metadata")


def test_copy_on_write_of_one_volume_does_not_block_another(tmp_path: Path) -> None:
    """A copy in progress (held inside copy_file_range) holds no pool-wide lock."""
    import thinpool.block.device as device

    d = make_pool(tmp_path)
    with Pool(d) as pool:
        pool.create_thin(0, size=4 << 20)
        pool.create_thin(5, size=4 << 20)
        with pool.volume(0) as v0:
            v0.write(0, os.urandom(BS))
        pool.create_snap(1, 0)
        entered, release = threading.Event(), threading.Event()
        real_copy = device._copy_range

        def slow_copy(*args) -> None:  # type: ignore[no-untyped-def]
            entered.set()
            release.wait(10)
            real_copy(*args)

        device._copy_range = slow_copy
        try:
            with pool.volume(1) as snap, pool.volume(5) as other, pool.volume(0) as v0:
                cow = run(snap.write, 10, b"copy me")
                assert entered.wait(5)
                # other volumes provision, read and overwrite; the origin reads
                other.write(0, b"independent")
                assert bytes(other.read(0, 11)) == b"independent"
                assert len(v0.read(0, BS)) == BS
                assert cow.is_alive()
                release.set()
                cow.join(5)
                assert bytes(snap.read(10, 7)) == b"copy me"
                assert bytes(v0.read(10, 7)) != b"copy me"
        finally:
            device._copy_range = real_copy
            release.set()
    assert_thin_check_clean(f"{d}/metadata")


# -- semantics --------------------------------------------------------------------------------------

def test_write_zeroes_over_two_partial_blocks(tmp_path: Path) -> None:
    """Regression (kill harness): the range starts in an unprovisioned block and ends inside a
    provisioned one; the provisioned part must be zeroed."""
    d = make_pool(tmp_path)
    with Pool(d) as pool:
        pool.create_thin(0, size=1 << 20)
        with pool.volume(0) as vol:
            vol.write(BS, b"q" * BS)
            vol.write_zeroes(BS - 100, 1000)
            assert bytes(vol.read(BS, 900)) == bytes(900)
            assert bytes(vol.read(BS + 900, 10)) == b"q" * 10


def test_write_zeroes_without_trim_keeps_blocks_provisioned(tmp_path: Path) -> None:
    d = make_pool(tmp_path)
    with Pool(d) as pool:
        pool.create_thin(0, size=1 << 20)
        with pool.volume(0) as vol:
            vol.write(0, os.urandom(2 * BS))
            vol.write_zeroes(0, 4 * BS, may_trim=False)
            assert bytes(vol.read(0, 4 * BS)) == bytes(4 * BS)
            assert pool.thin_status(0).mapped_sectors == 4 * 128
            vol.write_zeroes(0, 4 * BS)
            assert pool.thin_status(0).mapped_sectors == 0
            assert vol.extents(0, 8 * BS) == [(8 * BS, 3)]
    assert_thin_check_clean(f"{d}/metadata")


def test_extents_and_errnos(tmp_path: Path) -> None:
    d = make_pool(tmp_path, ignore_discard=True)
    base = tmp_path / "origin"
    base.write_bytes(b"o" * (BS + 10))
    with Pool(d) as pool:
        pool.create_thin(0, size=1 << 20)
        pool.create_thin(1, size=1 << 20, origin=str(base))
        with pool.volume(0) as vol, pool.volume(1) as ovol:
            vol.write(2 * BS, b"x")
            assert vol.extents(0, 4 * BS) == [(2 * BS, 3), (BS, 0), (BS, 3)]
            assert vol.extents(100, 10) == [(10, 3)]
            assert ovol.extents(0, 4 * BS) == [(2 * BS, 1), (2 * BS, 3)]
            for fn, args, err in ((vol.read, (1 << 20, 1), errno.EINVAL),
                                  (vol.write, (-1, b"x"), errno.EINVAL),
                                  (vol.trim, (0, BS), errno.EOPNOTSUPP),
                                  (ovol.write_zeroes, (0, BS, True, True), errno.EOPNOTSUPP)):
                with pytest.raises(DataPathError) as e:
                    fn(*args)
                assert e.value.errno == err
    with Pool(d, read_only=True) as pool, pool.volume(0) as vol:
        with pytest.raises(DataPathError) as e:
            vol.write(0, b"x")
        assert e.value.errno == errno.EPERM


def test_handles_share_state_and_flush(tmp_path: Path) -> None:
    """Two handles on one volume (two NBD connections): a flush on one covers the other."""
    d = make_pool(tmp_path)
    with Pool(d) as pool:
        pool.create_thin(0, size=1 << 20)
        a, b = pool.volume(0), pool.volume(0)
        a.write(0, b"from a")
        assert bytes(b.read(0, 6)) == b"from a"
        b.flush()
        assert not pool.md.dirty
        a.close()
        with pytest.raises(DataPathError):
            a.read(0, 1)
        assert bytes(b.read(0, 6)) == b"from a"
        with pytest.raises(Exception, match="EBUSY"):
            pool.delete(0)
        b.close()
        pool.delete(0)


# -- concurrency ------------------------------------------------------------------------------------

def test_concurrent_io_snapshots_discards_and_commits(tmp_path: Path) -> None:
    """Threads write, read, discard and zero disjoint slots of three volumes while snapshots
    are taken and commits run; every volume ends equal to its model, every snapshot holds
    whole writes only, and the metadata passes thin_check."""
    d = make_pool(tmp_path)
    size = 2 << 20
    slot = 3 * BS + 512  # each thread owns slots that straddle block boundaries
    with Pool(d) as pool:
        for v in range(3):
            pool.create_thin(v, size=size)
        handles = [pool.volume(v) for v in range(3)]
        models = [bytearray(size) for _ in range(3)]
        errors: list[BaseException] = []
        stop = threading.Event()

        def worker(idx: int) -> None:
            rng = random.Random(idx)
            vol, model = handles[idx % 3], models[idx % 3]
            mine = [s for s in range(size // slot) if s % 4 == idx // 3]
            try:
                for n in range(150):
                    s = rng.choice(mine)
                    off = s * slot + rng.randrange(0, slot // 2)
                    ln = rng.randrange(1, slot // 2)
                    kind = rng.random()
                    if kind < 0.6:
                        data = bytes([idx * 16 + n % 16 + 1]) * ln
                        vol.write(off, data, fua=rng.random() < 0.05)
                        model[off:off + ln] = data
                    elif kind < 0.75:
                        vol.write_zeroes(off, ln, may_trim=rng.random() < 0.5)
                        model[off:off + ln] = bytes(ln)
                    elif kind < 0.85:
                        vol.trim(off, ln)
                        lo, hi = -(-off // BS) * BS, (off + ln) // BS * BS
                        if hi > lo:
                            model[lo:hi] = bytes(hi - lo)
                    else:
                        assert bytes(vol.read(off, ln)) == bytes(model[off:off + ln])
            except BaseException as e:  # noqa: BLE001 - reported by the main thread
                errors.append(e)

        snaps: list[int] = []

        def snapshotter() -> None:
            n = 10
            try:
                while not stop.is_set() and n < 40:
                    pool.create_snap(n, n % 3)
                    snaps.append(n)
                    n += 1
                    pool.commit()
                    time.sleep(0.01)
            except BaseException as e:  # noqa: BLE001
                errors.append(e)

        workers = [run(worker, i) for i in range(12)]
        snap_thread = run(snapshotter)
        for t in workers:
            t.join(120)
        stop.set()
        snap_thread.join(60)
        assert not errors, errors
        for v in range(3):
            assert bytes(handles[v].read(0, size)) == bytes(models[v]), f"volume {v}"
            handles[v].close()
        assert len(snaps) > 3
        # a snapshot never shows part of one write call: every slot's bytes of one run of a
        # single fill value are whole (checked by value counts per written run)
        for n in snaps:
            with pool.volume(n) as s:
                assert len(s.read(0, size)) == size
    assert_thin_check_clean(f"{d}/metadata")


def test_snapshot_holds_whole_writes_only(tmp_path: Path) -> None:
    """Each write covers 96 blocks with one value.  A snapshot taken meanwhile shows one value
    across all of them, and no write that was in flight changes it after create_snap returned
    (the origin is quiesced for the snapshot, as the kernel suspends it)."""
    d = make_pool(tmp_path, data="1G")
    span = 96 * BS
    seen: dict[int, bytes] = {}
    with Pool(d) as pool:
        pool.create_thin(0, size=8 << 20)
        with pool.volume(0) as vol:
            stop = threading.Event()

            def writer() -> None:
                k = 1
                while not stop.is_set():
                    vol.write(BS // 2, bytes([k % 250 + 1]) * span)
                    k += 1

            t = run(writer)
            for n in range(1, 41):
                pool.create_snap(n, 0)
                with pool.volume(n) as s:
                    seen[n] = bytes(s.read(BS // 2, span))
            stop.set()
            t.join(10)
        for n in range(1, 41):
            with pool.volume(n) as s:
                data = bytes(s.read(BS // 2, span))
            assert len(set(data)) == 1, f"snapshot {n} is torn"
            assert data == seen[n], f"snapshot {n} changed after it was taken"
    assert_thin_check_clean(f"{d}/metadata")


# -- the mapping cache ----------------------------------------------------------------------------

def test_mapping_cache_follows_snapshots_discards_and_aborts(tmp_path: Path) -> None:
    with Pool(make_pool(tmp_path)) as pool:
        pool.create_thin(1, size=16 * BS)
        with pool.volume(1) as vol:
            vol.write(0, b"a" * BS)
            assert vol.read(0, BS) == b"a" * BS  # known now: mapped, not shared
            vol.write(0, b"b" * 4096)  # in place
            pool.create_snap(2, 1)  # every block of volume 1 is shared from here on
            vol.write(0, b"c" * 4096)  # so this copies the block first
            with pool.volume(2) as snap:
                assert snap.read(0, BS) == b"b" * 4096 + b"a" * (BS - 4096)
            assert vol.read(0, BS) == b"c" * 4096 + b"a" * (BS - 4096)
            vol.trim(0, BS)
            assert vol.read(0, BS) == bytes(BS)
            vol.write(0, b"e" * 512)  # provisions again: zeroed around the write
            assert vol.read(0, BS) == b"e" * 512 + bytes(BS - 512)
            pool.commit()
            assert vol.read(BS, BS) == bytes(BS)  # known unmapped
            vol.write(BS, b"d" * BS)
            assert vol.read(BS, BS) == b"d" * BS
            with pool.dp.md_lock:
                pool.dp.abort()  # the open transaction (block 1's mapping) is forgotten
            assert vol.read(BS, BS) == bytes(BS)
            assert vol.read(0, BS) == b"e" * 512 + bytes(BS - 512)
    assert_thin_check_clean(os.path.join(str(tmp_path / "pool"), "metadata"))


def test_a_cache_miss_looks_up_its_window(tmp_path: Path) -> None:
    """A miss looks up the aligned ``MISS_WINDOW`` blocks around it at once (one metadata
    walk per window, not per block), clipped at the end of the device; when holding the
    window would wait for another request, only the missed block."""
    from thinpool.block.device import MISS_WINDOW as W

    with Pool(make_pool(tmp_path)) as pool:
        pool.create_thin(1, size=(2 * W + 3) * BS)
        with pool.volume(1) as vol:
            for v in range(0, 2 * W + 3, 2):  # every other block mapped
                vol.write(v * BS, bytes([v % 256]) * 8)
        with pool.volume(1) as vol:  # reopened: nothing cached
            assert vol.state.maps == {}
            assert vol.read(4 * BS, 8) == bytes([4]) * 8
            assert set(vol.state.maps) == set(range(W))
            assert all(vol.state.maps[v] == pool.md.lookup(1, v) for v in range(W))
            hold = vol.state.ranges.acquire(W + 10, W + 10, True)  # another request's block
            assert vol.read((W + 3) * BS, 8) == bytes(8)
            assert set(vol.state.maps) == set(range(W)) | {W + 3}
            vol.state.ranges.release(hold)
            vol.write((W + 6) * BS, b"y")  # an overwrite misses: its window now
            assert set(vol.state.maps) == set(range(2 * W))
            assert vol.read((W + 6) * BS, 2) == b"y" + bytes([W + 6])
            assert vol.read((2 * W + 2) * BS, 1) == bytes([2 * W + 2])  # the last, short window
            assert set(vol.state.maps) == set(range(2 * W + 3))
            assert all(vol.state.maps[v] == pool.md.lookup(1, v) for v in range(2 * W + 3))


def test_a_cache_miss_on_a_device_larger_than_the_cache_looks_up_only_its_blocks(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Under random access over a device the cache cannot hold, windows would only fill the
    cache sooner (it is dropped when full) and make every miss dearer."""
    import thinpool.block.core as core
    from thinpool.block.device import MISS_WINDOW as W

    monkeypatch.setattr(core, "MAP_CACHE_LIMIT", 2 * W)
    with Pool(make_pool(tmp_path)) as pool:
        pool.create_thin(1, size=2 * W * BS)  # fits: windows
        pool.create_thin(2, size=(2 * W + 1) * BS)  # one block more: no windows
        with pool.volume(1) as v1, pool.volume(2) as v2:
            v1.read(3 * BS, 1)
            v2.read(3 * BS, 1)
            assert set(v1.state.maps) == set(range(W)) and set(v2.state.maps) == {3}


def test_mapping_cache_bound_keeps_volumes_correct(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import thinpool.block.core as core

    monkeypatch.setattr(core, "MAP_CACHE_LIMIT", 5)
    rng = random.Random(7)
    model = {1: bytearray(32 * BS), 2: bytearray(32 * BS)}
    with Pool(make_pool(tmp_path)) as pool:
        pool.create_thin(1, size=32 * BS)
        pool.create_thin(2, size=32 * BS)
        with pool.volume(1) as v1, pool.volume(2) as v2:
            vols = {1: v1, 2: v2}
            for _ in range(400):
                i = rng.choice((1, 2))
                off = rng.randrange(0, 31 * BS)
                n = rng.randrange(1, 3 * BS) if off + 3 * BS <= 32 * BS else 512
                if rng.random() < 0.5:
                    data = rng.randbytes(n)
                    vols[i].write(off, data)
                    model[i][off:off + n] = data
                elif rng.random() < 0.1:
                    vols[i].trim(off, n)
                    lo, hi = -(-off // BS) * BS, (off + n) // BS * BS
                    if hi > lo:
                        model[i][lo:hi] = bytes(hi - lo)
                else:
                    assert vols[i].read(off, n) == model[i][off:off + n]
            for i, vol in vols.items():
                assert vol.read(0, 32 * BS) == model[i]


def test_new_blocks_read_as_zeros_when_reused_with_old_data(tmp_path: Path) -> None:
    """Without passdown a freed block keeps its bytes in the data file; a partial
    write (or write-zeroes that keeps blocks provisioned) to a block allocated from
    those must still zero it."""
    d = make_pool(tmp_path, data="1M", no_discard_passdown=True)  # 16 blocks: reuse is forced
    with Pool(d) as pool:
        pool.create_thin(0, size=1 << 20)
        with pool.volume(0) as vol:
            vol.write(0, b"\xff" * (1 << 20))
            pool.commit()
            vol.discard(0, 1 << 20)
            pool.commit()
            assert os.path.getsize(f"{d}/data") >= 1 << 20
            vol.write(10, b"abc")
            got = bytes(vol.read(0, BS))
            assert got == bytes(10) + b"abc" + bytes(BS - 13)
            vol.write_zeroes(4 * BS, 2 * BS, may_trim=False)
            assert bytes(vol.read(4 * BS, 2 * BS)) == bytes(2 * BS)
            assert pool.thin_status(0).mapped_sectors == 3 * 128
            vol.write(8 * BS + 7, b"x")  # and in a fresh region of the pool's file
            assert bytes(vol.read(8 * BS, BS)) == bytes(7) + b"x" + bytes(BS - 8)
    assert_thin_check_clean(f"{d}/metadata")


# -- batches of writes ------------------------------------------------------------------------------

def test_write_many_matches_writes_one_by_one(tmp_path: Path) -> None:
    """Random batches over provisioned, unprovisioned and shared blocks (a snapshot between
    batches), overlapping inside a batch: the volume reads as the writes done in order, the
    snapshot keeps its content, every new block is mapped once and the metadata checks clean."""
    rng = random.Random(11)
    size = 48 * BS
    model = bytearray(size)
    d = make_pool(tmp_path)
    with Pool(d) as pool:
        pool.create_thin(1, size=size)
        with pool.volume(1) as vol:
            vol.write(0, os.urandom(8 * BS))
            model[:8 * BS] = vol.read(0, 8 * BS)
            snaps: dict[int, bytes] = {}
            touched = set(range(8))
            for round_ in range(30):
                if round_ % 10 == 5:
                    pool.create_snap(100 + round_, 1)
                    snaps[100 + round_] = bytes(model)
                batch = []
                for _ in range(rng.randrange(1, 17)):
                    off = rng.randrange(0, size - 1)
                    n = min(rng.choice((512, 4096, 4096, BS, BS + 4096, 3 * BS)), size - off)
                    data = rng.randbytes(n)
                    batch.append((off, memoryview(data)))
                    model[off:off + n] = data
                    touched.update(range(off // BS, (off + n - 1) // BS + 1))
                if rng.random() < 0.2:  # overlapping writes: the later one wins
                    off, data = batch[0]
                    batch.append((off, memoryview(b"L" * len(data))))
                    model[off:off + len(data)] = b"L" * len(data)
                vol.write_many(batch)
                assert vol.read(0, size) == model
            mapped = {v for v, _ in pool.md.mappings(1)}
            assert mapped == touched
            assert pool.thin_status(1).mapped_sectors == len(touched) * 128
        for snap, content in snaps.items():
            with pool.volume(snap) as s:
                assert s.read(0, size) == content
    assert_thin_check_clean(f"{d}/metadata")


def test_write_many_short_of_space_writes_one_by_one(tmp_path: Path) -> None:
    """A batch that needs more blocks than are free takes none of them at once (they would
    be lost to this transaction): its writes go one by one, so the free blocks are filled
    and the first write that finds none fails (error_if_no_space), mapping nothing."""
    d = make_pool(tmp_path, data="1M", error_if_no_space=True)  # 16 blocks
    with Pool(d) as pool:
        pool.create_thin(0, size=32 * BS)
        with pool.volume(0) as vol:
            vol.write(0, b"a" * (12 * BS))
            assert pool.md.data_sm.nr_free == 4
            batch = [(v * BS + 100, memoryview(bytes([v]) * 4096)) for v in range(12, 20)]
            batch.insert(0, (5, memoryview(b"in place")))
            with pytest.raises(DataPathError) as e:
                vol.write_many(batch)
            assert e.value.errno == errno.ENOSPC
            assert pool.md.data_sm.nr_free == 0
            assert pool.thin_status(0).mapped_sectors == 16 * 128
            assert vol.read(5, 8) == b"in place"
            for v in range(12, 20):
                want = bytes(100) + bytes([v]) * 4096 + bytes(BS - 4196) if v < 16 else bytes(BS)
                assert vol.read(v * BS, BS) == want
            with pytest.raises(DataPathError) as e:
                vol.write_many([(16 * BS, memoryview(b"x")), (17 * BS, memoryview(b"y"))])
            assert e.value.errno == errno.ENOSPC
            assert pool.thin_status(0).mapped_sectors == 16 * 128
            with pytest.raises(DataPathError) as e:
                vol.write_many([(0, memoryview(b"ok")), (32 * BS - 1, memoryview(b"xy"))])
            assert e.value.errno == errno.EINVAL
            assert vol.read(0, 2) == b"aa"  # a bad range is found before anything is written
    assert_thin_check_clean(f"{d}/metadata")


def test_provisioning_caches_the_new_mappings(tmp_path: Path) -> None:
    """The mappings a write just made are in the device's cache, equal to what the metadata
    says (so the next I/O on those blocks needs no lookup), also after a copy-on-write."""
    with Pool(make_pool(tmp_path)) as pool:
        pool.create_thin(1, size=16 * BS)
        with pool.volume(1) as vol:
            vol.write_many([(0, memoryview(b"a" * 10)), (5 * BS, memoryview(b"b" * BS))])
            vol.write(9 * BS + 1, b"c")
            for v in (0, 5, 9):
                assert vol.state.maps[v] == pool.md.lookup(1, v)
                assert not vol.state.maps[v].shared
            pool.create_snap(2, 1)
            assert vol.state.maps == {}
            vol.write_many([(1, memoryview(b"d")), (9 * BS, memoryview(b"e"))])
            for v in (0, 9):
                assert vol.state.maps[v] == pool.md.lookup(1, v)
                assert not vol.state.maps[v].shared
            assert vol.read(0, 2) == b"ad" and vol.read(9 * BS, 2) == b"ec"
            with pool.volume(2) as snap:
                assert snap.read(0, 2) == b"aa" and snap.read(9 * BS, 2) == b"\0c"
    assert_thin_check_clean(os.path.join(str(tmp_path / "pool"), "metadata"))


def test_large_unaligned_writes_in_pieces(tmp_path: Path) -> None:
    """Data-file writes are cut at 256 KiB file boundaries: large writes at odd offsets, in
    place over contiguous blocks and into new ones, read back byte for byte."""
    rng = random.Random(5)
    size = 64 * BS
    d = make_pool(tmp_path)
    with Pool(d) as pool:
        pool.create_thin(1, size=size)
        with pool.volume(1) as vol:
            model = bytearray(rng.randbytes(32 * BS))
            vol.write(0, model)  # contiguous data blocks: in-place runs span many blocks
            model += bytes(size - len(model))
            for off, n in ((4097, 20 * BS + 513), (BS - 1, 2), (3 * BS + 7, BS), (30 * BS + 11, 9 * BS)):
                data = rng.randbytes(n)
                vol.write(off, data)
                model[off:off + n] = data
                assert vol.read(0, size) == model
    assert_thin_check_clean(f"{d}/metadata")
