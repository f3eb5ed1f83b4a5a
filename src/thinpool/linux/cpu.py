"""Keeping threads that take turns on one lock on one CPU.

CPython runs Python code under one lock (the GIL) and releases it around
every system call. When the threads taking turns on it run on different
CPUs, each release wakes a waiter on another CPU; the releaser comes back
from its short system call to find the lock taken and sleeps: futex calls
and a cross-CPU wake-up on every system call. On one CPU the releaser
usually takes the lock back before the woken thread is even scheduled, so
the threads switch only when one of them blocks.

``SharedCpu`` puts its member threads on one CPU while two or more are
members, and gives a thread back every CPU the process had when the
``SharedCpu`` was made when it leaves
(and the last member when it is alone again). One ``SharedCpu`` per process:
the GIL is the process's, so every thread that takes turns on it belongs on
the same CPU. Several processes (a server and its workers, each with its own
GIL) each take a different CPU with ``spread_cpu``; left to pick the CPU their
second member happens to run on, they often land on the same one and fight
over it while another CPU has none of their threads. A member cannot move to an
idle CPU, so only threads that are throughput-bound should join; a thread
that waits for single requests should stay out.

Affinity is per thread and inherited: a thread started by a member starts
on the shared CPU and calls ``release_inherited`` to get every CPU back.
Failures to set an affinity (a CPU taken away by a cpuset, a thread that
already exited) are ignored: sharing is a speed-up, never a requirement.
Thread safe.
"""

from __future__ import annotations

import os
import threading


def current_cpu() -> int | None:
    """The CPU the calling thread last ran on (``/proc/thread-self/stat``), or None."""
    try:
        with open("/proc/thread-self/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return int(fields[36])  # field 39, "processor" (fields[0] is field 3)
    except (OSError, IndexError, ValueError):
        return None


def _set_affinity(tid: int, cpus: set[int]) -> None:
    try:
        os.sched_setaffinity(tid, cpus)
    except OSError:
        pass


def spread_cpu(slot: int) -> int:
    """The CPU for the ``slot``-th of a group of processes that share out the CPUs this
    process may use: slot 0 the lowest, slot 1 the next, round and round."""
    cpus = sorted(os.sched_getaffinity(0))
    return cpus[slot % len(cpus)]


class SharedCpu:
    """Member threads share one CPU while there are at least two of them: ``cpu`` if given
    (and the process may use it), else the one the second member last ran on."""

    def __init__(self, cpu: int | None = None) -> None:
        self._lock = threading.Lock()
        self._members: set[int] = set()
        self._all = os.sched_getaffinity(0)
        self._preferred = cpu if cpu in self._all else None
        self._cpu: int | None = None

    @property
    def cpu(self) -> int | None:
        """The shared CPU, or None while fewer than two threads are members."""
        return self._cpu

    def join(self) -> None:
        """The calling thread becomes a member (again: no-op)."""
        tid = threading.get_native_id()
        with self._lock:
            if tid in self._members:
                return
            self._members.add(tid)
            if len(self._all) < 2 or len(self._members) < 2:
                return
            if self._cpu is None:
                cpu = self._preferred if self._preferred is not None else current_cpu()
                self._cpu = cpu if cpu in self._all else min(self._all)
                for member in self._members:
                    _set_affinity(member, {self._cpu})
            else:
                _set_affinity(tid, {self._cpu})

    def leave(self) -> None:
        """The calling thread is no longer a member and may run on every CPU."""
        tid = threading.get_native_id()
        with self._lock:
            if tid not in self._members:
                return
            self._members.discard(tid)
            if self._cpu is None:
                return
            _set_affinity(tid, self._all)
            if len(self._members) < 2:
                for member in self._members:
                    _set_affinity(member, self._all)
                self._cpu = None

    def release_inherited(self) -> None:
        """For a thread started by a member: run on every CPU again."""
        if os.sched_getaffinity(0) != self._all:
            _set_affinity(threading.get_native_id(), self._all)
