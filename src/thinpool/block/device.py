"""Thin device I/O with the kernel's semantics, at any byte offset and length.

* Unprovisioned blocks read as zeros, or from the external origin.
* A write to an unprovisioned block provisions one; unless the write covers
  the whole block, the rest is zeroed first (a punched hole on a sparse data
  file), copied from the external origin, or left as is with
  ``skip_block_zeroing``.  The mapping is made only after the data is in
  place, so no reader ever sees a half-made block.
* A write to a shared block (mapped before the device's last snapshot)
  copies the block first (``copy_file_range``, no lock of the pool held) and
  remaps it.
* Trim (discard) unmaps the whole blocks inside the range; with passdown the
  data path punches holes for blocks nobody references any more, after the
  commit.  Write-zeroes unmaps whole blocks too, or with ``may_trim=False``
  keeps them provisioned and zeroed.
* ``flush`` (and FUA) makes every acknowledged write of the pool durable.
* Writes to the data file are cut at 128 KiB boundaries (``PWRITE_MAX``).
  The page cache sizes a file's folios by the writes that create them, and
  a small write into a large folio costs the kernel more: ext4 walks every
  buffer of the folio under the file's inode lock, which every writer of
  the data file takes. The walk misses the CPU's caches once the written
  data outgrows them. Measured here on ext4 (fio, random 4 KiB pwrites into
  a 4 GiB file first written sequentially in pieces of the size given): 83k
  writes/s into 256 KiB folios, 120-149k into 128 KiB, 129-163k into 64 KiB,
  and two writers do no more than one. Sequential writes cost 0.21 s of CPU
  per GiB in 256 KiB pieces, 0.24 in 128 KiB, 0.29 in 64 KiB. Through the
  server (8 clients' random writes on 8 filled 512 MiB volumes, two
  same-run A/Bs): 28-35 µs of server CPU per write with 128 KiB pieces
  against 35-42 with 256 KiB; sequential writes took about 7% more server
  CPU at the same speed (docs/benchmarks.md).

Concurrency: reads and overwrites of provisioned, unshared blocks hold their
block range shared and the metadata lock only for the lookup; everything
that changes a mapping holds the range exclusive plus the provision gate
(``locks``).  Unrelated blocks and devices run in parallel.

Mapping cache: what the metadata said about a device's blocks (mapped, with
sharing, or unmapped) is kept in its ``DeviceState.maps``, so most lookups
are a dict get with no metadata lock (and do not wait for a commit that
holds it).  Every mapping of a device changes only through its own handles
with the block range held exclusive, which drop the blocks' entries (and cache
the mappings a provisioning just made); entries are added with the metadata
lock held by a thread that holds the blocks' range, so nobody can change
those mappings meanwhile.  An aborted
transaction (``DataPath.generation``) and a snapshot of the device (its
sharing changes; ``DataPath.quiesced``) drop the whole cache.  A miss looks up
the aligned ``MISS_WINDOW`` blocks around it in one walk of the metadata,
holding their range shared for it (only if that does not wait, and only on
devices whose every mapping the cache could hold): a client that
opens a filled volume warms its cache in one lookup per 64 blocks instead of
one per block.  Measured (one client, random 4 KiB writes on a freshly opened,
filled 4 GiB volume): 17.5 µs of server CPU per write against 20-21.6 with
lookups of single blocks (docs/benchmarks.md).

A ``ThinDevice`` is one opener's handle; every handle of a device in the
process shares its range lock and external origin, so a flush on one
handle covers writes acknowledged on all (NBD's multi-conn).  Handles are
thread-safe.  Errors are ``DataPathError`` with an errno.
"""

from __future__ import annotations

import errno
import os
import threading
from typing import TYPE_CHECKING, Callable, Sequence

from ..errors import DataPathError, MetadataError, NoDataSpaceError, NoMetadataSpaceError
from ..thin.metadata import Mapping
from .locks import RangeLock

if TYPE_CHECKING:
    from .core import DataPath

HOLE = 1  # unprovisioned (NBD_STATE_HOLE)
ZERO = 2  # reads as zeros (NBD_STATE_ZERO)
MAX_EXTENT_BLOCKS = 1 << 16  # blocks looked at per extents() call
PWRITE_MAX = 128 << 10  # data-file writes are cut at this boundary (module docstring)
DISCARD_BATCH = 1024  # blocks unmapped per metadata-lock hold
MISS_WINDOW = 64  # blocks around a mapping-cache miss looked up at once (``_mappings``)
PUBLISH_WINDOW = 256  # blocks around a worker's miss published at once (``publish``)
PUBLISH_STEP = 64  # ... per metadata-lock hold (3.8 µs per block here)


class RangeError(DataPathError):
    """An offset or length outside the device."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.EINVAL, message)


class DeviceState:
    """What all handles of one open device share.

    ``maps`` is the mapping cache (module docstring): virtual block -> the
    ``Mapping`` the metadata holds, or None for an unmapped block; valid
    while ``maps_generation`` equals the data path's generation.  It is
    changed only through ``DataPath.remember_mappings`` / ``forget_mappings``
    (metadata lock held).
    """

    def __init__(self, dev_id: int, size: int, origin: str | None, ranges: RangeLock) -> None:
        self.dev_id = dev_id
        self.size = size
        self.ranges = ranges
        self.opens = 0
        self.maps: dict[int, Mapping | None] = {}
        self.maps_generation = 0
        self.origin_fd = -1
        self.origin_size = 0
        if origin:
            try:
                self.origin_fd = os.open(origin, os.O_RDONLY | os.O_CLOEXEC)
            except OSError as e:
                raise DataPathError(e.errno or errno.EIO,
                                    f"external origin {origin}: {e.strerror}") from None
            self.origin_size = os.fstat(self.origin_fd).st_size

    def close(self) -> None:
        if self.origin_fd >= 0:
            os.close(self.origin_fd)
            self.origin_fd = -1


def _copy_range(fd: int, src: int, dst: int, length: int) -> None:
    while length:
        n = os.copy_file_range(fd, fd, length, src, dst)
        if n <= 0:
            data = os.pread(fd, length, src)
            os.pwrite(fd, data.ljust(length, b"\0"), dst)
            return
        src, dst, length = src + n, dst + n, length - n


def pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    """pwrite all of ``data``, in pieces that do not cross a ``PWRITE_MAX`` boundary of the file."""
    length = len(data)
    if length <= PWRITE_MAX - offset % PWRITE_MAX:  # the common case: one piece
        n = os.pwrite(fd, data, offset)
        if n == length:
            return
        data, offset = data[n:], offset + n
    while data:
        n = os.pwrite(fd, data[:PWRITE_MAX - offset % PWRITE_MAX], offset)
        data, offset = data[n:], offset + n


def _pread_into(fd: int, out: memoryview, offset: int) -> None:
    done = 0
    while done < len(out):
        n = os.preadv(fd, [out[done:]], offset + done)
        if n == 0:  # beyond the end of the file: zeros
            out[done:] = bytes(len(out) - done)
            return
        done += n


class ThinDevice:
    """One handle on a thin device (see the module docstring)."""

    def __init__(self, dp: DataPath, state: DeviceState) -> None:
        self.dp = dp
        self.state = state
        self.dev_id = state.dev_id
        self.bs = dp.block_size
        self.closed = False
        self._close_lock = threading.Lock()

    @property
    def size(self) -> int:
        return self.state.size

    @property
    def has_origin(self) -> bool:
        return self.state.origin_fd >= 0

    @property
    def can_discard(self) -> bool:
        return not self.dp.policy.ignore_discard

    def close(self) -> None:
        with self._close_lock:
            if self.closed:
                return
            self.closed = True
        self.dp.release_state(self.state)

    def __enter__(self) -> ThinDevice:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check(self, offset: int, length: int) -> None:
        if self.closed:
            raise DataPathError(errno.EBADF, f"volume {self.dev_id} is closed")
        if offset < 0 or length < 0:
            raise RangeError(f"negative offset or length ({offset}, {length})")
        if offset + length > self.state.size:
            raise RangeError(f"range {offset}+{length} is beyond the end of volume "
                             f"{self.dev_id} ({self.state.size} bytes)")

    # -- reads --------------------------------------------------------------------------------
    def read(self, offset: int, length: int) -> bytes | bytearray:
        """The bytes at [offset, offset + length)."""
        self._check(offset, length)
        if length == 0:
            return b""
        bs, dp, ranges = self.bs, self.dp, self.state.ranges
        first, last = offset // bs, (offset + length - 1) // bs
        hold = ranges.acquire(first, last, False)
        try:
            mapped = self._mappings(first, last)
            if len(mapped) == last - first + 1:  # fully provisioned: one pread if contiguous
                d0 = mapped[first].data_block
                if all(mapped[first + i].data_block == d0 + i for i in range(1, last - first + 1)):
                    data = os.pread(dp.data_fd, length, d0 * bs + offset % bs)
                    if len(data) == length:
                        return data
            buf = bytearray(length)
            self._fill(offset, memoryview(buf), mapped, zeroed=True)
            return buf
        finally:
            ranges.release(hold)

    def readinto(self, offset: int, buf: memoryview) -> None:
        """Read len(buf) bytes at ``offset`` into ``buf`` (for servers with their own buffers)."""
        length = len(buf)
        self._check(offset, length)
        if length == 0:
            return
        bs, dp, ranges = self.bs, self.dp, self.state.ranges
        first, last = offset // bs, (offset + length - 1) // bs
        hold = ranges.acquire(first, last, False)
        try:
            self._fill(offset, buf, self._mappings(first, last), zeroed=False)
        finally:
            ranges.release(hold)

    def _fill(self, offset: int, buf: memoryview, mapped: dict[int, Mapping],
              zeroed: bool) -> None:
        """Copy [offset, offset + len(buf)) into ``buf``: runs of contiguous blocks, holes, origin."""
        bs, fd = self.bs, self.dp.data_fd
        length = len(buf)
        first, last = offset // bs, (offset + length - 1) // bs
        run_file = run_buf = run_len = 0
        pos = 0
        for v in range(first, last + 1):
            boff = (offset + pos) % bs
            seg = min(bs - boff, length - pos)
            m = mapped.get(v)
            if m is not None:
                file_off = m.data_block * bs + boff
                if run_len and run_file + run_len == file_off:
                    run_len += seg
                else:
                    if run_len:
                        _pread_into(fd, buf[run_buf:run_buf + run_len], run_file)
                    run_file, run_buf, run_len = file_off, pos, seg
            else:
                if run_len:
                    _pread_into(fd, buf[run_buf:run_buf + run_len], run_file)
                    run_len = 0
                self._read_unprovisioned(v * bs + boff, buf[pos:pos + seg], zeroed)
            pos += seg
        if run_len:
            _pread_into(fd, buf[run_buf:run_buf + run_len], run_file)

    def _read_unprovisioned(self, voffset: int, out: memoryview, zeroed: bool) -> None:
        st = self.state
        if st.origin_fd >= 0 and voffset < st.origin_size:
            n = min(len(out), st.origin_size - voffset)
            _pread_into(st.origin_fd, out[:n], voffset)
            if n < len(out):
                out[n:] = bytes(len(out) - n)
        elif not zeroed:
            out[:] = bytes(len(out))

    # -- mapping lookups (the caller holds the blocks' range) --------------------------------
    def _cached(self, first: int, last: int) -> dict[int, Mapping] | None:
        """The mapped blocks of [first, last] from the cache, or None unless it knows all."""
        st = self.state
        if st.maps_generation != self.dp.generation:
            return None
        maps = st.maps
        if first == last:
            if first not in maps:
                return None
            m = maps[first]
            return {} if m is None else {first: m}
        out: dict[int, Mapping] = {}
        for v in range(first, last + 1):
            if v not in maps:
                return None
            m = maps[v]
            if m is not None:
                out[v] = m
        return out

    def _lookup(self, first: int, last: int) -> dict[int, Mapping]:
        """The mapped blocks of [first, last] from the metadata, remembered (md_lock held)."""
        mapped = self.dp.md.lookup_range(self.dev_id, first, last + 1)
        self.dp.remember_mappings(self.state, first, last, mapped)
        return mapped

    def _mappings(self, first: int, last: int) -> dict[int, Mapping]:
        """virtual block -> Mapping for the mapped blocks of [first, last] (range held).

        A cache miss looks up and caches the aligned ``MISS_WINDOW`` around the
        range when the cache could hold the whole device (else, under random
        access, windows would only fill it sooner and cost more per miss), has
        room for the window, and the window's range can be held shared without
        waiting; otherwise just the range.
        """
        mapped = self._cached(first, last)
        if mapped is not None:
            return mapped
        dp, ranges = self.dp, self.state.ranges
        blocks = -(-self.state.size // self.bs)
        lo = first - first % MISS_WINDOW
        hi = min(max(last, lo + MISS_WINDOW - 1), blocks - 1)
        window = ranges.try_acquire(lo, hi, False) \
            if (lo, hi) != (first, last) and dp.cache_holds(blocks) else None
        try:
            with dp.md_lock:
                if window is None or not dp.cache_has_room(hi - lo + 1):
                    return self._lookup(first, last)
                around = self._lookup(lo, hi)
        finally:
            if window is not None:
                ranges.release(window)
        if first == last:
            m = around.get(first)
            return {} if m is None else {first: m}
        return {v: m for v, m in around.items() if first <= v <= last}

    # -- writes -------------------------------------------------------------------------------
    def write(self, offset: int, data: bytes | bytearray | memoryview, fua: bool = False) -> bool:
        """Write ``data`` at ``offset``; with ``fua`` it is durable when this returns.  True
        when it was an overwrite in place (every block provisioned and unshared)."""
        mv = memoryview(data).cast("B")
        length = len(mv)
        self._check(offset, length)
        if length == 0:
            return True
        dp = self.dp
        dp.require_writable()
        bs, ranges = self.bs, self.state.ranges
        first, last = offset // bs, (offset + length - 1) // bs
        hold = ranges.acquire(first, last, False)
        try:
            in_place = self._write_in_place(offset, mv, first, last)
        finally:
            ranges.release(hold)
        if not in_place:
            self._provision(first, last, lambda mapped, fresh: self._write_new(
                ((offset, mv),), mapped, fresh))
        if fua:
            dp.flush()
        return in_place

    def write_many(self, writes: Sequence[tuple[int, memoryview]]) -> None:
        """Do the writes (offset, data), in order, as one batch (no FUA).

        Overwrites of provisioned, unshared blocks go in place; the rest of the
        batch takes the provision gate and one exclusive range spanning all of
        it once, allocates every new block at once and maps them with one
        metadata insert.  On an error nothing new is mapped, but any write may
        have been done in place: the caller learns which write failed by
        doing them again one by one (writes are idempotent).  Short of data
        space for the whole batch, its writes that need new blocks are done
        one by one (each waits for space as ``write`` does).
        """
        bs = self.bs
        lo, hi = 1 << 64, -1
        for offset, data in writes:
            self._check(offset, len(data))
            lo, hi = min(lo, offset // bs), max(hi, (offset + len(data) - 1) // bs)
        writes = [(offset, data) for offset, data in writes if len(data)]
        if not writes:
            return
        self.dp.require_writable()
        ranges = self.state.ranges
        rest: list[tuple[int, memoryview]] = []
        hold = ranges.acquire(lo, hi, False)
        try:
            for offset, data in writes:
                if rest or not self._write_in_place(offset, data, offset // bs,
                                                    (offset + len(data) - 1) // bs):
                    rest.append((offset, data))  # keeps the order of overlapping writes
        finally:
            ranges.release(hold)
        if rest:
            first = min(offset // bs for offset, _ in rest)
            last = max((offset + len(data) - 1) // bs for offset, data in rest)
            if not self._provision(first, last,
                                   lambda mapped, fresh: self._write_new(rest, mapped, fresh),
                                   [(offset // bs, (offset + len(data) - 1) // bs)
                                    for offset, data in rest]):
                for offset, data in rest:  # out of data space: each waits on its own
                    self.write(offset, data)

    def publish(self, offset: int, length: int, window: int = PUBLISH_WINDOW) -> None:
        """Put the mappings of the range into the data path's shared table, and those of the
        rest of its aligned ``window`` of blocks into free slots: for a worker process that
        did not find them there (so a worker warms up in one request per window, not per
        block).  Nothing without a table."""
        dp = self.dp
        self._check(offset, length)
        if dp.shared_maps is None or length == 0:
            return
        first, last = offset // self.bs, (offset + length - 1) // self.bs
        lo, hi = first, last
        if window > 1:
            lo = first - first % window
            hi = max(last, min(lo + window, -(-self.state.size // self.bs)) - 1)
        for start in range(lo, hi + 1, PUBLISH_STEP):  # md_lock held for one step at a time
            end = min(start + PUBLISH_STEP, hi + 1) - 1
            hold = self.state.ranges.acquire(start, end, False)
            try:
                with dp.md_lock:
                    if self._cached(start, end) is None:
                        self._lookup(start, end)  # remembers, and publishes into free slots
                    else:
                        dp.publish_mappings(self.state, start, end, evict=False)
                    if start <= last and end >= first:
                        dp.publish_mappings(self.state, max(start, first), min(end, last))
            finally:
                self.state.ranges.release(hold)

    def _write_in_place(self, offset: int, mv: memoryview, first: int, last: int) -> bool:
        """Write ``mv`` if all its blocks are provisioned and unshared (range held); else False."""
        if first == last:  # the common case: one block
            st = self.state
            m = st.maps.get(first) if st.maps_generation == self.dp.generation else None
            if m is None:
                m = self._mappings(first, first).get(first)
                if m is None:
                    return False
            if m.shared:
                return False
            pwrite_all(self.dp.data_fd, mv, m.data_block * self.bs + offset % self.bs)
            return True
        mapped = self._mappings(first, last)
        if len(mapped) != last - first + 1 or any(m.shared for m in mapped.values()):
            return False
        self._pwrite_runs(offset, mv, {v: m.data_block for v, m in mapped.items()})
        return True

    def _pwrite_runs(self, offset: int, mv: memoryview, blocks: dict[int, int]) -> None:
        """pwrite ``mv`` at volume ``offset`` through the block map, contiguous runs at once."""
        bs, fd = self.bs, self.dp.data_fd
        length = len(mv)
        first, last = offset // bs, (offset + length - 1) // bs
        run_file = run_pos = run_len = pos = 0
        for v in range(first, last + 1):
            boff = (offset + pos) % bs
            seg = min(bs - boff, length - pos)
            file_off = blocks[v] * bs + boff
            if run_len and run_file + run_len == file_off:
                run_len += seg
            else:
                if run_len:
                    pwrite_all(fd, mv[run_pos:run_pos + run_len], run_file)
                run_file, run_pos, run_len = file_off, pos, seg
            pos += seg
        if run_len:
            pwrite_all(fd, mv[run_pos:run_pos + run_len], run_file)

    def _write_new(self, writes: Sequence[tuple[int, memoryview]], mapped: dict[int, Mapping],
                   fresh: dict[int, int]) -> None:
        """Fill the new blocks' parts the writes do not cover, then do the writes in order."""
        bs, dp = self.bs, self.dp
        for v, new in fresh.items():
            vlo, vhi = v * bs, (v + 1) * bs
            if any(offset <= vlo and offset + len(mv) >= vhi for offset, mv in writes):
                continue  # a write covers the whole block
            old = mapped.get(v)
            if old is not None:  # copy-on-write of a shared block
                _copy_range(dp.data_fd, old.data_block * bs, new * bs, bs)
            elif self.state.origin_fd >= 0 and vlo < self.state.origin_size:
                block = os.pread(self.state.origin_fd, bs, vlo)
                pwrite_all(dp.data_fd, memoryview(block.ljust(bs, b"\0")), new * bs)
            elif not dp.policy.skip_block_zeroing:
                dp.zero_block(new)
        blocks = {v: m.data_block for v, m in mapped.items()}
        blocks.update(fresh)
        for offset, mv in writes:
            self._pwrite_runs(offset, mv, blocks)

    def _provision(self, first: int, last: int,
                   act: Callable[[dict[int, Mapping], dict[int, int]], None],
                   spans: list[tuple[int, int]] | None = None) -> bool:
        """Run ``act(mapped, fresh)`` with a new data block for every unmapped or shared
        block of [first, last] (or only of the block ``spans`` inside it), then map the
        new blocks; True when done.

        Holds the provision gate shared and the range [first, last] exclusive
        throughout.  Out of data space, everything is given back and released
        before waiting (so a resize or a delete can run), then it starts over;
        with ``spans`` (a batch) it returns False instead of waiting.
        """
        dp, ranges = self.dp, self.state.ranges
        batch = spans is not None
        if spans is None:
            spans = [(first, last)]
        deadline: float | None = None
        while True:
            with dp.gate.shared():
                hold = ranges.acquire(first, last, True)
                try:
                    dp.require_writable()
                    with dp.md_lock:
                        gen = dp.generation
                        mapped: dict[int, Mapping] = {}
                        need_set: set[int] = set()
                        for lo, hi in spans:
                            got = self._cached(lo, hi)
                            if got is None:
                                got = self._lookup(lo, hi)
                            mapped.update(got)
                            need_set.update(v for v in range(lo, hi + 1)
                                            if (m := got.get(v)) is None or m.shared)
                        need = sorted(need_set)
                        try:
                            fresh: dict[int, int] | None = dict(zip(need, dp.allocate(len(need))))
                        except NoDataSpaceError:
                            fresh = None
                    if fresh is not None:
                        self._act_and_map(act, mapped, fresh, gen)
                finally:
                    ranges.release(hold)
            if fresh is not None:
                if fresh:
                    dp.low_water_check()
                return True
            if batch:
                return False
            deadline = dp.wait_for_space(deadline)

    def _act_and_map(self, act: Callable[[dict[int, Mapping], dict[int, int]], None],
                     mapped: dict[int, Mapping], fresh: dict[int, int], gen: int) -> None:
        dp = self.dp
        done = False
        try:
            act(mapped, fresh)
            if fresh:
                with dp.md_lock:
                    if gen != dp.generation:
                        raise DataPathError(errno.EIO, "the pool's transaction was aborted "
                                                       "meanwhile; the write was not mapped")
                    dp.forget_mappings(self.state, fresh)
                    try:
                        dp.md.insert_many(self.dev_id, sorted(fresh.items()))
                    except NoMetadataSpaceError:
                        raise dp.metadata_exhausted() from None
                    except MetadataError as e:
                        raise dp.metadata_failed(e) from None
                    now = dp.md.time  # a new mapping is as new as the device's last snapshot
                    dp.remember_new(self.state, {v: Mapping(d, now, False)
                                                 for v, d in fresh.items()})
            done = True
        except OSError as e:
            if isinstance(e, DataPathError):
                raise
            raise DataPathError(e.errno or errno.EIO, f"data device: {e.strerror}") from None
        finally:
            if not done and fresh:
                with dp.md_lock:
                    dp.give_back(list(fresh.values()), gen)

    # -- trim / zeroes / flush --------------------------------------------------------------------
    def trim(self, offset: int, length: int, fua: bool = False) -> None:
        """Discard: unmap every whole block inside the range (partial blocks are kept)."""
        self._check(offset, length)
        if self.dp.policy.ignore_discard:
            raise DataPathError(errno.EOPNOTSUPP,
                                "discard is disabled on this pool (ignore_discard)")
        self._unmap(-(-offset // self.bs), (offset + length) // self.bs)
        if fua:
            self.dp.flush()

    discard = trim

    def _unmap(self, lo: int, hi: int) -> None:
        """Unmap the blocks [lo, hi)."""
        if hi <= lo:
            return
        dp, md = self.dp, self.dp.md
        dp.require_writable()
        with dp.gate.shared():
            hold = self.state.ranges.acquire(lo, hi - 1, True)
            try:
                for start in range(lo, hi, DISCARD_BATCH):
                    end = min(hi, start + DISCARD_BATCH)
                    with dp.md_lock:
                        victims = [(v, m.data_block) for v, m in md.mappings(self.dev_id, start,
                                                                             end)]
                        dp.forget_mappings(self.state, [v for v, _ in victims])
                        freed = []
                        try:
                            for v, d in victims:
                                md.remove(self.dev_id, v)
                                if md.data_block_count(d) == 0:
                                    freed.append(d)
                        except NoMetadataSpaceError:
                            raise dp.metadata_exhausted() from None
                        except MetadataError as e:
                            raise dp.metadata_failed(e) from None
                        dp.note_unmapped(freed)
            finally:
                self.state.ranges.release(hold)

    def write_zeroes(self, offset: int, length: int, may_trim: bool = True,
                     fast_only: bool = False, fua: bool = False) -> None:
        """Make the range read as zeros.

        With ``may_trim`` whole blocks are unmapped; without it they stay
        provisioned (zeroed by punching holes, no data written).  A device
        with an external origin has to write real zeros (its unmapped blocks
        read the origin), which ``fast_only`` refuses with EOPNOTSUPP.
        """
        self._check(offset, length)
        if length == 0:
            return
        bs = self.bs
        if self.has_origin:
            if fast_only:
                raise DataPathError(errno.EOPNOTSUPP, "zeroing a volume with an external "
                                                      "origin means writing zeros")
            zeros = memoryview(bytes(min(length, 16 * bs)))
            pos = offset
            while pos < offset + length:
                n = min(offset + length - pos, len(zeros))
                self.write(pos, zeros[:n])
                pos += n
        else:
            lo = -(-offset // bs)
            hi = (offset + length) // bs
            if hi <= lo:
                self._zero_partial(offset, length)
            else:
                if lo * bs > offset:
                    self._zero_partial(offset, lo * bs - offset)
                if may_trim:
                    self._unmap(lo, hi)
                else:
                    self._provision(lo, hi - 1, self._zero_blocks)
                if offset + length > hi * bs:
                    self._zero_partial(hi * bs, offset + length - hi * bs)
        if fua:
            self.dp.flush()

    def _zero_partial(self, offset: int, length: int) -> None:
        """Zero parts of blocks: each provisioned block's part is written with zeros; an
        unprovisioned block reads as zeros already (no origin here)."""
        bs, end, pos = self.bs, offset + length, offset
        while pos < end:
            v = pos // bs
            piece_end = min(end, (v + 1) * bs)
            with self.dp.md_lock:
                mapped = self.dp.md.data_blocks(self.dev_id, v, v + 1)
            if mapped:
                self.write(pos, bytes(piece_end - pos))
            pos = piece_end

    def _zero_blocks(self, mapped: dict[int, Mapping], fresh: dict[int, int]) -> None:
        for d in fresh.values():
            self.dp.zero_block(d)
        for v, m in mapped.items():
            if v not in fresh:
                self.dp.zero_block(m.data_block)

    def flush(self) -> None:
        """Make every write acknowledged so far (on any handle of the pool) durable."""
        self.dp.flush()

    # -- allocation map ----------------------------------------------------------------------------
    def extents(self, offset: int, length: int) -> list[tuple[int, int]]:
        """(length, flags) runs from ``offset`` covering at least its first byte.

        Flags: ``HOLE`` for unprovisioned blocks, plus ``ZERO`` where they
        read as zeros (beyond any external origin).  At most
        ``MAX_EXTENT_BLOCKS`` blocks are looked at per call.
        """
        self._check(offset, length)
        if length == 0:
            return []
        bs = self.bs
        first = offset // bs
        last = min((offset + length - 1) // bs, first + MAX_EXTENT_BLOCKS - 1)
        with self.dp.md_lock:
            mapped = self.dp.md.data_blocks(self.dev_id, first, last + 1)
        origin_blocks = -(-self.state.origin_size // bs) if self.has_origin else 0
        out: list[tuple[int, int]] = []
        end = min(offset + length, (last + 1) * bs)
        for v in range(first, last + 1):
            flags = 0 if v in mapped else (HOLE if v < origin_blocks else HOLE | ZERO)
            lo = max(offset, v * bs)
            hi = min(end, (v + 1) * bs)
            if out and out[-1][1] == flags:
                out[-1] = (out[-1][0] + hi - lo, flags)
            else:
                out.append((hi - lo, flags))
        return out

    def cache(self, offset: int, length: int) -> None:
        """Hint that the range will be read soon (reads mapped data into the page cache)."""
        self._check(offset, length)
        if length == 0:
            return
        bs = self.bs
        first, last = offset // bs, (offset + length - 1) // bs
        with self.dp.md_lock:
            mapped = self.dp.md.data_blocks(self.dev_id, first, last + 1)
        for d in mapped.values():
            os.posix_fadvise(self.dp.data_fd, d * bs, bs, os.POSIX_FADV_WILLNEED)

    def copy_out(self, fd: int) -> int:
        """Copy the device into file ``fd`` at the same offsets, only provisioned or origin
        data (the file stays sparse elsewhere); returns bytes copied."""
        bs, dp, size = self.bs, self.dp, self.state.size
        hold = self.state.ranges.acquire(*RangeLock.WHOLE, exclusive=False)
        try:
            with dp.md_lock:
                mapped = [(v, m.data_block) for v, m in dp.md.mappings(self.dev_id)]
            copied = 0
            st = self.state
            if st.origin_fd >= 0:
                have = {v for v, _ in mapped}
                limit = min(st.origin_size, size)
                for v in range(-(-limit // bs)):
                    if v in have:
                        continue
                    data = os.pread(st.origin_fd, min(bs, limit - v * bs), v * bs)
                    if data.count(0) != len(data):
                        os.pwrite(fd, data, v * bs)
                        copied += len(data)
            for v, d in mapped:
                n = min(bs, size - v * bs)
                if n <= 0:
                    continue
                src, dst, left = d * bs, v * bs, n
                while left:
                    got = os.copy_file_range(dp.data_fd, fd, left, src, dst)
                    if got <= 0:
                        os.pwrite(fd, os.pread(dp.data_fd, left, src).ljust(left, b"\0"), dst)
                        break
                    src, dst, left = src + got, dst + got, left - got
                copied += n
            return copied
        finally:
            self.state.ranges.release(hold)
