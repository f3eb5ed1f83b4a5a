"""Write fresh thin metadata from IR events (restore, and formatting a pool).

``MetadataBuilder`` is a sink for the events of ``thin.ir``: devices and
their mappings stream in, bottom-level trees are written as they fill, and
``end_superblock`` writes the top-level and details trees, both space maps and
finally the superblock.  Nothing is shared, so allocation is sequential and
every metadata block has reference count 1; data counts are the number of
devices mapping each data block (each device has its own leaves).

Crash story: block 0 is zeroed first and the superblock is written last,
after a sync, so an interrupted build leaves an unformatted device, never a
superblock pointing at half-written trees.
"""

from __future__ import annotations

import os

import numpy as np

from ..errors import XmlFormatError
from ..ondisk import spacemap as smf
from ..ondisk.checksum import BLOCK_SIZE
from ..ondisk.spacemap import ENTRIES_PER_BITMAP
from ..ondisk.superblock import MAX_METADATA_BLOCKS, VERSION, SpaceMapRoot, Superblock
from ..ondisk.values import DETAILS_DTYPE, MAX_DEVICE_ID
from ..pdata.blockio import FileBlockIO
from ..pdata.btree_builder import SequentialWriter, TreeBuilder
from ..pdata.counts import ChunkedCounts
from .ir import DeviceInfo, MappingChunk, SuperblockInfo

MIN_DATA_BLOCK_SIZE = 128
MAX_DATA_BLOCK_SIZE = 2_097_152
INDEX_DTYPE = np.dtype([("blocknr", "<u8"), ("nr_free", "<u4"), ("none_free_before", "<u4")])
_SHIFT = np.uint64(24)


def validate_data_block_size(sectors: int) -> None:
    if not (MIN_DATA_BLOCK_SIZE <= sectors <= MAX_DATA_BLOCK_SIZE and sectors % 128 == 0):
        raise XmlFormatError(f"invalid data block size {sectors} sectors: must be a multiple of "
                             f"128 between {MIN_DATA_BLOCK_SIZE} and {MAX_DATA_BLOCK_SIZE}")


class MetadataBuilder:
    """An IR sink that writes fresh metadata to an existing file or device.

    With ``dry_run`` the output is only opened to learn its size and nothing
    is written: the whole build runs, so every error it would raise (bad
    input, too little space) is raised without touching the output.
    """

    def __init__(self, path: str | os.PathLike[str], dry_run: bool = False) -> None:
        self.dry_run = dry_run
        self.io = FileBlockIO(path, writable=not dry_run)
        self.nr_metadata_blocks = min(self.io.nr_blocks, MAX_METADATA_BLOCKS)
        if self.nr_metadata_blocks < 8:
            self.io.close()
            raise XmlFormatError(f"{os.fspath(path)} is too small for thin metadata "
                                 f"({self.io.nr_blocks * BLOCK_SIZE} bytes; at least 32 KiB)")
        self.writer = SequentialWriter(None if dry_run else self.io, self.nr_metadata_blocks)
        self.data_counts = ChunkedCounts()
        self.devices: list[tuple[int, int, tuple[int, int, int, int]]] = []
        self.seen_ids: set[int] = set()
        self.sb_info: SuperblockInfo | None = None
        self._dev: DeviceInfo | None = None
        self._tree: TreeBuilder | None = None
        self._mapped = 0
        if not dry_run:
            os.pwrite(self.io.fd, bytes(BLOCK_SIZE), 0)

    def close(self) -> None:
        self.io.close()

    # -- IR sink ----------------------------------------------------------------
    def begin_superblock(self, info: SuperblockInfo) -> None:
        validate_data_block_size(info.data_block_size)
        self.sb_info = info

    def begin_device(self, info: DeviceInfo) -> None:
        if not 0 <= info.dev_id <= MAX_DEVICE_ID:
            raise XmlFormatError(f"device id {info.dev_id} out of range (0..{MAX_DEVICE_ID})")
        if info.dev_id in self.seen_ids:
            raise XmlFormatError(f"device {info.dev_id} appears twice")
        self.seen_ids.add(info.dev_id)
        self._dev = info
        self._tree = TreeBuilder(self.writer, 8)
        self._mapped = 0

    def mappings(self, chunk: MappingChunk) -> None:
        assert self._tree is not None and self.sb_info is not None
        if len(chunk) == 0:
            return
        top = int(chunk.data_blocks.max())
        if top >= self.sb_info.nr_data_blocks:
            raise XmlFormatError(f"mapping beyond end of data device ({top} >= "
                                 f"{self.sb_info.nr_data_blocks})")
        values = (chunk.data_blocks.astype(np.uint64) << _SHIFT) | chunk.times.astype(np.uint64)
        self._tree.add(chunk.vblocks.astype(np.uint64), values.astype("<u8"))
        self.data_counts.add(chunk.data_blocks)
        self._mapped += len(chunk)

    def end_device(self) -> None:
        assert self._tree is not None and self._dev is not None
        root = self._tree.finish()
        d = self._dev
        self.devices.append((d.dev_id, root, (self._mapped, d.transaction, d.creation_time,
                                              d.snap_time)))
        self._tree = self._dev = None

    def end_superblock(self) -> None:
        assert self.sb_info is not None
        info = self.sb_info
        self.devices.sort()
        ids = np.array([d[0] for d in self.devices], dtype=np.uint64)
        top = TreeBuilder(self.writer, 8)
        top.add(ids, np.array([d[1] for d in self.devices], dtype="<u8"))
        mapping_root = top.finish()
        details = TreeBuilder(self.writer, DETAILS_DTYPE.itemsize)
        details.add(ids, np.array([d[2] for d in self.devices], dtype=DETAILS_DTYPE))
        details_root = details.finish()
        data_root = self._data_space_map(info.nr_data_blocks)
        meta_root = self._metadata_space_map()
        self.writer.flush()
        if self.dry_run:
            return
        self.io.sync()
        sb = Superblock(
            flags=info.flags or 0, version=info.version if info.version is not None else VERSION,
            time=info.time, trans_id=info.transaction, data_sm=data_root,
            metadata_sm=meta_root, data_mapping_root=mapping_root,
            device_details_root=details_root, data_block_size=info.data_block_size,
            metadata_nr_blocks=self.nr_metadata_blocks)
        os.pwrite(self.io.fd, sb.pack(), 0)
        self.io.sync()

    # -- space maps ---------------------------------------------------------------
    def _data_space_map(self, nr_blocks: int) -> SpaceMapRoot:
        n = smf.nr_bitmaps(nr_blocks)
        entries = np.zeros(n, dtype=INDEX_DTYPE)
        allocated = 0
        over_keys: list[np.ndarray] = []
        over_vals: list[np.ndarray] = []
        for i in range(n):
            counts = self.data_counts.get(i)
            loc = self.writer.alloc()
            self.writer.write(loc, smf.encode_bitmap(counts, loc))
            valid = min(ENTRIES_PER_BITMAP, nr_blocks - i * ENTRIES_PER_BITMAP)
            entries[i] = smf.index_entry_for(counts, loc, valid)
            allocated += int(np.count_nonzero(counts))
            big = np.flatnonzero(counts >= 3)
            if big.size:
                over_keys.append(big.astype(np.uint64) + np.uint64(i * ENTRIES_PER_BITMAP))
                over_vals.append(counts[big].astype("<u4"))
        index = TreeBuilder(self.writer, INDEX_DTYPE.itemsize)
        index.add(np.arange(n, dtype=np.uint64), entries)
        index_root = index.finish()
        overflow = TreeBuilder(self.writer, 4)
        for k, v in zip(over_keys, over_vals):
            overflow.add(k, v)
        return SpaceMapRoot(nr_blocks, allocated, index_root, overflow.finish())

    def _metadata_space_map(self) -> SpaceMapRoot:
        """Index block, bitmaps and an empty overflow tree; every used block counts 1."""
        nr = self.nr_metadata_blocks
        n = smf.nr_bitmaps(nr)
        index_block = self.writer.alloc()
        bitmap_blocks = [self.writer.alloc() for _ in range(n)]
        overflow = TreeBuilder(self.writer, 4).finish()
        used = self.writer.next
        entries = []
        for i, loc in enumerate(bitmap_blocks):
            counts = np.zeros(ENTRIES_PER_BITMAP, dtype=np.uint32)
            lo = i * ENTRIES_PER_BITMAP
            counts[:max(0, min(used - lo, ENTRIES_PER_BITMAP))] = 1
            self.writer.write(loc, smf.encode_bitmap(counts, loc))
            entries.append(smf.index_entry_for(counts, loc, min(ENTRIES_PER_BITMAP, nr - lo)))
        self.writer.write(index_block, smf.encode_index_block(entries, index_block))
        return SpaceMapRoot(nr, used, index_block, overflow)


def format_metadata(path: str | os.PathLike[str], data_block_size: int, nr_data_blocks: int,
                    transaction: int = 0) -> None:
    """Write empty pool metadata, as the kernel does on first activation."""
    builder = MetadataBuilder(path)
    try:
        builder.begin_superblock(SuperblockInfo("", 0, transaction, 0, VERSION, data_block_size,
                                                nr_data_blocks))
        builder.end_superblock()
    finally:
        builder.close()
