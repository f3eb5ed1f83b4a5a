"""``thinpool snapshotter serve``: one process serving one snapshotter root over gRPC.

``ROOT`` holds ``snapshots.db`` (the records), ``lock`` (one server per root:
an flock held while serving) and the backend's storage: ``pool/`` for
devicemapper, ``snapshots/`` for overlay2 and vfs.  The backend a root was
made with is recorded and a different ``--driver`` is refused.

``run`` opens the snapshotter (which finishes what a crash interrupted),
listens on the socket, calls ``ready`` once clients can connect, and serves
until SIGTERM or SIGINT; then it stops accepting calls, lets running ones
finish (up to ``GRACE`` seconds) and closes the backend.
"""

from __future__ import annotations

import faulthandler
import fcntl
import os
import signal
from typing import Callable

from ..errors import ThinpoolError
from .backend import Backend
from .core import Snapshotter
from .errors import FailedPrecondition, InvalidArgument
from .service import serve

DRIVERS = ("devicemapper", "overlay2", "vfs")
GRACE = 10.0
LOCK = "lock"
MARKER = "driver"  # ROOT/driver names the backend the root was made with


class RootInUse(ThinpoolError):
    """Another snapshotter serves the root."""


def parse_options(options: list[str] | tuple[str, ...]) -> dict[str, str]:
    """``KEY=VALUE`` storage options (keys lower-cased, both stripped)."""
    out: dict[str, str] = {}
    for opt in options:
        key, sep, value = opt.partition("=")
        if not sep or not key.strip():
            raise InvalidArgument(f"storage option {opt!r} is not KEY=VALUE")
        out[key.strip().lower()] = value.strip()
    return out


def make_backend(driver: str, root: str, options: dict[str, str]) -> Backend:
    """The backend ``driver`` for ``root`` (options are checked, nothing is created yet)."""
    if driver == "devicemapper":
        from .devmapper import DevmapperBackend

        return DevmapperBackend(root, options)
    if driver == "overlay2":
        from .dirs import OverlayBackend

        return OverlayBackend(root, options)
    if driver == "vfs":
        from .dirs import VfsBackend

        return VfsBackend(root, options)
    raise InvalidArgument(f"unknown snapshotter driver {driver!r} (one of {', '.join(DRIVERS)})")


def lock_root(root: str) -> int:
    """Take ``ROOT/lock`` (one server per root) or raise ``RootInUse``; the fd that holds it."""
    fd = os.open(os.path.join(root, LOCK), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
        os.close(fd)
        raise RootInUse(f"{root} is in use by another snapshotter"
                        + (f" (pid {holder})" if holder else "")) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def open_snapshotter(root: str, driver: str, options: dict[str, str]) -> tuple[Snapshotter, int]:
    """The snapshotter of ``root`` (created if new) and the lock fd that keeps it ours."""
    root = os.path.abspath(root)
    backend = make_backend(driver, root, options)
    os.makedirs(root, mode=0o711, exist_ok=True)
    lock = lock_root(root)
    try:
        marker = os.path.join(root, MARKER)
        try:
            with open(marker, encoding="utf-8") as f:
                recorded = f.read().strip()
        except FileNotFoundError:
            recorded = ""
        if recorded and recorded != driver:
            raise FailedPrecondition(f"{root} holds snapshots of the {recorded} driver, not "
                                     f"{driver}")
        if not recorded:
            with open(marker + ".tmp", "w", encoding="utf-8") as f:
                f.write(driver + "\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(marker + ".tmp", marker)
        return Snapshotter(root, backend), lock
    except BaseException:
        os.close(lock)
        raise


def _ignore(signum: int, frame: object) -> None:
    """The Python-level handler of the stop signals: the wakeup fd did the work."""


def _wait_for_stop(wake: int) -> None:
    """Block until the wakeup fd ``wake`` reports SIGTERM or SIGINT."""
    while True:
        if any(b in (signal.SIGTERM, signal.SIGINT) for b in os.read(wake, 64)):
            return


def run(root: str, socket_path: str, driver: str, options: dict[str, str],
        ready: Callable[[str], None]) -> None:
    """Serve until SIGTERM or SIGINT (see the module docstring).

    The stop signals reach this thread through Python's wakeup fd, which the
    interpreter's C-level handler writes from whichever thread the kernel
    delivered the signal to (often one of gRPC's: a blocking read in this
    thread is then not interrupted, and a handler of this thread's would never
    run).  So this thread waits on the fd, nothing runs in the middle of
    anything, and a signal that comes while the snapshotter is still opening
    is acted on as soon as it is open.  SIGUSR1 dumps every thread's stack to
    stderr (``faulthandler``), for a server that seems stuck.
    """
    wake_r, wake_w = os.pipe2(os.O_CLOEXEC)
    os.set_blocking(wake_w, False)
    old = {sig: signal.signal(sig, _ignore) for sig in (signal.SIGTERM, signal.SIGINT)}
    old_wakeup = signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    try:
        snapshotter, lock = open_snapshotter(root, driver, options)
        try:
            server = serve(snapshotter, socket_path)
            try:
                ready(os.path.abspath(socket_path))
                _wait_for_stop(wake_r)
            finally:
                server.stop(GRACE).wait()
                try:
                    os.unlink(os.path.abspath(socket_path))
                except FileNotFoundError:
                    pass
        finally:
            snapshotter.close()
            os.close(lock)
    finally:
        faulthandler.unregister(signal.SIGUSR1)
        signal.set_wakeup_fd(old_wakeup)
        for sig, handler in old.items():
            signal.signal(sig, handler)
        os.close(wake_r)
        os.close(wake_w)
