"""Which filesystem a block device holds, from its superblock (ext2/3/4, xfs, btrfs).

The pool server asks this before every mount; reading two superblock fields
costs one or two reads, where a ``blkid`` process costs a fork and an exec.
Only the filesystems thinpool makes and mounts are known here; anything else
is "" (callers that must name a foreign filesystem ask ``blkid``). ext2/3/4
are told apart by their feature flags as blkid tells them apart. Thread safe.
"""

from __future__ import annotations

import os
import struct

__all__ = ["filesystem"]

_EXT_SUPERBLOCK = 1024
_EXT_MAGIC = 0xEF53
_EXT_FIELDS = struct.Struct("<56xH34xIII")  # s_magic @0x38; compat, incompat, ro_compat @0x5C
_EXT_COMPAT_HAS_JOURNAL = 0x4
_EXT_INCOMPAT_JOURNAL_DEV = 0x8
_EXT3_INCOMPAT = 0x2 | 0x4 | 0x10  # filetype, recover, meta_bg: what ext3 understands
_EXT3_RO_COMPAT = 0x1 | 0x2 | 0x4  # sparse_super, large_file, btree_dir
_XFS_MAGIC = b"XFSB"
_BTRFS_MAGIC_AT = 65536 + 0x40
_BTRFS_MAGIC = b"_BHRfS_M"


def filesystem(device: str) -> str:
    """"ext2", "ext3", "ext4", "xfs", "btrfs", or "" for none of them; OSError if unreadable."""
    fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    try:
        head = os.pread(fd, 4096, 0)
        if head[:4] == _XFS_MAGIC:
            return "xfs"
        if len(head) >= _EXT_SUPERBLOCK + _EXT_FIELDS.size:
            magic, compat, incompat, ro_compat = _EXT_FIELDS.unpack_from(head, _EXT_SUPERBLOCK)
            if magic == _EXT_MAGIC:
                if incompat & _EXT_INCOMPAT_JOURNAL_DEV:
                    return "jbd"  # an external journal: not mountable
                if incompat & ~_EXT3_INCOMPAT or ro_compat & ~_EXT3_RO_COMPAT:
                    return "ext4"
                return "ext3" if compat & _EXT_COMPAT_HAS_JOURNAL else "ext2"
        if os.pread(fd, len(_BTRFS_MAGIC), _BTRFS_MAGIC_AT) == _BTRFS_MAGIC:
            return "btrfs"
        return ""
    finally:
        os.close(fd)
