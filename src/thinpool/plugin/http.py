"""HTTP/1.1, server side, as a state machine without I/O (like h11), for the plugin socket.

Bytes go in (``receive_data``; ``b""`` is end of file), events come out
(``next_event``): ``Request`` (the head), then ``Data`` pieces of the body,
then ``EndOfMessage``; ``ConnectionClosed`` when the peer ends the connection
cleanly between requests; ``NEED_DATA`` when more bytes are needed.  After
the response to a request whose body was read to ``EndOfMessage``,
``start_next_cycle`` readies the connection for the next request
(keep-alive).  Responses are plain bytes from ``response_head``,
``simple_response``, ``chunk`` and ``LAST_CHUNK``.

Scope is what dockerd's plugin client (Go's net/http) and curl send: request
bodies framed by ``Content-Length`` or ``Transfer-Encoding: chunked``
(chunk extensions ignored, trailers read and dropped), ``Expect:
100-continue`` reported on the request, HTTP/1.0 and HTTP/1.1.  Anything
else is an ``HTTPError`` carrying the status to answer with (400 malformed,
431 head too large, 501 an unsupported transfer coding, 505 another HTTP
version), after which the connection must be closed: the byte stream cannot
be resynchronised.  An end of file inside a head or a body is an
``IncompleteRequest``.

Memory is bounded: a request head may hold at most ``max_head_bytes`` (64
KiB by default) and ``max_header_fields`` fields; a chunk-size line or a
trailer at most ``max_line_bytes``.  Body data is handed out as it arrives,
never accumulated here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence, Union

from ..errors import ThinpoolError

REASONS = {100: "Continue", 200: "OK", 400: "Bad Request", 404: "Not Found",
           405: "Method Not Allowed", 413: "Content Too Large", 431: "Request Header Fields Too Large",
           500: "Internal Server Error", 501: "Not Implemented", 503: "Service Unavailable",
           505: "HTTP Version Not Supported"}

CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
LAST_CHUNK = b"0\r\n\r\n"

_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_TARGET = re.compile(rb"[\x21-\x7e]+")
_CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]{1,16}")


class HTTPError(ThinpoolError):
    """A request that cannot be parsed or served; ``status`` is the answer to send."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class IncompleteRequest(HTTPError):
    """The peer closed the connection inside a request head or body."""

    def __init__(self, message: str) -> None:
        super().__init__(400, message)


@dataclass(frozen=True)
class Request:
    """A request head; header names are lower case, values stripped, in arrival order."""

    method: str
    target: str
    version: str
    headers: tuple[tuple[str, str], ...]

    def header(self, name: str) -> str | None:
        """The field's values joined by ", " (RFC 9110), or None when absent."""
        values = [v for k, v in self.headers if k == name]
        return ", ".join(values) if values else None

    @property
    def keep_alive(self) -> bool:
        tokens = {t.strip().lower() for t in (self.header("connection") or "").split(",")}
        if self.version == "HTTP/1.0":
            return "keep-alive" in tokens
        return "close" not in tokens

    @property
    def expects_continue(self) -> bool:
        return (self.header("expect") or "").strip().lower() == "100-continue"


@dataclass(frozen=True)
class Data:
    data: bytes


@dataclass(frozen=True)
class EndOfMessage:
    pass


@dataclass(frozen=True)
class ConnectionClosed:
    pass


class _NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = _NeedData()
Event = Union[Request, Data, EndOfMessage, ConnectionClosed]

# states
_HEAD, _LENGTH, _CHUNK_LINE, _CHUNK_DATA, _CHUNK_END, _TRAILER, _DONE, _CLOSED, _ERROR = range(9)


class ServerConnection:
    """One client connection's request parser (see the module docstring)."""

    def __init__(self, *, max_head_bytes: int = 64 * 1024, max_header_fields: int = 128,
                 max_line_bytes: int = 4096) -> None:
        self.max_head_bytes = max_head_bytes
        self.max_header_fields = max_header_fields
        self.max_line_bytes = max_line_bytes
        self._buf = bytearray()
        self._pos = 0
        self._eof = False
        self._state = _HEAD
        self._remaining = 0          # body bytes left (Content-Length) or in this chunk
        self._received = 0           # body bytes received in this request
        self._trailer_bytes = 0
        self.request: Request | None = None

    # -- input ----------------------------------------------------------------------------
    def receive_data(self, data: bytes) -> None:
        """Bytes from the peer; ``b""`` means the peer closed its side."""
        if not data:
            self._eof = True
            return
        if self._pos and self._pos == len(self._buf):
            self._buf.clear()
            self._pos = 0
        elif self._pos > 65536 and self._pos * 2 > len(self._buf):
            del self._buf[:self._pos]
            self._pos = 0
        self._buf += data

    @property
    def body_bytes_received(self) -> int:
        """Body bytes of the current request handed out so far (after de-chunking)."""
        return self._received

    @property
    def request_complete(self) -> bool:
        """True once ``EndOfMessage`` of the current request was returned."""
        return self._state == _DONE

    def start_next_cycle(self) -> None:
        """After a complete request and its response: parse the next request."""
        if self._state != _DONE:
            raise HTTPError(500, "start_next_cycle before the request body was read")
        self._state = _HEAD
        self.request = None
        self._received = 0

    # -- events ---------------------------------------------------------------------------
    def next_event(self) -> Event | _NeedData:
        """The next event, ``NEED_DATA``, or an ``HTTPError`` for a broken request."""
        if self._state == _ERROR:
            raise HTTPError(400, "the connection already failed")
        try:
            return self._next()
        except HTTPError:
            self._state = _ERROR
            raise

    def _avail(self) -> int:
        return len(self._buf) - self._pos

    def _take(self, n: int) -> bytes:
        data = bytes(self._buf[self._pos:self._pos + n])
        self._pos += n
        return data

    def _line(self, limit: int, what: str) -> bytes | None:
        """One line (without its CRLF or bare LF), or None when it is not complete yet."""
        end = self._buf.find(b"\n", self._pos, self._pos + limit + 1)
        if end < 0:
            if self._avail() > limit:
                raise HTTPError(400, f"{what} longer than {limit} bytes")
            return None
        line = bytes(self._buf[self._pos:end])
        self._pos = end + 1
        return line[:-1] if line.endswith(b"\r") else line

    def _next(self) -> Event | _NeedData:
        if self._state == _HEAD:
            return self._head()
        if self._state == _LENGTH:
            if self._remaining == 0:
                self._state = _DONE
                return EndOfMessage()
            if not self._avail():
                return self._need(f"the request body ended after {self._received} bytes "
                                  f"({self._remaining} missing)")
            data = self._take(min(self._remaining, self._avail()))
            self._remaining -= len(data)
            self._received += len(data)
            return Data(data)
        if self._state in (_CHUNK_LINE, _CHUNK_DATA, _CHUNK_END, _TRAILER):
            return self._chunked()
        if self._state == _DONE:
            raise HTTPError(500, "next_event after the end of the request, before start_next_cycle")
        return ConnectionClosed()

    def _need(self, eof_message: str) -> _NeedData:
        if self._eof:
            raise IncompleteRequest(f"the client closed the connection: {eof_message}")
        return NEED_DATA

    def _head(self) -> Event | _NeedData:
        # Empty lines before a request line are ignored (RFC 9112 section 2.2).
        while self._avail() >= 2 and self._buf[self._pos:self._pos + 2] == b"\r\n":
            self._pos += 2
        while self._avail() >= 1 and self._buf[self._pos] == 0x0A:
            self._pos += 1
        end = self._buf.find(b"\r\n\r\n", self._pos, self._pos + self.max_head_bytes)
        sep = 4
        lf_end = self._buf.find(b"\n\n", self._pos, self._pos + self.max_head_bytes)
        if lf_end >= 0 and (end < 0 or lf_end < end):
            end, sep = lf_end, 2
        if end < 0:
            if self._avail() >= self.max_head_bytes:
                raise HTTPError(431, f"request head larger than {self.max_head_bytes} bytes")
            if self._eof:
                if not self._avail():
                    self._state = _CLOSED
                    return ConnectionClosed()
                raise IncompleteRequest("the client closed the connection inside a request head")
            return NEED_DATA
        head = bytes(self._buf[self._pos:end])
        self._pos = end + sep
        request = self._parse_head(head)
        self.request = request
        self._frame_body(request)
        return request

    def _parse_head(self, head: bytes) -> Request:
        lines = [line[:-1] if line.endswith(b"\r") else line for line in head.split(b"\n")]
        parts = lines[0].split(b" ")
        if len(parts) != 3 or not _TOKEN.fullmatch(parts[0]) or not _TARGET.fullmatch(parts[1]):
            raise HTTPError(400, f"malformed request line {lines[0][:80]!r}")
        method, target, version = parts
        if not re.fullmatch(rb"HTTP/\d\.\d", version):
            raise HTTPError(400, f"malformed request line {lines[0][:80]!r}")
        if version not in (b"HTTP/1.0", b"HTTP/1.1"):
            raise HTTPError(505, f"unsupported protocol version {version.decode()}")
        if len(lines) - 1 > self.max_header_fields:
            raise HTTPError(431, f"more than {self.max_header_fields} header fields")
        headers = []
        for line in lines[1:]:
            name, colon, value = line.partition(b":")
            if not colon or not _TOKEN.fullmatch(name):
                raise HTTPError(400, f"malformed header field {line[:80]!r}")
            if any(c < 0x20 and c != 0x09 or c == 0x7F for c in value):
                raise HTTPError(400, f"control character in header field {name.decode()}")
            headers.append((name.decode().lower(), value.strip(b" \t").decode("latin-1")))
        return Request(method.decode(), target.decode(), version.decode(), tuple(headers))

    def _frame_body(self, request: Request) -> None:
        te = request.header("transfer-encoding")
        lengths = [v for k, v in request.headers if k == "content-length"]
        if te is not None:
            if lengths:
                raise HTTPError(400, "both Transfer-Encoding and Content-Length in one request")
            if request.version == "HTTP/1.0":
                raise HTTPError(400, "Transfer-Encoding in an HTTP/1.0 request")
            if te.strip().lower() != "chunked":
                raise HTTPError(501, f"unsupported Transfer-Encoding {te!r} (only chunked)")
            self._state = _CHUNK_LINE
            return
        values = {v.strip() for value in lengths for v in value.split(",")}
        if len(values) > 1:
            raise HTTPError(400, "conflicting Content-Length values")
        length = values.pop() if values else "0"
        if not (length.isascii() and length.isdigit()) or len(length) > 18:
            raise HTTPError(400, f"invalid Content-Length {length[:40]!r}")
        self._remaining = int(length)
        self._state = _LENGTH

    def _chunked(self) -> Event | _NeedData:
        while True:
            if self._state == _CHUNK_LINE:
                line = self._line(self.max_line_bytes, "chunk-size line")
                if line is None:
                    return self._need(f"the chunked request body ended after {self._received} bytes")
                size = line.split(b";", 1)[0].strip(b" \t")
                if not _CHUNK_SIZE.fullmatch(size):
                    raise HTTPError(400, f"malformed chunk size {line[:40]!r}")
                self._remaining = int(size, 16)
                if self._remaining >= 1 << 62:
                    raise HTTPError(400, f"chunk size {size.decode()} too large")
                if self._remaining == 0:
                    self._state = _TRAILER
                    self._trailer_bytes = 0
                else:
                    self._state = _CHUNK_DATA
            elif self._state == _CHUNK_DATA:
                if not self._avail():
                    return self._need(f"the chunked request body ended inside a chunk after "
                                      f"{self._received} bytes")
                data = self._take(min(self._remaining, self._avail()))
                self._remaining -= len(data)
                self._received += len(data)
                if self._remaining == 0:
                    self._state = _CHUNK_END
                return Data(data)
            elif self._state == _CHUNK_END:
                head = bytes(self._buf[self._pos:self._pos + 2])
                if head[:1] == b"\n" or head == b"\r\n":
                    self._pos += 1 if head[:1] == b"\n" else 2
                    self._state = _CHUNK_LINE
                elif head in (b"", b"\r"):
                    return self._need(f"the chunked request body ended after {self._received} bytes")
                else:
                    raise HTTPError(400, "chunk data longer than its chunk size")
            else:  # _TRAILER
                line = self._line(self.max_line_bytes, "trailer field")
                if line is None:
                    return self._need("the chunked request body ended inside its trailer")
                if not line:
                    self._state = _DONE
                    return EndOfMessage()
                self._trailer_bytes += len(line)
                if self._trailer_bytes > self.max_head_bytes:
                    raise HTTPError(431, f"trailer larger than {self.max_head_bytes} bytes")


# -- responses ----------------------------------------------------------------------------------
def response_head(status: int, headers: Sequence[tuple[str, str]]) -> bytes:
    """Status line and header fields, up to and including the empty line."""
    lines = [f"HTTP/1.1 {status} {REASONS.get(status, 'Unknown')}"]
    lines += [f"{name}: {value}" for name, value in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def simple_response(status: int, body: bytes, content_type: str, *, keep_alive: bool) -> bytes:
    """A complete response with a Content-Length body."""
    headers = [("Content-Type", content_type), ("Content-Length", str(len(body)))]
    if not keep_alive:
        headers.append(("Connection", "close"))
    return response_head(status, headers) + body


def chunk(data: bytes) -> bytes:
    """One chunk of a chunked response body (``data`` must not be empty)."""
    return b"%x\r\n%s\r\n" % (len(data), data)
