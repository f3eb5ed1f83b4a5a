"""Space-map blocks: 2-bit bitmaps, index entries, the metadata index block.

A bitmap block holds 16,320 two-bit reference counts after a 16-byte header.
Within each pair of bits the *lower* bit is the high bit of the value
(dm-thin-format.md 3.2), so value 1 is pattern 0b10 and value 2 is 0b01.
Count 3 means "3 or more; see the overflow btree".
"""

from __future__ import annotations

import struct

import numpy as np

from . import checksum
from .checksum import BLOCK_SIZE, Salt
from ..errors import BadBlockError

ENTRIES_PER_BITMAP = (BLOCK_SIZE - 16) * 4  # 16320
MAX_METADATA_BITMAPS = 255
BITMAP_HEADER = struct.Struct("<IIQ")
INDEX_ENTRY = struct.Struct("<QII")
INDEX_BLOCK_HEADER = struct.Struct("<IIQ")


def decode_bitmap(raw: bytes | bytearray, location: int) -> np.ndarray:
    """Small counts (0..3) of one bitmap block as a uint32 array of 16,320."""
    _c, _unused, blocknr = BITMAP_HEADER.unpack_from(raw, 0)
    if blocknr != location:
        raise BadBlockError(location, "space map bitmap", f"bad block nr {blocknr}")
    bits = np.unpackbits(np.frombuffer(raw, dtype=np.uint8, offset=16), bitorder="little")
    pairs = bits.reshape(-1, 2)
    return (pairs[:, 0].astype(np.uint32) << 1) | pairs[:, 1]


def encode_bitmap(counts: np.ndarray, location: int) -> bytearray:
    """Bitmap block for ``counts`` (16,320 entries; values >= 3 stored as 3)."""
    small = np.minimum(counts, 3).astype(np.uint8)
    pairs = np.empty((ENTRIES_PER_BITMAP, 2), dtype=np.uint8)
    pairs[:, 0] = small >> 1
    pairs[:, 1] = small & 1
    buf = bytearray(BLOCK_SIZE)
    BITMAP_HEADER.pack_into(buf, 0, 0, 0, location)
    buf[16:] = np.packbits(pairs.reshape(-1), bitorder="little").tobytes()
    checksum.stamp(buf, Salt.BITMAP)
    return buf


def index_entry_for(counts: np.ndarray, bitmap_block: int, valid: int) -> tuple[int, int, int]:
    """(blocknr, nr_free, none_free_before) describing one bitmap, kernel style.

    ``valid`` is how many of the 16,320 entries lie inside the space map.
    nr_free counts every zero entry (the kernel does not truncate the last,
    partial bitmap); none_free_before is the first free valid entry.
    """
    nonzero = int(np.count_nonzero(counts))
    free = np.flatnonzero(counts[:valid] == 0)
    first_free = int(free[0]) if free.size else valid
    return bitmap_block, ENTRIES_PER_BITMAP - nonzero, first_free


def decode_index_block(raw: bytes | bytearray, location: int) -> list[tuple[int, int, int]]:
    """All 255 entries of the metadata space map's index block."""
    _c, _pad, blocknr = INDEX_BLOCK_HEADER.unpack_from(raw, 0)
    if blocknr != location:
        raise BadBlockError(location, "metadata index block", f"bad block nr {blocknr}")
    return [INDEX_ENTRY.unpack_from(raw, 16 + 16 * i) for i in range(MAX_METADATA_BITMAPS)]


def encode_index_block(entries: list[tuple[int, int, int]], location: int) -> bytearray:
    if len(entries) > MAX_METADATA_BITMAPS:
        raise ValueError("metadata space map needs more than 255 bitmaps")
    buf = bytearray(BLOCK_SIZE)
    INDEX_BLOCK_HEADER.pack_into(buf, 0, 0, 0, location)
    for i, entry in enumerate(entries):
        INDEX_ENTRY.pack_into(buf, 16 + 16 * i, *entry)
    checksum.stamp(buf, Salt.INDEX)
    return buf


def nr_bitmaps(nr_blocks: int) -> int:
    return -(-nr_blocks // ENTRIES_PER_BITMAP)
