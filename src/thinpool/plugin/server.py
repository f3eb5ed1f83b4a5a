"""The plugin's unix socket: threads and sockets around ``http.ServerConnection`` and ``GraphPlugin``.

``PluginServer(plugin, path)`` listens on a unix socket (created mode 0600
in a private directory and renamed into place; a stale socket file left by a
killed plugin is replaced, a live one or a non-socket refused) and serves
each connection in its own thread: keep-alive requests one after another,
each body handed to the plugin as a file-like reader that decodes it from
the socket as the plugin reads (an ApplyDiff tar streams into the driver,
never buffered whole).  ``stop`` (also from a signal handler, via
``request_stop``) stops accepting, removes the socket file if it is still
ours, lets requests in flight finish for ``grace`` seconds, then closes
every connection.

A connection that sends something that is not HTTP, a head that is too
large, or breaks the body framing gets the error status and is closed; a
client that disconnects in the middle of a request loses only that request
(an ApplyDiff's half layer is removed by the plugin).  Neither affects the
other connections or the server.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import socket
import stat
import tempfile
import threading
import time

from ..errors import ThinpoolError
from . import http as H
from .api import JSON_TYPE, GraphPlugin, JSONReply, StreamReply

log = logging.getLogger("thinpool.plugin")

RECV_SIZE = 256 * 1024
SEND_COALESCE = 256 * 1024


class PluginServerError(ThinpoolError):
    """The plugin socket cannot be set up."""


class _Body:
    """The current request's body as a file-like ``read(n)``, decoded from the socket on demand."""

    def __init__(self, conn: H.ServerConnection, sock: socket.socket, expects_continue: bool) -> None:
        self._conn = conn
        self._sock = sock
        self._pending = b""
        self._done = False
        self._continue = expects_continue
        self.error: BaseException | None = None

    def read(self, n: int = -1, /) -> bytes:
        if self.error is not None:
            raise self.error
        try:
            return self._read(n)
        except (H.HTTPError, OSError) as e:
            self.error = e if isinstance(e, H.HTTPError) else H.IncompleteRequest(
                f"the client connection failed in the middle of the request body: "
                f"{e.strerror or e}")
            raise self.error from None

    def readinto(self, b: bytearray | memoryview) -> int:
        data = self.read(len(b))
        b[:len(data)] = data
        return len(data)

    def _read(self, n: int) -> bytes:
        if n is None or n < 0:
            parts = [self._pending]
            self._pending = b""
            while (piece := self._next()) is not None:
                parts.append(piece)
            return b"".join(parts)
        while not self._pending and not self._done:
            piece = self._next()
            if piece is None:
                break
            self._pending = piece
        data, self._pending = self._pending[:n], self._pending[n:]
        return data

    def _next(self) -> bytes | None:
        """The next piece of body data, or None at its end."""
        if self._done:
            return None
        if self._continue:
            self._continue = False
            self._sock.sendall(H.CONTINUE)
        while True:
            event = self._conn.next_event()
            if event is H.NEED_DATA:
                self._conn.receive_data(self._sock.recv(RECV_SIZE))
                continue
            if isinstance(event, H.Data):
                if event.data:
                    return event.data
                continue
            self._done = True  # EndOfMessage
            return None

    def drain(self) -> bool:
        """Read and drop the rest of the body; False when the connection cannot go on."""
        if self.error is not None:
            return False
        try:
            self._pending = b""
            while self._next() is not None:
                pass
        except (H.HTTPError, OSError) as e:
            self.error = e
            return False
        return True


class PluginServer:
    """Serve one ``GraphPlugin`` on a unix socket (see the module docstring)."""

    def __init__(self, plugin: GraphPlugin, path: str, *, grace: float = 10.0,
                 max_connections: int = 64, request_timeout: float = 600.0) -> None:
        self.plugin = plugin
        self.path = os.path.abspath(path)
        self.grace = grace
        self.max_connections = max_connections
        self.request_timeout = request_timeout
        self._listener: socket.socket | None = None
        self._ino: tuple[int, int] | None = None
        self._accept_thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._conns: dict[socket.socket, bool] = {}   # socket -> busy with a request
        self._threads: set[threading.Thread] = set()
        self._stopping = threading.Event()
        self._stopped = threading.Event()

    # -- lifecycle --------------------------------------------------------------------------
    def start(self) -> None:
        """Bind the socket (mode 0600) and start accepting."""
        self._listener = self._bind(self.path)
        self._listener.listen(64)
        self._accept_thread = threading.Thread(target=self._accept_loop, name="plugin-accept",
                                               daemon=True)
        self._accept_thread.start()

    def _bind(self, path: str) -> socket.socket:
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            st = os.lstat(path)
        except FileNotFoundError:
            pass
        except OSError as e:
            raise PluginServerError(f"plugin socket {path}: {e.strerror}") from None
        else:
            if not stat.S_ISSOCK(st.st_mode):
                raise PluginServerError(f"plugin socket {path}: exists and is not a socket")
            with socket.socket(socket.AF_UNIX) as probe:
                try:
                    probe.connect(path)
                except OSError:
                    pass  # stale: replaced by the rename below
                else:
                    raise PluginServerError(f"plugin socket {path}: another plugin is serving it")
        tmpdir = tempfile.mkdtemp(prefix=".thinpool-plugin-", dir=os.path.dirname(path))
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            tmp = os.path.join(tmpdir, "s")
            sock.bind(tmp)
            os.chmod(tmp, 0o600)
            os.replace(tmp, path)
            st = os.stat(path)
            self._ino = (st.st_dev, st.st_ino)
        except OSError as e:
            sock.close()
            raise PluginServerError(f"plugin socket {path}: {e.strerror or e}") from None
        finally:
            shutil.rmtree(tmpdir, ignore_errors=True)
        return sock

    def request_stop(self) -> None:
        """Ask ``serve_forever`` to return (safe in a signal handler)."""
        self._stopping.set()

    def serve_forever(self) -> None:
        """Block until ``request_stop`` or ``stop``; then stop."""
        while not self._stopping.wait(0.5):
            pass
        self.stop()

    def stop(self) -> None:
        """Stop accepting, remove the socket, finish requests in flight (``grace``), close."""
        self._stopping.set()
        if self._stopped.is_set():
            return
        self._stopped.set()
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)
            self._listener.close()
        self._remove_socket()
        if self._accept_thread is not None:
            self._accept_thread.join(5)
        deadline = time.monotonic() + self.grace
        while time.monotonic() < deadline:
            with self._lock:
                if not any(self._conns.values()):
                    break
            time.sleep(0.05)
        with self._lock:
            for sock in self._conns:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
            threads = list(self._threads)
        for thread in threads:
            thread.join(5)

    def _remove_socket(self) -> None:
        if self._ino is None:
            return
        try:
            st = os.lstat(self.path)
            if (st.st_dev, st.st_ino) == self._ino:
                os.unlink(self.path)
        except OSError:
            pass
        self._ino = None

    # -- connections ------------------------------------------------------------------------
    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stopping.is_set():
            try:
                sock, _ = self._listener.accept()
            except OSError as e:
                if self._stopping.is_set():
                    return
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    time.sleep(0.1)
                continue
            with self._lock:
                if len(self._conns) >= self.max_connections:
                    full = True
                else:
                    full = False
                    self._conns[sock] = False
            if full:
                with contextlib.suppress(OSError):
                    sock.sendall(H.simple_response(503, json.dumps(
                        {"Err": f"too many connections (at most {self.max_connections})"}).encode(),
                        JSON_TYPE, keep_alive=False))
                sock.close()
                continue
            thread = threading.Thread(target=self._serve_connection, args=(sock,),
                                      name="plugin-conn", daemon=True)
            with self._lock:
                self._threads.add(thread)
            thread.start()

    def _set_busy(self, sock: socket.socket, busy: bool) -> None:
        with self._lock:
            self._conns[sock] = busy

    def _serve_connection(self, sock: socket.socket) -> None:
        conn = H.ServerConnection()
        try:
            while not self._stopping.is_set():
                sock.settimeout(None)   # idle between requests: dockerd keeps connections
                event = conn.next_event()
                if event is H.NEED_DATA:
                    conn.receive_data(sock.recv(RECV_SIZE))
                    continue
                if isinstance(event, H.ConnectionClosed):
                    return
                assert isinstance(event, H.Request)
                self._set_busy(sock, True)
                sock.settimeout(self.request_timeout)
                if not self._serve_request(sock, conn, event):
                    return
                self._set_busy(sock, False)
                conn.start_next_cycle()
        except H.HTTPError as e:
            self._answer_error(sock, e)
        except OSError:
            pass  # the client went away or timed out: only its connection ends
        finally:
            with self._lock:
                self._conns.pop(sock, None)
                self._threads.discard(threading.current_thread())
            sock.close()

    def _serve_request(self, sock: socket.socket, conn: H.ServerConnection,
                       request: H.Request) -> bool:
        """Serve one request; False when the connection must be closed afterwards."""
        body = _Body(conn, sock, request.expects_continue)
        reply = self.plugin.handle(request.method, request.target, body)
        log.info("%s %s -> %s", request.method, request.target[:200],
                 "stream" if isinstance(reply, StreamReply) else reply.status)
        if isinstance(reply, JSONReply) and "Err" in reply.body:
            log.warning("%s: %s", request.target[:200], reply.body["Err"])
        drained = body.drain() if reply_status(reply) != 413 else False
        if body.error is not None:
            if isinstance(reply, StreamReply):
                reply.close()
            if isinstance(body.error, H.HTTPError) and not isinstance(body.error, H.IncompleteRequest):
                raise body.error
            return False  # the client is gone or the stream is broken: nothing to answer
        keep_alive = request.keep_alive and drained and not self._stopping.is_set()
        if isinstance(reply, JSONReply):
            sock.sendall(H.simple_response(reply.status, json.dumps(reply.body).encode(),
                                           JSON_TYPE, keep_alive=keep_alive))
            return keep_alive
        return self._stream(sock, request, reply, keep_alive)

    def _stream(self, sock: socket.socket, request: H.Request, reply: StreamReply,
                keep_alive: bool) -> bool:
        chunked = request.version == "HTTP/1.1"
        headers = [("Content-Type", reply.content_type)]
        headers.append(("Transfer-Encoding", "chunked") if chunked else ("Connection", "close"))
        if chunked and not keep_alive:
            headers.append(("Connection", "close"))
        try:
            sock.sendall(H.response_head(200, headers))
            pending: list[bytes] = []
            size = 0
            for data in reply.chunks:
                if not data:
                    continue
                pending.append(data)
                size += len(data)
                if size >= SEND_COALESCE:
                    out = b"".join(pending)
                    sock.sendall(H.chunk(out) if chunked else out)
                    pending, size = [], 0
            if pending:
                out = b"".join(pending)
                sock.sendall(H.chunk(out) if chunked else out)
            if chunked:
                sock.sendall(H.LAST_CHUNK)
        except (ThinpoolError, OSError) as e:
            # Too late for an Err: end the connection without the last chunk, so the
            # client sees a broken body instead of a short tar.
            log.warning("%s: streaming failed: %s", request.target[:200], e)
            return False
        except Exception:
            log.exception("%s: streaming failed", request.target[:200])
            return False
        finally:
            reply.close()
        return keep_alive and chunked

    def _answer_error(self, sock: socket.socket, e: H.HTTPError) -> None:
        log.warning("bad request: %s", e)
        if isinstance(e, H.IncompleteRequest):
            return
        with contextlib.suppress(OSError):
            sock.settimeout(5)
            sock.sendall(H.simple_response(e.status, json.dumps({"Err": str(e)}).encode(),
                                           JSON_TYPE, keep_alive=False))


def reply_status(reply: JSONReply | StreamReply) -> int:
    """The HTTP status a reply is sent with."""
    return reply.status if isinstance(reply, JSONReply) else 200
