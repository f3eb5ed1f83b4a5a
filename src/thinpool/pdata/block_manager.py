"""Bounded block cache with checksum validation and write-back of dirty blocks.

* ``read(b, salt)`` returns the block's bytes; a block read from disk is
  verified against the checksum salt of its type before it enters the cache.
* ``write(b, data)`` stores a complete, checksummed block as dirty.  Dirty
  blocks beyond ``max_dirty`` are written back early: that is safe because
  the transaction manager only writes blocks that are free in the last
  committed state, so nothing reachable from the on-disk superblock changes.
* ``flush()`` writes every dirty block and syncs; the caller writes the
  superblock afterwards (two-phase commit).
* ``discard_dirty()`` forgets uncommitted writes (abort).
"""

from __future__ import annotations

from collections import OrderedDict

from ..errors import ChecksumError
from ..ondisk import checksum
from ..ondisk.checksum import KIND_NAMES, Salt
from .blockio import FileBlockIO


class BlockManager:
    def __init__(self, io: FileBlockIO, max_cached: int = 8192, max_dirty: int = 4096) -> None:
        self.io = io
        self.max_cached = max_cached
        self.max_dirty = max_dirty
        self._clean: OrderedDict[int, tuple[bytes, int]] = OrderedDict()
        self._dirty: OrderedDict[int, bytes] = OrderedDict()
        self._written_early: set[int] = set()
        self.reads = 0

    @property
    def nr_blocks(self) -> int:
        return self.io.nr_blocks

    def read(self, block: int, salt: Salt) -> bytes:
        data = self._dirty.get(block)
        if data is not None:
            return data
        hit = self._clean.get(block)
        if hit is not None and hit[1] == salt:
            self._clean.move_to_end(block)
            return hit[0]
        data = self.io.read(block)
        self.reads += 1
        computed = checksum.compute(data, salt)
        stored = checksum.stored(data)
        if computed != stored:
            raise ChecksumError(block, KIND_NAMES[salt], stored, computed)
        self._clean[block] = (data, salt)
        if len(self._clean) > self.max_cached:
            self._clean.popitem(last=False)
        return data

    def read_unchecked(self, block: int) -> bytes:
        data = self._dirty.get(block)
        return data if data is not None else self.io.read(block)

    def write(self, block: int, data: bytes | bytearray, salt: Salt) -> None:
        """Queue a complete block (already checksummed) for writing."""
        self._clean.pop(block, None)
        self._dirty[block] = bytes(data)
        self._dirty.move_to_end(block)
        if len(self._dirty) > self.max_dirty:
            self._write_back(len(self._dirty) - self.max_dirty // 2)

    def _write_back(self, count: int) -> None:
        for _ in range(count):
            block, data = self._dirty.popitem(last=False)
            self.io.write(block, data)
            self._written_early.add(block)
            self._clean[block] = (data, checksum.classify(data) or Salt.NODE)
            if len(self._clean) > self.max_cached:
                self._clean.popitem(last=False)

    def flush(self) -> None:
        """Write every dirty block and make them durable (superblock excluded)."""
        for block, data in self._dirty.items():
            self.io.write(block, data)
        for block, data in self._dirty.items():
            self._clean[block] = (data, checksum.classify(data) or Salt.NODE)
        self._dirty.clear()
        while len(self._clean) > self.max_cached:
            self._clean.popitem(last=False)
        self.io.sync()
        self._written_early.clear()

    def write_superblock(self, data: bytes | bytearray) -> None:
        """Second phase of a commit: block 0, then sync."""
        self.io.write(0, data)
        self.io.sync()
        self._clean[0] = (bytes(data), Salt.SUPERBLOCK)

    def discard_dirty(self) -> None:
        """Drop uncommitted state (the on-disk committed state is untouched)."""
        self._dirty.clear()
        for block in self._written_early:
            self._clean.pop(block, None)
        self._written_early.clear()
        self._clean.pop(0, None)

    def close(self) -> None:
        self.io.close()
