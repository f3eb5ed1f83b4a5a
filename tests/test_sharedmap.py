"""The shared mapping table: seqlock entries, attach from other processes, activity words and
membarrier barriers."""

from __future__ import annotations

import fcntl
import os
import struct
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from typing import Iterator

import pytest

from thinpool.block.sharedmap import (HEADER_SIZE, MAGIC, SLOT_SIZE, VERSION, WRITERS,
                                      SharedMapError, SharedMappingTable)
from thinpool.errors import ThinpoolError

FLOCK = struct.Struct("@hhqqi4x")

# A child process driven line by line on stdin; each named thread ("a", "b", ...) runs its
# own commands.  Replies (stdout, one line each):
#   lookup DEV V          -> "lookup <token data exclusive | None>"
#   enter T DEV V...      -> thread T enters writing(DEV, [V...]); "in T <blocks|None>"
#   leave T               -> thread T leaves; "out T <time.monotonic() just before leaving>"
#   publish DEV V D       -> tries to publish; "publish <error line>"
CHILD = r"""
import queue, sys, threading, time
from thinpool.block.sharedmap import SharedMappingTable
t = SharedMappingTable.attach(int(sys.argv[1]))
out = threading.Lock()
def say(line):
    with out:
        sys.stdout.write(line + "\n"); sys.stdout.flush()
queues = {}
def worker(name, q):
    while True:
        cmd = q.get()
        if cmd is None:
            return
        blocks = t.begin_writing(cmd[0], cmd[1])
        say(f"in {name} {blocks}")
        q.get()
        say(f"out {name} {time.monotonic()!r}")
        if blocks is not None:
            t.end_writing()
threads = []
for line in sys.stdin:
    w = line.split()
    if w[0] == "lookup":
        say(f"lookup {t.lookup(int(w[1]), int(w[2]))}")
    elif w[0] == "enter":
        q = queues[w[1]] = queue.Queue()
        th = threading.Thread(target=worker, args=(w[1], q))
        th.start(); threads.append(th)
        q.put((int(w[2]), [int(v) for v in w[3:]]))
    elif w[0] == "leave":
        queues[w[1]].put("go")
    elif w[0] == "publish":
        try:
            t.publish(int(w[1]), int(w[2]), int(w[3]), True)
            say("publish ok")
        except Exception as e:
            say(f"publish {type(e).__name__}: {e}")
for q in queues.values():
    q.put(None)
for th in threads:
    th.join()
t.close()
"""


@contextmanager
def writing(t: SharedMappingTable, dev_id: int, vblocks: list[int]) -> Iterator[dict[int, int] | None]:
    """begin_writing / end_writing as one block."""
    blocks = t.begin_writing(dev_id, vblocks)
    try:
        yield blocks
    finally:
        if blocks is not None:
            t.end_writing()


class Child:
    """A child process attached to the table (fd passed by inheritance)."""

    def __init__(self, table: SharedMappingTable) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", CHILD, str(table.fd)],
                                     pass_fds=[table.fd], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def reply(self) -> str:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line, "the child died"
        return line.rstrip("\n")

    def ask(self, line: str) -> str:
        self.send(line)
        return self.reply()

    def finish(self) -> None:
        """End the child; one stuck (a test failed while it was inside a writing) is killed."""
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            code = self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            raise AssertionError("the child did not finish; killed") from None
        assert code == 0


@pytest.fixture
def table() -> Iterator[SharedMappingTable]:
    t = SharedMappingTable.create(1 << 12)
    yield t
    t.close()


def colliding(t: SharedMappingTable, dev_id: int, vblock: int) -> tuple[int, int]:
    """Another key that lives in the same slot as (dev_id, vblock)."""
    want = t.slot_offset(dev_id, vblock)
    for dev in (dev_id, dev_id + 1, dev_id + 2):
        for v in range(1, 4 * t.slots):
            if (dev, vblock + v) != (dev_id, vblock) and t.slot_offset(dev, vblock + v) == want:
                return dev, vblock + v
    raise AssertionError("no colliding key")


def valid(t: SharedMappingTable, dev_id: int, vblock: int) -> tuple[int, bool] | None:
    """(data_block, exclusive) as a reader that checks its token sees it."""
    found = t.lookup(dev_id, vblock)
    if found is None:
        return None
    token, data, exclusive = found
    assert t.still_valid(dev_id, vblock, token)
    return data, exclusive


# -- entries ----------------------------------------------------------------------------------

def test_publish_lookup_withdraw_round_trip(table: SharedMappingTable) -> None:
    assert table.lookup(1, 5) is None
    table.publish(1, 5, 900, True)
    table.publish(1, 6, 901, False)
    table.publish(2, 5, 17, True)
    assert valid(table, 1, 5) == (900, True)
    assert valid(table, 1, 6) == (901, False)
    assert valid(table, 2, 5) == (17, True)
    assert table.lookup(3, 5) is None and table.lookup(1, 7) is None
    table.withdraw(1, 5)
    assert table.lookup(1, 5) is None
    assert valid(table, 1, 6) == (901, False)
    table.withdraw(1, 5)  # absent: nothing happens
    table.withdraw_device(1, range(0, 100))
    assert table.lookup(1, 6) is None and valid(table, 2, 5) == (17, True)
    # the limits of the key and value encodings
    table.publish((1 << 24) - 1, (1 << 40) - 1, (1 << 62) - 1, True)
    assert valid(table, (1 << 24) - 1, (1 << 40) - 1) == ((1 << 62) - 1, True)
    table.publish(0, 0, 0, False)
    assert valid(table, 0, 0) == (0, False)
    # a block number past the key's 40 bits is never mistaken for another device's block
    table.publish(1, 0, 55, True)
    assert table.lookup(0, 1 << 40) is None and table.lookup(0, -1) is None


def test_publish_rejects_what_the_encoding_cannot_hold(table: SharedMappingTable) -> None:
    for args in [(1 << 24, 0, 0), (-1, 0, 0), (0, 1 << 40, 0), (0, -1, 0), (0, 0, 1 << 62),
                 (0, 0, -1)]:
        with pytest.raises(SharedMapError, match="cannot hold") as e:
            table.publish(*args, True)
        assert isinstance(e.value, ThinpoolError) and "\n" not in str(e.value)


def test_withdraw_all_invalidates_entries_and_tokens(table: SharedMappingTable) -> None:
    for v in range(50):
        table.publish(4, v, 1000 + v, True)
    found = table.lookup(4, 10)
    assert found is not None
    table.withdraw_all()
    assert all(table.lookup(4, v) is None for v in range(50))
    assert not table.still_valid(4, 10, found[0])
    table.publish(4, 10, 1010, True)  # the same mapping again, in the new epoch
    again = table.lookup(4, 10)
    assert again is not None and again[1:] == (1010, True)
    assert not table.still_valid(4, 10, found[0])
    assert table.still_valid(4, 10, again[0])
    assert table.lookup(4, 11) is None


def test_colliding_key_evicts(table: SharedMappingTable) -> None:
    other = colliding(table, 3, 100)
    table.publish(3, 100, 7, True)
    token = table.lookup(3, 100)
    assert token is not None
    table.publish(*other, 8, False)
    assert table.lookup(3, 100) is None
    assert valid(table, *other) == (8, False)
    assert not table.still_valid(3, 100, token[0])
    table.withdraw(3, 100)  # not the slot's key: the other entry stays
    assert valid(table, *other) == (8, False)


def test_token_invalid_after_withdraw_and_republish(table: SharedMappingTable) -> None:
    table.publish(3, 9, 70, True)
    first = table.lookup(3, 9)
    assert first is not None and table.still_valid(3, 9, first[0])
    table.publish(3, 9, 71, True)  # same key, another block
    second = table.lookup(3, 9)
    assert second is not None and second[1] == 71
    assert not table.still_valid(3, 9, first[0])
    assert table.still_valid(3, 9, second[0])
    table.withdraw(3, 9)
    assert not table.still_valid(3, 9, second[0])
    table.publish(3, 9, 71, True)  # exactly the same entry again: still a new token
    third = table.lookup(3, 9)
    assert third is not None and third[0] not in (first[0], second[0])
    assert not table.still_valid(3, 9, second[0])


def test_odd_sequence_reads_as_absent(table: SharedMappingTable) -> None:
    table.publish(5, 1, 40, True)
    found = table.lookup(5, 1)
    assert found is not None
    off = table.slot_offset(5, 1)
    (seq,) = struct.unpack("@Q", os.pread(table.fd, 8, off))
    assert seq % 2 == 0 and seq > 0
    os.pwrite(table.fd, struct.pack("@Q", seq + 1), off)  # a writer in the middle of a change
    assert table.lookup(5, 1) is None
    assert not table.still_valid(5, 1, found[0])
    os.pwrite(table.fd, struct.pack("@Q", seq + 2), off)
    assert valid(table, 5, 1) == (40, True)


def test_create_rejects_bad_slot_counts() -> None:
    for slots in (0, 3, 1000, -4, 1 << 33):
        with pytest.raises(SharedMapError, match="power of 2"):
            SharedMappingTable.create(slots)


# -- other processes ------------------------------------------------------------------------

def test_child_sees_what_the_parent_publishes(table: SharedMappingTable) -> None:
    table.publish(7, 3, 300, True)
    child = Child(table)
    try:
        assert child.ask("lookup 7 3").startswith("lookup (") and \
            child.ask("lookup 7 3").endswith(", 300, True)")
        assert child.ask("lookup 7 4") == "lookup None"
        table.publish(7, 4, 301, False)
        table.withdraw(7, 3)
        assert child.ask("lookup 7 4").endswith(", 301, False)")
        assert child.ask("lookup 7 3") == "lookup None"
        table.withdraw_all()
        assert child.ask("lookup 7 4") == "lookup None"
        assert child.ask("publish 7 5 1") == \
            "publish SharedMapError: shared mapping table: only the process that created it writes it"
    finally:
        child.finish()
    assert table.lookup(7, 5) is None


def _activity(t: SharedMappingTable) -> list[int]:
    """The activity area as the file holds it: [words claimed, word 1, word 2, ...]."""
    at = os.fstat(t.fd).st_size - -(-8 * (t.writers + 1) // 4096) * 4096
    raw = os.pread(t.fd, 8 * (t.writers + 1), at)
    return list(struct.unpack(f"@{t.writers + 1}Q", raw))


def test_child_writing_changes_only_its_activity_word(table: SharedMappingTable) -> None:
    table.publish(7, 3, 300, True)
    entries = HEADER_SIZE + table.slots * SLOT_SIZE
    before = os.pread(table.fd, entries, 0)
    child = Child(table)
    try:
        child.send("enter a 7 3")
        assert child.reply() == "in a {3: 300}"
        assert os.pread(table.fd, entries, 0) == before
        act = _activity(table)
        assert act[0] == 1  # one word claimed
        assert act[1] & 1 and (act[1] >> 1) & 0xFFFFFF == 7  # busy with device 7
        assert not any(act[2:])
        child.send("leave a")
        assert child.reply().startswith("out a ")
        busy = act[1]
        deadline = time.monotonic() + 10
        while _activity(table)[1] == busy and time.monotonic() < deadline:
            time.sleep(0.01)
        idle = _activity(table)[1]
        assert not idle & 1 and idle >> 25 == busy >> 25  # idle, same count of writings
    finally:
        child.finish()
    assert os.pread(table.fd, entries, 0) == before


def _timed_barrier(table: SharedMappingTable, dev_id: int | None) -> tuple[threading.Thread, list[float]]:
    done: list[float] = []

    def run() -> None:
        table.barrier(dev_id)
        done.append(time.monotonic())

    th = threading.Thread(target=run, daemon=True)
    th.start()
    return th, done


def _child_writing_withdrawn(table: SharedMappingTable) -> Child:
    """A child inside a writing of device 7 block 3, whose entry the parent then withdrew."""
    table.publish(7, 3, 300, True)
    child = Child(table)
    try:
        child.send("enter a 7 3")
        assert child.reply() == "in a {3: 300}"
    except BaseException:
        child.proc.kill()
        child.proc.wait(10)
        raise
    table.withdraw(7, 3)
    return child


@pytest.mark.parametrize("which", [7, None])
def test_barrier_waits_for_a_writer_in_another_process(table: SharedMappingTable,
                                                       which: int | None) -> None:
    child = _child_writing_withdrawn(table)
    try:
        th, done = _timed_barrier(table, which)
        t0 = time.monotonic()
        table.barrier(8)  # another device: at once
        assert time.monotonic() - t0 < 0.25
        th.join(0.5)
        assert th.is_alive() and not done  # still inside writing()
        child.send("leave a")
        last_inside = float(child.reply().split()[2])
        th.join(10)
        assert done and done[0] > last_inside
        # a writing() that starts now sees the withdraw
        child.send("enter b 7 3")
        assert child.reply() == "in b None"
        child.send("leave b")
        child.reply()
    finally:
        child.finish()


def test_barrier_waits_for_the_last_of_two_threads(table: SharedMappingTable) -> None:
    table.publish(9, 0, 10, True)
    table.publish(9, 1, 11, True)
    child = Child(table)
    try:
        child.send("enter a 9 0")
        assert child.reply() == "in a {0: 10}"
        child.send("enter b 9 0 1")
        assert child.reply() == "in b {0: 10, 1: 11}"
        th, done = _timed_barrier(table, 9)
        child.send("leave a")
        child.reply()
        th.join(0.5)
        assert th.is_alive() and not done  # b is still inside
        child.send("leave b")
        last_inside = float(child.reply().split()[2])
        th.join(10)
        assert done and done[0] > last_inside
    finally:
        child.finish()


def test_barrier_waits_for_threads_of_the_same_process(table: SharedMappingTable) -> None:
    table.publish(2, 0, 10, True)
    inside = threading.Event()
    leave = threading.Event()

    def write() -> None:
        with writing(table, 2, [0]) as blocks:
            assert blocks == {0: 10}
            inside.set()
            leave.wait(10)

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    assert inside.wait(10)
    th, done = _timed_barrier(table, 2)
    th.join(0.3)
    assert th.is_alive() and not done
    leave.set()
    th.join(10)
    writer.join(10)
    assert done


def test_barrier_does_not_wait_for_a_writer_that_died_inside(table: SharedMappingTable) -> None:
    child = _child_writing_withdrawn(table)
    try:
        th, done = _timed_barrier(table, 7)
        th.join(0.3)
        assert th.is_alive() and not done  # the writer is alive and inside
        child.proc.kill()
        child.proc.wait(10)
        th.join(10)
        assert done  # its word is busy for ever, but no one owns it any more
    finally:
        child.proc.kill()
        child.proc.wait(10)
    # the next thread to claim that word starts it idle
    with writing(table, 7, [3]) as blocks:
        assert blocks is None
    assert _activity(table)[0] == 1 and not _activity(table)[1] & 1
    table.barrier(7)


def test_constant_writes_do_not_hold_a_barrier_off(table: SharedMappingTable) -> None:
    """Two threads overwrite blocks 0 and 1 without pause; a barrier after withdrawing block 1
    still returns (each writing changes the word), and no writing of block 1 starts after."""
    table.publish(4, 0, 40, True)
    table.publish(4, 1, 41, True)
    stop = threading.Event()
    late: list[float] = []

    def write(v: int) -> None:
        while not stop.is_set():
            with writing(table, 4, [0, v]) as blocks:
                if blocks is not None and v == 1:
                    late.append(time.monotonic())

    writers = [threading.Thread(target=write, args=(v,), daemon=True) for v in (0, 1)]
    for w in writers:
        w.start()
    time.sleep(0.1)
    table.withdraw(4, 1)
    table.barrier(4)
    returned = time.monotonic()
    time.sleep(0.1)
    stop.set()
    for w in writers:
        w.join(10)
    assert late and max(late) < returned


def test_writing_without_a_free_word_yields_none_and_an_ended_thread_frees_its_word() -> None:
    t = SharedMappingTable.create(16, writers=1)
    try:
        t.publish(1, 1, 2, True)
        inside, leave = threading.Event(), threading.Event()

        def hold() -> None:
            with writing(t, 1, [1]) as blocks:
                assert blocks == {1: 2}
                inside.set()
                leave.wait(10)

        holder = threading.Thread(target=hold)
        holder.start()
        assert inside.wait(10)
        got: list[object] = []
        other = threading.Thread(target=lambda: got.append(_enter(t, 1, [1])))
        other.start()
        other.join(10)
        assert got == [None]  # the one word is taken: forward
        leave.set()
        holder.join(10)
        del holder
        import gc
        gc.collect()  # the ended thread's state goes, and with it its descriptor and word
        got.clear()
        third = threading.Thread(target=lambda: got.append(_enter(t, 1, [1])))
        third.start()
        third.join(10)
        assert got == [{1: 2}]
    finally:
        t.close()


def _enter(t: SharedMappingTable, dev_id: int, vblocks: list[int]) -> object:
    with writing(t, dev_id, vblocks) as blocks:
        return blocks


def test_writing_yields_none_unless_all_present_and_exclusive(table: SharedMappingTable) -> None:
    table.publish(1, 0, 20, True)
    table.publish(1, 1, 21, False)
    table.publish(1, 2, 22, True)
    with writing(table, 1, [0]) as blocks:
        assert blocks == {0: 20}
    with writing(table, 1, [0, 2]) as blocks:
        assert blocks == {0: 20, 2: 22}
    with writing(table, 1, [0, 1]) as blocks:  # 1 is shared
        assert blocks is None
    with writing(table, 1, [2, 3]) as blocks:  # 3 is absent
        assert blocks is None
    table.withdraw(1, 2)
    with writing(table, 1, [0, 2]) as blocks:
        assert blocks is None
    with pytest.raises(SharedMapError, match="no device id"):
        with writing(table, 1 << 24, [0]):
            pass


def test_readers_in_another_process_never_accept_a_torn_entry(table: SharedMappingTable) -> None:
    """The parent rewrites one slot as fast as it can (two keys, blocks whose exclusive flag is
    their parity); a child reading it concurrently must never validate a mixed entry."""
    other = colliding(table, 6, 0)
    script = r"""
import sys, time
from thinpool.block.sharedmap import SharedMappingTable
t = SharedMappingTable.attach(int(sys.argv[1]))
other = (int(sys.argv[2]), int(sys.argv[3]))
sys.stdout.write("ready\n"); sys.stdout.flush()
ok = torn = bad = 0
end = time.monotonic() + 1.5
while time.monotonic() < end:
    for key in ((6, 0), other):
        found = t.lookup(*key)
        if found is None:
            continue
        token, data, exclusive = found
        if not t.still_valid(*key, token):
            torn += 1
            continue
        ok += 1
        want_parity = 0 if key == (6, 0) else 1
        if data % 2 != 1 - exclusive or data % 4 // 2 != want_parity:
            bad += 1
print(ok, torn, bad)
"""
    child = subprocess.Popen([sys.executable, "-c", script, str(table.fd), *map(str, other)],
                             pass_fds=[table.fd], stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None
    assert child.stdout.readline() == "ready\n"
    n = 0
    while child.poll() is None:
        for _ in range(200):
            n += 1
            # (6, 0): blocks with bit 1 clear; other: bit 1 set; exclusive == even
            table.publish(6, 0, 4 * n + (n & 1), n & 1 == 0)
            table.publish(*other, 4 * n + 2 + (n & 1), n & 1 == 0)
    out, _ = child.communicate(timeout=10)
    ok, torn, bad = map(int, out.split())
    assert child.returncode == 0
    assert bad == 0, (ok, torn, bad)
    assert ok > 1000, (ok, torn, bad)


# -- attach errors ----------------------------------------------------------------------------

def test_attach_rejects_what_is_not_a_table(table: SharedMappingTable, tmp_path) -> None:
    def refused(fd: int, match: str) -> None:
        with pytest.raises(SharedMapError, match=match) as e:
            SharedMappingTable.attach(fd)
        assert "\n" not in str(e.value)

    r, w = os.pipe()
    os.close(w)
    refused(r, "cannot be read")  # a pipe: no pread
    os.close(r)
    refused(r, "cannot be read")  # closed
    plain = os.memfd_create("not-a-table")
    try:
        refused(plain, "not a thinpool mapping table")  # empty
        os.write(plain, b"x" * 4096)
        refused(plain, "not a thinpool mapping table")
    finally:
        os.close(plain)
    copy = os.memfd_create("copy")
    try:
        size = os.fstat(table.fd).st_size
        os.write(copy, os.pread(table.fd, size, 0))
        attached = SharedMappingTable.attach(copy)  # a faithful copy is a table
        attached.close()
        os.ftruncate(copy, size - SLOT_SIZE)
        refused(copy, "does not fit its header's 4096 slots")
        os.ftruncate(copy, size + SLOT_SIZE)
        refused(copy, "does not fit")
        os.ftruncate(copy, size)
        os.pwrite(copy, struct.pack("@I", VERSION + 1), len(MAGIC))
        refused(copy, f"version {VERSION + 1}")
        os.pwrite(copy, struct.pack("@IIQ", VERSION, WRITERS, 3), len(MAGIC))
        refused(copy, "does not fit its header's 3 slots")
        os.ftruncate(copy, HEADER_SIZE - 1)
        refused(copy, "not a thinpool mapping table")
    finally:
        os.close(copy)


def test_attach_keeps_its_own_descriptor(table: SharedMappingTable) -> None:
    table.publish(1, 1, 2, True)
    fd = os.dup(table.fd)
    attached = SharedMappingTable.attach(fd)
    os.close(fd)  # the caller's descriptor is the caller's
    assert valid(attached, 1, 1) == (2, True)
    with pytest.raises(SharedMapError, match="only the process that created it"):
        attached.withdraw_all()
    attached.close()
    assert valid(table, 1, 1) == (2, True)


def test_close_closes_every_thread_descriptor() -> None:
    t = SharedMappingTable.create(16)
    t.publish(1, 1, 2, True)
    ino = os.fstat(t.fd).st_ino
    base = len(_open_on(ino))  # the table's fd and the mmap's duplicate

    def use() -> None:
        with writing(t, 1, [1]):
            assert len(_open_on(ino)) == base + 1

    th = threading.Thread(target=use)
    th.start()
    th.join()
    assert len(_open_on(ino)) == base  # an ended thread's description is closed
    use()
    t.barrier(None)  # the same thread: the same description
    assert len(_open_on(ino)) == base + 1
    t.close()
    assert not _open_on(ino)


def _open_on(ino: int) -> list[str]:
    """This process's descriptors on the file with inode ``ino``."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.stat(f"/proc/self/fd/{fd}").st_ino == ino:
                found.append(fd)
        except OSError:
            pass
    return found
