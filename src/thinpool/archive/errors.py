"""Errors of the archive layer.

Every problem with a layer stream (not a tar, corrupt compression, a truncated
or malformed tar, an entry that tries to leave the layer root) or with the
directory tree it is applied to is an ``ArchiveError`` whose str() is one line.
"""

from __future__ import annotations

from ..errors import ThinpoolError


class ArchiveError(ThinpoolError):
    """A layer stream or a directory tree cannot be read, applied or exported."""


class UnsafeArchiveError(ArchiveError):
    """An entry would escape the layer root or abuse a whiteout (``..``, ``.wh..``...).

    Raised before anything is written for that entry; entries earlier in the
    same stream have been applied (the caller discards the half-applied layer,
    as dockerd does after a failed ApplyDiff).
    """
