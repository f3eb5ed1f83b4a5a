"""Offline consistency check of thin-pool metadata, like ``thin_check``.

``check(path)`` walks everything reachable from the superblock once and
returns a ``CheckReport``: fatal ``errors`` and non-fatal ``leaks`` (on-disk
reference counts higher than the references found), one line each, every
line naming the tree and the block.  It never raises on corrupt input: a bad
node is reported and the walk goes on with the rest of the metadata.

What is checked (dm-thin-format.md sections 1-3 and 8):

* superblock checksum, magic and block number (a bad superblock stops the
  check); the metadata-snapshot copy the same way;
* every btree node of every tree: checksum, block number, flags, value size,
  ``max_entries`` (fits, divisible by 3), ``nr_entries``, at least a third
  full unless it is a root, keys strictly increasing, keys inside the range
  its parent gives it, all leaves at one depth;
* mappings point below the end of the data device; details tree and
  top-level mapping tree list the same devices; ``mapped_blocks`` equals the
  number of mappings;
* metadata reference counts: the walk counts block 0, the snapshot copy,
  every reference to a tree node (shared subtrees are walked once) and the
  space maps' own blocks; each count is compared with the metadata space map;
* data reference counts: one per occurrence of a data block in each distinct
  bottom-level leaf, compared with the data space map;
* space-map structure: index block / index tree entries, bitmap checksums and
  block numbers, an overflow entry (>= 3) behind every bitmap entry of 3.

With ``snapshot=True`` only the metadata snapshot's trees are checked (like
``thin_check -m``); the copy has no space-map roots, so no counts are
compared.  When part of a tree cannot be read, references below it are
unknown, so leaks are not reported (too-low counts still are).

Speed: one read per block, numpy on whole leaves, and data reference counts
gathered as arrays and counted per 16,320-block bitmap at the end.
"""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import numpy as np

from ..errors import ThinpoolError
from ..ondisk import spacemap as smf
from ..ondisk.checksum import Salt
from ..ondisk.node import DEVICE_DETAILS, HEADER, HEADER_SIZE, INDEX_ENTRY, LEAF, check_header, values_offset
from ..ondisk.spacemap import ENTRIES_PER_BITMAP, MAX_METADATA_BITMAPS
from ..ondisk.superblock import SpaceMapRoot, Superblock
from ..ondisk.values import TIME_BITS, DeviceDetails
from ..pdata.block_manager import BlockManager
from ..pdata.blockio import FileBlockIO
from ..thin.reader import read_superblock

MAX_DEPTH = 16  # 64-bit keys and >= 84-entry non-root nodes cannot need more levels
MAX_LISTED = 20  # reference-count mismatches listed one by one per space map and kind
_READ_ERRORS = (ThinpoolError, OSError)


@dataclass
class CheckReport:
    """Outcome of ``check``: problems plus what the superblock says."""

    path: str
    snapshot: bool = False
    errors: list[str] = field(default_factory=list)
    leaks: list[str] = field(default_factory=list)
    transaction_id: int | None = None
    time: int | None = None
    needs_check: bool = False
    data_block_size: int | None = None
    nr_data_blocks: int | None = None  # data device size, from the live superblock
    metadata_nr_blocks: int | None = None  # metadata space map size
    metadata_snap: int = 0  # block of the held metadata snapshot, 0 = none
    nr_devices: int = 0
    nr_mappings: int = 0
    metadata_blocks_used: int | None = None  # blocks referenced (full check only)
    data_blocks_used: int | None = None  # distinct data blocks mapped (full check only)

    @property
    def clean(self) -> bool:
        return not self.errors and not self.leaks


def check(metadata_path: str | os.PathLike[str], snapshot: bool = False) -> CheckReport:
    """Check the metadata at ``metadata_path`` (file or block device), read-only."""
    report = CheckReport(path=os.fspath(metadata_path), snapshot=snapshot)
    try:
        io = FileBlockIO(metadata_path, writable=False)
    except _READ_ERRORS as e:
        report.errors.append(str(e))
        return report
    try:
        if io.nr_blocks == 0:
            report.errors.append(f"{report.path} is too small to hold thin metadata "
                                 f"(less than one 4096-byte block)")
        else:
            _Checker(io, report).run(snapshot)
    finally:
        io.close()
    return report


class _DataCounts:
    """Data-block references found, counted per 16,320-block bitmap.

    Leaves' data blocks are buffered and folded in with one sort and a
    ``bincount`` per touched bitmap, so memory is one byte per block of the
    touched bitmaps plus the buffer; counts of 255 and more live in ``big``.
    """

    BUFFER = 1 << 20

    def __init__(self, dtype: type) -> None:
        self.buffer: np.ndarray = np.empty(self.BUFFER, dtype=dtype)
        self.used = 0
        self.chunks: dict[int, np.ndarray] = {}  # bitmap index -> uint8 counts, 255 = see big
        self.big: dict[int, int] = {}  # data block -> count, for counts >= 255

    def add(self, blocks: np.ndarray) -> None:
        if self.used + len(blocks) > len(self.buffer):
            self.flush()
        self.buffer[self.used:self.used + len(blocks)] = blocks
        self.used += len(blocks)

    def flush(self) -> None:
        refs = np.sort(self.buffer[:self.used])
        self.used = 0
        bitmap = refs // ENTRIES_PER_BITMAP
        starts = [0, *(np.flatnonzero(bitmap[1:] != bitmap[:-1]) + 1).tolist()]
        ends = [*starts[1:], len(refs)]
        for lo, hi in zip(starts if len(refs) else [], ends):
            i = int(bitmap[lo])
            base = i * ENTRIES_PER_BITMAP
            chunk = self.chunks.get(i)
            if chunk is None:
                chunk = self.chunks[i] = np.zeros(ENTRIES_PER_BITMAP, dtype=np.uint8)
            added = np.bincount((refs[lo:hi] - base).astype(np.intp), minlength=ENTRIES_PER_BITMAP)
            total = chunk + added
            for j in np.flatnonzero(total >= 255).tolist():
                self.big[base + j] = self.big.get(base + j, int(chunk[j])) + int(added[j])
            np.minimum(total, 255, out=total)
            chunk[:] = total

    def nr_used(self) -> int:
        return sum(int(np.count_nonzero(c)) for c in self.chunks.values())

    def expected(self, i: int, valid: int) -> np.ndarray:
        """Counts of bitmap ``i``'s first ``valid`` blocks (frees the chunk)."""
        chunk = self.chunks.pop(i, None)
        if chunk is None:
            return np.zeros(valid, dtype=np.int64)
        counts = chunk[:valid].astype(np.int64)
        base = i * ENTRIES_PER_BITMAP
        for j in np.flatnonzero(counts == 255).tolist():
            counts[j] = self.big[base + j]
        return counts


# -- tree walking ------------------------------------------------------------------------


class _Kind(enum.Enum):
    """Tree types; a node may be shared only between trees of one type."""

    DETAILS = 24
    TOP = 8
    MAPPING = -8  # same value size as TOP, distinct type
    DATA_INDEX = 16
    DATA_OVERFLOW = 4
    META_OVERFLOW = -4

    @property
    def value_size(self) -> int:
        return abs(self.value)


# (tree, block, keys, raw node, max_entries) -> payload items of that leaf
LeafHandler = Callable[["_Tree", int, np.ndarray, bytes, int], list[Any]]


@dataclass(frozen=True, slots=True)
class _Tree:
    label: str  # e.g. "mapping tree of device 3"
    kind: _Kind
    prefix: str  # "" or "metadata snapshot (block S): "
    on_leaf: LeafHandler


class _Summary:
    """What a parent needs to know about a walked subtree.

    ``first`` is the node's first key, ``last`` the largest key below it (None
    when empty); ``entries`` counts leaf entries; ``complete`` is False when
    part of the subtree could not be read; ``items`` are the leaf payloads.
    """

    __slots__ = ("height", "first", "last", "nr_entries", "max_entries", "entries",
                 "complete", "items")

    def __init__(self, height: int, first: int | None, last: int | None, nr_entries: int,
                 max_entries: int, entries: int, complete: bool, items: list[Any]) -> None:
        self.height = height
        self.first = first
        self.last = last
        self.nr_entries = nr_entries
        self.max_entries = max_entries
        self.entries = entries
        self.complete = complete
        self.items = items


def _ids(ids: Iterable[int], limit: int = 10) -> str:
    ids = list(ids)
    shown = ", ".join(map(str, ids[:limit]))
    return f"[{shown}{', ...' if len(ids) > limit else ''}] ({len(ids)})"


class _Checker:
    def __init__(self, io: FileBlockIO, report: CheckReport) -> None:
        self.io = io
        self.bm = BlockManager(io, max_cached=16)  # every block is read once: no cache needed
        self.report = report
        self.errors = report.errors
        self.counts = np.zeros(0, dtype=np.uint32)  # metadata references found, per block
        self.seen: dict[int, tuple[_Tree, _Summary | None]] = {}  # walked nodes
        self.pending: set[int] = set()  # nodes on the current path (detects cycles)
        self.underfull: set[int] = set()
        self.complete = True  # every referenced node could be walked
        self.nr_data_blocks = 0
        self.data_counts: _DataCounts | None = None  # full check only

    # -- entry point ------------------------------------------------------------------
    def run(self, snapshot: bool) -> None:
        live = self._superblock(0, "")
        if live is None:
            return
        r = self.report
        r.metadata_snap = live.held_root
        r.nr_data_blocks = self.nr_data_blocks = live.data_sm.nr_blocks
        r.data_block_size = live.data_block_size
        r.metadata_nr_blocks = live.metadata_sm.nr_blocks
        r.needs_check = live.needs_check
        r.transaction_id, r.time = live.trans_id, live.time
        if snapshot:
            self._run_snapshot(live)
        else:
            self._run_full(live)

    def _run_snapshot(self, live: Superblock) -> None:
        if live.held_root == 0:
            self.errors.append("superblock (block 0): no metadata snapshot is held")
            return
        self.counts = np.zeros(self.io.nr_blocks, dtype=np.uint32)
        snap = self._superblock(live.held_root, "metadata snapshot: ")
        if snap is None:
            return
        self.report.transaction_id, self.report.time = snap.trans_id, snap.time
        self._thin_trees(snap, f"metadata snapshot (block {snap.blocknr}): ", primary=True)

    def _run_full(self, live: Superblock) -> None:
        meta_root = live.metadata_sm
        nr_meta = min(meta_root.nr_blocks, MAX_METADATA_BITMAPS * ENTRIES_PER_BITMAP)
        if nr_meta > self.io.nr_blocks:
            self.errors.append(f"superblock (block 0): the metadata space map covers {nr_meta} "
                               f"blocks, but the device holds only {self.io.nr_blocks} "
                               f"(truncated?)")
        self.counts = np.zeros(max(nr_meta, self.io.nr_blocks), dtype=np.uint32)
        self.data_counts = _DataCounts(np.uint32 if self.nr_data_blocks <= 1 << 32 else np.uint64)
        self._ref(0, "superblock")
        snap = None
        if live.held_root:
            if self._ref(live.held_root, "superblock (block 0): metadata snapshot"):
                snap = self._superblock(live.held_root, "metadata snapshot: ")
            self.complete = self.complete and snap is not None
        meta = self._metadata_space_map(meta_root)
        data = self._data_space_map(live.data_sm)
        self._thin_trees(live, "", primary=True)
        if snap is not None:
            self._thin_trees(snap, f"metadata snapshot (block {snap.blocknr}): ", primary=False)
        self._compare_data(live.data_sm, *data)
        self._compare_metadata(meta_root, *meta)
        self.report.metadata_blocks_used = int(np.count_nonzero(self.counts))

    # -- blocks ---------------------------------------------------------------------------
    def _superblock(self, loc: int, prefix: str) -> Superblock | None:
        try:
            return read_superblock(self.bm, loc)
        except _READ_ERRORS as e:
            self.errors.append(f"{prefix}{e}")
            return None

    def _ref(self, b: int, referrer: str) -> bool:
        """Count one reference to metadata block ``b``; False if it cannot exist."""
        if b >= len(self.counts):
            self.errors.append(f"{referrer}: reference to block {b} beyond the end of the "
                               f"metadata device ({len(self.counts)} blocks)")
            self.complete = False
            return False
        self.counts[b] += 1
        return True

    # -- btrees ---------------------------------------------------------------------------
    def _root(self, b: int, tree: _Tree, referrer: str) -> _Summary | None:
        """Count the reference to a tree root and walk the tree."""
        if not self._ref(b, referrer):
            return None
        return self._walk(b, tree, 0)

    def _walk(self, b: int, tree: _Tree, depth: int) -> _Summary | None:
        """Summary of the subtree at ``b``, walking it on its first visit only."""
        if b in self.pending:
            self.errors.append(f"{tree.label}: btree node (block {b}) is its own ancestor (cycle)")
            self.complete = False
            return None
        prior = self.seen.get(b)
        if prior is not None:
            first_tree, summary = prior
            if first_tree.kind is not tree.kind:
                self.errors.append(f"{tree.label}: btree node (block {b}) is also used by the "
                                   f"{first_tree.label}")
                self.complete = False
                return None
            return summary
        if depth > MAX_DEPTH:
            self.errors.append(f"{tree.label}: btree node (block {b}): tree deeper than "
                               f"{MAX_DEPTH} levels")
            self.complete = False
            return None
        self.pending.add(b)
        summary = self._node(b, tree, depth)
        self.pending.discard(b)
        self.seen[b] = (tree, summary)
        if summary is None:
            self.complete = False
        return summary

    def _node(self, b: int, tree: _Tree, depth: int) -> _Summary | None:
        try:
            raw = self.bm.read(b, Salt.NODE)
            check_header(raw, b, tree.kind.value_size)
        except _READ_ERRORS as e:
            self.errors.append(f"{tree.label}: {e}")
            return None
        _c, flags, _b, nr, mx, _vs, _p = HEADER.unpack_from(raw, 0)
        where = f"{tree.label}: btree node (block {b})"
        if mx % 3:
            self.errors.append(f"{where}: max entries {mx} is not divisible by 3")
        keys = np.frombuffer(raw, dtype="<u8", count=nr, offset=HEADER_SIZE)
        if nr > 1 and (keys[1:] <= keys[:-1]).any():
            self.errors.append(f"{where}: keys are not strictly increasing")
        first = int(keys[0]) if nr else None
        if flags == LEAF:
            items = tree.on_leaf(tree, b, keys, raw, mx)
            return _Summary(0, first, int(keys[-1]) if nr else None, nr, mx, nr, True, items)
        return self._internal(b, tree, depth, keys.tolist(), raw, mx, where)

    def _internal(self, b: int, tree: _Tree, depth: int, keys: list[int], raw: bytes,
                  mx: int, where: str) -> _Summary:
        nr = len(keys)
        children = np.frombuffer(raw, dtype="<u8", count=nr, offset=values_offset(mx)).tolist()
        heights: set[int] = set()
        entries = 0
        complete = True
        items: list[Any] = []
        last: int | None = None
        for i, child in enumerate(children):
            if not self._ref(child, where):
                complete = False
                continue
            s = self._walk(child, tree, depth + 1)
            if s is None:
                complete = False
                continue
            if s.nr_entries < s.max_entries // 3 and child not in self.underfull:
                self.underfull.add(child)
                self.errors.append(f"{tree.label}: btree node (block {child}): too few entries "
                                   f"({s.nr_entries} < {s.max_entries // 3})")
            if s.first is not None and s.last is not None:
                if keys[i] > s.first:
                    self.errors.append(f"{where}: parent key mismatch: key {keys[i]} > first key "
                                       f"{s.first} of child block {child}")
                if i + 1 < nr and s.last >= keys[i + 1]:
                    self.errors.append(f"{where}: child block {child} holds key {s.last}, not "
                                       f"below the next parent key {keys[i + 1]}")
                last = s.last
            heights.add(s.height)
            entries += s.entries
            complete = complete and s.complete
            items.extend(s.items)
        if len(heights) > 1:
            self.errors.append(f"{where}: unbalanced: its leaves are at different depths")
        height = max(heights, default=0) + 1
        return _Summary(height, keys[0] if nr else None, last, nr, mx, entries, complete, items)

    # -- leaf payloads ----------------------------------------------------------------------
    def _mapping_leaf(self, tree: _Tree, b: int, keys: np.ndarray, raw: bytes,
                      mx: int) -> list[Any]:
        """Data blocks of one bottom-level leaf (walked once even when shared)."""
        if len(keys) == 0:
            return []
        data = np.frombuffer(raw, dtype="<u8", count=len(keys), offset=values_offset(mx))
        data = data >> TIME_BITS
        if int(data.max()) >= self.nr_data_blocks:
            bad = data >= self.nr_data_blocks
            self.errors.append(
                f"{tree.label}: btree node (block {b}): {int(bad.sum())} mappings beyond the end "
                f"of the data device (data block {int(data[bad][0])} >= {self.nr_data_blocks})")
            data = data[~bad]
        if self.data_counts is not None:
            self.data_counts.add(data)
        return []

    def _top_leaf(self, tree: _Tree, b: int, keys: np.ndarray, raw: bytes,
                  mx: int) -> list[Any]:
        """Walk each device's subtree; items are (dev, root, mappings or None, leaf)."""
        roots = np.frombuffer(raw, dtype="<u8", count=len(keys), offset=values_offset(mx))
        items = []
        for dev, root in zip(keys.tolist(), roots.tolist()):
            sub = _Tree(f"{tree.prefix}mapping tree of device {dev}", _Kind.MAPPING, tree.prefix,
                        self._mapping_leaf)
            s = self._root(root, sub, f"{tree.label}: btree node (block {b})")
            items.append((dev, root, s.entries if s is not None and s.complete else None, b))
        return items

    def _details_leaf(self, tree: _Tree, b: int, keys: np.ndarray, raw: bytes,
                      mx: int) -> list[Any]:
        """Items are (dev, DeviceDetails, leaf)."""
        off = values_offset(mx)
        values = DEVICE_DETAILS.unpack_many(memoryview(raw)[off:off + 24 * len(keys)])
        return [(dev, DeviceDetails(*v), b) for dev, v in zip(keys.tolist(), values)]

    def _index_leaf(self, tree: _Tree, b: int, keys: np.ndarray, raw: bytes,
                    mx: int) -> list[Any]:
        """Items are (bitmap index, bitmap block, leaf)."""
        off = values_offset(mx)
        values = INDEX_ENTRY.unpack_many(memoryview(raw)[off:off + 16 * len(keys)])
        return [(i, v[0], b) for i, v in zip(keys.tolist(), values)]

    def _overflow_leaf(self, tree: _Tree, b: int, keys: np.ndarray, raw: bytes,
                       mx: int) -> list[Any]:
        """Items are (keys, counts) arrays."""
        counts = np.frombuffer(raw, dtype="<u4", count=len(keys), offset=values_offset(mx))
        return [(keys, counts)] if len(keys) else []

    # -- thin trees -----------------------------------------------------------------------
    def _thin_trees(self, sb: Superblock, prefix: str, primary: bool) -> None:
        """Details and mapping trees of one superblock, and their agreement."""
        where = f"{prefix}superblock (block {sb.blocknr})"
        details = self._root(sb.device_details_root,
                             _Tree(f"{prefix}device details tree", _Kind.DETAILS, prefix,
                                   self._details_leaf), where)
        top = self._root(sb.data_mapping_root,
                         _Tree(f"{prefix}top-level mapping tree", _Kind.TOP, prefix,
                               self._top_leaf), where)
        if primary and top is not None:
            self.report.nr_devices = len(top.items)
            self.report.nr_mappings = sum(n for _d, _r, n, _l in top.items if n is not None)
        if details is None or top is None:
            return
        by_details = {dev: (d, leaf) for dev, d, leaf in details.items}
        by_mapping = {dev: (root, n) for dev, root, n, _leaf in top.items}
        if details.complete and top.complete:
            no_mapping = sorted(by_details.keys() - by_mapping.keys())
            if no_mapping:
                self.errors.append(
                    f"{prefix}device details tree (root {sb.device_details_root}): devices "
                    f"{_ids(no_mapping)} are missing from the top-level mapping tree "
                    f"(root {sb.data_mapping_root})")
            no_details = sorted(by_mapping.keys() - by_details.keys())
            if no_details:
                self.errors.append(
                    f"{prefix}top-level mapping tree (root {sb.data_mapping_root}): devices "
                    f"{_ids(no_details)} are missing from the device details tree "
                    f"(root {sb.device_details_root})")
        for dev in sorted(by_details.keys() & by_mapping.keys()):
            d, leaf = by_details[dev]
            root, n = by_mapping[dev]
            if n is not None and n != d.mapped_blocks:
                self.errors.append(
                    f"{prefix}device details tree: btree node (block {leaf}): device {dev} has "
                    f"mapped_blocks {d.mapped_blocks}, but its mapping tree (root {root}) holds "
                    f"{n} mappings")

    # -- space maps -----------------------------------------------------------------------
    def _metadata_space_map(self, root: SpaceMapRoot) -> tuple[dict[int, int], _Summary | None]:
        """Count the metadata space map's own blocks; bitmap index -> block."""
        label = "metadata space map"
        n = smf.nr_bitmaps(root.nr_blocks)
        if n > MAX_METADATA_BITMAPS:
            self.errors.append(f"{label}: {root.nr_blocks} blocks need {n} bitmaps, more than "
                               f"the {MAX_METADATA_BITMAPS} an index block holds")
            n = MAX_METADATA_BITMAPS
        bitmaps: dict[int, int] = {}
        index_block = root.bitmap_root
        if self._ref(index_block, f"superblock (block 0): {label} root"):
            try:
                entries = smf.decode_index_block(self.bm.read(index_block, Salt.INDEX),
                                                 index_block)
            except _READ_ERRORS as e:
                self.errors.append(f"{label}: {e}")
                entries = []
            for i, (blk, _free, _before) in enumerate(entries[:n]):
                if self._ref(blk, f"{label}: metadata index block (block {index_block}) "
                                  f"entry {i}"):
                    bitmaps[i] = blk
        overflow = self._root(root.ref_count_root,
                              _Tree(f"{label} overflow tree", _Kind.META_OVERFLOW, "",
                                    self._overflow_leaf), f"superblock (block 0): {label} root")
        return bitmaps, overflow

    def _data_space_map(self, root: SpaceMapRoot) -> tuple[dict[int, int], _Summary | None]:
        """Walk the data space map's trees and count its bitmaps; index -> block."""
        label = "data space map"
        where = f"superblock (block 0): {label} root"
        n = smf.nr_bitmaps(root.nr_blocks)
        index = self._root(root.bitmap_root, _Tree(f"{label} index tree", _Kind.DATA_INDEX, "",
                                                   self._index_leaf), where)
        bitmaps: dict[int, int] = {}
        if index is not None:
            keys = set()
            for i, blk, leaf in index.items:
                if i >= n:
                    self.errors.append(f"{label} index tree: btree node (block {leaf}): entry for "
                                       f"bitmap {i}, but {root.nr_blocks} blocks need only {n}")
                    continue
                keys.add(i)
                if self._ref(blk, f"{label} index tree: btree node (block {leaf})"):
                    bitmaps[i] = blk
            if index.complete and len(keys) < n:
                missing: list[int] = []
                i = 0
                while len(missing) < 10 and i < n:  # at most len(keys) + 10 steps
                    if i not in keys:
                        missing.append(i)
                    i += 1
                self.errors.append(f"{label} index tree (root {root.bitmap_root}): no entry for "
                                   f"{n - len(keys)} of {n} bitmaps (first missing: {missing})")
        overflow = self._root(root.ref_count_root,
                              _Tree(f"{label} overflow tree", _Kind.DATA_OVERFLOW, "",
                                    self._overflow_leaf), where)
        return bitmaps, overflow

    def _bitmap_counts(self, label: str, i: int, blk: int, valid: int,
                       overflow: tuple[np.ndarray, np.ndarray],
                       overflow_complete: bool) -> tuple[np.ndarray, np.ndarray] | None:
        """On-disk counts of the ``valid`` entries of bitmap ``i`` (overflow applied) and
        a mask of the entries whose count is known."""
        try:
            small = smf.decode_bitmap(self.bm.read(blk, Salt.BITMAP), blk)[:valid]
        except _READ_ERRORS as e:
            self.errors.append(f"{label}: {e}")
            return None
        counts = small.astype(np.int64)
        known = np.ones(valid, dtype=bool)
        threes = np.flatnonzero(small == 3)
        if threes.size:
            ov_keys, ov_counts = overflow
            wanted = threes.astype(np.uint64) + np.uint64(i * ENTRIES_PER_BITMAP)
            pos = np.minimum(np.searchsorted(ov_keys, wanted), max(len(ov_keys) - 1, 0))
            found = ov_keys[pos] == wanted if len(ov_keys) else np.zeros(threes.size, bool)
            if not found.all():
                known[threes[~found]] = False
                if overflow_complete:
                    self.errors.append(
                        f"{label}: space map bitmap (block {blk}): blocks "
                        f"{_ids(wanted[~found].tolist())} have count 3 (or more) but no entry "
                        f"in the overflow tree")
            values = ov_counts[pos[found]].astype(np.int64)
            counts[threes[found]] = values
            small_values = values < 3
            if small_values.any():
                self.errors.append(
                    f"{label}: overflow tree: blocks {_ids(wanted[found][small_values].tolist())} "
                    f"have overflow counts below 3 (bitmap block {blk} says 3 or more)")
        return counts, known

    def _compare(self, label: str, nr_blocks: int, bitmaps: dict[int, int],
                 overflow: _Summary | None, expected: Callable[[int, int], np.ndarray],
                 unit: str) -> None:
        """Compare on-disk counts with the ``expected(bitmap index, valid)`` ones."""
        if overflow is None:
            ov: tuple[np.ndarray, np.ndarray] = (np.zeros(0, np.uint64), np.zeros(0, np.uint32))
        elif overflow.items:
            ov_keys = np.concatenate([k for k, _c in overflow.items])
            ov_counts = np.concatenate([c for _k, c in overflow.items])
            order = np.argsort(ov_keys, kind="stable")
            ov = (ov_keys[order], ov_counts[order])
        else:
            ov = (np.zeros(0, np.uint64), np.zeros(0, np.uint32))
        ov_complete = overflow is not None and overflow.complete
        low: list[str] = []
        high: list[str] = []
        nr_low = nr_high = 0
        for i, blk in sorted(bitmaps.items()):
            valid = min(ENTRIES_PER_BITMAP, nr_blocks - i * ENTRIES_PER_BITMAP)
            got = self._bitmap_counts(label, i, blk, valid, ov, ov_complete)
            if got is None:
                continue
            ondisk, known = got
            want = expected(i, valid)
            diff = np.flatnonzero((ondisk != want) & known)
            if diff.size == 0:
                continue
            base = i * ENTRIES_PER_BITMAP
            for j in diff.tolist():
                a, e = int(ondisk[j]), int(want[j])
                line = (f"{label}: {unit} {base + j} (bitmap block {blk}): reference count {a}, "
                        f"expected {e}")
                if a < e:
                    nr_low += 1
                    if len(low) < MAX_LISTED:
                        low.append(line)
                else:
                    nr_high += 1
                    if len(high) < MAX_LISTED:
                        high.append(line + " (leaked)")
        self.errors.extend(low)
        if nr_low > len(low):
            self.errors.append(f"{label}: {nr_low - len(low)} more {unit}s with reference counts "
                               f"below the references found")
        if self.complete:
            self.report.leaks.extend(high)
            if nr_high > len(high):
                self.report.leaks.append(f"{label}: {nr_high - len(high)} more {unit}s with "
                                         f"reference counts above the references found (leaked)")

    def _compare_data(self, root: SpaceMapRoot, bitmaps: dict[int, int],
                      overflow: _Summary | None) -> None:
        counts = self.data_counts
        assert counts is not None
        counts.flush()
        self.report.data_blocks_used = counts.nr_used()
        self._compare("data space map", root.nr_blocks, bitmaps, overflow, counts.expected,
                      "data block")

    def _compare_metadata(self, root: SpaceMapRoot, bitmaps: dict[int, int],
                          overflow: _Summary | None) -> None:
        nr = min(root.nr_blocks, MAX_METADATA_BITMAPS * ENTRIES_PER_BITMAP)
        counts = self.counts

        def expected(i: int, valid: int) -> np.ndarray:
            base = i * ENTRIES_PER_BITMAP
            return counts[base:base + valid]

        self._compare("metadata space map", nr, bitmaps, overflow, expected, "block")
        beyond = np.flatnonzero(counts[nr:]) + nr
        if beyond.size:
            self.errors.append(f"metadata space map: blocks {_ids(beyond.tolist())} are "
                               f"referenced but lie beyond the space map's {nr} blocks")
