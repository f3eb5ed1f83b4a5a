"""SharedCpu: member threads share one CPU while two or more are members."""

from __future__ import annotations

import os
import queue
import threading
from contextlib import contextmanager
from typing import Callable, Iterator

import pytest

from thinpool.linux.cpu import SharedCpu, current_cpu, spread_cpu

ALL = os.sched_getaffinity(0)
pytestmark = pytest.mark.skipif(len(ALL) < 2, reason="needs a process allowed on 2 CPUs or more")


class Member:
    """A thread that runs the calls it is given, one at a time, and waits in between."""

    def __init__(self) -> None:
        self.calls: queue.Queue[Callable[[], None] | None] = queue.Queue()
        self.done: queue.Queue[None] = queue.Queue()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while (fn := self.calls.get()) is not None:
            fn()
            self.done.put(None)

    def do(self, fn: Callable[[], None]) -> None:
        self.calls.put(fn)
        self.done.get(timeout=10)

    def cpus(self) -> set[int]:
        assert self.thread.native_id is not None
        return os.sched_getaffinity(self.thread.native_id)

    def stop(self) -> None:
        self.calls.put(None)
        self.thread.join()


def test_current_cpu_is_one_the_process_may_use() -> None:
    assert current_cpu() in ALL


def test_members_share_one_cpu_from_two_on_and_get_every_cpu_back() -> None:
    shared = SharedCpu()
    a, b, c = Member(), Member(), Member()
    try:
        a.do(shared.join)
        assert shared.cpu is None and a.cpus() == ALL  # alone: free
        b.do(shared.join)
        cpu = shared.cpu
        assert cpu in ALL
        assert a.cpus() == b.cpus() == {cpu}
        c.do(shared.join)
        c.do(shared.join)  # joining twice is harmless
        assert c.cpus() == {cpu}
        a.do(shared.leave)
        assert a.cpus() == ALL and b.cpus() == c.cpus() == {cpu}
        b.do(shared.leave)  # c is alone again: every CPU
        assert shared.cpu is None and b.cpus() == c.cpus() == ALL
        c.do(shared.leave)
        c.do(shared.leave)  # leaving twice is harmless
        assert c.cpus() == ALL
    finally:
        for m in (a, b, c):
            m.stop()


def test_a_thread_started_by_a_member_gets_every_cpu_back() -> None:
    shared = SharedCpu()
    a, b = Member(), Member()
    seen: list[set[int]] = []

    def start_child() -> None:
        def child() -> None:
            seen.append(os.sched_getaffinity(0))
            shared.release_inherited()
            seen.append(os.sched_getaffinity(0))
        t = threading.Thread(target=child)
        t.start()
        t.join()
    try:
        a.do(shared.join)
        b.do(shared.join)
        a.do(start_child)
        assert seen == [{shared.cpu}, ALL]
    finally:
        a.do(shared.leave)
        b.do(shared.leave)
        a.stop()
        b.stop()


def test_spread_cpu_takes_the_allowed_cpus_in_turn() -> None:
    cpus = sorted(ALL)
    assert [spread_cpu(k) for k in range(2 * len(cpus))] == cpus + cpus


@contextmanager
def two_members() -> Iterator[tuple[Member, Member]]:
    a, b = Member(), Member()
    try:
        yield a, b
    finally:
        a.stop()
        b.stop()


@pytest.mark.parametrize("given", [max(ALL), min(ALL)])
def test_a_given_cpu_is_where_members_go(given: int) -> None:
    """Wherever the members happen to run: two processes given different CPUs never share one."""
    shared = SharedCpu(given)
    with two_members() as (a, b):
        a.do(shared.join)
        assert shared.cpu is None and a.cpus() == ALL  # alone: free, as without a given CPU
        b.do(shared.join)
        assert shared.cpu == given and a.cpus() == b.cpus() == {given}


def test_a_cpu_the_process_may_not_use_is_ignored() -> None:
    shared = SharedCpu(max(ALL) + 1000)
    with two_members() as (a, b):
        a.do(shared.join)
        b.do(shared.join)
        assert shared.cpu in ALL and a.cpus() == b.cpus() == {shared.cpu}
