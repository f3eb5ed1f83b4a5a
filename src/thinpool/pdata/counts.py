"""In-memory reference counts accumulated in bitmap-sized chunks.

Builders and checkers count references to data or metadata blocks without
allocating one counter per block of a possibly huge device: only the
16,320-block ranges that are actually referenced get a uint32 array.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from ..ondisk.spacemap import ENTRIES_PER_BITMAP


class ChunkedCounts:
    def __init__(self) -> None:
        self.chunks: dict[int, np.ndarray] = {}

    def chunk(self, i: int) -> np.ndarray:
        arr = self.chunks.get(i)
        if arr is None:
            arr = self.chunks[i] = np.zeros(ENTRIES_PER_BITMAP, dtype=np.uint32)
        return arr

    def add(self, blocks: np.ndarray) -> None:
        """Count every element of ``blocks`` once (duplicates count several times)."""
        if blocks.size == 0:
            return
        blocks = blocks.astype(np.uint64, copy=False)
        groups = blocks // np.uint64(ENTRIES_PER_BITMAP)
        lo, hi = int(groups.min()), int(groups.max())
        if lo == hi:
            offsets = (blocks - np.uint64(lo * ENTRIES_PER_BITMAP)).astype(np.int64)
            self.chunk(lo)[:] += np.bincount(offsets, minlength=ENTRIES_PER_BITMAP).astype(np.uint32)
            return
        order = np.argsort(groups, kind="stable")
        sorted_blocks = blocks[order]
        sorted_groups = groups[order]
        cuts = np.flatnonzero(np.diff(sorted_groups)) + 1
        for part in np.split(sorted_blocks, cuts):
            g = int(part[0]) // ENTRIES_PER_BITMAP
            offsets = (part - np.uint64(g * ENTRIES_PER_BITMAP)).astype(np.int64)
            self.chunk(g)[:] += np.bincount(offsets, minlength=ENTRIES_PER_BITMAP).astype(np.uint32)

    def get(self, i: int) -> np.ndarray:
        """Counts of bitmap range i (zeros if never touched)."""
        arr = self.chunks.get(i)
        return arr if arr is not None else np.zeros(ENTRIES_PER_BITMAP, dtype=np.uint32)

    def items(self) -> Iterator[tuple[int, np.ndarray]]:
        for i in sorted(self.chunks):
            yield i, self.chunks[i]
