"""The control socket: how ``thinpool`` commands reach a running pool server.

Like ``dmsetup`` talking to the kernel, every CLI command on a pool with a
running server becomes one request on the unix socket ``DIR/control.sock``
(mode 0600).  The format, version 1:

* one request per connection; a message is a 4-byte big-endian length and
  that many bytes of UTF-8 JSON (at most ``MAX_MESSAGE``);
* request ``{"version": 1, "command": NAME, "args": {...}}``; the file
  descriptors the command reads or writes (stdin, stdout, a file the CLI
  opened) travel with it as ``SCM_RIGHTS`` ancillary data;
* response ``{"ok": true, "result": {...}}`` or ``{"ok": false, "error":
  "one line", "errno": N or null}``;
* the server may notice that the client went away (the connection hung up)
  and stop a long command early.

``Decoder`` is the framing without sockets; ``request`` is the client,
``ControlServer`` the server (a thread per connection).
"""

from __future__ import annotations

import array
import json
import logging
import os
import select
import socket
import struct
import threading
from typing import Any, Callable, Sequence

from ..errors import ThinpoolError
from ..unixsock import bind_private, connect

log = logging.getLogger("thinpool.control")

VERSION = 1
CONTROL_SOCKET = "control.sock"
"""The control socket's name in a pool directory."""
MAX_MESSAGE = 1 << 20
MAX_FDS = 4
_LEN = struct.Struct(">I")

Handler = Callable[[str, dict[str, Any], list[int], Callable[[], bool]], dict[str, Any]]


def control_path(directory: str) -> str:
    """The control socket of the pool server of pool ``directory``."""
    return os.path.join(os.path.abspath(directory), CONTROL_SOCKET)


class ControlError(ThinpoolError):
    """The control socket or a message on it is unusable."""


def encode(message: dict[str, Any]) -> bytes:
    body = json.dumps(message, separators=(",", ":")).encode()
    if len(body) > MAX_MESSAGE:
        raise ControlError(f"control message too large ({len(body)} bytes)")
    return _LEN.pack(len(body)) + body


class Decoder:
    """Bytes in, one message out (sans-I/O)."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> dict[str, Any] | None:
        """Add bytes; the message once it is complete, else None."""
        self._buf += data
        if len(self._buf) < 4:
            return None
        (n,) = _LEN.unpack_from(self._buf)
        if n > MAX_MESSAGE:
            raise ControlError(f"control message too large ({n} bytes)")
        if len(self._buf) < 4 + n:
            return None
        try:
            message = json.loads(bytes(self._buf[4:4 + n]))
        except ValueError as e:
            raise ControlError(f"malformed control message: {e}") from None
        if not isinstance(message, dict):
            raise ControlError("malformed control message: not a JSON object")
        return message


def _recv_message(sock: socket.socket) -> tuple[dict[str, Any], list[int]]:
    decoder = Decoder()
    fds: list[int] = []
    while True:
        fdbuf = array.array("i")
        data, anc, _flags, _addr = sock.recvmsg(1 << 16, socket.CMSG_SPACE(MAX_FDS * fdbuf.itemsize))
        for level, kind, payload in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fdbuf.frombytes(payload[:len(payload) - len(payload) % fdbuf.itemsize])
                fds.extend(fdbuf)
        if not data:
            for fd in fds:
                os.close(fd)
            raise ControlError("the control connection closed before a whole message arrived")
        message = decoder.feed(data)
        if message is not None:
            return message, fds


def request(path: str, command: str, args: dict[str, Any],
            fds: Sequence[int] = ()) -> dict[str, Any]:
    """Run ``command`` on the server at ``path``; its result, or ``ThinpoolError``.

    Raises ``ConnectionError`` (an ``OSError``) when no server listens there.
    """
    with connect(path) as sock:
        payload = encode({"version": VERSION, "command": command, "args": args})
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] \
            if fds else []
        sent = sock.sendmsg([payload], anc)
        if sent < len(payload):
            sock.sendall(payload[sent:])
        try:
            reply, stray = _recv_message(sock)
        except ControlError:
            raise ControlError("the pool server closed the connection without answering "
                               "(see its log)") from None
        for fd in stray:
            os.close(fd)
    if reply.get("ok"):
        return reply.get("result") or {}
    err = reply.get("errno")
    raise RemoteError(str(reply.get("error", "unknown error")), err)


class RemoteError(ThinpoolError):
    """The server ran the command and it failed; ``errno`` as the server saw it."""

    def __init__(self, message: str, err: int | None) -> None:
        super().__init__(message)
        self.errno = err


class ControlServer:
    """Accepts control connections and runs each request through ``handler``.

    ``handler(command, args, fds, cancelled)`` returns the result; a
    ``ThinpoolError`` or ``OSError`` becomes an error reply, anything else is
    logged and answered as an internal error.  The received descriptors are
    closed after the handler returns.
    """

    def __init__(self, path: str, handler: Handler) -> None:
        self.path = path
        self.handler = handler
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._clients: set[threading.Thread] = set()
        self._lock = threading.Lock()

    def start(self) -> None:
        self._sock = bind_private(self.path)
        self._thread = threading.Thread(target=self._accept_loop, name="thinpool-control",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop accepting, wait for running requests, remove the socket file."""
        self._stopping.set()
        if self._sock is not None:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
            self._sock.shutdown(socket.SHUT_RDWR)
            self._sock.close()
        if self._thread is not None:
            self._thread.join()
        with self._lock:
            clients = list(self._clients)
        for t in clients:
            t.join()

    def _accept_loop(self) -> None:
        assert self._sock is not None
        while not self._stopping.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            t = threading.Thread(target=self._serve, args=(conn,), name="thinpool-control-req",
                                 daemon=True)
            with self._lock:
                self._clients.add(t)
            t.start()

    def _serve(self, conn: socket.socket) -> None:
        fds: list[int] = []
        try:
            with conn:
                try:
                    message, fds = _recv_message(conn)
                except (ControlError, OSError) as e:
                    log.warning("control request dropped: %s", e)
                    return
                reply = self._answer(message, fds, lambda: _hung_up(conn))
                try:
                    conn.sendall(encode(reply))
                except OSError:
                    pass  # the client is gone; nothing to tell it
        finally:
            for fd in fds:
                os.close(fd)
            with self._lock:
                self._clients.discard(threading.current_thread())

    def _answer(self, message: dict[str, Any], fds: list[int],
                cancelled: Callable[[], bool]) -> dict[str, Any]:
        if message.get("version") != VERSION:
            return {"ok": False, "error": f"unsupported control protocol version "
                                          f"{message.get('version')!r} (this server speaks "
                                          f"{VERSION})", "errno": None}
        command, args = message.get("command"), message.get("args")
        if not isinstance(command, str) or not isinstance(args, dict):
            return {"ok": False, "error": "malformed control request", "errno": None}
        try:
            return {"ok": True, "result": self.handler(command, args, fds, cancelled)}
        except (ThinpoolError, OSError) as e:
            err = getattr(e, "errno", None)
            text = str(e) if isinstance(e, ThinpoolError) else \
                f"{e.strerror or e}" + (f" ({e.filename})" if e.filename else "")
            return {"ok": False, "error": text, "errno": err if isinstance(err, int) else None}
        except Exception as e:  # noqa: BLE001 - a server bug must not kill the server
            log.exception("control command %s failed", command)
            return {"ok": False, "error": f"internal error in the pool server: {e!r}",
                    "errno": None}


def _hung_up(conn: socket.socket) -> bool:
    """Whether the client closed its end (a Ctrl-C'd CLI)."""
    p = select.poll()
    p.register(conn, select.POLLRDHUP)
    return any(ev & (select.POLLRDHUP | select.POLLHUP | select.POLLERR) for _, ev in p.poll(0))
