"""Reference-count space maps in the kernel's on-disk layout (format 3.x).

A ``SpaceMap`` keeps the counts of every bitmap it has touched in memory as
two uint32 arrays: the counts as of the last commit and the current ones.
Allocation only hands out a block that is free in *both*, so a block freed
in the open transaction is never reused before the commit, and a block
reachable from the last committed superblock is never overwritten.

``persist()`` writes the touched bitmaps (shadowed), their index entries and
the overflow btree (counts >= 3) through the transaction manager:

* ``DataSpaceMap`` - index entries in a btree (value: 16-byte index entry).
* ``MetadataSpaceMap`` - index entries in one index block, rewritten at every
  commit.  Persisting it changes metadata counts (new bitmap locations,
  overflow-tree nodes), so it iterates to a fixed point, which is how this
  module "ties the knot" the kernel ties with its queued block operations.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import numpy as np

from ..errors import MetadataError, NoDataSpaceError, NoMetadataSpaceError, NoSpaceError
from ..ondisk import spacemap as smf
from ..ondisk.checksum import Salt
from ..ondisk.node import INDEX_ENTRY, U32
from ..ondisk.spacemap import ENTRIES_PER_BITMAP
from ..ondisk.superblock import SpaceMapRoot

if TYPE_CHECKING:
    from .btree import BTree
    from .transaction import TransactionManager

IndexEntry = tuple[int, int, int]  # bitmap block, nr_free, none_free_before


class SpaceMap:
    """In-memory view of one space map; subclasses know where it lives."""

    kind = "space map"
    no_space: type[NoSpaceError] = NoSpaceError

    def __init__(self, tm: TransactionManager, root: SpaceMapRoot, index: list[IndexEntry],
                 overflow: BTree) -> None:
        self.tm = tm
        self.nr_blocks = root.nr_blocks
        self.nr_allocated = root.nr_allocated
        self.ref_count_root = root.ref_count_root
        self.index = index
        self.overflow = overflow
        self._current: dict[int, np.ndarray] = {}
        self._committed: dict[int, np.ndarray] = {}
        self._dirty: set[int] = set()
        self._free: dict[int, np.ndarray] = {}
        self._free_pos: dict[int, int] = {}
        self._cursor = 0  # bitmap to start allocation searches from
        self._overflow_now: dict[int, int] = {}  # overflow entries changed this transaction
        self.on_low_space: Callable[[int], None] | None = None

    # -- counts -------------------------------------------------------------------
    def _counts(self, i: int) -> np.ndarray:
        arr = self._current.get(i)
        if arr is None:
            if i >= len(self.index):
                raise MetadataError(f"{self.kind}: block beyond the space map "
                                    f"({self.nr_blocks} blocks)")
            arr = self._load(i)
            self._committed[i] = arr.copy()
            self._current[i] = arr
        return arr

    def _load(self, i: int) -> np.ndarray:
        loc = self.index[i][0]
        if loc == 0:
            return np.zeros(ENTRIES_PER_BITMAP, dtype=np.uint32)
        counts = smf.decode_bitmap(self.tm.bm.read(loc, Salt.BITMAP), loc)
        base = i * ENTRIES_PER_BITMAP
        for j in np.flatnonzero(counts == 3).tolist():
            real = self.overflow.lookup(self.ref_count_root, base + j)
            if real is None:
                raise MetadataError(f"{self.kind}: block {base + j} has count >= 3 in bitmap "
                                    f"{loc} but no overflow entry")
            counts[j] = real
        return counts

    def _check(self, b: int) -> None:
        if not 0 <= b < self.nr_blocks:
            raise MetadataError(f"{self.kind}: block {b} out of range (0..{self.nr_blocks - 1})")

    def get(self, b: int) -> int:
        self._check(b)
        i, j = divmod(b, ENTRIES_PER_BITMAP)
        return int(self._counts(i)[j])

    def inc(self, b: int, delta: int = 1) -> None:
        self._check(b)
        i, j = divmod(b, ENTRIES_PER_BITMAP)
        arr = self._counts(i)
        old = int(arr[j])
        arr[j] = old + delta
        if old == 0:
            self.nr_allocated += 1
        self._dirty.add(i)

    def dec(self, b: int) -> int:
        """Drop one reference; returns the new count."""
        self._check(b)
        i, j = divmod(b, ENTRIES_PER_BITMAP)
        arr = self._counts(i)
        old = int(arr[j])
        if old == 0:
            raise MetadataError(f"{self.kind}: reference count of block {b} would go below zero")
        arr[j] = old - 1
        if old == 1:
            self.nr_allocated -= 1
        self._dirty.add(i)
        return old - 1

    def inc_many(self, blocks: np.ndarray) -> None:
        """Increment each block in ``blocks`` (duplicates count twice)."""
        if blocks.size == 0:
            return
        if int(blocks.max()) >= self.nr_blocks:
            raise MetadataError(f"{self.kind}: block {int(blocks.max())} out of range")
        groups = blocks // ENTRIES_PER_BITMAP
        for i in np.unique(groups).tolist():
            sel = blocks[groups == i] - i * ENTRIES_PER_BITMAP
            arr = self._counts(i)
            before = int(np.count_nonzero(arr))
            np.add.at(arr, sel, 1)
            self.nr_allocated += int(np.count_nonzero(arr)) - before
            self._dirty.add(i)

    # -- allocation -----------------------------------------------------------------
    @property
    def nr_free(self) -> int:
        return self.nr_blocks - self.nr_allocated

    def new_block(self) -> int:
        """Allocate a block free in the committed and the current state (count -> 1)."""
        n = len(self.index)
        for step in range(n + 1):
            i = (self._cursor + step) % n if n else 0
            if n == 0:
                break
            free = self._free.get(i)
            if free is None:
                if i not in self._current and self.index[i][1] == 0:
                    continue
                cur = self._counts(i)
                valid = min(ENTRIES_PER_BITMAP, self.nr_blocks - i * ENTRIES_PER_BITMAP)
                free = np.flatnonzero((cur[:valid] == 0) & (self._committed[i][:valid] == 0))
                self._free[i] = free
                self._free_pos[i] = 0
            pos = self._free_pos[i]
            cur = self._current[i]
            while pos < free.size and cur[free[pos]] != 0:
                pos += 1
            if pos < free.size:
                j = int(free[pos])
                self._free_pos[i] = pos + 1
                self._cursor = i
                cur[j] = 1
                self.nr_allocated += 1
                self._dirty.add(i)
                b = i * ENTRIES_PER_BITMAP + j
                if self.on_low_space is not None:
                    self.on_low_space(self.nr_free)
                return b
            self._free_pos[i] = pos
        raise self.no_space(f"{self.kind} is full ({self.nr_blocks} blocks)")

    def extend(self, nr_blocks: int) -> None:
        """Grow to ``nr_blocks``; new bitmaps are written at the next commit."""
        if nr_blocks < self.nr_blocks:
            raise MetadataError(f"{self.kind} cannot shrink ({self.nr_blocks} -> {nr_blocks})")
        old_bitmaps = len(self.index)
        self.nr_blocks = nr_blocks
        for i in range(old_bitmaps, smf.nr_bitmaps(nr_blocks)):
            self.index.append((0, ENTRIES_PER_BITMAP, 0))
            self._dirty.add(i)
            self._counts(i)
        for i in range(max(0, old_bitmaps - 1), len(self.index)):
            self._free.pop(i, None)

    # -- persistence helpers ------------------------------------------------------------
    def _valid(self, i: int) -> int:
        return min(ENTRIES_PER_BITMAP, self.nr_blocks - i * ENTRIES_PER_BITMAP)

    def _overflow_changes(self, i: int) -> list[tuple[int, int | None]]:
        """Overflow-tree edits needed for bitmap ``i``: (block, count or None=remove)."""
        cur, com = self._current[i], self._committed[i]
        base = i * ENTRIES_PER_BITMAP
        out: list[tuple[int, int | None]] = []
        # only where the count moved since the commit, or the tree was edited since: elsewhere
        # the tree holds the committed count, which is the current one
        moved = set(np.flatnonzero(((cur >= 3) | (com >= 3)) & (cur != com)).tolist())
        moved.update(b - base for b in self._overflow_now if base <= b < base + ENTRIES_PER_BITMAP)
        for j in sorted(moved):
            b = base + j
            want = int(cur[j]) if cur[j] >= 3 else None
            have = self._overflow_now.get(b, int(com[j]) if com[j] >= 3 else None)
            if want != have:
                out.append((b, want))
        return out

    def _apply_overflow(self, edits: list[tuple[int, int | None]]) -> None:
        """Apply ``edits`` (blocks in ascending order): removals one by one, the inserts and
        overwrites as one batch (each node on the way shadowed once, not once per block)."""
        puts = []
        for b, want in edits:
            if want is None:
                self.ref_count_root, _ = self.overflow.remove(self.ref_count_root, b)
            else:
                puts.append((b, want))
            self._overflow_now[b] = want  # type: ignore[assignment]
        if puts:
            self.ref_count_root, _ = self.overflow.insert_many(self.ref_count_root, puts)

    def _bitmap_location(self, i: int) -> tuple[int, bool]:
        """A location for bitmap i that may be written now; True if it changed."""
        loc = self.index[i][0]
        if loc and self.tm.is_fresh(loc):
            return loc, False
        new = self.tm.new_block()
        if loc:
            self.tm.sm.dec(loc)
        return new, True

    def root(self) -> SpaceMapRoot:
        return SpaceMapRoot(self.nr_blocks, self.nr_allocated, self._index_root(),
                            self.ref_count_root)

    def _index_root(self) -> int:
        raise NotImplementedError

    def committed(self) -> None:
        """The transaction committed: current counts become the committed ones."""
        for i in self._dirty:
            self._committed[i] = self._current[i].copy()
        self._dirty.clear()
        self._free.clear()
        self._free_pos.clear()
        self._overflow_now.clear()
        if len(self._current) > 512:  # bound memory: drop clean bitmaps
            self._current.clear()
            self._committed.clear()


class DataSpaceMap(SpaceMap):
    """Data block counts: index entries in a btree, bitmaps, overflow btree."""

    kind = "data space map"
    no_space = NoDataSpaceError

    def __init__(self, tm: TransactionManager, root: SpaceMapRoot, index_tree: BTree,
                 overflow: BTree) -> None:
        self.index_tree = index_tree
        self.index_root = root.bitmap_root
        index = [v for _k, v in index_tree.items(root.bitmap_root)]
        if len(index) != smf.nr_bitmaps(root.nr_blocks):
            raise MetadataError(f"data space map index has {len(index)} entries, expected "
                                f"{smf.nr_bitmaps(root.nr_blocks)}")
        super().__init__(tm, root, index, overflow)

    def _index_root(self) -> int:
        return self.index_root

    def persist(self) -> None:
        for i in sorted(self._dirty):
            self._apply_overflow(self._overflow_changes(i))
        for i in sorted(self._dirty):
            loc, _ = self._bitmap_location(i)
            counts = self._current[i]
            self.tm.bm.write(loc, smf.encode_bitmap(counts, loc), Salt.BITMAP)
            entry = smf.index_entry_for(counts, loc, self._valid(i))
            if entry != self.index[i]:
                self.index[i] = entry
                self.index_root, _ = self.index_tree.insert(self.index_root, i, entry)


class MetadataSpaceMap(SpaceMap):
    """Metadata block counts: one index block, bitmaps, overflow btree."""

    kind = "metadata space map"
    no_space = NoMetadataSpaceError

    def __init__(self, tm: TransactionManager, root: SpaceMapRoot, overflow: BTree) -> None:
        self.index_block = root.bitmap_root
        raw = tm.bm.read(self.index_block, Salt.INDEX)
        n = smf.nr_bitmaps(root.nr_blocks)
        if n > smf.MAX_METADATA_BITMAPS:
            raise MetadataError(f"metadata space map of {root.nr_blocks} blocks needs {n} bitmaps "
                                f"(at most {smf.MAX_METADATA_BITMAPS})")
        index = smf.decode_index_block(raw, self.index_block)[:n]
        super().__init__(tm, root, index, overflow)

    def _index_root(self) -> int:
        return self.index_block

    def persist(self) -> None:
        """Write bitmaps, overflow tree and index block at a fixed point of the counts."""
        if not self.tm.is_fresh(self.index_block):
            old = self.index_block
            self.index_block = self.tm.new_block()
            self.dec(old)
        locations: dict[int, int] = {}
        while True:
            changed = False
            for i in sorted(self._dirty):
                if i not in locations or not self.tm.is_fresh(locations[i]):
                    loc, _ = self._bitmap_location(i)
                    locations[i] = loc
                    self.index[i] = (loc,) + self.index[i][1:]  # type: ignore[assignment]
                    changed = True
            for i in sorted(self._dirty):
                edits = self._overflow_changes(i)
                if edits:
                    self._apply_overflow(edits)
                    changed = True
            self.tm.flush_nodes()
            if not changed:
                break
        for i in sorted(self._dirty):
            loc = locations[i]
            counts = self._current[i]
            self.tm.bm.write(loc, smf.encode_bitmap(counts, loc), Salt.BITMAP)
            self.index[i] = smf.index_entry_for(counts, loc, self._valid(i))
        self.tm.bm.write(self.index_block, smf.encode_index_block(self.index, self.index_block),
                         Salt.INDEX)


OVERFLOW_CODEC = U32
INDEX_CODEC = INDEX_ENTRY
