"""Read-only access to committed thin metadata, for the offline tools.

``MetadataReader`` opens a metadata file or device, picks the live superblock
or (``snapshot=True``) the metadata-snapshot copy it points to, and walks
the device-details tree and the two-level mapping tree.  Mapping leaves are
returned as numpy arrays, so tools never decode a node value by value.
Every block read is checksum-verified; structural problems raise
``MetadataError`` naming the block.

``TreeReader`` is the part that needs no superblock: tree walks from any
root.  Besides the strict walks it has damage-tolerant ones for repair
(``salvage_leaves`` and the thin-tree helpers built on it): an unreadable
node drops only its own subtree, and only the entries a btree lookup would
reach are returned, so the result is always in strictly increasing key order.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np

from ..errors import BadBlockError, MetadataError, ThinpoolError
from ..ondisk.checksum import BLOCK_SIZE, Salt
from ..ondisk.node import (DEVICE_DETAILS, HEADER, LEAF, U64, NodeView, ValueCodec, check_header,
                           values_offset)
from ..ondisk.superblock import MAGIC, Superblock
from ..ondisk.values import DETAILS_DTYPE, MAX_DEVICE_ID, DeviceDetails
from ..pdata.block_manager import BlockManager
from ..pdata.blockio import FileBlockIO

TIME_MASK = np.uint64((1 << 24) - 1)
MAX_DEPTH = 16  # 64-bit keys and >= 84-entry non-root nodes cannot need more levels
_READ_ERRORS = (ThinpoolError, OSError)


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


@dataclass
class SalvageLog:
    """What a damage-tolerant walk had to leave out.

    ``bad_nodes`` lists (block, problem) for every node that could not be
    used, together with its subtree; ``dropped`` counts readable leaf entries
    left out because a lookup could not reach them (outside the key range
    their parents give them, or out of order inside their leaf).
    """

    bad_nodes: list[tuple[int, str]] = field(default_factory=list)
    dropped: int = 0

    @property
    def complete(self) -> bool:
        return not self.bad_nodes and self.dropped == 0


class TreeReader:
    """Read-only tree walks over a metadata file or device; no superblock needed."""

    def __init__(self, path: str | os.PathLike[str], max_cached: int = 4096) -> None:
        self.io = FileBlockIO(path, writable=False)
        if self.io.nr_blocks == 0:
            self.io.close()
            raise MetadataError(f"{os.fspath(path)} is too small to hold thin metadata")
        self.bm = BlockManager(self.io, max_cached=max_cached)

    def close(self) -> None:
        self.io.close()

    def __enter__(self) -> TreeReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def nr_blocks(self) -> int:
        return self.io.nr_blocks

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

    # -- damage-tolerant walking (repair) ------------------------------------------------
    def salvage_leaves(self, root: int, dtype: np.dtype, log: SalvageLog
                       ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(keys, values) of every usable leaf under ``root``, in key order.

        Values are viewed with ``dtype`` (its itemsize is the tree's value
        size).  A node that cannot be read or fails the header checks (block
        number, flags, value size, entry counts) is logged with its subtree
        and skipped; so is a node met twice in one walk (a loop).  Of a
        leaf's entries only those a lookup reaches are kept: inside the key
        range ``[keys[i], keys[i+1])`` every ancestor gives the child (the
        kernel's lookup never looks for a key elsewhere), strictly above the
        last key kept (so duplicates across leaves go) and, inside a leaf with
        keys out of order, in order with both neighbours (``_reachable``);
        the rest are counted in ``log.dropped``.
        """
        value_size = dtype.itemsize
        stack: list[tuple[int, int, int | None, int]] = [(root, 0, None, 0)]  # block, lo, hi, depth
        seen: set[int] = set()
        last: int | None = None  # highest key kept so far
        while stack:
            b, lo, hi, depth = stack.pop()
            if b in seen:
                log.bad_nodes.append((b, f"btree node (block {b}) is reached twice"))
                continue
            seen.add(b)
            try:
                node = self.node(b, value_size)
            except _READ_ERRORS as e:
                log.bad_nodes.append((b, str(e)))
                continue
            n = node.nr_entries
            keys = np.frombuffer(node.raw, dtype="<u8", count=n, offset=HEADER.size)
            off = values_offset(node.max_entries)
            if node.flags == LEAF:
                keep = _reachable(keys, lo, hi, last)
                kept = int(np.count_nonzero(keep))
                log.dropped += n - kept
                if kept:
                    k = keys[keep]
                    last = int(k[-1])
                    yield k, np.frombuffer(node.raw, dtype=dtype, count=n, offset=off)[keep]
                continue
            if depth >= MAX_DEPTH:
                log.bad_nodes.append((b, f"btree node (block {b}): more than {MAX_DEPTH} levels"))
                continue
            children = np.frombuffer(node.raw, dtype="<u8", count=n, offset=off).tolist()
            bounds = keys.tolist()
            pending = []
            for i, child in enumerate(children):
                c_lo = max(lo, bounds[i])
                c_hi = bounds[i + 1] if i + 1 < n else None
                if hi is not None:
                    c_hi = hi if c_hi is None else min(hi, c_hi)
                if c_hi is not None and c_lo >= c_hi:
                    log.bad_nodes.append((child, f"btree node (block {b}): keys out of order, "
                                                 f"child block {child} is unreachable"))
                    continue
                pending.append((child, c_lo, c_hi, depth + 1))
            stack.extend(reversed(pending))

    def salvage_details(self, root: int, log: SalvageLog) -> dict[int, DeviceDetails]:
        """Readable entries of a device-details tree (ids beyond 2^24 - 1 are dropped)."""
        out: dict[int, DeviceDetails] = {}
        for keys, values in self.salvage_leaves(root, DETAILS_DTYPE, log):
            for dev, v in zip(keys.tolist(), values.tolist()):
                if dev > MAX_DEVICE_ID:
                    log.dropped += 1
                    continue
                out[dev] = DeviceDetails(*v)
        return out

    def salvage_mapping_roots(self, root: int, log: SalvageLog) -> dict[int, int]:
        """Readable device id -> subtree root entries of a top-level mapping tree."""
        out: dict[int, int] = {}
        u64 = np.dtype("<u8")
        for keys, values in self.salvage_leaves(root, u64, log):
            for dev, sub in zip(keys.tolist(), values.tolist()):
                if dev > MAX_DEVICE_ID:
                    log.dropped += 1
                    continue
                out[dev] = sub
        return out

    def salvage_mappings(self, root: int, log: SalvageLog
                         ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """(virtual blocks, data blocks, times) of every usable leaf of a device's tree."""
        for keys, vals in self.salvage_leaves(root, np.dtype("<u8"), log):
            yield keys, vals >> np.uint64(24), vals & TIME_MASK


def _reachable(keys: np.ndarray, lo: int, hi: int | None, last: int | None) -> np.ndarray:
    """Mask of the leaf entries a lookup reaches (see ``salvage_leaves``).

    In a leaf whose keys are not strictly increasing, an entry out of order
    with either neighbour is dropped (a swapped or garbled key casts doubt on
    both sides of the break), and so is any entry not above every earlier
    entry still kept by that rule.
    """
    floor = lo if last is None else max(lo, last + 1)
    keep = keys >= np.uint64(floor)
    if hi is not None:
        keep &= keys < np.uint64(hi)
    if keys.size > 1:
        rising = keys[1:] > keys[:-1]
        if not bool(rising.all()):
            keep[1:] &= rising
            keep[:-1] &= rising
            idx = np.flatnonzero(keep)
            if idx.size > 1:
                k = keys[idx]
                before = np.maximum.accumulate(k)[:-1]
                keep[idx[1:][k[1:] <= before]] = False
    return keep


class MetadataReader(TreeReader):
    """A ``TreeReader`` positioned on a superblock (the live one or the snapshot copy)."""

    def __init__(self, path: str | os.PathLike[str], snapshot: bool = False,
                 max_cached: int = 4096) -> None:
        super().__init__(path, max_cached)
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

    def __enter__(self) -> MetadataReader:
        return self

    # -- thin structures ------------------------------------------------------------------
    def details(self) -> dict[int, DeviceDetails]:
        return {k: DeviceDetails(*v) for k, v in
                self.tree_items(self.sb.device_details_root, DEVICE_DETAILS)}

    def mapping_roots(self) -> dict[int, int]:
        return dict(self.tree_items(self.sb.data_mapping_root, U64))
