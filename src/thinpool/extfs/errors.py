"""Errors of the ext2/3/4 reader (each a one-line ``ThinpoolError``)."""

from __future__ import annotations

from ..errors import ThinpoolError


class ExtfsError(ThinpoolError):
    """The filesystem cannot be read by this reader."""


class UnsupportedFilesystem(ExtfsError):
    """Not an ext2/3/4 filesystem this reader handles: no ext superblock, a feature it does not
    implement, a journal that needs replaying.  Whoever can read it another way (a kernel mount)
    should."""


class CorruptFilesystem(ExtfsError):
    """An on-disk structure is inconsistent (out-of-range block, bad header, loop...); the
    message names the inode or path."""
