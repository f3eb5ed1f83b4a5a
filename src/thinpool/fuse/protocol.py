"""FUSE kernel protocol: constants and wire structures (pure, no I/O).

Facts from the kernel's ``include/uapi/linux/fuse.h`` (protocol 7.x, all
little-endian on the machines we run on, structures padded to 8 bytes).
Every request read from /dev/fuse starts with a 40-byte ``fuse_in_header``;
every reply written back starts with a 16-byte ``fuse_out_header`` whose
``error`` is 0 or a negative errno and whose ``len`` counts the whole reply.
A notification (sent by the filesystem unasked) is an out header with
``unique`` 0 and the notification code in ``error``.

Only what a single directory of fixed-size files needs is defined here.
"""

from __future__ import annotations

import enum
import os
import stat
import struct

KERNEL_MAJOR = 7
OUR_MINOR = 38
"""The minor version we reply in INIT (the kernel then uses the smaller one)."""
MIN_MINOR = 28
"""Oldest kernel protocol we accept: 7.28 (Linux 4.20) has max_pages."""

ROOT_ID = 1


class Op(enum.IntEnum):
    """Request opcodes (``enum fuse_opcode``), those we name in code or logs."""

    LOOKUP = 1
    FORGET = 2
    GETATTR = 3
    SETATTR = 4
    OPEN = 14
    READ = 15
    WRITE = 16
    STATFS = 17
    RELEASE = 18
    FSYNC = 20
    FLUSH = 25
    INIT = 26
    OPENDIR = 27
    READDIR = 28
    RELEASEDIR = 29
    FSYNCDIR = 30
    ACCESS = 34
    INTERRUPT = 36
    DESTROY = 38
    NOTIFY_REPLY = 41
    BATCH_FORGET = 42
    FALLOCATE = 43
    READDIRPLUS = 44


NOTIFY_INVAL_ENTRY = 3

# INIT flags (fuse_init_in.flags / fuse_init_out.flags)
FUSE_ASYNC_READ = 1 << 0
FUSE_BIG_WRITES = 1 << 5
FUSE_DO_READDIRPLUS = 1 << 13
FUSE_ASYNC_DIO = 1 << 15
FUSE_WRITEBACK_CACHE = 1 << 16
FUSE_MAX_PAGES = 1 << 22
FUSE_INIT_EXT = 1 << 30

# fuse_open_out.open_flags
FOPEN_DIRECT_IO = 1 << 0
FOPEN_KEEP_CACHE = 1 << 1
FOPEN_PARALLEL_DIRECT_WRITES = 1 << 6

# fuse_setattr_in.valid
FATTR_MODE = 1 << 0
FATTR_UID = 1 << 1
FATTR_GID = 1 << 2
FATTR_SIZE = 1 << 3

# fallocate(2) modes (linux/falloc.h)
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

# /dev/fuse ioctl: _IOR(229, 0, uint32_t)
FUSE_DEV_IOC_CLONE = (2 << 30) | (4 << 16) | (229 << 8) | 0

IN_HEADER = struct.Struct("<IIQQIIIHH")     # len opcode unique nodeid uid gid pid extlen pad
OUT_HEADER = struct.Struct("<IiQ")           # len error unique
ATTR_FMT = "QQQQQQIIIIIIIIII"                # ino size blocks atime mtime ctime *nsec x3 mode
#                                              nlink uid gid rdev blksize flags
ENTRY_OUT = struct.Struct("<QQQQII" + ATTR_FMT)   # nodeid generation entry_valid attr_valid
#                                                   entry_valid_nsec attr_valid_nsec attr
ATTR_OUT = struct.Struct("<QII" + ATTR_FMT)       # attr_valid attr_valid_nsec dummy attr
INIT_IN = struct.Struct("<IIII")                  # major minor max_readahead flags
INIT_OUT = struct.Struct("<IIIIHHIIHHI28x")       # ... flags2 unused[7]
OPEN_IN = struct.Struct("<II")                    # flags open_flags
OPEN_OUT = struct.Struct("<QII")                  # fh open_flags padding
READ_IN = struct.Struct("<QQIIQII")               # fh offset size read_flags lock_owner flags pad
WRITE_IN = struct.Struct("<QQIIQII")              # fh offset size write_flags lock_owner flags pad
WRITE_OUT = struct.Struct("<II")
RELEASE_IN = struct.Struct("<QIIQ")               # fh flags release_flags lock_owner
FLUSH_IN = struct.Struct("<QIIQ")                 # fh unused padding lock_owner
FSYNC_IN = struct.Struct("<QII")                  # fh fsync_flags padding
SETATTR_IN = struct.Struct("<IIQQQQQQIIIIIIII")   # valid pad fh size lock_owner atime mtime ctime
#                                                   *nsec x3 mode unused4 uid gid unused5
FALLOCATE_IN = struct.Struct("<QQQII")            # fh offset length mode padding
ACCESS_IN = struct.Struct("<II")
BATCH_FORGET_IN = struct.Struct("<II")
STATFS_OUT = struct.Struct("<QQQQQIIII24x")       # blocks bfree bavail files ffree bsize namelen
#                                                   frsize padding spare[6]
DIRENT = struct.Struct("<QQII")                   # ino off namelen type, then the name
NOTIFY_INVAL_ENTRY_OUT = struct.Struct("<QII")    # parent namelen flags, then name and NUL

# Hot-path views: only the fields the handlers use, no tuple slicing.
IN_HEADER_ROUTE = struct.Struct("<IIQQ")          # len opcode unique nodeid
READ_IN_HOT = struct.Struct("<QQI")               # fh offset size
WRITE_IN_HOT = struct.Struct("<QQI12xI")          # fh offset size flags
WRITE_REPLY = struct.Struct("<IiQII")             # out header + fuse_write_out

WRITE_PAYLOAD_OFFSET = IN_HEADER.size + WRITE_IN.size
"""Where a WRITE's data starts in the request (80)."""

assert IN_HEADER.size == 40 and OUT_HEADER.size == 16
assert ENTRY_OUT.size == 128 and ATTR_OUT.size == 104 and INIT_OUT.size == 64
assert SETATTR_IN.size == 88 and STATFS_OUT.size == 80 and READ_IN.size == 40

# O_DSYNC is part of O_SYNC; either on a write's file flags means "durable before the reply".
O_DSYNC = os.O_DSYNC
O_ACCMODE = os.O_RDONLY | os.O_WRONLY | os.O_RDWR


def dirent_size(namelen: int, plus: bool) -> int:
    """Bytes one READDIR (or READDIRPLUS) entry takes, padded to 8."""
    n = DIRENT.size + namelen + (ENTRY_OUT.size if plus else 0)
    return (n + 7) & ~7


def dirent_type(mode: int) -> int:
    """The DT_* value of a file mode, as readdir reports it."""
    return stat.S_IFMT(mode) >> 12


def notify_inval_entry(parent: int, name: bytes) -> bytes:
    """A FUSE_NOTIFY_INVAL_ENTRY message: drop the kernel's cached dentry."""
    body = NOTIFY_INVAL_ENTRY_OUT.pack(parent, len(name), 0) + name + b"\0"
    return OUT_HEADER.pack(OUT_HEADER.size + len(body), NOTIFY_INVAL_ENTRY, 0) + body
