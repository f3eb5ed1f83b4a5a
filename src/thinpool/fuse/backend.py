"""What a FUSE mount serves as one file: the ``Export`` interface.

The same method names and semantics as ``thinpool.nbd.backend.Export``, so
one object can serve both; this is the subset the FUSE side calls.
Contracts (as seen from an Export written for both):

* Calls may come from several threads at once. Ranges are validated: inside
  ``[0, size)``, length > 0, at most 1 MiB of payload; offsets and lengths
  are byte-granular (a process can ``pread`` any range of the file; through
  a loop device they are multiples of 512).
* ``buf``/``data`` views point into the mount's per-thread buffers and are
  valid only during the call: copy what must outlive it.
* Failures are ``thinpool.errors.DataPathError`` with an ``errno``; the
  process doing the I/O gets that errno. Anything else raised is logged as a
  bug and answered with EIO. The mount keeps working either way.
* ``write_zeroes(..., may_trim, fast_only, fua)``: afterwards the range
  reads as zeroes; with ``may_trim`` False it must stay provisioned. The
  FUSE side never sets ``fast_only``. A hole punched in the file
  (``FALLOC_FL_PUNCH_HOLE``, which loop devices send for discards) is
  ``write_zeroes(may_trim=True)``, not ``trim``: fallocate(2) promises that
  a punched range reads back as zeroes, which NBD's trim does not.
* ``close`` is called once, by ``FuseMount.remove_file`` or
  ``FuseMount.stop``, when no open file handle uses the export any more.
"""

from __future__ import annotations

from typing import Protocol

__all__ = ["Export"]


class Export(Protocol):
    """One volume served as one file (see the module docstring)."""

    size: int
    """Bytes; the file's fixed size."""
    read_only: bool
    """The file is shown 0400 and every open for writing fails with EROFS."""

    def readinto(self, offset: int, buf: memoryview) -> None:
        """Fill ``buf`` with the bytes at ``offset``."""

    def write(self, offset: int, data: memoryview, fua: bool) -> None:
        """Write ``data`` at ``offset``; with ``fua``, durably before returning."""

    def flush(self) -> None:
        """Make every write completed before this call durable."""

    def write_zeroes(self, offset: int, length: int, may_trim: bool, fast_only: bool,
                     fua: bool) -> None:
        """Make the range read as zeroes."""

    def close(self) -> None:
        """Release the export; no call follows."""
