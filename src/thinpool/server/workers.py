"""NBD worker processes: the pool process's side.

With ``thinpool serve --workers N`` the pool process starts N worker
processes (``nbdworker``) and shares with them the data file and a
``SharedMappingTable`` that mirrors its mapping caches
(``DataPath.share_mappings``).  Each NBD connection the pool accepts is
served where fewest connections are, the pool process first on a tie, so
one client always talks to the pool process and eight are spread over
every process (each with its own GIL). Each process's readers of pipelining
clients share one CPU of their own (``linux.cpu.spread_cpu``: both of the
pool process's servers the first, worker k the (k+2)-th, round the CPUs).  The connections of one client
process (on the unix socket, by its pid) all go where its first one went
while it lives: a multi-conn client such as ``nbdcopy`` is one client, and
split over processes its requests would cost a copy and a hop each.  A worker serves the reads and
in-place overwrites whose blocks the table knows, and sends every other
request - provisioning and copy-on-write writes, trims, zeroes, flushes,
block status - over its own NBD connection to the pool process's internal
socket ``DIR/workers.sock`` (mode 0600), whose exports
(``UpstreamCatalog``) publish the mappings of every block they read, so
the worker finds them the next time.

Hand-off: an accepted socket goes to a worker over a unix socket pair with
``SCM_RIGHTS``; the worker sends one byte back whenever one of its
connections ends, which is how the pool knows the workers' loads.  Only
plain connections are handed over (a server with TLS serves every
connection itself).

Life and death: workers get SIGKILL when the pool process dies
(``PR_SET_PDEATHSIG``) and exit when their socket pair closes; ``stop``
closes them, lets them finish their connections and waits.  A worker that
dies takes only its own connections (their unacknowledged writes, as a
dropped connection would); the pool logs it and stops handing it any.
Nothing a worker acknowledged is lost: its writes are in the data file's
page cache before the reply, and flushes and FUA go through the pool.

Internal protocol of ``workers.sock``: the exports and the listing of
``nbd.sock``, except that an opened export's description is
``"<volume id>|<public description>"``, which tells the worker which
device's mappings to look up.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
import subprocess
import sys
import threading

from ..block.device import PUBLISH_WINDOW
from ..block.sharedmap import SharedMappingTable
from ..linux.procs import process_exists
from ..pool.engine import Pool
from .exports import PoolCatalog, VolumeExport

log = logging.getLogger("thinpool.server")

WORKER_SOCKET = "workers.sock"
HOMES_KEPT = 1024  # client processes remembered before the dead ones are forgotten


class UpstreamExport(VolumeExport):
    """A volume for a worker's forwarded requests: reads and writes publish the blocks'
    mappings (and those around them), so the worker serves the next ones itself."""

    def readinto(self, offset: int, buf: memoryview) -> None:
        self.dev.readinto(offset, buf)
        self.dev.publish(offset, len(buf))

    def write(self, offset: int, data: memoryview, fua: bool) -> None:
        self._writable()
        in_place = self.dev.write(offset, data, fua)
        # an overwrite the worker sent here: it lacks the blocks around too; a provisioning
        # write (a sequential fill, say) publishes only its own blocks
        self.dev.publish(offset, len(data), window=PUBLISH_WINDOW if in_place else 1)


class UpstreamCatalog(PoolCatalog):
    """The exports of ``workers.sock``: volumes by decimal id, with the id in the description."""

    def open_export(self, name: str) -> VolumeExport:
        export = super().open_export(name)
        return UpstreamExport(export.dev, export.read_only,
                              f"{export.dev.dev_id}|{export.description}")


class _Worker:
    def __init__(self, index: int, proc: subprocess.Popen[bytes], channel: socket.socket,
                 owner: WorkerProcesses) -> None:
        self.owner = owner
        self.index = index
        self.proc = proc
        self.channel = channel
        self.connections = 0
        self.alive = True
        self.reader = threading.Thread(target=self._read_closes, daemon=True,
                                       name=f"nbd-worker-{index} closes")

    def _read_closes(self) -> None:
        while True:
            try:
                got = self.channel.recv(256)
            except OSError:
                got = b""
            if not got:
                break
            with self.owner.lock:
                self.connections -= len(got)
        with self.owner.lock:
            self.alive = False
            stopping = self.owner.stopping
        if not stopping:
            try:
                status: int | str = self.proc.wait(5.0)
            except subprocess.TimeoutExpired:
                status = "none yet"
            log.error("NBD worker %d (pid %d) died (exit status %s); its connections are "
                      "gone, new ones are served by the others", self.index, self.proc.pid,
                      status)


class WorkerProcesses:
    """``count`` worker processes that serve NBD connections of ``pool`` handed to them.

    Thread-safe.  ``start`` raises ``OSError`` when a process cannot be
    started (nothing is left running); the pool's data path must already
    share ``table``.
    """

    def __init__(self, pool: Pool, table: SharedMappingTable, upstream: str, count: int) -> None:
        self.pool = pool
        self.table = table
        self.upstream = upstream
        self.count = count
        self.lock = threading.Lock()  # the workers' loads and liveness
        self.stopping = False
        self._workers: list[_Worker] = []
        self._homes: dict[int, _Worker | None] = {}  # client pid -> where it is served

    def start(self) -> None:
        try:
            for i in range(self.count):
                self._workers.append(self._spawn(i))
        except BaseException:
            self.stop()
            raise

    def _spawn(self, index: int) -> _Worker:
        mine, theirs = socket.socketpair()
        try:
            args = [sys.executable, "-m", "thinpool.server.nbdworker",
                    "--upstream", self.upstream, "--data-fd", str(self.pool.data_fd),
                    "--table-fd", str(self.table.fd), "--channel-fd", str(theirs.fileno()),
                    "--block-size", str(self.pool.block_size), "--index", str(index)]
            proc = subprocess.Popen(args, pass_fds=(self.pool.data_fd, self.table.fd,
                                                    theirs.fileno()),
                                    stdin=subprocess.DEVNULL)
        except BaseException:
            mine.close()
            raise
        finally:
            theirs.close()
        worker = _Worker(index, proc, mine, self)
        worker.reader.start()
        return worker

    def offer(self, sock: socket.socket, own: int) -> bool:
        """Hand ``sock`` over, or not (the module docstring); True when handed over (the
        caller closes its copy).  ``own``: the pool process's connections."""
        pid = _peer_pid(sock)
        with self.lock:
            worker = self._choose(pid, own)
            if worker is None:
                return False
            worker.connections += 1
        try:
            socket.send_fds(worker.channel, [b"c"], [sock.fileno()])
        except OSError as e:
            with self.lock:
                worker.connections -= 1
            log.warning("NBD worker %d: handing a connection over failed (%s); serving it "
                        "in the pool process", worker.index, e)
            return False
        return True

    def _choose(self, pid: int | None, own: int) -> _Worker | None:
        """Where a connection of client process ``pid`` goes (lock held): where that
        process's connections went while it lives, else the least loaded worker if it
        serves fewer than ``own``; None is the pool process."""
        if pid is not None and pid in self._homes:
            home = self._homes[pid]
            if process_exists(pid) and (home is None or home.alive):
                return home
            del self._homes[pid]
        alive = [w for w in self._workers if w.alive]
        worker = min(alive, key=lambda w: w.connections) if alive else None
        if worker is not None and worker.connections >= own:
            worker = None
        if pid is not None:
            if len(self._homes) >= HOMES_KEPT:
                self._homes = {p: h for p, h in self._homes.items() if process_exists(p)}
            self._homes[pid] = worker
        return worker

    def stop(self, timeout: float = 15.0) -> None:
        """Close the workers' socket pairs, let them finish their connections, wait."""
        with self.lock:
            self.stopping = True
        for w in self._workers:
            try:
                w.channel.shutdown(socket.SHUT_WR)
            except OSError:
                pass
        for w in self._workers:
            try:
                w.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("NBD worker %d did not stop in %.0f s; killing it", w.index, timeout)
                w.proc.kill()
                w.proc.wait()
            w.reader.join(5.0)
            w.channel.close()
        self._workers.clear()

    def loads(self) -> list[dict[str, object]]:
        """Each worker's pid, connection count and whether it is alive."""
        with self.lock:
            return [{"pid": w.proc.pid, "connections": w.connections, "alive": w.alive}
                    for w in self._workers]


def _peer_pid(sock: socket.socket) -> int | None:
    """The client's process id (unix sockets), else None."""
    if sock.family != socket.AF_UNIX:
        return None
    try:
        pid, _, _ = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                        struct.calcsize("3i")))
    except OSError:
        return None
    return pid or None


def upstream_path(directory: str) -> str:
    return os.path.join(directory, WORKER_SOCKET)
