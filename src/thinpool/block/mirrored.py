"""A thin device's reads and in-place overwrites done by a process that is not the pool's.

The pool process publishes the mappings it knows in a
``sharedmap.SharedMappingTable`` (``DataPath.share_mappings``).  A
``MirroredDevice`` in another process (an NBD worker) opens the same data
file and does with it only what needs no metadata change:

* ``readinto``: every block of the range is in the table (mapped, or
  unmapped on a device without an external origin, which reads as zeros);
  the data is read, then the entries are checked unchanged (the table's
  sequence counters), so a read never returns a block remapped or freed
  meanwhile.
* ``write``: every block is in the table as provisioned and not shared; the
  write runs between ``SharedMappingTable.begin_writing`` and
  ``end_writing``, so the pool, before it
  unmaps such a block or snapshots the device, withdraws the entries and
  waits for it (``barrier``).  Data-file writes are cut at ``PWRITE_MAX``
  boundaries like the pool's own.

Both return False when they cannot (a block missing, shared, unprovisioned
with an origin, or changing under the read): the caller asks the pool
process instead, which also publishes what it looked up.  Durability is
the pool's: the write lands in the page cache of the one data file, so the
pool's next flush or commit covers it.  Thread-safe.
"""

from __future__ import annotations

import os

from .core import UNMAPPED
from .device import pwrite_all
from .sharedmap import SharedMappingTable

__all__ = ["MirroredDevice"]


class MirroredDevice:
    """Reads and overwrites of device ``dev_id`` through the pool's shared mapping table."""

    def __init__(self, table: SharedMappingTable, data_fd: int, dev_id: int,
                 block_size: int) -> None:
        self.table = table
        self.data_fd = data_fd
        self.dev_id = dev_id
        self.bs = block_size

    def readinto(self, offset: int, buf: memoryview) -> bool:
        """Fill ``buf`` from ``offset`` if the table knows every block; else False."""
        bs, dev, table = self.bs, self.dev_id, self.table
        length = len(buf)
        first, last = offset // bs, (offset + length - 1) // bs
        if first == last:  # the common case
            hit = table.lookup(dev, first)
            if hit is None:
                return False
            token, block, _ = hit
            if block == UNMAPPED:
                buf[:] = bytes(length)
            elif os.preadv(self.data_fd, [buf], block * bs + offset % bs) != length:
                return False
            return table.still_valid(dev, first, token)
        hits = []
        for v in range(first, last + 1):
            hit = table.lookup(dev, v)
            if hit is None:
                return False
            hits.append(hit)
        pos = 0
        for i, (_, block, _) in enumerate(hits):
            boff = (offset + pos) % bs
            seg = min(bs - boff, length - pos)
            out = buf[pos:pos + seg]
            if block == UNMAPPED:
                out[:] = bytes(seg)
            elif os.preadv(self.data_fd, [out], block * bs + boff) != seg:
                return False
            pos += seg
        return all(table.still_valid(dev, first + i, token)
                   for i, (token, _, _) in enumerate(hits))

    def write(self, offset: int, data: memoryview) -> bool:
        """Write ``data`` at ``offset`` if every block is provisioned and unshared; else False."""
        bs = self.bs
        length = len(data)
        first, last = offset // bs, (offset + length - 1) // bs
        table = self.table
        blocks = table.begin_writing(self.dev_id, range(first, last + 1))
        if blocks is None:
            return False
        try:
            if first == last:  # the common case
                pwrite_all(self.data_fd, data, blocks[first] * bs + offset % bs)
                return True
            pos = 0
            while pos < length:
                v = (offset + pos) // bs
                boff = (offset + pos) % bs
                seg = min(bs - boff, length - pos)
                pwrite_all(self.data_fd, data[pos:pos + seg], blocks[v] * bs + boff)
                pos += seg
        finally:
            table.end_writing()
        return True
