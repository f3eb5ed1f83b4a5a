"""Bulk construction of fresh metadata: sequential allocation, trees bottom-up.

Used by restore and by formatting a new pool, where nothing is shared and
nothing is committed yet, so blocks are simply handed out in order and
written once.  Trees are built from sorted (key, value) arrays: leaves are
filled to max_entries while at least max_entries entries stay pending, and
the last 1..2 leaves split what remains evenly, so every non-root node holds
at least max_entries // 3 entries (thin_check's rule).
"""

from __future__ import annotations

import os

import numpy as np

from ..errors import NoMetadataSpaceError
from ..ondisk.checksum import BLOCK_SIZE
from ..ondisk.node import encode_arrays, max_entries_for
from .blockio import FileBlockIO

_BATCH = 256


class SequentialWriter:
    """Hands out blocks 1, 2, 3... and writes them in contiguous batches.

    With ``io=None`` nothing is written: a dry run that finds out whether a
    build fits in ``limit`` blocks.
    """

    def __init__(self, io: FileBlockIO | None, limit: int) -> None:
        self.io = io
        self.limit = limit
        self.next = 1
        self._run_start = -1
        self._run: list[bytes | bytearray] = []

    def alloc(self) -> int:
        b = self.next
        if b >= self.limit:
            raise NoMetadataSpaceError(
                f"metadata device too small: {self.limit} blocks are not enough")
        self.next += 1
        return b

    def write(self, b: int, data: bytes | bytearray) -> None:
        if self.io is None:
            return
        if self._run and b == self._run_start + len(self._run) and len(self._run) < _BATCH:
            self._run.append(data)
            return
        self.flush()
        self._run_start, self._run = b, [data]

    def flush(self) -> None:
        if self._run and self.io is not None:
            os.pwritev(self.io.fd, self._run, self._run_start * BLOCK_SIZE)
            self._run = []


class TreeBuilder:
    """Streams sorted entries into a new btree; ``finish`` returns its root."""

    def __init__(self, writer: SequentialWriter, value_size: int) -> None:
        self.writer = writer
        self.value_size = value_size
        self.max = max_entries_for(value_size)
        self._keys: list[np.ndarray] = []
        self._values: list[np.ndarray] = []
        self._pending = 0
        self._level: list[tuple[int, int]] = []  # (first key, block) of finished leaves

    def add(self, keys: np.ndarray, values: np.ndarray) -> None:
        """Append entries; keys must continue the increasing order.

        ``values`` has one row per key whose bytes are the packed value
        (e.g. dtype '<u8' for 8-byte values, or a structured dtype).
        """
        if keys.size == 0:
            return
        self._keys.append(keys)
        self._values.append(values)
        self._pending += int(keys.size)
        if self._pending >= 2 * self.max:
            self._emit_full()

    def _emit_full(self) -> None:
        keys = np.concatenate(self._keys)
        values = np.concatenate(self._values)
        start = 0
        while keys.size - start >= 2 * self.max:
            self._leaf(keys[start:start + self.max], values[start:start + self.max])
            start += self.max
        self._keys, self._values = [keys[start:]], [values[start:]]
        self._pending = int(keys.size - start)

    def _leaf(self, keys: np.ndarray, values: np.ndarray) -> None:
        b = self.writer.alloc()
        self.writer.write(b, encode_arrays(b, True, keys, values.tobytes(), self.value_size))
        self._level.append((int(keys[0]) if keys.size else 0, b))

    def finish(self) -> int:
        keys = np.concatenate(self._keys) if self._keys else np.zeros(0, dtype=np.uint64)
        values = np.concatenate(self._values) if self._values else np.zeros(0, dtype=np.uint8)
        n = int(keys.size)
        if n <= self.max:
            if n or not self._level:
                self._leaf(keys, values)
        else:
            half = n // 2
            self._leaf(keys[:half], values[:half])
            self._leaf(keys[half:], values[half:])
        self._keys, self._values = [], []
        return build_internal(self.writer, self._level)


def build_internal(writer: SequentialWriter, level: list[tuple[int, int]]) -> int:
    """Build internal levels over (first key, block) children; returns the root."""
    mx = max_entries_for(8)
    while len(level) > 1:
        parents: list[tuple[int, int]] = []
        n = len(level)
        sizes = _split_sizes(n, mx)
        start = 0
        for size in sizes:
            chunk = level[start:start + size]
            start += size
            keys = np.array([k for k, _ in chunk], dtype=np.uint64)
            vals = np.array([b for _, b in chunk], dtype="<u8")
            b = writer.alloc()
            writer.write(b, encode_arrays(b, False, keys, vals.tobytes(), 8))
            parents.append((chunk[0][0], b))
        level = parents
    return level[0][1]


def _split_sizes(n: int, mx: int) -> list[int]:
    """Node sizes for n entries: full nodes, the last two sharing the remainder."""
    if n <= mx:
        return [n]
    sizes = []
    while n >= 2 * mx:
        sizes.append(mx)
        n -= mx
    if n > mx:
        sizes += [n // 2, n - n // 2]
    else:
        sizes.append(n)
    return sizes
