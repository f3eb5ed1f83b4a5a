"""``thinpool serve``: one long-running process that owns a pool and serves it.

The server opens the pool read-write (it holds the pool lock), serves every
volume over NBD (a unix socket, mode 0600, and optionally TCP), and answers
the CLI on the control socket ``DIR/control.sock``, so that every
``thinpool`` command on the pool goes through it while it runs.  It records
itself in ``DIR/server.json`` (pid and endpoints) for the CLI and for
recovery after a crash.

Stopping (``thinpool stop``, SIGTERM or SIGINT): stop accepting control
requests, stop the NBD server (requests in flight finish, connections
close), close the pool (commit), remove the sockets and ``server.json``.
Crash story: the pool's own commit protocol; a SIGKILLed server leaves
stale sockets and ``server.json``, which the next server replaces.

With ``workers`` (``serve --workers N``), NBD connections are spread over N
worker processes too (``workers``); they stop before the pool closes and
die with the server.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from ..block.sharedmap import SharedMappingTable
from ..errors import ThinpoolError
from ..linux.cpu import SharedCpu, spread_cpu
from ..nbd.server import NBDServer, TLSConfig
from ..pool.engine import Pool
from ..pool.registry import write_json_atomic
from . import commands
from .control import ControlServer, control_path
from .exports import PoolCatalog
from .kernel import KernelDevices, leftovers
from .workers import UpstreamCatalog, WorkerProcesses, upstream_path

log = logging.getLogger("thinpool.server")

NBD_SOCKET = "nbd.sock"
STATE_FILE = "server.json"


class ServerError(ThinpoolError):
    pass


@dataclass
class ServerOptions:
    nbd_socket: str | None = None  # default DIR/nbd.sock
    tcp: tuple[str, int] | None = None
    tls: TLSConfig | None = None
    read_only: set[int] = field(default_factory=set)
    workers: int = 0  # NBD worker processes (workers.py); none with TLS


def read_state(directory: str) -> dict[str, Any] | None:
    """What ``server.json`` says about the pool's server, or None."""
    try:
        with open(os.path.join(directory, STATE_FILE), encoding="utf-8") as f:
            state = json.load(f)
        return state if isinstance(state, dict) else None
    except (OSError, ValueError):
        return None


class PoolServer:
    """The pool, its NBD server and its control socket in one process.

    ``start`` raises ``ThinpoolError`` (nothing left running) if any part
    cannot start; ``stop`` is idempotent and safe to call from any thread.
    """

    def __init__(self, directory: str, options: ServerOptions | None = None) -> None:
        self.directory = os.path.abspath(directory)
        self.options = options or ServerOptions()
        self.pool: Pool | None = None
        self.nbd: NBDServer | None = None
        self.upstream: NBDServer | None = None  # the workers' internal socket
        self.workers: WorkerProcesses | None = None
        self.shared_maps: SharedMappingTable | None = None  # the workers' view of the mappings
        self.control: ControlServer | None = None
        self.kernel: KernelDevices | None = None
        self.force_stop = False
        self.stopped = threading.Event()
        self._stop_requested = threading.Event()
        self._stop_lock = threading.Lock()

    @property
    def nbd_socket(self) -> str:
        return self.options.nbd_socket or os.path.join(self.directory, NBD_SOCKET)

    # -- life cycle -------------------------------------------------------------------------
    def start(self) -> None:
        left = leftovers(self.directory, read_state(self.directory))
        if any(left.values()):
            what = "; ".join(f"{k}: {', '.join(v)}" for k, v in left.items() if v)
            raise ServerError(f"a previous server of {self.directory} died and left {what}; run "
                              f"'thinpool attach --recover {self.directory}' to bring them back, "
                              f"or 'thinpool stop --force {self.directory}' to clean them up")
        try:
            self.pool = Pool(self.directory)
            missing = [i for i in self.options.read_only if not self.pool.md.exists(i)]
            if missing:
                raise ServerError(f"--read-only names volumes that do not exist: {missing}")
            dispatch = None
            cpu: bool | SharedCpu = True
            if self.options.workers > 0 and self.options.tls is None:
                cpu = SharedCpu(spread_cpu(0))  # worker k takes spread_cpu(k + 1)
                self.workers = self._start_workers(self.options.workers, cpu)
                dispatch = self.workers.offer
            self.nbd = NBDServer(PoolCatalog(self.pool, self.options.read_only),
                                 unix_path=self.nbd_socket, tcp=self.options.tcp,
                                 tls=self.options.tls, dispatch=dispatch, share_cpu=cpu)
            self.nbd.start()
            self.kernel = KernelDevices(self.pool, self.directory, self._save_state)
            self._started_at = time.time()
            self._save_state()
            self.control = ControlServer(control_path(self.directory), self._handle)
            self.control.start()
        except BaseException:
            self.stop()
            raise
        log.info("serving pool %s: NBD on %s%s, control on %s", self.directory, self.nbd_socket,
                 f" and {self.nbd.tcp_address}" if self.nbd.tcp_address else "",
                 control_path(self.directory))

    def _start_workers(self, count: int, cpu: SharedCpu) -> WorkerProcesses:
        """The shared mapping table, the internal socket (its readers on ``cpu``, the
        process's one ``SharedCpu``) and ``count`` worker processes."""
        assert self.pool is not None
        table = self.shared_maps = SharedMappingTable.create()
        self.pool.dp.share_mappings(table)
        self.upstream = NBDServer(UpstreamCatalog(self.pool, self.options.read_only),
                                  unix_path=upstream_path(self.directory), share_cpu=cpu)
        self.upstream.start()
        workers = WorkerProcesses(self.pool, table, upstream_path(self.directory), count)
        workers.start()
        return workers

    def _save_state(self) -> None:
        """``server.json``: who serves, where, and the kernel devices it holds (for recovery).

        Replaced atomically but not synced (it changes with every attach, mount, umount and
        detach): what it describes - this process, its loop devices and mounts - is gone
        after a machine crash anyway, and a process crash loses no written file."""
        assert self.nbd is not None
        write_json_atomic(os.path.join(self.directory, STATE_FILE), {
            "pid": os.getpid(), "nbd_socket": self.nbd_socket,
            "tcp": list(self.nbd.tcp_address) if self.nbd.tcp_address else None,
            "control_socket": control_path(self.directory), "started": self._started_at,
            **(self.kernel.state() if self.kernel is not None else {})}, durable=False)

    def request_stop(self) -> None:
        """Ask ``serve_forever`` to stop (signal handlers, the stop command)."""
        self._stop_requested.set()

    def serve_forever(self) -> None:
        """Run until SIGTERM, SIGINT or ``request_stop``; then stop."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.request_stop())
        try:
            while not self._stop_requested.wait(1.0):
                pass
        finally:
            self.stop()

    def stop(self) -> None:
        with self._stop_lock:
            if self.stopped.is_set():
                return
            try:
                if self.control is not None:
                    self.control.stop()
                if self.kernel is not None:
                    self.kernel.shutdown(force=True)
                if self.nbd is not None:
                    self.nbd.stop()
                if self.workers is not None:
                    self.workers.stop()
                if self.upstream is not None:
                    self.upstream.stop()
                if self.pool is not None:
                    self.pool.close()
                if self.shared_maps is not None:
                    self.shared_maps.close()
            finally:
                state = os.path.join(self.directory, STATE_FILE)
                if (read_state(self.directory) or {}).get("pid") == os.getpid():
                    os.unlink(state)
                self.stopped.set()
                log.info("pool server for %s stopped", self.directory)

    # -- control requests -------------------------------------------------------------------
    def _handle(self, command: str, args: dict[str, Any], fds: list[int],
                cancelled: Callable[[], bool]) -> dict[str, Any]:
        assert self.pool is not None
        kernel = self.kernel
        assert kernel is not None
        if command == "stop":
            if not args.get("force"):
                kernel.shutdown()  # refuses while something it does not own is mounted
            self.request_stop()
            return {"pid": os.getpid()}
        if command == "server-info":
            assert self.nbd is not None
            return {**(read_state(self.directory) or {}),
                    "nbd_connections": self.nbd.connection_count,
                    "workers": self.workers.loads() if self.workers is not None else []}
        if command == "check":
            return self._check()
        if command == "attach":
            return {"device": kernel.attach(args["id"])}
        if command == "detach":
            dev_id = kernel.resolve(str(args["target"]))
            kernel.detach(dev_id)
            return {"id": dev_id}
        if command == "mount":
            return kernel.mount(args["id"], args["mountpoint"], args.get("mkfs"),
                                args.get("options"), args.get("force", False))
        if command == "umount":
            kernel.umount(args["mountpoint"])
            return {}
        origin = _snapshot_origin(command, args)
        if origin is not None:
            with kernel.frozen(origin):
                result = commands.run(self.pool, command, args, fds, cancelled)
            if command == "create-snap" and args.get("attach"):
                # the new device straight away (one request instead of two); if the attach
                # fails the snapshot stays, as after a create-snap and a failed attach
                result["device"] = kernel.attach(int(args["id"]))
            return result
        return commands.run(self.pool, command, args, fds, cancelled)

    def _check(self) -> dict[str, Any]:
        """Check the live pool's committed metadata while nothing can commit."""
        from ..tools.check import check

        assert self.pool is not None
        dp = self.pool.dp
        with dp.quiesced():
            dp.commit_gated()
            report = check(self.pool.meta_path)
        return {"errors": report.errors, "leaks": report.leaks, "clean": report.clean}


def _snapshot_origin(command: str, args: dict[str, Any]) -> int | None:
    """The origin volume of a snapshot request (verb or kernel message), else None."""
    if command == "create-snap":
        return int(args["origin_id"])
    if command == "message":
        words = str(args.get("text", "")).split()
        if len(words) == 3 and words[0] == "create_snap" and words[2].isascii() and \
                words[2].isdigit():
            return int(words[2])
    return None
