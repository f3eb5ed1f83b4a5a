"""The data path's shared state: metadata, data device, locks, allocation, commits.

``DataPath`` is what the kernel's thin-pool target keeps per pool: the open
metadata (``PoolMetadata``), the data device, the out-of-space policy, the
pool mode (rw, ro, out_of_data_space) and the commit machinery.  Thin
devices (``device.ThinDevice``) do their I/O through it.  The pool layer
above owns directories, configuration, the volume registry and messages.

Locks (see ``locks``): the provision gate (shared by everything that
changes mappings, exclusive for commits and device changes), one range lock
per open device, and ``md_lock`` around every use of the metadata (held
briefly, never across a data copy or a data sync).  The open devices' table
has a lock of its own, taken last (never held while taking another).

Open devices keep a cache of their mappings (``device`` module docstring),
at most ``MAP_CACHE_LIMIT`` entries for the whole pool; the data path keeps
the count and drops every cache when it would grow beyond that.

Worker processes (``share_mappings``): the caches are mirrored into a
``sharedmap.SharedMappingTable`` that other processes read, with no lock,
to serve reads and in-place overwrites of the same data file themselves.
The table never holds an entry the caches do not (every entry is published
when it is cached, withdrawn when it is dropped), and before a mapping
changes under a worker's feet the entry is withdrawn and the data path
waits for the workers' writes in flight on that device
(``SharedMappingTable.barrier``): when a discard unmaps a provisioned,
unshared block, when a snapshot of the device makes its blocks shared
(``quiesced``) and when a transaction is aborted.  Copy-on-write and
provisioning change only unmapped or shared blocks, which workers never
write, so the write path pays no barrier.  Workers read under the table's
sequence counters and retry when an entry changed under a read.

Commit and crash story: a commit first syncs the data device without any
lock (reads and writes go on), then closes the gate (in-flight provisioning
finishes, new provisioning waits), syncs again (little is left), commits
the metadata (superblock last) and punches the holes of discarded blocks
nobody references any more.  Every committed mapping therefore points at
data that was durable before the superblock naming it was written; a block
freed in a transaction is reused only after that transaction committed
(space-map rule) and, being unmapped under an exclusive range lock, is in
no I/O's hands any more.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterable, Iterator

from ..errors import DataPathError, MetadataError, NoDataSpaceError, NoMetadataSpaceError
from ..linux import libc
from ..thin.metadata import PoolMetadata
from .locks import RangeLock, SharedExclusiveLock

if TYPE_CHECKING:
    from ..thin.metadata import Mapping
    from .device import DeviceState, ThinDevice
    from .sharedmap import SharedMappingTable

log = logging.getLogger("thinpool.block")

MAP_CACHE_LIMIT = 1 << 17  # cached mappings (of all open devices together), ~22 MiB
UNMAPPED = 1 << 40  # the data block published for an unprovisioned block (kernel blocks < 2**40)
COMMIT_HEADROOM = 32  # metadata blocks a commit may need (bitmaps, index, details paths)
FALLOC_PUNCH = 0x01 | 0x02  # FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE


@dataclass(frozen=True)
class DataPolicy:
    """What the thin-pool table and thinpool's own knobs say about the data path."""

    block_size: int  # bytes
    skip_block_zeroing: bool = False
    ignore_discard: bool = False
    discard_passdown: bool = True
    error_if_no_space: bool = False
    no_space_timeout: float = 60.0
    low_water_mark: int = 0  # free data blocks


class DataPath:
    """Metadata plus data device of one pool, shared by all its thin devices.

    Thread safety: every method may be called from any thread.
    """

    def __init__(self, md: PoolMetadata, data_fd: int, data_is_file: bool, policy: DataPolicy,
                 read_only: bool, on_low_water: Callable[[int], None] | None = None) -> None:
        self.md = md
        self.data_fd = data_fd
        self.data_is_file = data_is_file
        self.policy = policy
        self.block_size = policy.block_size
        self.read_only = read_only
        self.on_low_water = on_low_water
        self.md_lock = threading.Lock()
        self.gate = SharedExclusiveLock()
        self.space = threading.Condition(threading.Lock())
        self.space_waits = 0  # times a writer waited for data space (for tests and status)
        self.generation = 0  # bumped when a transaction is aborted
        self.mode = "ro" if md.needs_check else "rw"  # the pool's mode, as status shows it
        self.meta_reserve = min(4096, md.tm.sm.nr_blocks // 10)
        self._low_water_armed = True
        self._pending_passdown: set[int] = set()
        self._states: dict[int, DeviceState] = {}  # open devices
        self._ranges: dict[int, tuple[RangeLock, int]] = {}  # dev id -> (lock, references)
        self._devices_lock = threading.Lock()
        self._cached_maps = 0  # entries of every open device's mapping cache (md_lock)
        self.shared_maps: SharedMappingTable | None = None

    def share_mappings(self, table: SharedMappingTable) -> None:
        """Mirror the mapping caches into ``table`` from now on (module docstring); call
        before any device is opened."""
        with self._devices_lock:
            if self._states:
                raise DataPathError(errno.EBUSY, "devices are open: mappings cannot be shared now")
        self.shared_maps = table

    # -- devices ---------------------------------------------------------------------------
    def open_device(self, dev_id: int, size: int, origin: str | None) -> ThinDevice:
        """A new handle on ``dev_id``; every handle of a device shares one ``DeviceState``."""
        from .device import DeviceState, ThinDevice

        with self._devices_lock:
            state = self._states.get(dev_id)
            if state is None:
                lock = self._ref_range(dev_id)
                try:
                    state = DeviceState(dev_id, size, origin, lock)
                except BaseException:
                    self._unref_range(dev_id)
                    raise
                self._states[dev_id] = state
            state.opens += 1
        return ThinDevice(self, state)

    def release_state(self, state: DeviceState) -> None:
        """A handle was closed; the last one closes the shared state."""
        with self._devices_lock:
            state.opens -= 1
            if state.opens:
                return
            del self._states[state.dev_id]
            self._unref_range(state.dev_id)
        with self.md_lock:
            self._drop_mappings(state)
        state.close()

    def is_open(self, dev_id: int) -> bool:
        with self._devices_lock:
            return dev_id in self._states

    def set_device_size(self, dev_id: int, size: int) -> None:
        """An open device's new virtual size (the registry changed it)."""
        with self._devices_lock:
            state = self._states.get(dev_id)
            if state is not None:
                state.size = size

    def _ref_range(self, dev_id: int) -> RangeLock:
        """The range lock of ``dev_id``, kept while anyone (a device, a quiesce) refers to it."""
        lock, refs = self._ranges.get(dev_id, (None, 0))
        if lock is None:
            lock = RangeLock()
        self._ranges[dev_id] = (lock, refs + 1)
        return lock

    def _unref_range(self, dev_id: int) -> None:
        lock, refs = self._ranges[dev_id]
        if refs == 1:
            del self._ranges[dev_id]
        else:
            self._ranges[dev_id] = (lock, refs - 1)

    # -- the mapping caches (md_lock held) ----------------------------------------------------
    def remember_mappings(self, state: DeviceState, first: int, last: int,
                          mapped: dict[int, Mapping]) -> None:
        """Cache what the metadata just said about blocks [first, last] of an open device.

        The caller holds md_lock and the blocks' range (so the answer stays
        true until it releases the range or changes a mapping).
        """
        if state.maps_generation != self.generation:
            self._drop_mappings(state)
            state.maps_generation = self.generation
        count = last - first + 1
        if self._cached_maps + count > MAP_CACHE_LIMIT:
            with self._devices_lock:
                states = list(self._states.values())
            for st in states:
                self._drop_mappings(st)
            if count > MAP_CACHE_LIMIT:
                return
        maps = state.maps
        before = len(maps)
        for v in range(first, last + 1):
            maps[v] = mapped.get(v)
        self._cached_maps += len(maps) - before
        if self.shared_maps is not None:
            self.publish_mappings(state, first, last, evict=False)

    @staticmethod
    def cache_holds(blocks: int) -> bool:
        """Whether the mapping caches could hold every mapping of a ``blocks``-block device."""
        return blocks <= MAP_CACHE_LIMIT

    def cache_has_room(self, count: int) -> bool:
        """Whether ``count`` more entries fit in the mapping caches (md_lock held)."""
        return self._cached_maps + count <= MAP_CACHE_LIMIT

    def publish_mappings(self, state: DeviceState, first: int, last: int,
                         evict: bool = True) -> None:
        """Put the cached mappings of blocks [first, last] into the shared table (md_lock
        held); with ``evict`` False only into slots no other block's entry holds (so that
        publishing many blocks does not push out what workers use)."""
        table = self.shared_maps
        if table is None or state.maps_generation != self.generation:
            return
        maps, dev_id = state.maps, state.dev_id
        zeros = state.origin_fd < 0  # without an external origin, unmapped reads as zeros
        for v in range(first, last + 1):
            if v in maps:
                m = maps[v]
                if m is not None:
                    table.publish(dev_id, v, m.data_block, not m.shared, evict)
                elif zeros:
                    table.publish(dev_id, v, UNMAPPED, False, evict)

    def remember_new(self, state: DeviceState, new: dict[int, Mapping]) -> None:
        """Cache mappings just made (md_lock held, their blocks' range held exclusive), so
        the next I/O on those blocks needs no lookup; skipped when the cache is full."""
        if state.maps_generation != self.generation or \
                self._cached_maps + len(new) > MAP_CACHE_LIMIT:
            return
        maps = state.maps
        before = len(maps)
        maps.update(new)
        self._cached_maps += len(maps) - before
        table = self.shared_maps
        if table is not None:
            for v, m in new.items():
                table.publish(state.dev_id, v, m.data_block, not m.shared, False)

    def forget_mappings(self, state: DeviceState, vblocks: Iterable[int]) -> None:
        """Blocks whose mapping is about to change (md_lock and their range exclusive held).

        With a shared table, a provisioned block's entry is withdrawn and, before this
        returns, the workers' writes in flight on the device have ended."""
        maps, table = state.maps, self.shared_maps
        wait = False
        for v in vblocks:
            if v in maps:
                wait = wait or maps[v] is not None
                del maps[v]
                self._cached_maps -= 1
                if table is not None:
                    table.withdraw(state.dev_id, v)
        if wait and table is not None:
            table.barrier(state.dev_id)

    def _drop_mappings(self, state: DeviceState) -> None:
        """Forget a device's whole cache (and withdraw it from the shared table, without
        waiting for workers).  The dict is replaced, never emptied in place: a reader may
        be looking at it without md_lock."""
        if self.shared_maps is not None:
            self.shared_maps.withdraw_device(state.dev_id, list(state.maps))
        self._cached_maps -= len(state.maps)
        state.maps = {}

    # -- modes -----------------------------------------------------------------------------
    def require_writable(self) -> None:
        if self.read_only:
            raise DataPathError(errno.EPERM, "the pool is open read-only")
        if self.mode == "ro":
            raise DataPathError(errno.EIO, "the pool is in read-only mode" + (
                " (needs_check is set; run 'thinpool check')" if self.md.needs_check else
                " (its metadata device is full; grow it with 'thinpool pool resize "
                "--metadata-size')"))

    def abort(self) -> None:
        """Forget the open transaction (md_lock held)."""
        self.md.abort()
        self.generation += 1
        self._withdraw_all()

    def _withdraw_all(self) -> None:
        """Every mapping may have changed (md_lock held): empty the shared table and wait
        for the workers' writes in flight."""
        if self.shared_maps is not None:
            self.shared_maps.withdraw_all()
            self.shared_maps.barrier(None)

    def metadata_exhausted(self) -> DataPathError:
        """The metadata device is full (md_lock held): abort, go read-only."""
        self.abort()
        self.mode = "ro"
        return DataPathError(errno.ENOSPC, "metadata device is full: pool switched to read-only "
                                           "(grow it with 'thinpool pool resize --metadata-size')")

    def metadata_failed(self, err: Exception) -> DataPathError:
        """A metadata operation hit corruption (md_lock held): needs_check, read-only."""
        self.md.set_needs_check()
        self.generation += 1
        self._withdraw_all()
        self.mode = "ro"
        return DataPathError(errno.EIO, "metadata operation failed; pool is read-only and "
                                        f"needs_check is set (run 'thinpool check'): {err}")

    # -- allocation (md_lock held) ---------------------------------------------------------
    def allocate(self, count: int) -> list[int]:
        """``count`` new data blocks (reference count 1 each), or none.

        Raises ``NoDataSpaceError`` when the data device is full (the caller
        decides whether to wait, see ``wait_for_space``), ``DataPathError``
        when the metadata device is nearly full (the pool goes read-only:
        what is written so far still commits, from the reserve).
        """
        msm = self.md.tm.sm
        if msm.nr_free <= max(self.meta_reserve // 2, COMMIT_HEADROOM) + count // 64:
            self.mode = "ro"
            raise DataPathError(errno.ENOSPC, "metadata device is nearly full: pool switched to "
                                              "read-only (grow it with 'thinpool pool resize "
                                              "--metadata-size')")
        blocks: list[int] = []
        try:
            if self.md.data_sm.nr_free < count:  # (blocks allocated and given back in this
                raise NoDataSpaceError(           # transaction are reused only after a commit)
                    f"data device has {self.md.data_sm.nr_free} free blocks, {count} needed")
            for _ in range(count):
                blocks.append(self.md.alloc_data_block())
        except NoDataSpaceError:
            for b in blocks:
                self.md.data_sm.dec(b)
            self.mode = "out_of_data_space"
            raise
        if self.mode == "out_of_data_space":
            self.mode = "rw"
        return blocks

    def give_back(self, blocks: list[int], generation: int) -> None:
        """Return allocated, never mapped blocks (md_lock held); no-op after an abort."""
        if generation == self.generation:
            for b in blocks:
                self.md.data_sm.dec(b)

    def low_water_check(self) -> None:
        """Fire the low-water callback once when free data blocks reach the mark (no lock held)."""
        free = self.md.data_sm.nr_free
        if self._low_water_armed and free <= self.policy.low_water_mark:
            self._low_water_armed = False
            log.warning("pool reached its low water mark: %d data blocks free", free)
            if self.on_low_water is not None:
                self.on_low_water(free)

    def wait_for_space(self, deadline: float | None) -> float:
        """Called with no lock held after the data device was found full.

        Returns the deadline to pass next time; raises ``DataPathError(ENOSPC)``
        with ``error_if_no_space`` or once ``no_space_timeout`` has passed.
        """
        if self.policy.error_if_no_space:
            raise DataPathError(errno.ENOSPC, "thin pool is out of data space")
        now = time.monotonic()
        if deadline is None:
            deadline = now + self.policy.no_space_timeout
            log.warning("pool is out of data space; queueing writes for %.0f s",
                        self.policy.no_space_timeout)
        if now >= deadline:
            raise DataPathError(errno.ENOSPC, "thin pool is out of data space (no resize within "
                                              "the timeout)")
        with self.space:
            self.space_waits += 1
            self.space.wait(deadline - now)
        return deadline

    def space_changed(self) -> None:
        """Data space may have grown or been freed: wake waiting writers."""
        self._low_water_armed = True
        with self.space:
            self.space.notify_all()

    # -- discards --------------------------------------------------------------------------
    def note_unmapped(self, blocks: list[int]) -> None:
        """Data blocks just unmapped by a discard (md_lock held): punched after the commit."""
        if self.policy.discard_passdown:
            self._pending_passdown.update(blocks)

    # -- commits ---------------------------------------------------------------------------
    def flush(self) -> None:
        """Make every write acknowledged so far durable (NBD FLUSH, fsync, FUA)."""
        if self.md.dirty or self._pending_passdown:
            self.commit()
        elif not self.read_only:
            os.fdatasync(self.data_fd)

    def commit(self) -> None:
        """Commit the open transaction (see the module docstring for the protocol)."""
        if self.read_only:
            return
        if self.md.dirty:
            os.fsync(self.data_fd)  # most of the data, with I/O going on
        with self.gate.exclusive():
            self.commit_gated()

    def commit_gated(self) -> None:
        """The commit proper; the caller holds the gate exclusive (not ``md_lock``)."""
        if self.read_only:
            return
        if self.md.needs_check:
            if self.md.dirty:
                raise DataPathError(errno.EIO, "needs_check is set: changes cannot be committed")
            return
        if not self.md.dirty and not self._pending_passdown:
            return
        os.fsync(self.data_fd)  # data before the mappings that reference it
        with self.md_lock:
            try:
                self.md.commit()
            except NoMetadataSpaceError:
                raise self.metadata_exhausted() from None
            except MetadataError as e:
                raise self.metadata_failed(e) from None
            freed = [b for b in sorted(self._pending_passdown)
                     if self.md.data_block_count(b) == 0]
            self._pending_passdown.clear()
        for b in freed:  # still gated: nobody can allocate these blocks meanwhile
            self.zero_block(b)

    @contextmanager
    def quiesced(self, dev_id: int | None = None) -> Iterator[None]:
        """Nothing changes mappings (and, with ``dev_id``, no I/O runs on that device).

        For device changes, resizes and metadata snapshots: the gate is held
        exclusive and, for ``dev_id``, the device's whole range (the kernel's
        "suspend the origin before a snapshot").  Inside, use ``md_lock``
        around metadata calls and ``commit_gated`` to commit.  Leaving drops
        ``dev_id``'s mapping cache (a snapshot changed which blocks it shares).
        """
        with self.gate.exclusive():
            if dev_id is None:
                yield
                return
            with self._devices_lock:
                lock = self._ref_range(dev_id)
            try:
                hold = lock.acquire(*RangeLock.WHOLE, exclusive=True)
                try:
                    if self.shared_maps is not None:  # workers stop writing in place first
                        with self.md_lock:
                            with self._devices_lock:
                                state = self._states.get(dev_id)
                            if state is not None:
                                self._drop_mappings(state)
                        self.shared_maps.barrier(dev_id)
                    yield
                finally:
                    with self.md_lock:  # a snapshot changed what its blocks share
                        with self._devices_lock:
                            state = self._states.get(dev_id)
                        if state is not None:
                            self._drop_mappings(state)
                    lock.release(hold)
            finally:
                with self._devices_lock:
                    self._unref_range(dev_id)

    # -- raw data blocks -------------------------------------------------------------------
    def zero_block(self, block: int) -> None:
        """Make a data block read as zeros (a hole in a sparse data file)."""
        bs = self.block_size
        if self.data_is_file:
            punch_hole(self.data_fd, block * bs, bs)
        else:
            os.pwrite(self.data_fd, bytes(bs), block * bs)


_fallocate = libc.function("fallocate", ctypes.c_int,
                           [ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong])


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Deallocate a range of a regular file so it reads as zeros (falls back to writing zeros)."""
    if _fallocate(fd, FALLOC_PUNCH, offset, length) != 0:
        if libc.last_errno() in (errno.EOPNOTSUPP, errno.ENOSYS):
            os.pwrite(fd, bytes(length), offset)
        else:
            raise libc.os_error()
