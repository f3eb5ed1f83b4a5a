"""A minimal blocking NBD client for tests: fixed newstyle, NBD_OPT_GO, simple replies.

Enough to drive the pool server from Python (the kill harness, fuzzing baselines);
the real clients (qemu, libnbd) are used everywhere else.
"""

from __future__ import annotations

import socket
import struct

from thinpool.unixsock import connect

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OPT_REPLY_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
OPT_GO = 7
REP_ACK, REP_INFO = 1, 3
INFO_EXPORT = 0
CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH, CMD_TRIM, CMD_WRITE_ZEROES = 0, 1, 2, 3, 4, 6
FLAG_FUA, FLAG_NO_HOLE = 1, 2


class NBDError(Exception):
    def __init__(self, error: int, what: str) -> None:
        super().__init__(f"{what}: NBD error {error}")
        self.error = error


def connect_from_child(sock_path: str) -> socket.socket:
    """A connection made by a short-lived child process: the server sees another client
    process (its pid, ``SO_PEERCRED``) than this one."""
    import os

    mine, theirs = socket.socketpair()
    pid = os.fork()
    if pid == 0:  # the child: connect, hand the socket over, exit
        code = 1
        try:
            s = connect(sock_path)
            socket.send_fds(theirs, [b"s"], [s.fileno()])
            code = 0
        finally:
            os._exit(code)
    theirs.close()
    try:
        _, fds, _, _ = socket.recv_fds(mine, 1, 1)
    finally:
        mine.close()
        os.waitpid(pid, 0)
    if not fds:
        raise ConnectionError(f"the child process could not connect to {sock_path}")
    return socket.socket(fileno=fds[0])


class NBDClient:
    def __init__(self, sock_path: str, export: str, other_process: bool = False) -> None:
        """``other_process``: connect from a child process (``connect_from_child``)."""
        self.sock = connect_from_child(sock_path) if other_process else connect(sock_path)
        self.cookie = 0
        magic, opt_magic, _hs = struct.unpack(">QQH", self._recv(18))
        if magic != NBDMAGIC or opt_magic != IHAVEOPT:
            raise ConnectionError("not a fixed-newstyle NBD server")
        self.sock.sendall(struct.pack(">I", 3))  # FIXED_NEWSTYLE | NO_ZEROES
        name = export.encode()
        data = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
        self.sock.sendall(struct.pack(">QII", IHAVEOPT, OPT_GO, len(data)) + data)
        self.size = -1
        while True:
            magic, _opt, rtype, length = struct.unpack(">QIII", self._recv(20))
            payload = self._recv(length)
            if magic != OPT_REPLY_MAGIC:
                raise ConnectionError("bad option reply")
            if rtype == REP_ACK:
                break
            if rtype == REP_INFO and struct.unpack(">H", payload[:2])[0] == INFO_EXPORT:
                self.size, self.flags = struct.unpack(">QH", payload[2:12])
            elif rtype & (1 << 31):
                raise NBDError(rtype, f"NBD_OPT_GO {export!r}: {payload!r}")

    def _recv(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("the server closed the connection")
            buf += chunk
        return bytes(buf)

    def _request(self, cmd: int, offset: int, length: int, flags: int = 0,
                 data: bytes = b"") -> bytes:
        self.cookie += 1
        self.sock.sendall(struct.pack(">IHHQQI", REQUEST_MAGIC, flags, cmd, self.cookie, offset,
                                      length) + data)
        if cmd == CMD_DISC:
            return b""
        magic, error, cookie = struct.unpack(">IIQ", self._recv(16))
        if magic != SIMPLE_REPLY_MAGIC or cookie != self.cookie:
            raise ConnectionError("bad reply")
        if error:
            raise NBDError(error, f"command {cmd} at {offset}+{length}")
        return self._recv(length) if cmd == CMD_READ else b""

    def read(self, offset: int, length: int) -> bytes:
        return self._request(CMD_READ, offset, length)

    def read_pipelined(self, offsets: list[int], length: int) -> dict[int, bytes]:
        """READs of ``length`` at each offset, all sent in one write before any reply is
        read (a pipelining client); offset -> data."""
        cookies: dict[int, int] = {}
        out = bytearray()
        for offset in offsets:
            self.cookie += 1
            cookies[self.cookie] = offset
            out += struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_READ, self.cookie, offset, length)
        self.sock.sendall(out)
        got: dict[int, bytes] = {}
        for _ in offsets:
            magic, error, cookie = struct.unpack(">IIQ", self._recv(16))
            if magic != SIMPLE_REPLY_MAGIC or cookie not in cookies:
                raise ConnectionError("bad reply")
            if error:
                raise NBDError(error, f"read at {cookies[cookie]}+{length}")
            got[cookies.pop(cookie)] = self._recv(length)
        return got

    def write(self, offset: int, data: bytes, fua: bool = False) -> None:
        self._request(CMD_WRITE, offset, len(data), FLAG_FUA if fua else 0, data)

    def flush(self) -> None:
        self._request(CMD_FLUSH, 0, 0)

    def trim(self, offset: int, length: int) -> None:
        self._request(CMD_TRIM, offset, length)

    def write_zeroes(self, offset: int, length: int, no_hole: bool = False) -> None:
        self._request(CMD_WRITE_ZEROES, offset, length, FLAG_NO_HOLE if no_hole else 0)

    def close(self) -> None:
        try:
            self._request(CMD_DISC, 0, 0)
        except OSError:
            pass
        self.sock.close()

    def __enter__(self) -> NBDClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def wait_closed(sock: socket.socket) -> None:
    """Block until the peer closes ``sock``."""
    while sock.recv(4096):
        pass
