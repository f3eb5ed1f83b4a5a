"""The NBD server: sockets and threads around the protocol state machine.

``NBDServer(catalog, unix_path=..., tcp=..., tls=...)`` listens on a Unix
socket (mode 0600; a stale socket file is replaced, a live one or a non-socket
refused; removed again by ``stop``) and/or a TCP address. It is meant to be
embedded: ``start()`` returns at once, ``stop()`` stops accepting, lets every
connection finish the requests it already received, closes the exports and
joins every thread it started.

Per connection: one reader thread runs the handshake (under a deadline) and
then parses requests. WRITEs without FUA, small READs (up to ``inline_max``
bytes) and BLOCK_STATUS run in the reader itself: for page-cache speed
requests a hand-off to another thread costs more (GIL, wake-ups) than the
request. A large WRITE's payload is already in the reader's buffer; handing
it over for the pwrite saved nothing (nbdcopy's 1 MiB writes over 4
connections: 760 -> 880 MiB/s and 1.36 -> 1.15 s of server CPU per GiB run
in the readers; over one connection within 3% at 13% less CPU). A large
READ is not, while its connection is the only one of the server that
*streams* (its last receive brought a READ or WRITE of more than
``SHARED_MAX`` bytes): the pread and
the send of one request would then never overlap those of the next (one
connection: 1,770 -> 1,310 MiB/s). Once ``STREAMING_INLINE`` connections of
the server stream, large READs run in the readers too, each sending
their reply at once: the readers of different connections overlap one
another, and the hand-offs cost more CPU than they save (eight clients'
1 MiB reads over two processes: 0.56-0.70 -> 0.43-0.56 ms of server CPU per
read). A connection stops streaming when a receive brings only small
requests, when it has waited ``stream_idle`` seconds for data (a ``poll``
before each receive while it streams), or when it closes.  Everything else
(FLUSH, FUA writes, TRIM, WRITE_ZEROES, CACHE, large READs of a lone
stream) goes to a small pool of worker threads
(created on demand, up to ``workers_per_connection``), so
pipelined slow requests run concurrently; an export whose writes may block
for long (waiting for space, say) should be served with ``inline_max=None``.
Each reply goes out in one ``sendmsg`` under the connection's send lock; the
reader holds back the replies of the requests it ran itself while more
requests are already received, and sends up to ``HELD_REPLIES`` of them in one ``sendmsg`` (before
it waits for data, hands a request to a worker or has held that many), so a
pipelining client costs fewer system calls per request and a lone request is
answered at once. Small WRITEs already received back to back (up to
``WRITE_BATCH`` of them, ``WRITE_BATCH_BYTES`` of payload) go to the
export's optional ``write_many`` together, in order, before the reader does
anything else (a thin volume then provisions them with one allocation and one
metadata insert); if the batch fails they are done again one by one, so each
gets its own answer. The reader stops reading while
the requests in flight hold more than ``inflight_bytes`` of payload or number
``max_inflight``, so a client cannot make the server buffer without bound;
and, while it has requests in flight itself, while those of all connections
hold more than ``total_inflight_bytes``, so the server's memory does not grow
with the number of clients. A
client that vanishes, sends garbage or stops reading its replies (after
``send_timeout``) loses only its own connection.

Readers whose clients pipeline small requests (more than one READ or WRITE
of at most ``SHARED_MAX`` bytes or BLOCK_STATUS between two receives, and no
larger READ or WRITE) join the server's ``linux.cpu.SharedCpu``: while two or more do,
their threads run on one CPU, where handing the GIL over is a plain switch
instead of a cross-CPU wake-up on every system call (8 such connections:
33k -> 60k reads/s here, 32 -> 16 µs of CPU per request). A reader leaves
when its client pauses (a receive waits over ``IDLE_LEAVE``) or sends a
larger READ or WRITE (their copies run in the kernel, on any CPU); worker
threads and readers of clients that wait for each reply (latency-bound)
keep every CPU. ``share_cpu=False`` turns this off; a ``SharedCpu`` given as
``share_cpu`` is used instead of the server's own (one per process: several
servers in one process share its GIL).

Structured READs of at least ``sparse_read_min`` bytes (not DF) ask the
export for its extents first and send ranges that read as zeroes as hole
chunks, so unprovisioned space crosses the socket as 32 bytes per run.

TLS uses the ``ssl`` module through memory BIOs (so one thread can read
while others write), with certificates in qemu's ``tls-creds-x509``
directory layout: ``server-cert.pem``, ``server-key.pem`` and, optionally,
``ca-cert.pem``; when the CA is present client certificates are required and
verified against it (qemu's ``verify-peer=on``), unless ``verify_peer`` is
False.
"""

from __future__ import annotations

import errno
import logging
import os
import queue
import select
import selectors
import socket
import ssl
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence, cast

from ..errors import DataPathError, ThinpoolError
from ..linux.cpu import SharedCpu
from ..unixsock import UnixSocketError, bind_private, sendmsg_all
from . import protocol as P
from .backend import Catalog, Export, ExportNotFound

log = logging.getLogger("thinpool.nbd")

MIN_HOLE_CHUNK = 4096
HELD_REPLIES = 16  # replies of inline requests sent together at most
WRITE_BATCH = 16  # small writes received back to back, done together at most
WRITE_BATCH_BYTES = 1 << 20  # ... and their payload bytes
MAX_READ_CHUNKS = 64
IDLE_LEAVE = 0.01  # a pipelining reader waiting this long for data leaves the shared CPU
SHARED_MAX = 16 << 10  # requests up to this size are GIL-bound; larger ones, kernel-bound
STREAMING_INLINE = 2  # connections streaming large requests at which large READs run inline


class NBDServerError(ThinpoolError):
    """The server cannot start: bad address, socket in use, bad TLS credentials."""


@dataclass(frozen=True)
class TLSConfig:
    """TLS credentials in qemu's tls-creds-x509 layout and the TLS mode."""

    directory: Path
    mode: P.TLSMode = P.TLSMode.REQUIRED
    verify_peer: bool = True

    def context(self) -> ssl.SSLContext:
        """The server-side SSL context (TLS >= 1.2); one-line errors."""
        if self.mode is P.TLSMode.OFF:
            raise NBDServerError("TLS credentials given with TLS mode 'off'")
        directory = Path(self.directory)
        cert, key, ca = (directory / n for n in ("server-cert.pem", "server-key.pem", "ca-cert.pem"))
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            ctx.load_cert_chain(cert, key)
            if ca.exists() and self.verify_peer:
                ctx.load_verify_locations(cafile=str(ca))
                ctx.verify_mode = ssl.CERT_REQUIRED
        except (OSError, ssl.SSLError) as e:
            raise NBDServerError(f"TLS credentials in {directory}: {e.strerror or e}") from None
        return ctx


class _BufferPool:
    """Recycled bytearrays in power-of-two sizes (>= 4 KiB), at most ``limit`` bytes kept."""

    def __init__(self, limit: int = 64 << 20) -> None:
        self._free: dict[int, list[bytearray]] = {}
        self._kept = 0
        self._limit = limit
        self._lock = threading.Lock()

    def get(self, n: int) -> bytearray:
        size = 4096 if n <= 4096 else 1 << (n - 1).bit_length()
        with self._lock:
            free = self._free.get(size)
            if free:
                self._kept -= size
                return free.pop()
        return bytearray(size)

    def put(self, buf: bytearray) -> None:
        size = len(buf)
        with self._lock:
            if self._kept + size <= self._limit:
                self._free.setdefault(size, []).append(buf)
                self._kept += size


class _SocketTransport:
    """A connected socket and a poller for it; the two transports' common part."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.poller = select.poll()
        self.poller.register(sock, select.POLLIN)

    def readable(self, timeout: float) -> bool:
        """Whether data (or the end of the stream, or an error) comes within ``timeout`` s."""
        return bool(self.poller.poll(timeout * 1000))


class _PlainTransport(_SocketTransport):
    """The socket's own I/O, unencrypted."""

    def recv_into(self, view: memoryview) -> int:
        return self.sock.recv_into(view)

    def send(self, bufs: Sequence[bytes | memoryview]) -> None:
        sendmsg_all(self.sock, bufs)

    def close(self) -> None:
        self.sock.close()


class _TLSTransport(_SocketTransport):
    """TLS over memory BIOs; ``lock`` guards the SSL object, raw I/O runs outside it."""

    def __init__(self, sock: socket.socket, ctx: ssl.SSLContext,
                 flush_lock: threading.Lock) -> None:
        super().__init__(sock)
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.obj = ctx.wrap_bio(self.incoming, self.outgoing, server_side=True)
        self.lock = threading.Lock()
        self.flush_lock = flush_lock  # the connection's send lock
        self.raw = bytearray(64 << 10)

    def readable(self, timeout: float) -> bool:
        """Whether data (or the end of the stream, or an error) comes within ``timeout`` s;
        bytes already received count, even a partial TLS record."""
        with self.lock:
            if self.obj.pending() or self.incoming.pending:
                return True
        return super().readable(timeout)

    def handshake(self) -> None:
        """Run the server handshake (the socket's timeout bounds each read)."""
        while True:
            try:
                self.obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                pass
            self.sock.sendall(self.outgoing.read())
            n = self.sock.recv_into(self.raw)
            if n == 0:
                raise ConnectionError("client closed the connection during the TLS handshake")
            self.incoming.write(memoryview(self.raw)[:n])
        self.sock.sendall(self.outgoing.read())

    def recv_into(self, view: memoryview) -> int:
        while True:
            with self.lock:
                try:
                    n = cast(int, self.obj.read(len(view), view))  # type: ignore[arg-type]
                except ssl.SSLWantReadError:
                    n = -1
                except (ssl.SSLEOFError, ssl.SSLZeroReturnError):
                    n = 0
                pending = self.outgoing.pending
            if pending:  # TLS records the read produced (alerts, key updates)
                with self.flush_lock, self.lock:
                    data = self.outgoing.read()
                self.sock.sendall(data)
            if n >= 0:
                return n
            got = self.sock.recv_into(self.raw)
            with self.lock:
                if got:
                    self.incoming.write(memoryview(self.raw)[:got])
                else:
                    self.incoming.write_eof()

    def send(self, bufs: Sequence[bytes | memoryview]) -> None:
        with self.lock:
            for b in bufs:
                self.obj.write(b)
            data = self.outgoing.read()
        self.sock.sendall(data)

    def close(self) -> None:
        """Send close_notify (without waiting for the peer's), then close."""
        with self.lock:
            try:
                self.obj.unwrap()
            except (OSError, ssl.SSLError):  # SSLWantReadError: the peer's close_notify is not awaited
                pass
            data = self.outgoing.read()
        try:
            self.sock.sendall(data)
        except OSError:
            pass
        self.sock.close()


_STOP = object()
_WriteMany = Callable[[Sequence[tuple[int, memoryview]]], None]


class _Connection:
    """One client: the reader thread, its workers, its export."""

    def __init__(self, server: NBDServer, sock: socket.socket, peer: str) -> None:
        self.server = server
        self.sock = sock
        self.peer = peer
        self.send_lock = threading.Lock()
        self.transport: _PlainTransport | _TLSTransport = _PlainTransport(sock)
        self.export: Export | None = None
        self.replies: P.Replies | None = None
        self.dead = False
        self.queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self.workers: list[threading.Thread] = []
        self.cond = threading.Condition()
        self.waiting = False  # the reader waits on cond for in-flight requests to finish
        self.inflight = 0
        self.inflight_bytes = 0
        self.held: list[bytes | memoryview] = []  # reader thread only: replies not sent yet
        self.held_buffers: list[bytearray] = []  # ... and the buffers they point into
        self.held_count = 0
        self.on_shared_cpu = False  # reader thread only: a member of the server's SharedCpu
        self.streaming = False  # reader thread only: counted in the server's ``streaming``
        self.thread = threading.Thread(target=self.run, name=f"nbd-conn {peer}", daemon=True)

    # -- lifecycle ----------------------------------------------------------

    def run(self) -> None:
        try:
            proto = P.ServerConnection(self.server.tls_mode, allocate=self.server.buffers.get)
            if self._negotiate(proto):
                self._serve(proto)
        except Exception:  # the connection's last resort: never kill the server
            log.exception("nbd %s: internal error, closing the connection", self.peer)
        finally:
            self._finish()

    def _leave_shared_cpu(self) -> None:
        assert self.server.shared_cpu is not None
        self.server.shared_cpu.leave()
        self.on_shared_cpu = False

    def _set_streaming(self, on: bool) -> None:
        self.streaming = on
        self.server.count_streaming(1 if on else -1)

    def _finish(self) -> None:
        if self.on_shared_cpu:
            self._leave_shared_cpu()
        if self.streaming:
            self._set_streaming(False)
        with self.cond:
            while self.inflight:
                self.waiting = True
                self.cond.wait()
        for _ in self.workers:
            self.queue.put(_STOP)
        for t in self.workers:
            t.join()
        if self.export is not None:
            try:
                self.export.close()
            except Exception:
                log.exception("nbd %s: closing the export failed", self.peer)
        try:
            self.transport.close()
        except OSError:
            pass
        self.server._forget(self)

    def shutdown(self, how: int) -> None:
        """Wake the reader (SHUT_RD: it sees EOF) or break the connection (SHUT_RDWR)."""
        try:
            self.sock.shutdown(how)
        except OSError:
            pass

    # -- handshake ------------------------------------------------------------

    def _flush(self, proto: P.ServerConnection) -> None:
        data = proto.data_to_send()
        if data:
            self.transport.send([data])

    def _negotiate(self, proto: P.ServerConnection) -> bool:
        server = self.server
        deadline = time.monotonic() + server.handshake_timeout
        try:
            while True:
                ev = proto.next_event()
                if isinstance(ev, P.Closed):
                    try:  # e.g. the ACK of NBD_OPT_ABORT, which clients need not read
                        self._flush(proto)
                    except (OSError, ssl.SSLError):
                        pass
                    if not ev.clean:
                        log.info("nbd %s: %s", self.peer, ev.reason)
                    return False
                self._flush(proto)
                if ev is P.NEED_DATA:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        log.info("nbd %s: handshake timed out", self.peer)
                        return False
                    self.sock.settimeout(remaining)
                    proto.buffer_updated(self.transport.recv_into(proto.get_buffer()))
                elif isinstance(ev, P.ExportRequest):
                    if self._open(proto, ev):
                        self._flush(proto)
                        self._enter_transmission()
                        return True
                elif isinstance(ev, P.ListExports):
                    try:
                        exports = server.catalog.list_exports()
                    except Exception as e:
                        log.exception("nbd %s: listing the exports failed", self.peer)
                        proto.reject_list(str(e) if isinstance(e, ThinpoolError) else "internal error")
                    else:
                        proto.reply_list(exports)
                elif isinstance(ev, P.StartTLS):
                    assert server.ssl_context is not None
                    tls = _TLSTransport(self.sock, server.ssl_context, self.send_lock)
                    self.sock.settimeout(max(deadline - time.monotonic(), 0.001))
                    tls.handshake()
                    self.transport = tls
                    proto.tls_started()
        except (OSError, ssl.SSLError) as e:
            log.info("nbd %s: connection lost during the handshake: %s", self.peer, e)
            return False

    def _open(self, proto: P.ServerConnection, ev: P.ExportRequest) -> bool:
        """Answer INFO/GO/EXPORT_NAME; True when transmission starts."""
        try:
            export = self.server.catalog.open_export(ev.name)
        except ExportNotFound as e:
            proto.reject_export(str(e) or f"no export named {ev.name!r}")
            return False
        except ThinpoolError as e:
            proto.reject_export(str(e), P.REP_ERR_POLICY)
            return False
        except Exception:
            log.exception("nbd %s: opening export %r failed", self.peer, ev.name)
            proto.reject_export("internal error", P.REP_ERR_POLICY)
            return False
        try:
            info = P.ExportInfo(
                name=ev.name, size=export.size, read_only=export.read_only,
                can_trim=export.can_trim, can_zero=export.can_zero,
                can_fast_zero=export.can_fast_zero, can_cache=export.can_cache,
                can_multi_conn=export.can_multi_conn, block_sizes=tuple(export.block_sizes),  # type: ignore[arg-type]
                description=export.description)
        except Exception as e:
            log.error("nbd %s: export %r: %s", self.peer, ev.name, e)
            export.close()
            proto.reject_export("the export is misconfigured on the server", P.REP_ERR_POLICY)
            return False
        proto.accept_export(info)
        if ev.kind is P.ExportRequestKind.INFO:
            export.close()
            return False
        self.export = export
        self.replies = proto.replies
        return True

    def _enter_transmission(self) -> None:
        self.sock.settimeout(None)
        timeout = self.server.send_timeout
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO,
                             struct.pack("ll", int(timeout), int(timeout % 1 * 1e6)))

    # -- transmission -----------------------------------------------------------

    def _serve(self, proto: P.ServerConnection) -> None:
        server = self.server
        max_bytes, max_count, inline_max = server.inflight_bytes, server.max_inflight, server.inline_max
        total_max, stream_idle = server.total_inflight_bytes, server.stream_idle
        cond = self.cond
        recv_into = self.transport.recv_into
        Request, InvalidRequest, NEED_DATA = P.Request, P.InvalidRequest, P.NEED_DATA
        CMD_READ, CMD_WRITE, CMD_BLOCK_STATUS, FUA = (P.CMD_READ, P.CMD_WRITE, P.CMD_BLOCK_STATUS,
                                                      P.CMD_FLAG_FUA)
        write_many: _WriteMany | None = getattr(self.export, "write_many", None)
        shared_cpu = server.shared_cpu
        batch: list[P.Request] = []  # small writes received back to back, not done yet
        batch_bytes = 0
        small = 0  # READs, WRITEs up to SHARED_MAX and BLOCK_STATUS since the last receive
        large = False  # ... and whether a larger READ or WRITE came with them
        while True:
            ev = proto.next_event()
            if type(ev) is Request:
                cmd = ev.command
                if cmd == CMD_READ or cmd == CMD_WRITE:
                    if ev.length <= SHARED_MAX:
                        small += 1
                    else:
                        large = True
                elif cmd == CMD_BLOCK_STATUS:
                    small += 1
                plain_write = cmd == CMD_WRITE and not ev.flags & FUA
                if inline_max is not None and plain_write and write_many is not None \
                        and ev.length <= inline_max:
                    batch.append(ev)
                    batch_bytes += ev.length
                    if len(batch) >= WRITE_BATCH or batch_bytes >= WRITE_BATCH_BYTES:
                        self._execute_writes(batch, write_many)
                        batch_bytes = 0
                    continue
                if batch:
                    self._execute_writes(batch, write_many)  # type: ignore[arg-type]  # batch => write_many
                    batch_bytes = 0
                if inline_max is not None and (plain_write or cmd == CMD_BLOCK_STATUS or
                                               (cmd == CMD_READ and ev.length <= inline_max)):
                    self._execute(ev, True)
                else:
                    if self.held:
                        self._send_held()
                    if cmd == CMD_READ and inline_max is not None and \
                            server.streaming >= STREAMING_INLINE:
                        self._execute(ev, False)  # a large reply goes out at once
                    else:
                        self._dispatch(ev)
                continue
            if batch:
                self._execute_writes(batch, write_many)  # type: ignore[arg-type]  # batch => write_many
                batch_bytes = 0
            if ev is NEED_DATA:
                if self.held:
                    self._send_held()
                if self.inflight_bytes > max_bytes or self.inflight >= max_count:
                    with cond:
                        while self.inflight_bytes > max_bytes or self.inflight >= max_count:
                            self.waiting = True
                            cond.wait()
                if server.total_inflight > total_max and self.inflight_bytes:
                    server.wait_for_budget(self)
                if shared_cpu is not None:
                    if large:
                        if self.on_shared_cpu:
                            self._leave_shared_cpu()  # copies in the kernel: any CPU
                    elif small > 1 and not self.on_shared_cpu:
                        shared_cpu.join()  # the client pipelines small requests: GIL-bound
                        self.on_shared_cpu = True
                if (large or small) and large != self.streaming:
                    self._set_streaming(large)  # large requests start a stream, small ones end it
                small = 0
                large = False
                if self.streaming and not self.transport.readable(stream_idle):
                    self._set_streaming(False)  # the client paused: it streams no more
                started = time.monotonic() if self.on_shared_cpu else 0.0
                try:
                    n = recv_into(proto.get_buffer())
                except (OSError, ssl.SSLError) as e:
                    log.info("nbd %s: receive failed: %s", self.peer, e)
                    n = 0
                if self.on_shared_cpu and time.monotonic() - started > IDLE_LEAVE:
                    self._leave_shared_cpu()  # the client paused: every CPU again
                proto.buffer_updated(n)
            elif type(ev) is InvalidRequest:
                self._reply([ev.reply], None, True)
            elif isinstance(ev, P.Closed):
                if self.held:
                    self._send_held()
                if not ev.clean:
                    log.info("nbd %s: %s", self.peer, ev.reason)
                return

    def _execute_writes(self, batch: list[P.Request], write_many: _WriteMany) -> None:
        """Do a batch of small writes with the export's ``write_many`` and hold their
        replies; when it fails, do them one by one (each gets its own answer).  Empties
        ``batch``."""
        if len(batch) == 1:
            self._execute(batch.pop(), True)
            return
        try:
            write_many([(r.offset, r.data) for r in batch if r.data is not None])
        except Exception as e:
            if not isinstance(e, DataPathError):
                log.exception("nbd %s: export failed on a batch of %d writes; doing them "
                              "one by one", self.peer, len(batch))
            for r in batch:
                self._execute(r, True)
            batch.clear()
            return
        assert self.replies is not None
        ok, put = self.replies.ok, self.server.buffers.put
        for r in batch:
            r.data = None
            if r.buffer is not None:
                put(r.buffer)
                r.buffer = None
            self._reply([ok(r.cookie)], None, True)
        batch.clear()

    def _dispatch(self, req: P.Request) -> None:
        weight = req.length if req.command in (P.CMD_READ, P.CMD_WRITE) else 0
        if weight:
            self.server.take_budget(weight)
        with self.cond:
            self.inflight += 1
            self.inflight_bytes += weight
            spawn = self.inflight > len(self.workers) < self.server.workers_per_connection
        if spawn:
            t = threading.Thread(target=self._work, name=f"nbd-worker {self.peer}", daemon=True)
            self.workers.append(t)
            t.start()
        self.queue.put(req)

    def _work(self) -> None:
        if self.server.shared_cpu is not None:
            self.server.shared_cpu.release_inherited()  # large I/O and flushes use any CPU
        q, cond, execute = self.queue, self.cond, self._execute
        while True:
            req = q.get()
            if req is _STOP:
                return
            assert isinstance(req, P.Request)
            weight = req.length if req.command in (P.CMD_READ, P.CMD_WRITE) else 0
            try:
                execute(req)
            finally:
                with cond:
                    self.inflight -= 1
                    self.inflight_bytes -= weight
                    if self.waiting:
                        self.waiting = False
                        cond.notify()
                if weight:
                    self.server.give_budget(weight)

    def _send(self, bufs: Sequence[bytes | memoryview]) -> None:
        with self.send_lock:
            if self.dead:
                return
            try:
                self.transport.send(bufs)
            except (OSError, ssl.SSLError) as e:
                self.dead = True
                log.info("nbd %s: send failed, dropping the connection: %s", self.peer, e)
                self.shutdown(socket.SHUT_RDWR)

    def _reply(self, bufs: list[bytes | memoryview], buffer: bytearray | None, hold: bool) -> None:
        """Send one reply (``buffer``, if any, goes back to the pool after it); with ``hold``
        (reader thread only) it may wait for the next ones (see the module docstring)."""
        if hold:
            self.held += bufs
            if buffer is not None:
                self.held_buffers.append(buffer)
            self.held_count += 1
            if self.held_count >= HELD_REPLIES:
                self._send_held()
            return
        self._send(bufs)
        if buffer is not None:
            bufs.clear()
            self.server.buffers.put(buffer)

    def _send_held(self) -> None:
        held, self.held = self.held, []
        self.held_count = 0
        self._send(held)
        held.clear()
        put = self.server.buffers.put
        for b in self.held_buffers:
            put(b)
        self.held_buffers.clear()

    def _execute(self, req: P.Request, hold: bool = False) -> None:
        export, replies = self.export, self.replies
        assert export is not None and replies is not None
        cmd, cookie, flags = req.command, req.cookie, req.flags
        fua = bool(flags & P.CMD_FLAG_FUA)
        buffers = self.server.buffers
        try:
            if cmd == P.CMD_READ:
                self._read(export, replies, req, hold)
                return
            if req.length or cmd == P.CMD_FLUSH:
                if cmd == P.CMD_WRITE:
                    assert req.data is not None
                    export.write(req.offset, req.data, fua)
                elif cmd == P.CMD_FLUSH:
                    export.flush()
                elif cmd == P.CMD_TRIM:
                    export.trim(req.offset, req.length, fua)
                elif cmd == P.CMD_WRITE_ZEROES:
                    export.write_zeroes(req.offset, req.length, not flags & P.CMD_FLAG_NO_HOLE,
                                        bool(flags & P.CMD_FLAG_FAST_ZERO), fua)
                elif cmd == P.CMD_BLOCK_STATUS:
                    extents = export.extents(req.offset, min(req.length, replies.size - req.offset))
                    self._reply([replies.block_status(cookie, req.offset, req.length,
                                                      bool(flags & P.CMD_FLAG_REQ_ONE), extents)],
                                None, hold)
                    return
                elif cmd == P.CMD_CACHE:
                    if export.can_cache:
                        export.cache(req.offset, req.length)
            reply: bytes = replies.ok(cookie)
        except DataPathError as e:
            fast = cmd == P.CMD_WRITE_ZEROES and bool(flags & P.CMD_FLAG_FAST_ZERO)
            reply = replies.error(cookie, P.nbd_error(e.errno or errno.EIO, fast), str(e))
        except Exception:
            log.exception("nbd %s: export failed on %r", self.peer, req)
            reply = replies.error(cookie, P.NBD_EIO, "internal server error")
        finally:
            if req.buffer is not None:
                req.data = None
                buffers.put(req.buffer)
                req.buffer = None
        self._reply([reply], None, hold)

    def _read(self, export: Export, replies: P.Replies, req: P.Request, hold: bool) -> None:
        cookie, offset, length = req.cookie, req.offset, req.length
        buffers = self.server.buffers
        buf = buffers.get(length)
        view = memoryview(buf)[:length]
        bufs: list[bytes | memoryview]
        sent = False
        try:
            try:
                sparse_min = self.server.sparse_read_min
                if (sparse_min is not None and length >= sparse_min and replies.structured
                        and not req.flags & P.CMD_FLAG_DF):
                    runs = self._zero_runs(export, offset, length)
                    pos = 0
                    for start, run in runs:
                        if start > pos:
                            export.readinto(offset + pos, view[pos:start])
                        pos = start + run
                    if pos < length:
                        export.readinto(offset + pos, view[pos:])
                    bufs = replies.sparse_read(cookie, offset, view, runs)
                elif length:
                    export.readinto(offset, view)
                    bufs = replies.read(cookie, offset, view)
                else:
                    bufs = replies.read(cookie, offset, view)
            except DataPathError as e:
                bufs = [replies.error(cookie, P.nbd_error(e.errno or errno.EIO), str(e))]
            except Exception:
                log.exception("nbd %s: export failed on %r", self.peer, req)
                bufs = [replies.error(cookie, P.NBD_EIO, "internal server error")]
            sent = True
            self._reply(bufs, buf, hold)
        finally:
            if not sent:
                buffers.put(buf)

    @staticmethod
    def _zero_runs(export: Export, offset: int, length: int) -> list[tuple[int, int]]:
        """Ranges (relative start, length) of the request that read as zeroes,
        each >= MIN_HOLE_CHUNK, at most MAX_READ_CHUNKS // 2 of them."""
        runs: list[tuple[int, int]] = []
        pos = 0
        for _ in range(8):
            extents = export.extents(offset + pos, length - pos)
            if not extents:
                break
            for ext_len, state in extents:
                if ext_len <= 0:
                    return runs
                ext_len = min(ext_len, length - pos)
                if state & P.NBD_STATE_ZERO:
                    if runs and runs[-1][0] + runs[-1][1] == pos:
                        runs[-1] = (runs[-1][0], runs[-1][1] + ext_len)
                    else:
                        runs.append((pos, ext_len))
                pos += ext_len
                if pos >= length:
                    break
            if pos >= length:
                break
        runs = [r for r in runs if r[1] >= MIN_HOLE_CHUNK]
        return runs[:MAX_READ_CHUNKS // 2]


class NBDServer:
    """An embeddable, threaded NBD server for the exports of one ``Catalog``.

    ``unix_path`` and/or ``tcp`` = (host, port) (port 0 picks a free one, see
    ``tcp_address``). ``tls`` (a ``TLSConfig``) enables STARTTLS in its mode;
    without it STARTTLS is refused. ``start`` raises ``NBDServerError``
    when a socket cannot be bound or the credentials do not load. Limits:
    ``max_connections`` (more are accepted and closed at once), ``share_cpu``,
    ``handshake_timeout`` seconds for the whole negotiation, ``send_timeout``
    seconds for a reply to make progress, ``stream_idle`` seconds a streaming
    connection may wait for data before it stops counting as streaming; see
    the module docstring for the others. One start/stop cycle per object.

    Serving in several processes: ``dispatch(sock, connections)``, if given,
    is offered every accepted socket with the number of connections this
    server has; when it returns True it took the socket (say, sent it to
    another process), and this server forgets it. A server made with
    ``adopt_only`` listens nowhere and serves the sockets given to
    ``adopt``; ``on_close()`` is called whenever one of its connections ends.
    """

    def __init__(self, catalog: Catalog, *, unix_path: str | os.PathLike[str] | None = None,
                 tcp: tuple[str, int] | None = None, tls: TLSConfig | None = None,
                 workers_per_connection: int = 4, max_connections: int = 256,
                 handshake_timeout: float = 10.0, send_timeout: float = 60.0,
                 inflight_bytes: int = 64 << 20, max_inflight: int = 128,
                 total_inflight_bytes: int = 64 << 20,
                 inline_max: int | None = 128 << 10, sparse_read_min: int | None = 64 << 10,
                 stream_idle: float = 0.1, share_cpu: bool | SharedCpu = True,
                 dispatch: Callable[[socket.socket, int], bool] | None = None,
                 on_close: Callable[[], None] | None = None, adopt_only: bool = False) -> None:
        if unix_path is None and tcp is None and not adopt_only:
            raise NBDServerError("the NBD server needs a unix socket path or a TCP address")
        self.catalog = catalog
        self.unix_path = Path(unix_path) if unix_path is not None else None
        self._tcp_request = tcp
        self.tls = tls
        self.tls_mode = tls.mode if tls is not None else P.TLSMode.OFF
        self.ssl_context: ssl.SSLContext | None = None
        self.workers_per_connection = max(1, workers_per_connection)
        self.max_connections = max_connections
        self.handshake_timeout = handshake_timeout
        self.send_timeout = send_timeout
        self.inflight_bytes = inflight_bytes
        self.max_inflight = max_inflight
        self.total_inflight_bytes = total_inflight_bytes
        self.total_inflight = 0  # payload bytes of requests in flight on all connections
        self._budget = threading.Condition(threading.Lock())
        self._budget_waiters = 0
        self.inline_max = inline_max
        self.stream_idle = stream_idle
        self.sparse_read_min = sparse_read_min
        self.shared_cpu = share_cpu if isinstance(share_cpu, SharedCpu) else \
            SharedCpu() if share_cpu else None
        self.buffers = _BufferPool()
        self.tcp_address: tuple[str, int] | None = None
        self._listeners: list[socket.socket] = []
        self._unix_ino: tuple[int, int] | None = None
        self._connections: set[_Connection] = set()
        self._lock = threading.Lock()
        self.streaming = 0  # connections whose last receive brought a large READ or WRITE
        self._wake: tuple[socket.socket, socket.socket] | None = None  # stops the acceptor
        self._acceptor: threading.Thread | None = None
        self._started = False
        self._stopping = False
        self.dispatch = dispatch
        self.on_close = on_close

    # -- public -----------------------------------------------------------------

    def start(self) -> None:
        """Bind, listen and start accepting in a background thread."""
        if self._started or self._stopping:
            raise NBDServerError("the NBD server was already started")
        self._started = True
        try:
            if self.tls is not None:
                self.ssl_context = self.tls.context()
            if self.unix_path is not None:
                self._listeners.append(self._bind_unix(self.unix_path))
            if self._tcp_request is not None:
                self._listeners.append(self._bind_tcp(*self._tcp_request))
        except BaseException:
            self._close_listeners()
            raise
        if not self._listeners:  # adopt_only
            return
        self._wake = socket.socketpair()
        self._acceptor = threading.Thread(target=self._accept_loop, args=(self._wake[0],),
                                          name="nbd-accept", daemon=True)
        self._acceptor.start()

    def adopt(self, sock: socket.socket) -> None:
        """Serve ``sock``, a connection accepted elsewhere, from its handshake on."""
        if self._stopping:
            sock.close()
            return
        sock.setblocking(True)
        peer = f"unix#{sock.fileno()}"
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            try:
                peer = "{}:{}".format(*sock.getpeername()[:2])
            except OSError:
                pass
        self._serve_socket(sock, peer)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop accepting, finish in-flight requests, close exports and sockets.

        Connections get ``timeout`` seconds to finish (their clients see EOF
        after the replies to what they already sent); after that they are cut.
        """
        if self._stopping:
            return
        self._stopping = True
        if self._acceptor is not None and self._wake is not None:
            self._wake[1].send(b"x")
            self._acceptor.join()
            for s in self._wake:
                s.close()
        self._close_listeners()
        with self._lock:
            conns = list(self._connections)
        for c in conns:
            c.shutdown(socket.SHUT_RD)
        deadline = time.monotonic() + timeout
        for c in conns:
            c.thread.join(max(0.0, deadline - time.monotonic()))
        for c in conns:
            if c.thread.is_alive():
                log.warning("nbd %s: did not finish in time, cutting it off", c.peer)
                c.shutdown(socket.SHUT_RDWR)
        for c in conns:
            c.thread.join(5.0)

    def __enter__(self) -> NBDServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def connection_count(self) -> int:
        with self._lock:
            return len(self._connections)

    # -- sockets ------------------------------------------------------------------

    def _bind_unix(self, path: Path) -> socket.socket:
        """A listening socket at ``path`` with mode 0600 from the start (``unixsock``)."""
        try:
            sock = bind_private(path)
        except UnixSocketError as e:
            raise NBDServerError(str(e)) from None
        st = os.stat(path)
        self._unix_ino = (st.st_dev, st.st_ino)
        sock.setblocking(False)
        return sock

    def _bind_tcp(self, host: str, port: int) -> socket.socket:
        try:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            sock = socket.create_server((host, port), family=family, backlog=64)
        except OSError as e:
            raise NBDServerError(f"TCP address {host}:{port}: {e.strerror or e}") from None
        addr = sock.getsockname()
        self.tcp_address = (addr[0], addr[1])
        sock.setblocking(False)
        return sock

    def _close_listeners(self) -> None:
        for s in self._listeners:
            s.close()
        self._listeners.clear()
        if self.unix_path is not None and self._unix_ino is not None:
            try:
                st = os.stat(self.unix_path)
                if (st.st_dev, st.st_ino) == self._unix_ino:
                    os.unlink(self.unix_path)
            except OSError:
                pass
            self._unix_ino = None

    def _accept_loop(self, wake: socket.socket) -> None:
        sel = selectors.DefaultSelector()
        try:
            for s in self._listeners:
                sel.register(s, selectors.EVENT_READ)
            sel.register(wake, selectors.EVENT_READ)
            while not self._stopping:
                for key, _ in sel.select():
                    if key.fileobj is wake or self._stopping:
                        return
                    assert isinstance(key.fileobj, socket.socket)
                    self._accept(key.fileobj)
        finally:
            sel.close()

    def _accept(self, listener: socket.socket) -> None:
        try:
            sock, addr = listener.accept()
        except BlockingIOError:
            return
        except OSError as e:
            log.warning("nbd: accept failed: %s", e)
            if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                time.sleep(0.1)
            return
        sock.setblocking(True)
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            peer = f"{addr[0]}:{addr[1]}"
        else:
            peer = f"unix#{sock.fileno()}"
        if self.dispatch is not None:
            with self._lock:
                count = len(self._connections)
            try:
                taken = self.dispatch(sock, count)
            except Exception:
                log.exception("nbd: handing %s over failed; serving it here", peer)
                taken = False
            if taken:
                sock.close()
                return
        self._serve_socket(sock, peer)

    def _serve_socket(self, sock: socket.socket, peer: str) -> None:
        with self._lock:
            if len(self._connections) >= self.max_connections:
                log.warning("nbd: refusing %s: %d connections already", peer, len(self._connections))
                sock.close()
                return
            conn = _Connection(self, sock, peer)
            self._connections.add(conn)
        conn.thread.start()

    def count_streaming(self, delta: int) -> None:
        """A connection starts (+1) or stops (-1) streaming large requests.  Readers read
        ``streaming`` without the lock: it only steers where a large READ runs."""
        with self._lock:
            self.streaming += delta

    # -- the server-wide in-flight budget ------------------------------------------------

    def take_budget(self, weight: int) -> None:
        with self._budget:
            self.total_inflight += weight

    def give_budget(self, weight: int) -> None:
        with self._budget:
            self.total_inflight -= weight
            if self._budget_waiters:
                self._budget.notify_all()

    def wait_for_budget(self, conn: _Connection) -> None:
        """Block ``conn``'s reader while all connections' requests in flight exceed
        ``total_inflight_bytes`` and ``conn`` has some of them (its own finishing
        always frees it, so it cannot wait forever)."""
        with self._budget:
            self._budget_waiters += 1
            try:
                while self.total_inflight > self.total_inflight_bytes and conn.inflight_bytes:
                    self._budget.wait()
            finally:
                self._budget_waiters -= 1

    def _forget(self, conn: _Connection) -> None:
        with self._lock:
            self._connections.discard(conn)
        if self.on_close is not None:
            self.on_close()


__all__ = ["NBDServer", "NBDServerError", "TLSConfig"]
