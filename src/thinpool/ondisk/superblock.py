"""The thin superblock (block 0) and the space-map roots it embeds.

Layout (dm-thin-format.md 1.2): 364 meaningful bytes, the rest zero, so the
kernel can rely on a one-sector atomic write.  The metadata-snapshot copy uses
the same layout with its own block number and zeroed space-map roots.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field, replace

from . import checksum
from .checksum import BLOCK_SIZE, Salt

MAGIC = 27022010
VERSION = 2
METADATA_BLOCK_SECTORS = 8
NEEDS_CHECK = 1
MAX_METADATA_BLOCKS = 255 * 16320  # one index block of 255 bitmaps

_SM_ROOT = struct.Struct("<QQQQ")
_SB = struct.Struct("<IIQ16sQIIQQ128s128sQQIIQIII")
assert _SB.size == 364


@dataclass(frozen=True, slots=True)
class SpaceMapRoot:
    """disk_sm_root: what the superblock records of one space map."""

    nr_blocks: int = 0
    nr_allocated: int = 0
    bitmap_root: int = 0
    ref_count_root: int = 0

    def pack(self) -> bytes:
        return _SM_ROOT.pack(self.nr_blocks, self.nr_allocated, self.bitmap_root,
                             self.ref_count_root).ljust(128, b"\0")

    @classmethod
    def unpack(cls, raw: bytes) -> SpaceMapRoot:
        return cls(*_SM_ROOT.unpack_from(raw, 0))


@dataclass(frozen=True, slots=True)
class Superblock:
    blocknr: int = 0
    flags: int = 0
    uuid: bytes = b"\0" * 16
    magic: int = MAGIC
    version: int = VERSION
    time: int = 0
    trans_id: int = 0
    held_root: int = 0
    data_sm: SpaceMapRoot = field(default_factory=SpaceMapRoot)
    metadata_sm: SpaceMapRoot = field(default_factory=SpaceMapRoot)
    data_mapping_root: int = 0
    device_details_root: int = 0
    data_block_size: int = 128
    metadata_block_size: int = METADATA_BLOCK_SECTORS
    metadata_nr_blocks: int = 0
    compat_flags: int = 0
    compat_ro_flags: int = 0
    incompat_flags: int = 0

    @property
    def needs_check(self) -> bool:
        return bool(self.flags & NEEDS_CHECK)

    def pack(self) -> bytearray:
        """A full 4 KiB block with a valid checksum."""
        buf = bytearray(BLOCK_SIZE)
        _SB.pack_into(buf, 0, 0, self.flags, self.blocknr, self.uuid, self.magic,
                      self.version, self.time, self.trans_id, self.held_root,
                      self.data_sm.pack(), self.metadata_sm.pack(),
                      self.data_mapping_root, self.device_details_root,
                      self.data_block_size, self.metadata_block_size,
                      self.metadata_nr_blocks, self.compat_flags,
                      self.compat_ro_flags, self.incompat_flags)
        checksum.stamp(buf, Salt.SUPERBLOCK)
        return buf

    @classmethod
    def unpack(cls, raw: bytes | bytearray | memoryview) -> Superblock:
        """Decode without validation; see ``validate``."""
        (_csum, flags, blocknr, uuid, magic, version, time, trans_id, held_root,
         data_sm, meta_sm, mapping_root, details_root, dbs, mbs, mnr, compat,
         compat_ro, incompat) = _SB.unpack_from(raw, 0)
        return cls(blocknr, flags, uuid, magic, version, time, trans_id, held_root,
                   SpaceMapRoot.unpack(data_sm), SpaceMapRoot.unpack(meta_sm),
                   mapping_root, details_root, dbs, mbs, mnr, compat, compat_ro, incompat)

    def snapshot_copy(self, location: int) -> Superblock:
        """The metadata-snapshot copy the kernel writes at ``location``."""
        return replace(self, blocknr=location, held_root=0,
                       data_sm=SpaceMapRoot(), metadata_sm=SpaceMapRoot())
