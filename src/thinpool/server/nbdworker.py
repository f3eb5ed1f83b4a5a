"""An NBD worker process (``python -m thinpool.server.nbdworker``), started by ``workers``.

It serves the NBD connections the pool process hands it (``NBDServer``
with ``adopt_only``): the handshake, then every request.  Reads and
in-place overwrites whose blocks are in the pool's shared mapping table
run here (``block.mirrored``); everything else goes to the pool process
over one NBD connection per client connection to ``workers.sock``
(``nbd.client``), as do the listing and opening of exports, so a client
sees the same exports, flags and errors as from the pool process.

Exits when the pool process closes its socket pair (after finishing its
connections) and is killed when the pool process dies (PDEATHSIG).
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import logging
import os
import signal
import socket
import sys
from typing import Sequence

from ..block.mirrored import MirroredDevice
from ..block.sharedmap import SharedMappingTable
from ..errors import DataPathError
from ..linux import libc
from ..linux.cpu import SharedCpu, spread_cpu
from ..nbd.backend import ExportNotFound
from ..nbd.client import ClientExport, list_exports
from ..nbd.server import NBDServer

log = logging.getLogger("thinpool.server")

PR_SET_PDEATHSIG = 1


class WorkerExport:
    """A volume served by a worker: local reads and overwrites, the rest upstream."""

    def __init__(self, upstream: ClientExport, local: MirroredDevice, description: str) -> None:
        self.upstream = upstream
        self.local = local
        self.size = upstream.size
        self.read_only = upstream.read_only
        self.can_trim = upstream.can_trim
        self.can_zero = upstream.can_zero
        self.can_fast_zero = upstream.can_fast_zero
        self.can_cache = upstream.can_cache
        self.can_multi_conn = upstream.can_multi_conn
        self.block_sizes = upstream.block_sizes
        self.description = description

    def readinto(self, offset: int, buf: memoryview) -> None:
        if not self.local.readinto(offset, buf):
            self.upstream.readinto(offset, buf)

    def write(self, offset: int, data: memoryview, fua: bool) -> None:
        if self.read_only or not self.local.write(offset, data):
            self.upstream.write(offset, data, fua)
        elif fua:
            self.upstream.flush()

    def write_many(self, writes: Sequence[tuple[int, memoryview]]) -> None:
        """In order: in place until one cannot be, then that one and the rest upstream."""
        for i, (offset, data) in enumerate(writes):
            if self.read_only or not self.local.write(offset, data):
                self.upstream.write_many(writes[i:])
                return

    def flush(self) -> None:
        self.upstream.flush()

    def trim(self, offset: int, length: int, fua: bool) -> None:
        self.upstream.trim(offset, length, fua)

    def write_zeroes(self, offset: int, length: int, may_trim: bool, fast_only: bool,
                     fua: bool) -> None:
        self.upstream.write_zeroes(offset, length, may_trim, fast_only, fua)

    def extents(self, offset: int, length: int) -> list[tuple[int, int]]:
        return self.upstream.extents(offset, length)

    def cache(self, offset: int, length: int) -> None:
        self.upstream.cache(offset, length)

    def close(self) -> None:
        self.upstream.close()


class WorkerCatalog:
    """The pool's exports, as the pool process's internal socket names them."""

    def __init__(self, upstream: str, table: SharedMappingTable, data_fd: int,
                 block_size: int) -> None:
        self.upstream = upstream
        self.table = table
        self.data_fd = data_fd
        self.block_size = block_size

    def list_exports(self) -> list[tuple[str, str]]:
        return list_exports(self.upstream)  # listed as the pool lists them

    def open_export(self, name: str) -> WorkerExport:
        upstream = ClientExport.connect(self.upstream, name)
        try:
            dev_id, sep, description = upstream.description.partition("|")
            if not sep or not dev_id.isdigit():
                raise DataPathError(errno.EPROTO, "the pool's internal NBD socket did not name "
                                                  "the volume")
            local = MirroredDevice(self.table, self.data_fd, int(dev_id), self.block_size)
            return WorkerExport(upstream, local, description)
        except BaseException:
            upstream.close()
            raise


def _die_with_parent() -> None:
    prctl = libc.function("prctl", argtypes=[ctypes.c_int] + [ctypes.c_ulong] * 4)
    if prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise libc.os_error()
    if os.getppid() == 1:  # the pool process is already gone
        os._exit(1)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="thinpool.server.nbdworker")
    ap.add_argument("--upstream", required=True)
    ap.add_argument("--data-fd", type=int, required=True)
    ap.add_argument("--table-fd", type=int, required=True)
    ap.add_argument("--channel-fd", type=int, required=True)
    ap.add_argument("--block-size", type=int, required=True)
    ap.add_argument("--index", type=int, default=0)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format=f"%(asctime)s nbd-worker-{args.index} %(levelname)s %(message)s")
    try:
        _die_with_parent()
    except OSError as e:  # a worker that could outlive the pool must not run
        log.error("cannot ask to be killed with the pool process (prctl): %s", e.strerror)
        return 1
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the pool process decides when to stop
    table = SharedMappingTable.attach(args.table_fd)
    channel = socket.socket(fileno=args.channel_fd)

    def closed() -> None:
        try:
            channel.send(b"d")
        except OSError:
            pass

    # the pool process's threads share spread_cpu(0); worker k's share the next CPU round
    server = NBDServer(WorkerCatalog(args.upstream, table, args.data_fd, args.block_size),
                       adopt_only=True, on_close=closed,
                       share_cpu=SharedCpu(spread_cpu(args.index + 1)))
    server.start()
    try:
        while True:
            try:
                _, fds, _, _ = socket.recv_fds(channel, 16, 16)
            except OSError as e:
                log.error("reading the pool process's socket pair failed: %s", e)
                break
            if not fds:
                break
            for fd in fds:
                server.adopt(socket.socket(fileno=fd))
    finally:
        server.stop()
        table.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
