"""The ext2/3/4 superblock and group descriptors: decoded, validated, features checked.

``Superblock.parse(raw, device_size)`` takes the 1024 bytes at offset 1024
of a device.  A device without the ext magic, or with a feature that changes
how the filesystem must be read and that this reader does not implement
(compression, meta_bg, inline data, encryption, casefold, xattr inodes, dirdata,
an external journal device, an unreplayed journal, mount options kept in the
superblock), is ``UnsupportedFilesystem``; numbers that cannot describe a
filesystem on a device of ``device_size`` bytes are ``CorruptFilesystem``.
Read-only-compatible features never change how the filesystem is read, so
every one is accepted, as a read-only kernel mount does.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from crc32c import crc32c

from .errors import CorruptFilesystem, UnsupportedFilesystem

SUPERBLOCK_OFFSET = 1024
MAGIC = 0xEF53

INCOMPAT_COMPRESSION = 0x1
INCOMPAT_FILETYPE = 0x2
INCOMPAT_RECOVER = 0x4
INCOMPAT_JOURNAL_DEV = 0x8
INCOMPAT_META_BG = 0x10
INCOMPAT_EXTENTS = 0x40
INCOMPAT_64BIT = 0x80
INCOMPAT_MMP = 0x100
INCOMPAT_FLEX_BG = 0x200
INCOMPAT_EA_INODE = 0x400
INCOMPAT_DIRDATA = 0x1000
INCOMPAT_CSUM_SEED = 0x2000
INCOMPAT_LARGEDIR = 0x4000
INCOMPAT_INLINE_DATA = 0x8000
INCOMPAT_ENCRYPT = 0x10000
INCOMPAT_CASEFOLD = 0x20000

RO_COMPAT_HUGE_FILE = 0x8
RO_COMPAT_METADATA_CSUM = 0x400

DEFM_UID16 = 0x2

_SUPPORTED_INCOMPAT = (INCOMPAT_FILETYPE | INCOMPAT_EXTENTS | INCOMPAT_64BIT | INCOMPAT_MMP | INCOMPAT_FLEX_BG
                       | INCOMPAT_CSUM_SEED | INCOMPAT_LARGEDIR)
_NAMED_INCOMPAT = {INCOMPAT_COMPRESSION: "compression", INCOMPAT_RECOVER: "needs_recovery (a journal to replay)",
                   INCOMPAT_JOURNAL_DEV: "journal_dev", INCOMPAT_META_BG: "meta_bg", INCOMPAT_EA_INODE: "ea_inode",
                   INCOMPAT_DIRDATA: "dirdata", INCOMPAT_INLINE_DATA: "inline_data",
                   INCOMPAT_ENCRYPT: "encrypt", INCOMPAT_CASEFOLD: "casefold"}

_SB = struct.Struct("<IIIIIIIIIIIIIHHHHHHIIII")
"""inodes_count, blocks_count_lo, r_blocks_lo, free_blocks_lo, free_inodes, first_data_block,
log_block_size, log_cluster_size, blocks_per_group, clusters_per_group, inodes_per_group,
mtime, wtime, mnt_count, max_mnt_count, magic, state, errors, minor_rev, lastcheck, checkinterval,
creator_os, rev_level"""


@dataclass(frozen=True, slots=True)
class Superblock:
    """What the reader needs of an ext2/3/4 superblock (validated)."""

    block_size: int
    blocks_count: int
    first_data_block: int
    blocks_per_group: int
    inodes_per_group: int
    inodes_count: int
    inode_size: int
    desc_size: int
    groups: int
    first_ino: int       # the first inode a directory may name (the root, 2, is the exception)
    incompat: int
    ro_compat: int
    uid16: bool          # EXT4_DEFM_UID16: the kernel ignores the high 16 bits of ids

    @property
    def largedir(self) -> bool:
        return bool(self.incompat & INCOMPAT_LARGEDIR)

    @property
    def huge_file(self) -> bool:
        return bool(self.ro_compat & RO_COMPAT_HUGE_FILE)

    @property
    def is_64bit(self) -> bool:
        return bool(self.incompat & INCOMPAT_64BIT)

    @classmethod
    def parse(cls, raw: bytes, device_size: int) -> "Superblock":
        if len(raw) < 1024 or int.from_bytes(raw[0x38:0x3A], "little") != MAGIC:
            raise UnsupportedFilesystem("no ext2/ext3/ext4 superblock")
        (inodes_count, blocks_lo, _r, _fb, _fi, first_data_block, log_block, _lc, blocks_per_group, _cpg,
         inodes_per_group, _mt, _wt, _mc, _mmc, _magic, _state, _errors, _minor, _lck, _ci, _os,
         rev_level) = _SB.unpack_from(raw, 0)
        incompat = int.from_bytes(raw[0x60:0x64], "little")
        ro_compat = int.from_bytes(raw[0x64:0x68], "little")
        unsupported = incompat & ~_SUPPORTED_INCOMPAT
        if unsupported:
            names = [name for bit, name in _NAMED_INCOMPAT.items() if unsupported & bit]
            rest = unsupported & ~sum(_NAMED_INCOMPAT)
            if rest:
                names.append(f"unknown incompatible features {rest:#x}")
            raise UnsupportedFilesystem(f"ext filesystem with {', '.join(names)}")
        if raw[0x200:0x240].strip(b"\0"):
            raise UnsupportedFilesystem("ext filesystem with mount options stored in its superblock")
        if ro_compat & RO_COMPAT_METADATA_CSUM:
            stored = int.from_bytes(raw[0x3FC:0x400], "little")
            if stored != crc32c(raw[:0x3FC]) ^ 0xFFFFFFFF:
                raise CorruptFilesystem("ext superblock: bad checksum")
        if log_block > 6:
            raise CorruptFilesystem(f"ext superblock: block size 2^{10 + log_block} bytes")
        block_size = 1024 << log_block
        blocks_count = blocks_lo
        if incompat & INCOMPAT_64BIT:
            blocks_count |= int.from_bytes(raw[0x150:0x154], "little") << 32
        first_ino = 11
        if rev_level == 0:
            inode_size = 128
        else:
            first_ino = int.from_bytes(raw[0x54:0x58], "little")
            inode_size = int.from_bytes(raw[0x58:0x5A], "little")
            if inode_size < 128 or inode_size > block_size or inode_size & (inode_size - 1):
                raise CorruptFilesystem(f"ext superblock: inode size {inode_size}")
        desc_size = 32
        if incompat & INCOMPAT_64BIT:
            desc_size = int.from_bytes(raw[0xFE:0x100], "little")
            if desc_size < 64 or desc_size > 1024 or desc_size & (desc_size - 1):
                raise CorruptFilesystem(f"ext superblock: group descriptor size {desc_size}")
        if first_data_block != (1 if block_size == 1024 else 0) and first_data_block != 0:
            raise CorruptFilesystem(f"ext superblock: first data block {first_data_block}")
        if blocks_count <= first_data_block or blocks_count * block_size > device_size:
            raise CorruptFilesystem(f"ext superblock: {blocks_count} blocks of {block_size} bytes do not fit "
                                    f"the device ({device_size} bytes)")
        if not 0 < blocks_per_group <= 8 * block_size or not 0 < inodes_per_group <= 8 * block_size:
            raise CorruptFilesystem(f"ext superblock: {blocks_per_group} blocks and {inodes_per_group} inodes "
                                    "per group")
        groups = -(-(blocks_count - first_data_block) // blocks_per_group)
        if not 0 < inodes_count <= groups * inodes_per_group:
            raise CorruptFilesystem(f"ext superblock: {inodes_count} inodes in {groups} groups")
        uid16 = bool(int.from_bytes(raw[0x100:0x104], "little") & DEFM_UID16)
        return cls(block_size, blocks_count, first_data_block, blocks_per_group, inodes_per_group,
                   inodes_count, inode_size, desc_size, groups, first_ino, incompat, ro_compat, uid16)

    def inode_tables(self, table: bytes) -> list[int]:
        """The first block of each group's inode table, from the group descriptor table."""
        out = []
        per_table = -(-self.inodes_per_group * self.inode_size // self.block_size)
        for g in range(self.groups):
            at = g * self.desc_size
            block = int.from_bytes(table[at + 8:at + 12], "little")
            if self.desc_size >= 64:
                block |= int.from_bytes(table[at + 0x28:at + 0x2C], "little") << 32
            if block <= self.first_data_block or block + per_table > self.blocks_count:
                raise CorruptFilesystem(f"ext group {g}: inode table at block {block} is outside the filesystem")
            out.append(block)
        return out

    @property
    def descriptor_table(self) -> tuple[int, int]:
        """(byte offset, length) of the group descriptor table."""
        return (self.first_data_block + 1) * self.block_size, self.groups * self.desc_size
