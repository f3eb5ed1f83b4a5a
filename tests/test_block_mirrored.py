"""The data path mirrored into a shared mapping table, and I/O through it (``MirroredDevice``).

A pool in this process shares its mapping caches; a ``MirroredDevice`` on another
attachment of the table does what a worker process does. What it reads or writes must
always be what the pool's own handles see, across overwrites, snapshots, discards, aborts
and closes, and it must refuse (return False) whatever it cannot do safely.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import pytest

from thinpool.block.core import UNMAPPED
from thinpool.block.device import MISS_WINDOW, PUBLISH_WINDOW
from thinpool.block.mirrored import MirroredDevice
from thinpool.block.sharedmap import SharedMappingTable
from thinpool.errors import DataPathError
from thinpool.pool.config import PoolConfig
from thinpool.pool.engine import Pool

from thinmodel import assert_thin_check_clean

BS = 64 * 1024


@pytest.fixture
def pool(tmp_path: Path) -> Iterator[Pool]:
    d = str(tmp_path / "pool")
    Pool.create(d, "256M", "16M", PoolConfig())
    with Pool(d) as p:
        yield p
    assert_thin_check_clean(os.path.join(d, "metadata"))


@pytest.fixture
def shared(pool: Pool) -> Iterator[SharedMappingTable]:
    table = SharedMappingTable.create(1 << 14)
    pool.dp.share_mappings(table)
    reader = SharedMappingTable.attach(table.fd)  # what a worker gets
    yield reader
    reader.close()


def mirror(pool: Pool, table: SharedMappingTable, dev_id: int) -> MirroredDevice:
    return MirroredDevice(table, pool.data_fd, dev_id, pool.block_size)


def read(m: MirroredDevice, offset: int, length: int) -> bytes | None:
    buf = bytearray(length)
    return bytes(buf) if m.readinto(offset, memoryview(buf)) else None


def test_reads_and_overwrites_follow_the_pool(pool: Pool, shared: SharedMappingTable) -> None:
    pool.create_thin(1, size=2 * MISS_WINDOW * BS)
    far = (MISS_WINDOW + 5) * BS  # outside the window the first write looks up
    m = mirror(pool, shared, 1)
    with pool.volume(1) as vol:
        assert read(m, 0, 4096) is None  # nothing looked up yet
        vol.write(0, b"a" * 3 * BS)  # provisioned here: published as exclusive
        assert read(m, BS - 100, 200) == b"a" * 200
        assert m.write(100, memoryview(b"b" * (2 * BS)))  # in place, two blocks
        assert vol.read(0, 3 * BS) == b"a" * 100 + b"b" * 2 * BS + b"a" * (BS - 100)
        assert read(m, 5 * BS, 10) == bytes(10)  # in the looked-up window: known unmapped
        assert read(m, far, 10) is None  # never looked up
        vol.read(far, 10)  # now known unmapped: reads as zeros, cannot be written
        assert read(m, far, 10) == bytes(10)
        assert not m.write(far, memoryview(b"x"))
        pool.create_snap(2, 1)  # every block of 1 is shared now
        assert read(m, 0, 100) is None or read(m, 0, 100) == b"a" * 100
        assert not m.write(0, memoryview(b"c" * 10))  # shared: only the pool may copy it
        vol.write(0, b"c" * 10)  # copies the block
        assert m.write(20, memoryview(b"d" * 10))  # exclusive again
        with pool.volume(2) as snap:
            assert snap.read(0, 40) == b"a" * 40
        assert vol.read(0, 40) == b"c" * 10 + b"a" * 10 + b"d" * 10 + b"a" * 10
        vol.trim(0, 3 * BS)  # unmapped: the mirror must not read the old blocks
        assert read(m, 0, 100) in (None, bytes(100))
        assert not m.write(0, memoryview(b"e"))
        vol.write(BS, b"f" * BS)
        with pool.dp.md_lock:
            pool.dp.abort()  # the mapping of block 1 is gone again
        assert read(m, BS, 10) in (None, bytes(10))
        assert not m.write(BS, memoryview(b"g"))
    assert read(m, 20, 10) is None  # closing the last handle withdraws the device


def test_publish_window_and_eviction(pool: Pool, shared: SharedMappingTable) -> None:
    """A worker's miss publishes its window, into free slots only; the missed blocks
    themselves go in even over another block's entry."""
    blocks = 2 * PUBLISH_WINDOW
    pool.create_thin(1, size=blocks * BS)
    m = mirror(pool, shared, 1)
    with pool.volume(1) as vol:
        for off in range(0, blocks * BS, 16 * BS):
            vol.write(off, os.urandom(16 * BS))
    with pool.volume(1) as vol:  # reopened: nothing published
        assert all(read(m, v * BS, 8) is None for v in range(blocks))
        vol.publish(3 * BS + 5, 100)
        got = [read(m, v * BS, 8) is not None for v in range(blocks)]
        assert got == [True] * PUBLISH_WINDOW + [False] * PUBLISH_WINDOW
        assert read(m, 3 * BS, BS) == vol.read(3 * BS, BS)
        vol.publish(PUBLISH_WINDOW * BS, 1, window=1)
        assert read(m, (PUBLISH_WINDOW + 1) * BS, 8) is None
        assert read(m, PUBLISH_WINDOW * BS, 8) == vol.read(PUBLISH_WINDOW * BS, 8)


def test_publish_does_not_push_out_other_entries(pool: Pool) -> None:
    table = SharedMappingTable.create(1 << 8)  # smaller than one window: slots collide
    pool.dp.share_mappings(table)
    try:
        pool.create_thin(1, size=PUBLISH_WINDOW * 2 * BS)
        with pool.volume(1) as vol:
            vol.write(0, b"x" * BS)
            vol.write(256 * BS, b"y" * BS)  # block 256 shares block 0's slot
            vol.publish(0, BS, window=1)
            assert table.lookup(1, 0) is not None
            vol.publish(300 * BS, 1)  # its window holds block 256: not over block 0
            assert table.lookup(1, 0) is not None and table.lookup(1, 256) is None
            vol.publish(256 * BS, 1)  # a miss on block 256 itself: it goes in
            assert table.lookup(1, 256) is not None and table.lookup(1, 0) is None
            found = table.lookup(1, 256)
            assert found is not None and found[1] != UNMAPPED and found[2]
    finally:
        table.close()


def test_external_origin_blocks_are_never_published_as_zeros(pool: Pool, tmp_path: Path,
                                                            shared: SharedMappingTable) -> None:
    origin = tmp_path / "origin.raw"
    origin.write_bytes(b"o" * 4 * BS)
    pool.create_thin(1, size=8 * BS, origin=str(origin))
    m = mirror(pool, shared, 1)
    with pool.volume(1) as vol:
        assert vol.read(0, BS) == b"o" * BS
        vol.publish(0, 8 * BS)
        assert read(m, 0, 10) is None  # unmapped with an origin: only the pool knows
        vol.write(0, b"n" * BS)
        assert read(m, 0, 10) == b"n" * 10


def test_sharing_needs_no_open_devices(pool: Pool) -> None:
    pool.create_thin(1, size=BS)
    table = SharedMappingTable.create(1 << 8)
    try:
        with pool.volume(1):
            with pytest.raises(DataPathError, match="devices are open"):
                pool.dp.share_mappings(table)
        assert pool.dp.shared_maps is None
    finally:
        table.close()
