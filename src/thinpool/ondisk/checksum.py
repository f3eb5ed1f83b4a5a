"""CRC32C block checksums as the kernel computes them (dm_bm_checksum).

The first 4 bytes of every metadata block hold
``crc32c_standard(block[4:]) ^ 0xFFFFFFFF ^ salt`` (little-endian); the salt
identifies the block type.  The C-accelerated ``crc32c`` package does the CRC.
"""

from __future__ import annotations

import enum
import struct

from crc32c import crc32c as _crc32c

BLOCK_SIZE = 4096
_CSUM = struct.Struct("<I")


class Salt(enum.IntEnum):
    """Per-block-type checksum salts."""

    SUPERBLOCK = 160774
    NODE = 121107
    BITMAP = 240779
    INDEX = 160478


KIND_NAMES = {
    Salt.SUPERBLOCK: "superblock",
    Salt.NODE: "btree node",
    Salt.BITMAP: "space map bitmap",
    Salt.INDEX: "metadata index block",
}


def compute(block: bytes | bytearray | memoryview, salt: int) -> int:
    """Checksum value to store at offset 0 of ``block``."""
    return _crc32c(memoryview(block)[4:BLOCK_SIZE]) ^ 0xFFFFFFFF ^ salt


def stored(block: bytes | bytearray | memoryview) -> int:
    return _CSUM.unpack_from(block, 0)[0]


def stamp(block: bytearray, salt: int) -> None:
    """Write the checksum into ``block`` in place (last step before writing)."""
    _CSUM.pack_into(block, 0, compute(block, salt))


def classify(block: bytes | bytearray | memoryview) -> Salt | None:
    """Block type whose salt makes the stored checksum valid, if any."""
    residue = stored(block) ^ _crc32c(memoryview(block)[4:BLOCK_SIZE]) ^ 0xFFFFFFFF
    try:
        return Salt(residue)
    except ValueError:
        return None
