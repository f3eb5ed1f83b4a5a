"""What the NBD server serves: the Export and Catalog interfaces.

The server knows nothing about pools or volumes; whoever embeds it passes a
``Catalog`` that names exports and opens them. Contracts:

* ``Catalog.open_export(name)`` returns a fresh ``Export`` for one client
  connection (the server closes it when that connection ends, or right after
  answering NBD_OPT_INFO) or raises ``ExportNotFound``. ``""`` is the
  default export; a catalog without one raises ``ExportNotFound``.
* Export methods may be called from several threads at once, also on
  different Export objects of the same volume (one per connection). Ranges
  are already validated (inside the export, aligned to the minimum block
  size, lengths > 0, payloads <= the maximum block size).
* Failures are ``thinpool.errors.DataPathError`` with an errno (EIO, ENOSPC,
  EINVAL, EPERM, EOPNOTSUPP, EOVERFLOW...), which becomes the NBD error sent
  to the client. Anything else raised is treated as a server bug: logged,
  answered with EIO, and the connection goes on.
* ``can_multi_conn`` promises that all Export objects of a volume share one
  cache: a write acknowledged on one connection is visible to reads on all,
  and ``flush`` (or a FUA write) on any connection makes every acknowledged
  write durable.
* ``extents(offset, length)`` returns consecutive (length, flags) pairs from
  ``offset`` covering at least one byte, flags built from ``NBD_STATE_HOLE``
  (unprovisioned) and ``NBD_STATE_ZERO`` (reads as zeroes); the server clips
  and merges them.
* Optional ``write_many(writes)``: do the writes, a sequence of (offset,
  data) pairs, in order, as if one by one (no FUA).  If it raises, the
  server does them again one by one to learn which failed, so it must leave
  nothing behind that a repeated write would not overwrite.  The server
  hands it the small writes a pipelining client sent back to back.
* ``write_zeroes(..., may_trim, fast_only, ...)``: afterwards the range reads
  as zeroes; with ``may_trim`` False it must stay provisioned; with
  ``fast_only`` raise ``DataPathError(EOPNOTSUPP)`` at once, contents
  unchanged, unless the zeroing is cheaper than writing zeroes.
"""

from __future__ import annotations

from typing import Protocol

from ..errors import ThinpoolError
from .protocol import NBD_STATE_HOLE, NBD_STATE_ZERO

__all__ = ["Catalog", "Export", "ExportNotFound", "NBD_STATE_HOLE", "NBD_STATE_ZERO"]


class ExportNotFound(ThinpoolError):
    """The catalog has no export of that name."""


class Export(Protocol):
    """One opened export (see the module docstring for the contracts)."""

    size: int
    """Bytes; a multiple of ``block_sizes[0]``."""
    read_only: bool
    can_trim: bool
    can_zero: bool
    can_fast_zero: bool
    can_cache: bool
    can_multi_conn: bool
    block_sizes: tuple[int, int, int]
    """(minimum, preferred, maximum payload): powers of two for the first two,
    minimum <= 64 KiB, preferred >= 512, maximum <= 32 MiB."""
    description: str
    """Free text shown by ``nbdinfo --list`` (may be empty)."""

    def readinto(self, offset: int, buf: memoryview) -> None:
        """Fill ``buf`` with the bytes at ``offset``."""

    def write(self, offset: int, data: memoryview, fua: bool) -> None:
        """Write ``data`` at ``offset``; with ``fua``, durably before returning."""

    def flush(self) -> None:
        """Make every write completed before this call durable."""

    def trim(self, offset: int, length: int, fua: bool) -> None:
        """Hint that the range is no longer needed (may deallocate it)."""

    def write_zeroes(self, offset: int, length: int, may_trim: bool, fast_only: bool,
                     fua: bool) -> None:
        """Make the range read as zeroes."""

    def extents(self, offset: int, length: int) -> list[tuple[int, int]]:
        """Allocation status from ``offset``: (length, NBD_STATE_* flags) pairs."""

    def cache(self, offset: int, length: int) -> None:
        """Advisory prefetch of the range."""

    def close(self) -> None:
        """Release what ``open_export`` acquired."""


class Catalog(Protocol):
    """The set of exports a server offers."""

    def list_exports(self) -> list[tuple[str, str]]:
        """(name, description) of every export, for NBD_OPT_LIST."""

    def open_export(self, name: str) -> Export:
        """Open ``name`` for one connection; raise ``ExportNotFound`` if absent."""
