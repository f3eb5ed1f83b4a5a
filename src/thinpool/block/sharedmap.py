"""A table of block mappings in shared memory: one writer process, many reader processes.

The pool process (the *writer*) publishes what its metadata says about
blocks of open thin devices: virtual block -> data block, and whether the
block is *exclusive* (provisioned and not shared with a snapshot).  Worker
processes (the *readers*) look mappings up without asking the pool: a READ
preads the data block itself, an overwrite of exclusive blocks pwrites in
place.  Everything else goes to the pool.

Layout (one memfd, native byte order, every field 8-byte aligned)::

    header, 64 bytes:  magic b"TPSMAP\\0\\1" | version u32 | writers u32 | slots u64 | epoch u64 | 0...
    slot i, 32 bytes at 64 + 32*i:  seq u64 | key u64 | value u64 | epoch u64
        key   = dev_id << 40 | vblock        (dev_id < 2**24, vblock < 2**40)
        value = data_block << 2 | exclusive << 1 | 1    (0: empty slot)
    activity area, at the first page boundary after the slots:
        claimed u64 | word 1 .. word ``writers``, u64 each
        word = ops << 25 | dev_id << 1 | 1   while its thread is writing (``begin_writing``)
               ops << 25                      otherwise (``ops`` counts its writings)

The table is direct-mapped: (dev_id, vblock) lives in the single slot
``slot_offset`` names (consecutive blocks of a device in consecutive slots),
and publishing evicts whatever was there.  A slot's entry counts only while
its epoch equals the header's: ``withdraw_all`` bumps the header's epoch.

Seqlock.  The writer changes a slot as: seq made odd, then the fields, then
seq made even (separate stores, in that order).  A reader loads seq, then
the fields (the slot's epoch must equal the header's), and after using the
answer loads the slot's epoch, the header's epoch and seq again
(``still_valid``; the token is the seq): the epochs equal and seq unchanged
mean no store of the writer to that slot, and no ``withdraw_all``, came
between the first load and the last, so what it read was one consistent
entry, current all along.  This is correct because x86-64 (TSO) keeps
loads in order with loads and stores in order with stores; weaker memory models would need fences that Python cannot
issue, so ``create`` and ``attach`` refuse other architectures.  Every
access is one aligned 8-byte load or store, made through a
``memoryview.cast("Q")`` of the mapping (CPython copies a "Q" item with a
fixed-size memcpy: one instruction, never torn).  Not ``struct.pack_into``:
it zeroes its whole target before packing, so a reader could see a
sequence (or the epoch) pass through 0.

Contract.
* Writer calls (``publish``, ``withdraw*``, ``barrier``) are serialized by
  the caller and made only in the process that created the table (attached
  tables are mapped read-only).  Reader calls are lock-free and safe from
  any number of threads and processes, concurrently with the writer.
* A reader may assume nothing from ``lookup`` alone (its fields may be torn
  by a concurrent publish): after ``still_valid`` returns True for its
  token, the entry was published, not withdrawn, and unchanged from before
  the lookup until that call.  So: lookup, pread the data block, still_valid;
  False -> retry or forward.  The writer must withdraw an entry before the
  mapping changes or its data block is freed or reused.
* In-place overwrites run between ``begin_writing`` and ``end_writing``,
  which need no system call: the thread marks its own activity word busy
  with the device (one store), looks the blocks up, pwrites, and marks the
  word idle.  The writer's ``barrier(dev_id)``, called after the
  withdraws, runs membarrier(2)
  (``linux.membarrier``; every process that attaches or creates a table
  registers for it) and then waits until every word it finds busy with
  that device has changed.  Why that suffices: the membarrier puts a full
  barrier into every reader thread at some point P of its run.  A writing
  whose lookup came after P sees the withdraws (they were stored before the
  membarrier); one whose lookup came before P stored its busy word before
  P too, so the barrier's scan sees it and waits for the write to end.  A
  word changes with every writing (``ops``), so constant writes to a device
  cannot hold a barrier off; a word whose thread's process died counts as
  idle (see below).
* Activity words are claimed by threads, once each, on first use: under an
  OFD write lock on byte ``CLAIM_LOCK`` of the memfd, the first word whose
  own lock byte (``WORD_LOCKS + k``) no one holds, locked through the
  thread's own open file description (``/proc/self/fd`` reopened).  The
  lock goes when that description closes: at the thread's end (a
  finalizer) or the process's.  So the barrier counts a busy word as ended
  once no one holds its lock.  A thread that finds no free word gets None
  from ``begin_writing`` (the caller forwards the write).
* ``close`` only when no other thread uses the table.

Cost, measured here (CPython 3.11, x86-64, 2 shared cores, 2**18 slots): ``lookup``
of a present entry 520 ns (a miss 330 ns), ``still_valid`` 250 ns, ``publish``
750 ns, ``withdraw`` of an absent key 250 ns, ``begin_writing`` and
``end_writing`` of one block 2.7-3.4 µs together, 1.1 of it the lookups (6 µs
with an OFD lock per write, the first design), an uncontended ``barrier``
2.5 µs (the membarrier call).
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import platform
import struct
import threading
import time
import weakref
from typing import Iterable, Sequence

from ..errors import ThinpoolError
from ..linux import membarrier

MAGIC = b"TPSMAP\0\1"
VERSION = 2
HEADER_SIZE = 64
SLOT_SIZE = 32
PAGE = 4096
WRITERS = 4096  # activity words: threads that may write in place, all processes
WRITERS_LIMIT = 1 << 20
CLAIM_LOCK = 1 << 40  # memfd byte locked while a thread claims an activity word
WORD_LOCKS = CLAIM_LOCK + 1  # + k: held by the owner of activity word k
DEV_LIMIT = 1 << 24
VBLOCK_LIMIT = 1 << 40
DATA_BLOCK_LIMIT = 1 << 62
SLOTS_LIMIT = 1 << 32
_EPOCH = 3  # the header's epoch word
_HASH_MUL = 0x9E3779B1  # spreads devices over the table; blocks of a device stay consecutive

_HEADER = struct.Struct("@8sIIQQ")  # magic, version, writers, slots, epoch
_BUSY_DEV = (1 << 24) - 1  # an activity word's dev_id field, after >> 1
_OPS_SHIFT = 25
_OPS_MASK = (1 << (64 - _OPS_SHIFT)) - 1
_FLOCK = struct.Struct("@hhqqi4x")  # struct flock: type, whence, start, len, pid
_X86_64 = ("x86_64", "amd64")


class SharedMapError(ThinpoolError):
    """A shared mapping table that cannot be made, attached or written."""


class SharedMappingTable:
    """Mappings published by one writer process for lock-free readers (module docstring)."""

    def __init__(self, fd: int, slots: int, writers: int, writable: bool) -> None:
        """Map an open, validated table file; use ``create`` or ``attach``."""
        self.fd = fd
        self.slots = slots
        self.writers = writers
        self._writable = writable
        table_len = HEADER_SIZE + slots * SLOT_SIZE
        act_at, act_len = _activity_area(slots, writers)
        rw = mmap.PROT_READ | mmap.PROT_WRITE
        self._map = mmap.mmap(fd, table_len, mmap.MAP_SHARED, rw if writable else mmap.PROT_READ)
        self._act_map = mmap.mmap(fd, act_len, mmap.MAP_SHARED, rw, offset=act_at)
        self._bytes = memoryview(self._map)
        self._words = self._bytes.cast("Q")  # 8-byte loads and stores (module docstring)
        self._act_bytes = memoryview(self._act_map)
        self._act = self._act_bytes.cast("Q")  # [0]: words claimed; [k]: activity word k
        self._mask = slots - 1
        self._dev_mul = _HASH_MUL & self._mask  # the same hash, with smaller (faster) products
        self._local = threading.local()
        self._descs: list[weakref.finalize] = []
        self._descs_lock = threading.Lock()

    @classmethod
    def create(cls, slots: int = 1 << 18, writers: int = WRITERS) -> SharedMappingTable:
        """A new, empty table in a fresh memfd (close-on-exec); this process is its writer.

        ``writers`` activity words: how many threads, in all reader processes
        together, may write in place (others forward their writes).
        """
        _require_platform()
        if not (isinstance(slots, int) and 0 < slots <= SLOTS_LIMIT and slots & (slots - 1) == 0):
            raise SharedMapError(f"shared mapping table: {slots!r} slots is not a power of 2 "
                                 f"up to {SLOTS_LIMIT}")
        if not (isinstance(writers, int) and 0 < writers <= WRITERS_LIMIT):
            raise SharedMapError(f"shared mapping table: {writers!r} writers is not 1 to "
                                 f"{WRITERS_LIMIT}")
        fd = os.memfd_create("thinpool-maps", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, _file_size(slots, writers))
            os.pwrite(fd, _HEADER.pack(MAGIC, VERSION, writers, slots, 0), 0)
            return cls(fd, slots, writers, writable=True)
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def attach(cls, fd: int) -> SharedMappingTable:
        """Map the table another process created and passed as ``fd``: its entries read-only,
        its activity words read-write (for ``begin_writing``).

        The table keeps its own duplicate of ``fd`` (``fd`` stays the caller's).
        A descriptor that is not such a table is a SharedMapError.
        """
        _require_platform()
        try:
            size = os.fstat(fd).st_size
            head = os.pread(fd, HEADER_SIZE, 0)
        except OSError as e:
            raise SharedMapError(f"shared mapping table: fd {fd} cannot be read "
                                 f"({errno.errorcode.get(e.errno or 0, e.strerror)})") from None
        if len(head) < HEADER_SIZE or head[:8] != MAGIC:
            raise SharedMapError(f"shared mapping table: fd {fd} is not a thinpool mapping table")
        _, version, writers, slots, _ = _HEADER.unpack_from(head)
        if version != VERSION:
            raise SharedMapError(f"shared mapping table: fd {fd} has version {version}, "
                                 f"this code reads version {VERSION}")
        if not 0 < slots <= SLOTS_LIMIT or slots & (slots - 1) or \
                not 0 < writers <= WRITERS_LIMIT or size != _file_size(slots, writers):
            raise SharedMapError(f"shared mapping table: fd {fd} is {size} bytes, which does not "
                                 f"fit its header's {slots} slots and {writers} writers")
        own = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 0)
        try:
            return cls(own, slots, writers, writable=False)
        except BaseException:
            os.close(own)
            raise

    def close(self) -> None:
        """Unmap, and close the table's descriptors (this thread's and every other's)."""
        with self._descs_lock:
            descs, self._descs = self._descs, []
        for fin in descs:
            fin()
        self._words.release()
        self._bytes.release()
        self._map.close()
        self._act.release()
        self._act_bytes.release()
        self._act_map.close()
        os.close(self.fd)

    def slot_offset(self, dev_id: int, vblock: int) -> int:
        """Byte offset in the file of the one slot that can hold (dev_id, vblock)."""
        return HEADER_SIZE + (((vblock + dev_id * self._dev_mul) & self._mask) << 5)

    def _slot_word(self, dev_id: int, vblock: int) -> int:
        """Index in ``_words`` of the slot's seq (the rest of the slot follows)."""
        return 8 + (((vblock + dev_id * self._dev_mul) & self._mask) << 2)

    # -- writer side ------------------------------------------------------------------------
    def publish(self, dev_id: int, vblock: int, data_block: int, exclusive: bool,
                evict: bool = True) -> None:
        """Make (dev_id, vblock) -> data_block visible to readers, evicting the slot's entry
        (with ``evict`` False, an entry of another key stays and this one is not published)."""
        self._require_writable()
        if not (0 <= dev_id < DEV_LIMIT and 0 <= vblock < VBLOCK_LIMIT
                and 0 <= data_block < DATA_BLOCK_LIMIT):
            raise SharedMapError(f"shared mapping table: cannot hold device {dev_id} block "
                                 f"{vblock} -> data block {data_block} (device id < 2**24, "
                                 "block < 2**40, data block < 2**62)")
        i = self._slot_word(dev_id, vblock)
        key = dev_id << 40 | vblock
        q = self._words
        epoch = q[_EPOCH]
        if not evict and q[i + 2] and q[i + 3] == epoch and q[i + 1] != key:
            return
        self._store(i, key, data_block << 2 | bool(exclusive) << 1 | 1, epoch)

    def withdraw(self, dev_id: int, vblock: int) -> None:
        """Remove (dev_id, vblock) if the table holds it: readers' tokens for it go invalid."""
        self._require_writable()
        i = self._slot_word(dev_id, vblock)
        q = self._words
        if q[i + 2] and q[i + 1] == dev_id << 40 | vblock:
            self._store(i, 0, 0, 0)

    def withdraw_device(self, dev_id: int, vblocks: Iterable[int]) -> None:
        """``withdraw`` each of a device's ``vblocks``."""
        for v in vblocks:
            self.withdraw(dev_id, v)

    def withdraw_all(self) -> None:
        """Invalidate every entry and every reader's token (a new epoch)."""
        self._require_writable()
        self._words[_EPOCH] += 1

    def barrier(self, dev_id: int | None) -> None:
        """Wait until every writing on ``dev_id`` (None: any device), in any process, that
        began before this call has ended.  Call it after the withdraws it protects."""
        self._require_writable()
        if dev_id is not None and not 0 <= dev_id < DEV_LIMIT:
            raise SharedMapError(f"shared mapping table: no device id {dev_id}")
        membarrier.barrier()  # the module docstring: why this makes the scan below enough
        act = self._act
        busy = []
        for k in range(1, act[0] + 1):
            word = act[k]
            if word & 1 and (dev_id is None or (word >> 1) & _BUSY_DEV == dev_id):
                busy.append((k, word))
        delay = 20e-6
        while busy:
            time.sleep(delay)
            delay = min(2 * delay, 1e-3)
            busy = [(k, word) for k, word in busy if act[k] == word and self._word_owned(k)]

    def _word_owned(self, k: int) -> bool:
        """Whether a live thread holds activity word ``k`` (its lock byte is locked)."""
        got = fcntl.fcntl(self._holder().fd, fcntl.F_OFD_GETLK,
                          _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, WORD_LOCKS + k, 1, 0))
        return _FLOCK.unpack(got)[0] != fcntl.F_UNLCK

    def _store(self, i: int, key: int, value: int, epoch: int) -> None:
        """Seqlock write of the slot at word ``i``: seq odd, fields, seq even."""
        q = self._words
        seq = q[i]
        q[i] = seq + 1
        q[i + 1] = key
        q[i + 2] = value
        q[i + 3] = epoch
        q[i] = seq + 2

    def _require_writable(self) -> None:
        if not self._writable:
            raise SharedMapError("shared mapping table: only the process that created it writes it")

    # -- reader side ------------------------------------------------------------------------
    def lookup(self, dev_id: int, vblock: int) -> tuple[int, int, bool] | None:
        """(token, data_block, exclusive) for (dev_id, vblock), or None: not present (or being
        changed).  Trust the answer only once ``still_valid(dev_id, vblock, token)``."""
        if vblock >> 40:
            return None
        q = self._words
        epoch = q[3]  # _EPOCH
        i = 8 + (((vblock + dev_id * self._dev_mul) & self._mask) << 2)  # _slot_word, inlined
        seq = q[i]
        if seq & 1 or q[i + 1] != dev_id << 40 | vblock:
            return None
        value = q[i + 2]
        if not value or q[i + 3] != epoch:
            return None
        return seq, value >> 2, value & 2 == 2

    def still_valid(self, dev_id: int, vblock: int, token: int) -> bool:
        """The entry ``lookup`` returned ``token`` for is still there, unchanged, right now."""
        q = self._words
        i = 8 + (((vblock + dev_id * self._dev_mul) & self._mask) << 2)  # _slot_word, inlined
        # Loads in this order: the slot's epoch (unchanged if seq is), the header's epoch
        # (no withdraw_all if equal), then seq (no change of the slot since the lookup).
        return q[i + 3] == q[3] and q[i] == token

    def begin_writing(self, dev_id: int, vblocks: Sequence[int]) -> dict[int, int] | None:
        """Start an in-place overwrite: {vblock: data_block} if every one of ``vblocks`` is
        present and exclusive, and then the thread's activity word says it is busy with
        ``dev_id`` (so the writer's ``barrier(dev_id)`` waits for it, module docstring) until
        it calls ``end_writing`` (in a ``finally``) after its pwrites.  None: write through
        the pool instead (no ``end_writing``).  One writing per thread at a time."""
        if not 0 <= dev_id < DEV_LIMIT:
            raise SharedMapError(f"shared mapping table: no device id {dev_id}")
        holder = self._holder()
        k = holder.word
        if k < 0:
            k = holder.word = self._claim_word(holder.fd)
        if not k:
            return None  # no activity word free
        act = self._act
        ops = holder.ops = (holder.ops + 1) & _OPS_MASK
        act[k] = ops << _OPS_SHIFT | dev_id << 1 | 1
        blocks = self._exclusive_blocks(dev_id, vblocks)
        if blocks is None:
            act[k] = ops << _OPS_SHIFT
        return blocks

    def end_writing(self) -> None:
        """End the calling thread's writing that ``begin_writing`` started."""
        holder = self._local.holder
        self._act[holder.word] = holder.ops << _OPS_SHIFT

    def _exclusive_blocks(self, dev_id: int, vblocks: Sequence[int]) -> dict[int, int] | None:
        """{vblock: data_block} if all are present, exclusive and read consistently, else None."""
        blocks = {}
        for v in vblocks:
            found = self.lookup(dev_id, v)
            if found is None or not found[2] or not self.still_valid(dev_id, v, found[0]):
                return None
            blocks[v] = found[1]
        return blocks

    def _holder(self) -> _ThreadState:
        """This thread's state (its own open file description of the table, for OFD locks),
        made on first use; its word is claimed by its first ``begin_writing``."""
        holder: _ThreadState | None = getattr(self._local, "holder", None)
        if holder is None:
            holder = _ThreadState(os.open(f"/proc/self/fd/{self.fd}", os.O_RDWR | os.O_CLOEXEC))
            fin = weakref.finalize(holder, os.close, holder.fd)  # closed when the thread ends
            with self._descs_lock:
                self._descs = [f for f in self._descs if f.alive]
                self._descs.append(fin)
            self._local.holder = holder
        return holder

    def _claim_word(self, fd: int) -> int:
        """Lock the first free activity word through ``fd`` and return it (0: none free)."""
        fcntl.fcntl(fd, fcntl.F_OFD_SETLKW, _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, CLAIM_LOCK, 1, 0))
        try:
            act = self._act
            for k in range(1, self.writers + 1):
                try:
                    fcntl.fcntl(fd, fcntl.F_OFD_SETLK,
                                _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, WORD_LOCKS + k, 1, 0))
                except (BlockingIOError, PermissionError):
                    continue  # another thread's
                act[k] = 0  # its last owner may have died busy
                if k > act[0]:
                    act[0] = k
                return k
            return 0
        finally:
            fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _FLOCK.pack(fcntl.F_UNLCK, os.SEEK_SET, CLAIM_LOCK, 1, 0))


class _ThreadState:
    """Lives in a thread's local storage: its descriptor (closed by a finalizer when the thread
    ends, which frees its activity word), its activity word (-1: not claimed yet, 0: none was
    free) and its writings so far."""

    __slots__ = ("fd", "word", "ops", "__weakref__")

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.word = -1
        self.ops = 0


def _activity_area(slots: int, writers: int) -> tuple[int, int]:
    """(offset, length) of the activity area in the file: page-aligned, page-rounded."""
    at = -(-(HEADER_SIZE + slots * SLOT_SIZE) // PAGE) * PAGE
    return at, -(-8 * (writers + 1) // PAGE) * PAGE


def _file_size(slots: int, writers: int) -> int:
    at, length = _activity_area(slots, writers)
    return at + length


def _require_platform() -> None:
    """x86-64 memory ordering (module docstring) and membarrier; registers this process."""
    if platform.machine().lower() not in _X86_64:
        raise SharedMapError(f"shared mapping table: needs x86-64 memory ordering, this machine "
                             f"is {platform.machine()}")
    if not membarrier.supported():
        raise SharedMapError("shared mapping table: needs membarrier(2) with global expedited "
                             "barriers (Linux 4.16 or later, not filtered by seccomp)")
    membarrier.register()
