"""A read-only ext2/3/4 reader working from a device's blocks, in userspace.

``Filesystem(source)`` opens the filesystem on a ``BlockSource`` (anything with
``size`` and ``readinto(offset, memoryview)``: ``FileSource`` for an image file
or block device, a thin volume's block mapping...) and gives inodes
(``inode``), file contents (``data``), symlink targets (``readlink``),
directory entries (``entries``) and xattrs (``xattrs``) as a read-only kernel
mount would show them.  Filesystems it does not handle are
``UnsupportedFilesystem`` (read them another way); damage is
``CorruptFilesystem``.  This package imports nothing of thinpool but errors.
"""

from __future__ import annotations

import os

from .errors import CorruptFilesystem, ExtfsError, UnsupportedFilesystem
from .fs import CHUNK, ROOT_INO, BlockSource, Filesystem, Inode, Run


class FileSource:
    """A file or block device as a ``BlockSource``; reads past its end are zeros."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.size = os.lseek(fd, 0, os.SEEK_END)

    def readinto(self, offset: int, buf: memoryview) -> None:
        got = os.preadv(self.fd, [buf], offset)
        if got < len(buf):
            buf[got:] = bytes(len(buf) - got)


__all__ = ["BlockSource", "CHUNK", "CorruptFilesystem", "ExtfsError", "FileSource", "Filesystem", "Inode",
           "ROOT_INO", "Run", "UnsupportedFilesystem"]
