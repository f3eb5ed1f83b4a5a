"""FuseMount: a FUSE filesystem served by threads over /dev/fuse.

``FuseMount(mountpoint)`` mounts a directory of fixed-size files, one per
``Export`` (``add_file``/``remove_file``, also while mounted), so that
a loop device with direct I/O can turn each into a block device (see
``thinpool.linux.loop``). No libfuse: /dev/fuse is opened, mounted with
mount(2) (type ``fuse.thinpool``, ``fd=N,rootmode=40000,user_id=,group_id=,
default_permissions[,allow_other]``, nosuid, nodev), and ``threads`` worker
threads each read requests from their own clone of the device fd
(FUSE_DEV_IOC_CLONE), hand them to the shared ``FuseSession`` and write the
reply back with one ``writev``; requests run in parallel, the threads block
only in the kernel. Needs root (CAP_SYS_ADMIN).

Lifecycle: ``start()`` returns once the kernel's INIT is answered.
``stop()`` is idempotent, never raises, and may be called from a signal
handler or another thread: it detaches the loop devices still attached to
its files, waits up to ``grace`` seconds for their handles to close,
unmounts (when a file is still open, for example by a loop device whose
filesystem is mounted, it detaches the mount lazily and aborts the FUSE
connection, so I/O on that device fails from then on), joins every thread,
closes every fd and closes the exports. A process that dies without
``stop()`` leaves a dead mount ("Transport endpoint is not connected")
until someone unmounts it.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import struct
import tempfile
import threading
import time
from pathlib import Path

from ..linux import loop
from ..linux.mounts import MNT_DETACH, MS_NODEV, MS_NOSUID, mount, mountinfo, unmount
from . import protocol as P
from .backend import Export
from .session import Buffers, FileBusyError, FileEntry, FuseError, FuseSession

log = logging.getLogger("thinpool.fuse")

FSTYPE = "fuse.thinpool"
INIT_TIMEOUT = 10.0


def is_mounted(mountpoint: str | os.PathLike[str]) -> bool:
    """Whether a thinpool FUSE filesystem is mounted at ``mountpoint``."""
    where = os.path.realpath(mountpoint)
    return any(e.mountpoint == where and e.fstype == FSTYPE for e in mountinfo())


class FuseMount:
    """One FUSE mount serving a directory of exports (see the module docstring)."""

    def __init__(self, mountpoint: str | os.PathLike[str], *, threads: int = 4,
                 allow_other: bool = False, grace: float = 5.0) -> None:
        if not 1 <= threads <= 64:
            raise FuseError(f"threads must be between 1 and 64, not {threads}")
        self.mountpoint = os.path.realpath(mountpoint)
        self.threads = threads
        self.allow_other = allow_other
        self.grace = grace
        self._init_done = threading.Event()
        self._init_error: str | None = None
        self.session = FuseSession(on_init=self._on_init)
        self._fds: list[int] = []
        self._workers: list[threading.Thread] = []
        self._conn: int | None = None  # the FUSE connection id (the mount's device number)
        self._mounted = False
        self._started = False
        self._stopping = False
        self._stop_lock = threading.RLock()

    # ---- public API ----

    def start(self) -> None:
        """Mount and serve; returns when the kernel's INIT has been answered."""
        if self._started or self._stopping:
            raise FuseError(f"FUSE mount at {self.mountpoint} was already started")
        if not os.path.isdir(self.mountpoint):
            raise FuseError(f"mount point {self.mountpoint} is not a directory")
        try:
            fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise FuseError(f"cannot open /dev/fuse: {e.strerror}") from None
        self._fds.append(fd)
        self._started = True
        opts = (f"fd={fd},rootmode=40000,user_id={os.geteuid()},group_id={os.getegid()},"
                f"default_permissions{',allow_other' if self.allow_other else ''}")
        try:
            mount("thinpool", self.mountpoint, FSTYPE, MS_NOSUID | MS_NODEV, opts)
        except OSError as e:
            self.stop()
            hint = " (needs root)" if e.errno == errno.EPERM else ""
            raise FuseError(f"cannot mount FUSE at {self.mountpoint}: {e.strerror}{hint}") from None
        self._mounted = True
        self._conn = self._connection_id()
        try:
            for _ in range(self.threads - 1):
                clone = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
                self._fds.append(clone)
                fcntl.ioctl(clone, P.FUSE_DEV_IOC_CLONE, struct.pack("I", fd))
        except OSError as e:
            self.stop()
            raise FuseError(f"cannot clone the /dev/fuse descriptor: {e.strerror}") from None
        for i, wfd in enumerate(self._fds):
            t = threading.Thread(target=self._serve, args=(wfd,), daemon=True,
                                 name=f"fuse-{os.path.basename(self.mountpoint)}-{i}")
            self._workers.append(t)
            t.start()
        if not self._init_done.wait(INIT_TIMEOUT) or self._init_error is not None:
            reason = self._init_error or "the kernel sent no INIT"
            self.stop()
            raise FuseError(f"FUSE mount at {self.mountpoint} failed: {reason}")

    def add_file(self, name: str, export: Export) -> None:
        """Show ``export`` as file ``name`` (mode 0600, or 0400 when read-only;
        owned by root; size ``export.size``).

        From then on the mount owns the export and closes it when the file
        is removed or the mount stopped (also by a ``stop()`` running at the
        same time). On FuseError (bad or taken name, bad export, mount
        stopped) the export was not taken.
        """
        if self._stopping:
            raise FuseError(f"FUSE mount at {self.mountpoint} is stopped")
        entry = self.session.add_file(name, export)
        if self._stopping:  # stop() may have missed it: close it here (once, whoever is first)
            entry.close_export()

    def remove_file(self, name: str, wait: float = 0.0) -> None:
        """Remove file ``name`` and close its export.

        While the file is open (a loop device holds it, or a process), waits
        up to ``wait`` seconds for it to be closed, then raises
        ``FileBusyError``. (After a loop device is detached the kernel closes
        the file asynchronously: give it a moment.)
        """
        deadline = time.monotonic() + wait
        while True:
            try:
                entry = self.session.remove_file(name)
                break
            except FileBusyError:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise
                self.session.wait_closed(name, left)
        if self._workers and not self._stopping:
            self._notify(P.notify_inval_entry(P.ROOT_ID, entry.bname))
        entry.close_export()

    def path(self, name: str) -> str:
        """The path of file ``name`` on this mount."""
        return os.path.join(self.mountpoint, name)

    def open_handles(self, name: str) -> int:
        """How many handles the kernel holds open on file ``name``."""
        return self.session.open_handles(name)

    def stop(self) -> None:
        """Unmount, end the threads, close fds and exports (module docstring).

        A caller in another thread waits for a running ``stop()`` to finish;
        a signal handler interrupting ``stop()`` in the same thread returns.
        No lock that ``add_file``/``remove_file`` hold is taken here, and
        every step is safe to repeat (fds are popped before closing, exports
        close once), so a signal arriving anywhere cannot deadlock it or
        close anything twice.
        """
        with self._stop_lock:
            if self._stopping:
                return
            self._stopping = True
            files = self.session.files()
            if self._mounted:
                self._mounted = False
                self._release_files(files)
                self._unmount(files)
            self._join()
            while self._fds:
                try:
                    os.close(self._fds.pop())
                except OSError:
                    pass
            for entry in files.values():
                try:
                    entry.close_export()
                except Exception:
                    log.exception("fuse: closing the export of %r failed", entry.name)

    def __enter__(self) -> FuseMount:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- internals ----

    def _on_init(self, error: str | None) -> None:
        self._init_error = error
        self._init_done.set()

    def _serve(self, fd: int) -> None:
        """One worker: read a request, handle it, write the reply; until unmounted."""
        buf = Buffers()
        req = buf.request
        iov = (req,)
        handle = self.session.handle
        readv, writev = os.readv, os.writev
        while True:
            try:
                n = readv(fd, iov)
            except OSError as e:
                if e.errno in (errno.ENOENT, errno.EINTR, errno.EAGAIN):
                    continue  # the request was interrupted before we got it
                if e.errno not in (errno.ENODEV, errno.ECONNABORTED, errno.EBADF):
                    log.error("fuse: reading /dev/fuse failed: %s", e)
                return  # unmounted or aborted
            reply = handle(req, n, buf)
            if reply is None:
                continue
            try:
                writev(fd, reply)
            except OSError as e:
                if e.errno == errno.ENOENT:
                    continue  # the request was interrupted or aborted meanwhile
                if e.errno not in (errno.ENODEV, errno.ECONNABORTED, errno.EBADF):
                    log.error("fuse: replying on /dev/fuse failed: %s", e)
                    continue
                return

    def _notify(self, message: bytes) -> None:
        try:
            os.write(self._fds[0], message)
        except OSError as e:
            if e.errno not in (errno.ENOENT, errno.ENODEV):
                log.warning("fuse: notification failed: %s", e)

    def _connection_id(self) -> int | None:
        """The FUSE connection id: the kernel dev_t of our mount (from mountinfo)."""
        found = [e.device for e in mountinfo()
                 if e.mountpoint == self.mountpoint and e.fstype == FSTYPE]
        if not found:
            return None
        return (os.major(found[-1]) << 20) | os.minor(found[-1])  # the kernel's MKDEV

    def _release_files(self, files: dict[str, FileEntry]) -> None:
        """Detach the loop devices on our files; wait up to ``grace`` for handles to close."""
        for name, entry in files.items():
            if not entry.handles:
                continue
            for device in loop.find(self.path(name)):
                try:
                    loop.detach(device)
                except loop.LoopError as e:
                    log.warning("fuse: %s", e)
        deadline = time.monotonic() + self.grace
        while any(e.handles for e in files.values()) and time.monotonic() < deadline:
            time.sleep(0.02)

    def _unmount(self, files: dict[str, FileEntry]) -> None:
        try:
            unmount(self.mountpoint)
            return
        except OSError as e:
            if e.errno == errno.EINVAL:  # someone else unmounted it
                self._abort()
                return
            if e.errno != errno.EBUSY:
                log.error("fuse: unmounting %s failed: %s", self.mountpoint, e.strerror)
        busy = sorted(name for name, entry in files.items() if entry.handles)
        log.warning("fuse: %s still in use (open: %s); detaching lazily and aborting the "
                    "connection", self.mountpoint, ", ".join(busy) or "unknown")
        try:
            unmount(self.mountpoint, MNT_DETACH)
        except OSError as e:
            log.error("fuse: lazy unmount of %s failed: %s", self.mountpoint, e.strerror)
        self._abort()

    def _abort(self) -> None:
        """Abort the FUSE connection through fusectl (mounted temporarily if need be):
        every worker's read then fails with ENODEV."""
        if self._conn is None or not any(t.is_alive() for t in self._workers):
            return
        ctl = [e.mountpoint for e in mountinfo() if e.fstype == "fusectl"]
        tmp = None
        try:
            if not ctl:
                tmp = tempfile.mkdtemp(prefix="thinpool-fusectl-")
                mount("fusectl", tmp, "fusectl")
                ctl = [tmp]
            Path(ctl[0], str(self._conn), "abort").write_text("1")
        except OSError as e:
            log.error("fuse: aborting the connection of %s failed: %s", self.mountpoint, e)
        finally:
            if tmp is not None:
                try:
                    unmount(tmp, MNT_DETACH)
                except OSError:
                    pass
                try:
                    os.rmdir(tmp)
                except OSError as e:
                    log.warning("fuse: cannot remove %s: %s", tmp, e.strerror)

    def _join(self) -> None:
        deadline = time.monotonic() + self.grace
        for t in self._workers:
            t.join(max(0.0, deadline - time.monotonic()))
        if any(t.is_alive() for t in self._workers):
            self._abort()
            for t in self._workers:
                t.join(self.grace)
        alive = [t.name for t in self._workers if t.is_alive()]
        if alive:
            log.error("fuse: threads did not stop: %s", ", ".join(alive))
        self._workers = [t for t in self._workers if t.is_alive()]
