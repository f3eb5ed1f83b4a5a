"""Find mounts, loop devices and servers that a test module leaves behind, and clear them.

A leaked mount breaks later tests in ways far from their cause: a dead FUSE mount
("Transport endpoint is not connected") makes ``mkfs.btrfs`` refuse to run, a leaked loop
device keeps its backing file busy, a pool server left running is killed by some later
teardown and leaves exactly such a dead mount.  conftest.py compares the kernel's state before a test
module's first test with the state after its last one (module- and function-scoped fixtures
are torn down by then) and fails the session naming the module and what it left.

Session-scoped fixtures that keep a mount on purpose register it with :func:`keep_for_session`.

Servers are told apart from other test sessions' servers on the same machine by an
environment variable that this session sets and every process it starts inherits
(``THINPOOL_TEST_SESSION``): a session never reports or kills another session's servers.

``THINPOOL_TEST_LEAK_GUARD`` selects the mode: ``fail`` (default: report, clean up under
/tmp - servers get SIGTERM, then SIGKILL - and fail the run), ``report`` (report only: for runs beside other test runs on the same
machine, whose mounts come and go), ``off``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

MODE = os.environ.get("THINPOOL_TEST_LEAK_GUARD", "fail")
"""fail | report | off (see the module docstring)."""

_kept: set[str] = set()

SESSION = f"{os.getpid()}-{time.time_ns()}"
os.environ["THINPOOL_TEST_SESSION"] = SESSION  # inherited by every process the tests start
_SESSION_MARK = f"THINPOOL_TEST_SESSION={SESSION}".encode()


def keep_for_session(*paths: str | os.PathLike[str]) -> None:
    """Mount points and loop backing files at or below ``paths`` outlive a module on purpose."""
    _kept.update(os.path.realpath(p) for p in paths)


def _unescape(field: str) -> str:
    """/proc/self/mounts escapes space, tab, newline and backslash as octal."""
    return field.encode().decode("unicode_escape") if "\\" in field else field


def _mountpoints() -> set[str]:
    with open("/proc/self/mounts") as f:
        return {_unescape(line.split()[1]) for line in f if line.strip()}


def _loop_devices() -> dict[str, str]:
    """Bound loop devices: /dev/loopN -> backing file."""
    found: dict[str, str] = {}
    for backing in Path("/sys/block").glob("loop*/loop/backing_file"):
        try:
            found["/dev/" + backing.parent.parent.name] = backing.read_text().strip()
        except OSError:  # detached between glob and read
            continue
    return found


SERVER_MARKS = (b"thinpool.cli", b"dockerd", b"containerd")
"""A process whose command line holds one of these is a server that tests start."""


def _servers() -> set[tuple[int, str]]:
    """Running servers that tests start: (pid, command line)."""
    found: set[tuple[int, str]] = set()
    me = os.getpid()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if not any(mark in arg for arg in argv[:4] for mark in SERVER_MARKS):
            continue
        try:
            with open(f"/proc/{entry.name}/environ", "rb") as f:
                if _SESSION_MARK not in f.read().split(b"\0"):
                    continue  # another session's (or nobody's) server
        except OSError:
            continue
        found.add((int(entry.name), b" ".join(argv).decode(errors="replace").strip()))
    return found


def _is_kept(path: str) -> bool:
    return any(path == k or path.startswith(k.rstrip("/") + "/") for k in _kept)


@dataclass(frozen=True)
class KernelState:
    """The mounts, loop devices and servers at one moment."""

    mounts: frozenset[str]
    loops: frozenset[tuple[str, str]]
    servers: frozenset[tuple[int, str]]

    @classmethod
    def now(cls) -> KernelState:
        return cls(frozenset(_mountpoints()), frozenset(_loop_devices().items()),
                   frozenset(_servers()))

    def leaked_since(self, before: KernelState) -> Leaks:
        """New mounts (deepest first), loop devices and servers that no session fixture keeps."""
        mounts = sorted((m for m in self.mounts - before.mounts if not _is_kept(m)),
                        key=lambda m: m.count("/"), reverse=True)
        loops = sorted(l for l in self.loops - before.loops if not _is_kept(l[1]))
        return Leaks(mounts, loops, sorted(self.servers - before.servers))


@dataclass(frozen=True)
class Leaks:
    mounts: list[str]
    loops: list[tuple[str, str]]
    servers: list[tuple[int, str]]

    def __bool__(self) -> bool:
        return bool(self.mounts or self.loops or self.servers)

    def __str__(self) -> str:
        return ", ".join([f"mount {m}" for m in self.mounts] + [f"{d} on {b}" for d, b in self.loops]
                         + [f"process {pid} ({cmd})" for pid, cmd in self.servers])


def clear(leaks: Leaks) -> None:
    """Stop leaked servers, then detach leaked mounts and loop devices below /tmp (lazily:
    a dead FUSE mount cannot sync)."""
    for pid, _ in leaks.servers:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    for pid, _ in leaks.servers:
        while time.monotonic() < deadline and os.path.exists(f"/proc/{pid}"):
            time.sleep(0.05)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    mounts, loops = leaks.mounts, leaks.loops
    if leaks.servers:  # a stopped server took its own mounts and loops with it
        now = KernelState.now()
        mounts = [m for m in mounts if m in now.mounts]
        loops = [l for l in loops if l in now.loops]
    for m in mounts:
        if m.startswith("/tmp/"):
            subprocess.run(["umount", "-l", m], capture_output=True)
    for dev, backing in loops:
        if backing.startswith("/tmp/"):
            subprocess.run(["losetup", "-d", dev], capture_output=True)

