"""Thin volume I/O with the kernel's semantics, at any byte offset and length.

* Unprovisioned blocks read as zeros, or from the external origin.
* A write to an unprovisioned block allocates one; unless the write covers
  the whole block, the rest is zeroed first (a punched hole on a sparse data
  file), copied from the external origin, or left as is with
  ``skip_block_zeroing``.
* A write to a shared block (mapping older than the device's last snapshot)
  copies the block first (``os.copy_file_range``) and remaps it.
* Discard unmaps the whole blocks inside the range; with passdown the pool
  punches holes for blocks nobody references any more, after the commit.
* ``flush`` commits; otherwise the pool commits at least once a second.

Data moves with pread/pwrite/preadv/pwritev on the data file; runs of
virtually and physically contiguous blocks become one system call.
"""

from __future__ import annotations

import errno
import os
from typing import TYPE_CHECKING

from ..errors import MetadataError, NoMetadataSpaceError, ThinpoolError
from .registry import VolumeRecord

if TYPE_CHECKING:
    from ..thin.metadata import Mapping
    from .engine import Pool


class VolumeRangeError(ThinpoolError):
    pass


def _copy_range(fd: int, src: int, dst: int, length: int) -> None:
    while length:
        n = os.copy_file_range(fd, fd, length, src, dst)
        if n <= 0:
            data = os.pread(fd, length, src)
            os.pwrite(fd, data.ljust(length, b"\0"), dst)
            return
        src, dst, length = src + n, dst + n, length - n


class ThinVolume:
    def __init__(self, pool: Pool, dev_id: int, record: VolumeRecord) -> None:
        self.pool = pool
        self.dev_id = dev_id
        self.size = record.size
        self.name = record.name
        self.bs = pool.block_size
        self._zeros = memoryview(bytes(self.bs))
        self.origin_fd = -1
        self.origin_size = 0
        if record.origin:
            try:
                self.origin_fd = os.open(record.origin, os.O_RDONLY | os.O_CLOEXEC)
            except OSError as e:
                pool._volume_closed(dev_id)
                raise ThinpoolError(f"external origin {record.origin}: {e.strerror}") from None
            self.origin_size = os.fstat(self.origin_fd).st_size
        self.closed = False

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.origin_fd >= 0:
                os.close(self.origin_fd)
            self.pool._volume_closed(self.dev_id)

    def __enter__(self) -> ThinVolume:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_range(self, offset: int, length: int) -> None:
        if self.closed:
            raise VolumeRangeError(f"volume {self.dev_id} is closed")
        if offset < 0 or length < 0:
            raise VolumeRangeError(f"negative offset or length ({offset}, {length})")
        if offset + length > self.size:
            raise VolumeRangeError(f"range {offset}+{length} is beyond the end of volume "
                                   f"{self.dev_id} ({self.size} bytes)")

    # -- reads --------------------------------------------------------------------------------
    def read(self, offset: int, length: int) -> bytes | bytearray:
        """The bytes at [offset, offset + length)."""
        self._check_range(offset, length)
        if length == 0:
            return b""
        bs, pool = self.bs, self.pool
        first, last = offset // bs, (offset + length - 1) // bs
        with pool.io.shared():
            with pool.lock:
                mapped = pool.md.data_blocks(self.dev_id, first, last + 1)
            if len(mapped) == last - first + 1:  # fully provisioned: one pread if contiguous
                d0 = mapped[first]
                if all(mapped[first + i] == d0 + i for i in range(1, last - first + 1)):
                    data = os.pread(pool.data_fd, length, d0 * bs + offset % bs)
                    if len(data) == length:
                        return data
            buf = bytearray(length)
            self._fill(offset, memoryview(buf), mapped, zeroed=True)
            return buf

    def readinto(self, offset: int, buf: memoryview) -> None:
        """Read len(buf) bytes at ``offset`` into ``buf`` (for servers with their own buffers)."""
        length = len(buf)
        self._check_range(offset, length)
        if length == 0:
            return
        bs, pool = self.bs, self.pool
        with pool.io.shared():
            with pool.lock:
                mapped = pool.md.data_blocks(self.dev_id, offset // bs,
                                             (offset + length - 1) // bs + 1)
            self._fill(offset, buf, mapped, zeroed=False)

    def _fill(self, offset: int, buf: memoryview, mapped: dict[int, int], zeroed: bool) -> None:
        """Copy [offset, offset + len(buf)) into ``buf``: runs of contiguous blocks, holes, origin."""
        bs, fd = self.bs, self.pool.data_fd
        length = len(buf)
        first, last = offset // bs, (offset + length - 1) // bs
        run_file = run_buf = run_len = 0
        pos = 0
        for v in range(first, last + 1):
            boff = (offset + pos) % bs
            seg = min(bs - boff, length - pos)
            d = mapped.get(v)
            if d is not None:
                file_off = d * bs + boff
                if run_len and run_file + run_len == file_off:
                    run_len += seg
                else:
                    if run_len:
                        self._pread(fd, buf[run_buf:run_buf + run_len], run_file)
                    run_file, run_buf, run_len = file_off, pos, seg
            else:
                if run_len:
                    self._pread(fd, buf[run_buf:run_buf + run_len], run_file)
                    run_len = 0
                self._read_unprovisioned(v * bs + boff, buf[pos:pos + seg], zeroed)
            pos += seg
        if run_len:
            self._pread(fd, buf[run_buf:run_buf + run_len], run_file)

    @staticmethod
    def _pread(fd: int, out: memoryview, offset: int) -> None:
        done = 0
        while done < len(out):
            n = os.preadv(fd, [out[done:]], offset + done)
            if n == 0:  # beyond the end of the data file: zeros
                out[done:] = bytes(len(out) - done)
                return
            done += n

    def _read_unprovisioned(self, voffset: int, out: memoryview, zeroed: bool) -> None:
        if self.origin_fd >= 0 and voffset < self.origin_size:
            n = min(len(out), self.origin_size - voffset)
            self._pread(self.origin_fd, out[:n], voffset)
            if n < len(out):
                out[n:] = self._zeros[:len(out) - n]
        elif not zeroed:
            out[:] = self._zeros[:len(out)]

    # -- writes -------------------------------------------------------------------------------
    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        mv = memoryview(data).cast("B")
        length = len(mv)
        self._check_range(offset, length)
        if length == 0:
            return
        pool = self.pool
        pool._require_writable()
        with pool.io.shared():
            with pool.lock:
                targets = self._place(offset, length)
            fd = pool.data_fd
            for file_off, p, n in targets:
                chunk = mv[p:p + n]
                while chunk:
                    written = os.pwrite(fd, chunk, file_off)
                    chunk, file_off = chunk[written:], file_off + written

    def _place(self, offset: int, length: int) -> list[tuple[int, int, int]]:
        """Where a write's bytes go: (data file offset, position in data, length) runs.

        Blocks that are unmapped or shared get new data blocks, mapped in one
        batch at the end (pool.lock held). If a new block had to wait for data
        space, the lock was released meanwhile and the mappings looked up may
        be stale: the new blocks are given back and the placement starts over.
        """
        pool, md = self.pool, self.pool.md
        while True:
            waits = pool.space_waits
            targets, fresh = self._plan(offset, length)
            if pool.space_waits == waits:
                break
            for _, d in fresh:
                md.data_sm.dec(d)
        if fresh:
            try:
                md.insert_many(self.dev_id, fresh)
            except NoMetadataSpaceError:
                pool._metadata_exhausted()  # aborts the transaction, pool goes read-only
                raise
            except MetadataError as e:
                pool._metadata_failed(e)
                raise
        return targets

    def _plan(self, offset: int, length: int
              ) -> tuple[list[tuple[int, int, int]], list[tuple[int, int]]]:
        """(write runs, [(virtual block, new data block)]) from one range lookup.

        New blocks are allocated and filled but not mapped; on an error they
        are given back before it propagates.
        """
        bs, md = self.bs, self.pool.md
        first, last = offset // bs, (offset + length - 1) // bs
        mapped = md.lookup_range(self.dev_id, first, last + 1)
        targets: list[tuple[int, int, int]] = []
        fresh: list[tuple[int, int]] = []
        pos = 0
        try:
            for v in range(first, last + 1):
                boff = (offset + pos) % bs
                seg = min(bs - boff, length - pos)
                m = mapped.get(v)
                if m is not None and not m.shared:
                    d = m.data_block
                else:
                    d = self._new_block(v, m, seg == bs)
                    fresh.append((v, d))
                file_off = d * bs + boff
                if targets and targets[-1][0] + targets[-1][2] == file_off:
                    f, p, n = targets[-1]
                    targets[-1] = (f, p, n + seg)
                else:
                    targets.append((file_off, pos, seg))
                pos += seg
        except BaseException:
            for _, d in fresh:
                md.data_sm.dec(d)
            raise
        return targets, fresh

    def _new_block(self, v: int, m: Mapping | None, full: bool) -> int:
        """A new data block for virtual block v, unmapped or shared as ``m`` (pool.lock held).

        Unless the write covers the whole block, the new block first gets the
        old contents: the shared block's, the external origin's, or zeros.
        """
        pool = self.pool
        new = pool.alloc_data_block()
        bs = self.bs
        try:
            if not full:
                if m is not None:
                    _copy_range(pool.data_fd, m.data_block * bs, new * bs, bs)
                elif self.origin_fd >= 0 and v * bs < self.origin_size:
                    block = os.pread(self.origin_fd, bs, v * bs)
                    os.pwrite(pool.data_fd, block.ljust(bs, b"\0"), new * bs)
                elif not pool.config.skip_block_zeroing:
                    pool._zero_data_block(new)
        except BaseException:
            pool.md.data_sm.dec(new)
            raise
        return new

    # -- discard / zeroes / flush ---------------------------------------------------------------
    def discard(self, offset: int, length: int) -> None:
        """Unmap every whole block inside the range (partial blocks are ignored)."""
        self._check_range(offset, length)
        if self.pool.config.ignore_discard:
            raise OSError(errno.EOPNOTSUPP, "discard is disabled on this pool (ignore_discard)")
        self._unmap(offset, length)

    def _unmap(self, offset: int, length: int) -> None:
        self.pool._require_writable()
        bs, pool = self.bs, self.pool
        lo = -(-offset // bs)
        hi = (offset + length) // bs
        if hi <= lo:
            return
        with pool.io.shared(), pool.lock:
            md = pool.md
            victims = [(v, m.data_block) for v, m in md.mappings(self.dev_id, lo, hi)]
            freed = []
            for v, d in victims:
                md.remove(self.dev_id, v)
                if md.data_block_count(d) == 0:
                    freed.append(d)
            pool.note_unmapped(freed)

    def write_zeroes(self, offset: int, length: int) -> None:
        """Make the range read as zeros: unmap whole blocks, write zeros at the edges."""
        self._check_range(offset, length)
        bs = self.bs
        if self.origin_fd >= 0:
            pos = offset
            while pos < offset + length:
                n = min(offset + length - pos, 16 * bs)
                self.write(pos, bytes(n))
                pos += n
            return
        lo = -(-offset // bs) * bs
        hi = (offset + length) // bs * bs
        if hi <= lo:
            self.write(offset, bytes(length))
            return
        if lo > offset:
            self.write(offset, bytes(lo - offset))
        self._unmap(lo, hi - lo)
        if offset + length > hi:
            self.write(hi, bytes(offset + length - hi))

    def flush(self) -> None:
        self.pool.commit()
