"""Read-only access to committed thin metadata, for the offline tools.

``MetadataReader`` opens a metadata file or device, picks the live superblock
or (``snapshot=True``) the metadata-snapshot copy it points to, and walks
the device-details tree and the two-level mapping tree.  Mapping leaves are
returned as numpy arrays, so tools never decode a node value by value.
Every block read is checksum-verified; structural problems raise
``MetadataError`` naming the block.
"""

from __future__ import annotations

import os
from typing import Any, Iterator

import numpy as np

from ..errors import BadBlockError, MetadataError
from ..ondisk.checksum import BLOCK_SIZE, Salt
from ..ondisk.node import (DEVICE_DETAILS, HEADER, LEAF, U64, NodeView, ValueCodec, check_header,
                           values_offset)
from ..ondisk.superblock import MAGIC, Superblock
from ..ondisk.values import DeviceDetails
from ..pdata.block_manager import BlockManager
from ..pdata.blockio import FileBlockIO

TIME_MASK = np.uint64((1 << 24) - 1)


def read_superblock(bm: BlockManager, location: int = 0) -> Superblock:
    raw = bm.read(location, Salt.SUPERBLOCK)
    sb = Superblock.unpack(raw)
    if sb.magic != MAGIC:
        raise BadBlockError(location, "superblock", f"bad magic {sb.magic} (expected {MAGIC})")
    if sb.blocknr != location:
        raise BadBlockError(location, "superblock", f"bad block nr {sb.blocknr}")
    return sb


def probe_superblock(path: str | os.PathLike[str]) -> Superblock | None:
    """The superblock of a metadata file or device; None if block 0 is all zeros (blank).

    Raises ``MetadataError`` when block 0 holds something that is not a valid
    dm-thin superblock (what the kernel refuses to open and never formats).
    """
    io = FileBlockIO(path, writable=False)
    try:
        if io.nr_blocks == 0:
            raise MetadataError(f"{os.fspath(path)} is smaller than one 4 KiB metadata block")
        if io.read(0).count(0) == BLOCK_SIZE:
            return None
        return read_superblock(BlockManager(io, max_cached=1), 0)
    finally:
        io.close()


class MetadataReader:
    def __init__(self, path: str | os.PathLike[str], snapshot: bool = False,
                 max_cached: int = 4096) -> None:
        self.io = FileBlockIO(path, writable=False)
        if self.io.nr_blocks == 0:
            self.io.close()
            raise MetadataError(f"{os.fspath(path)} is too small to hold thin metadata")
        self.bm = BlockManager(self.io, max_cached=max_cached)
        try:
            self.live = read_superblock(self.bm, 0)
            if snapshot:
                if self.live.held_root == 0:
                    raise MetadataError("no metadata snapshot is held")
                self.sb = read_superblock(self.bm, self.live.held_root)
            else:
                self.sb = self.live
        except BaseException:
            self.io.close()
            raise

    def close(self) -> None:
        self.io.close()

    def __enter__(self) -> MetadataReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- generic tree walking ----------------------------------------------------------
    def node(self, b: int, value_size: int | None) -> NodeView:
        raw = self.bm.read(b, Salt.NODE)
        check_header(raw, b, value_size)
        return NodeView(raw)

    def leaves(self, root: int, value_size: int) -> Iterator[NodeView]:
        """Leaves of a tree in key order (depth-first)."""
        stack = [root]
        depth_guard = 0
        while stack:
            b = stack.pop()
            node = self.node(b, value_size)
            if node.flags == LEAF:
                yield node
                continue
            depth_guard += 1
            if depth_guard > 10_000_000:
                raise MetadataError(f"btree under block {root} does not terminate")
            children = node.values_raw().cast("Q").tolist()
            stack.extend(reversed(children))

    def tree_items(self, root: int, codec: ValueCodec = U64) -> Iterator[tuple[int, Any]]:
        for leaf in self.leaves(root, codec.size):
            keys = leaf.keys().tolist()
            values = codec.unpack_many(leaf.values_raw())
            yield from zip(keys, values)

    # -- thin structures ------------------------------------------------------------------
    def details(self) -> dict[int, DeviceDetails]:
        return {k: DeviceDetails(*v) for k, v in
                self.tree_items(self.sb.device_details_root, DEVICE_DETAILS)}

    def mapping_roots(self) -> dict[int, int]:
        return dict(self.tree_items(self.sb.data_mapping_root, U64))

    def mapping_leaves(self, root: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(virtual blocks, raw block_time values) per leaf, as uint64 arrays."""
        for leaf in self.leaves(root, 8):
            n = leaf.nr_entries
            keys = np.frombuffer(leaf.raw, dtype="<u8", count=n, offset=HEADER.size)
            vals = np.frombuffer(leaf.raw, dtype="<u8", count=n,
                                 offset=values_offset(leaf.max_entries))
            yield keys, vals

    def mappings(self, root: int) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """(virtual blocks, data blocks, times) per leaf."""
        for keys, vals in self.mapping_leaves(root):
            yield keys, vals >> np.uint64(24), vals & TIME_MASK
