"""The NBD protocol, server side, as a state machine without I/O (like h11).

Bytes go in (``receive_data``, or the zero-copy pair ``get_buffer`` /
``buffer_updated``), events come out (``next_event``), and everything to send
is bytes: negotiation replies accumulate in ``data_to_send()``; transmission
replies are built by the thread-safe ``Replies`` object (``conn.replies``)
because they are sent from worker threads. There are no sockets, threads or
clocks here; the adapter (``thinpool.nbd.server``) supplies them, and also
the handshake deadline.

Scope: fixed newstyle negotiation only (oldstyle and plain newstyle clients
are dropped); options LIST, INFO, GO, EXPORT_NAME, ABORT, STRUCTURED_REPLY,
LIST/SET_META_CONTEXT (``base:allocation``) and STARTTLS; everything else
(extended headers included) gets ``NBD_REP_ERR_UNSUP``. Transmission: READ
(DF), WRITE, DISC, FLUSH, TRIM, CACHE, WRITE_ZEROES (NO_HOLE, FAST_ZERO),
BLOCK_STATUS (REQ_ONE); FUA is accepted on every command.

Every client message is validated; an invalid request becomes an
``InvalidRequest`` event carrying the prescribed error reply, and a message
that cannot be resynchronised (bad magic, oversized option or payload, EOF
inside a message, too many options) ends the connection with ``Closed``.
Memory is bounded: option data is capped at ``max_option_length`` (64 KiB by
default) and WRITE payloads at ``PAYLOAD_HARD_CAP``; payloads above the
export's maximum but under the cap are drained through the fixed receive
buffer, never allocated.
"""

from __future__ import annotations

import enum
import errno as _errno
import struct
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence, Union

from ..errors import ThinpoolError

# -- wire constants (names follow the protocol document) ---------------------

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OPTION_REPLY_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

FLAG_FIXED_NEWSTYLE = 0x0001
FLAG_NO_ZEROES = 0x0002
FLAG_C_FIXED_NEWSTYLE = 0x00000001
FLAG_C_NO_ZEROES = 0x00000002

OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10

REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_META_CONTEXT = 4
REP_ERR_UNSUP = 0x80000001
REP_ERR_POLICY = 0x80000002
REP_ERR_INVALID = 0x80000003
REP_ERR_PLATFORM = 0x80000004
REP_ERR_TLS_REQD = 0x80000005
REP_ERR_UNKNOWN = 0x80000006
REP_ERR_SHUTDOWN = 0x80000007
REP_ERR_BLOCK_SIZE_REQD = 0x80000008
REP_ERR_TOO_BIG = 0x80000009

INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3

TF_HAS_FLAGS = 0x0001
TF_READ_ONLY = 0x0002
TF_SEND_FLUSH = 0x0004
TF_SEND_FUA = 0x0008
TF_SEND_TRIM = 0x0020
TF_SEND_WRITE_ZEROES = 0x0040
TF_SEND_DF = 0x0080
TF_CAN_MULTI_CONN = 0x0100
TF_SEND_CACHE = 0x0400
TF_SEND_FAST_ZERO = 0x0800

CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_CACHE = 5
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7

CMD_FLAG_FUA = 0x0001
CMD_FLAG_NO_HOLE = 0x0002
CMD_FLAG_DF = 0x0004
CMD_FLAG_REQ_ONE = 0x0008
CMD_FLAG_FAST_ZERO = 0x0010

REPLY_FLAG_DONE = 0x0001
REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_OFFSET_HOLE = 2
REPLY_TYPE_BLOCK_STATUS = 5
REPLY_TYPE_ERROR = 0x8001

NBD_EPERM = 1
NBD_EIO = 5
NBD_ENOMEM = 12
NBD_EINVAL = 22
NBD_ENOSPC = 28
NBD_EOVERFLOW = 75
NBD_ENOTSUP = 95
NBD_ESHUTDOWN = 108

NBD_STATE_HOLE = 0x1
NBD_STATE_ZERO = 0x2

BASE_ALLOCATION = "base:allocation"
BASE_ALLOCATION_ID = 1
"""Context id this server gives ``base:allocation`` in SET_META_CONTEXT."""

MAX_STRING = 4096
"""Longest export name, description or meta-context query accepted (bytes)."""
MAX_PAYLOAD = 32 << 20
"""Largest maximum payload an export may advertise (32 MiB)."""
PAYLOAD_HARD_CAP = 64 << 20
"""WRITE payloads above the export's maximum are drained up to this size and
answered with EINVAL; a larger one ends the connection."""
MAX_EXTENTS = 1 << 17
"""Most extents sent in one BLOCK_STATUS reply (qemu's own cap)."""
RECV_BUFFER_SIZE = 256 << 10
RECV_WINDOW = 32 << 10
"""Most bytes ``get_buffer`` offers in the receive buffer: enough for several
small pipelined requests per receive, small enough that little of a large
WRITE payload lands there (it has to be copied out)."""
DIRECT_PAYLOAD_MIN = 16 << 10
"""A WRITE payload with at least this much still missing is received straight
into its own buffer (``get_buffer``) instead of through the receive buffer."""

_GREETING = struct.pack(">QQH", NBDMAGIC, IHAVEOPT, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_OPT_HDR = struct.Struct(">QII")
_OPT_REPLY = struct.Struct(">QIII")
_REQUEST = struct.Struct(">IHHQQI")
_unpack_request = _REQUEST.unpack_from
_SIMPLE = struct.Struct(">IIQ")
_CHUNK = struct.Struct(">IHHQI")
_CHUNK_OFFSET = struct.Struct(">IHHQIQ")
_CHUNK_HOLE = struct.Struct(">IHHQIQI")
_ERROR_BODY = struct.Struct(">IH")
_INFO_EXPORT = struct.Struct(">HQH")
_INFO_BLOCK_SIZE = struct.Struct(">HIII")
_EXPORT_NAME_REPLY = struct.Struct(">QH")
_EMPTY = memoryview(b"")


class InvalidExportError(ThinpoolError):
    """An export's description breaks the protocol's rules (a server-side bug)."""


class TLSMode(enum.Enum):
    """OFF: STARTTLS is refused (ERR_POLICY). ALLOWED: clients may upgrade.
    REQUIRED: every option but STARTTLS and ABORT gets ERR_TLS_REQD until
    TLS is up (EXPORT_NAME ends the connection)."""

    OFF = "off"
    ALLOWED = "allowed"
    REQUIRED = "required"


def _power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


@dataclass(frozen=True, slots=True)
class ExportInfo:
    """What the handshake advertises about one export.

    ``block_sizes`` = (minimum, preferred, maximum payload) as in
    ``NBD_INFO_BLOCK_SIZE``; requests not aligned to the minimum get EINVAL
    (except the tail of an export whose size is not a multiple of it; but
    the size must be a multiple, because qemu refuses otherwise).
    """

    name: str
    size: int
    read_only: bool = False
    can_trim: bool = False
    can_zero: bool = False
    can_fast_zero: bool = False
    can_cache: bool = False
    can_multi_conn: bool = False
    block_sizes: tuple[int, int, int] = (1, 4096, MAX_PAYLOAD)
    description: str = ""

    def __post_init__(self) -> None:
        minimum, preferred, maximum = self.block_sizes
        problem = None
        if not 0 <= self.size < 1 << 63:
            problem = f"size {self.size} out of range"
        elif not (_power_of_two(minimum) and minimum <= 65536):
            problem = f"minimum block size {minimum} is not a power of two up to 64 KiB"
        elif not (_power_of_two(preferred) and preferred >= max(minimum, 512)):
            problem = f"preferred block size {preferred} is not a power of two >= max(minimum, 512)"
        elif not (preferred <= maximum <= MAX_PAYLOAD and maximum % minimum == 0):
            problem = f"maximum payload {maximum} not a multiple of the minimum between preferred and 32 MiB"
        elif self.size % minimum:
            problem = f"size {self.size} is not a multiple of the minimum block size {minimum}"
        elif len(self.name.encode()) > MAX_STRING or "\0" in self.name:
            problem = "export name longer than 4096 bytes or containing NUL"
        if problem:
            raise InvalidExportError(f"export {self.name!r}: {problem}")

    def transmission_flags(self, structured: bool) -> int:
        """The flags word: only what this export and this server really do."""
        flags = TF_HAS_FLAGS | TF_SEND_FLUSH | TF_SEND_FUA
        if self.read_only:
            flags |= TF_READ_ONLY
        else:
            if self.can_trim:
                flags |= TF_SEND_TRIM
            if self.can_zero:
                flags |= TF_SEND_WRITE_ZEROES
                if self.can_fast_zero:
                    flags |= TF_SEND_FAST_ZERO
        if structured:
            flags |= TF_SEND_DF
        if self.can_multi_conn:
            flags |= TF_CAN_MULTI_CONN
        if self.can_cache:
            flags |= TF_SEND_CACHE
        return flags


_ERRNO_MAP = {
    _errno.EPERM: NBD_EPERM, _errno.EROFS: NBD_EPERM, _errno.EACCES: NBD_EPERM,
    _errno.EIO: NBD_EIO,
    _errno.ENOMEM: NBD_ENOMEM,
    _errno.EINVAL: NBD_EINVAL,
    _errno.ENOSPC: NBD_ENOSPC, _errno.EDQUOT: NBD_ENOSPC, _errno.EFBIG: NBD_ENOSPC,
    _errno.EOVERFLOW: NBD_EOVERFLOW,
    _errno.ESHUTDOWN: NBD_ESHUTDOWN,
}


def nbd_error(err: int, fast_zero: bool = False) -> int:
    """The NBD error value for an errno: only the values the protocol allows.

    EOPNOTSUPP becomes ENOTSUP only for a FAST_ZERO request (the one place the
    protocol allows it) and EINVAL otherwise; an unknown errno becomes EINVAL,
    as in nbdkit and qemu.
    """
    if err in (_errno.EOPNOTSUPP, _errno.ENOTSUP):
        return NBD_ENOTSUP if fast_zero else NBD_EINVAL
    return _ERRNO_MAP.get(err, NBD_EINVAL)


# -- events -------------------------------------------------------------------


class _NeedData:
    __slots__ = ()

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = _NeedData()
"""``next_event`` needs more input (``receive_data`` / ``buffer_updated``)."""


@dataclass(frozen=True, slots=True)
class ListExports:
    """NBD_OPT_LIST: answer with ``reply_list``."""


class ExportRequestKind(enum.Enum):
    INFO = "info"
    GO = "go"
    EXPORT_NAME = "export_name"


@dataclass(frozen=True, slots=True)
class ExportRequest:
    """INFO, GO or EXPORT_NAME for ``name``: answer with ``accept_export`` or
    ``reject_export``. Accepting a GO or EXPORT_NAME starts transmission."""

    name: str
    kind: ExportRequestKind


@dataclass(frozen=True, slots=True)
class StartTLS:
    """STARTTLS accepted: send ``data_to_send()`` (the ACK) in plain text, run
    the TLS handshake as the server, then call ``tls_started()``."""


@dataclass(frozen=True, slots=True)
class Closed:
    """The connection is over: send whatever ``data_to_send()`` still holds,
    then close. ``clean`` is False for protocol violations and for EOF inside
    a message; ``reason`` is one line for the log."""

    reason: str
    clean: bool


class Request:
    """A valid transmission request to execute and answer through ``replies``.

    For WRITE, ``data`` is the payload (a memoryview over ``buffer``, which
    came from the machine's ``allocate`` function; the adapter may recycle
    it once the write is done). ``data`` and ``buffer`` are None otherwise.
    """

    __slots__ = ("cookie", "command", "flags", "offset", "length", "data", "buffer")

    def __init__(self, cookie: int, command: int, flags: int, offset: int, length: int,
                 data: memoryview | None = None, buffer: bytearray | None = None) -> None:
        self.cookie = cookie
        self.command = command
        self.flags = flags
        self.offset = offset
        self.length = length
        self.data = data
        self.buffer = buffer

    def __repr__(self) -> str:
        return (f"Request(cookie={self.cookie}, command={self.command}, flags={self.flags:#x}, "
                f"offset={self.offset}, length={self.length})")


@dataclass(frozen=True, slots=True)
class InvalidRequest:
    """A request refused by validation; send ``reply`` (it carries ``error``)."""

    cookie: int
    command: int
    error: int
    message: str
    reply: bytes


Event = Union[_NeedData, ListExports, ExportRequest, StartTLS, Closed, Request, InvalidRequest]


# -- replies in transmission ---------------------------------------------------


class Replies:
    """Builds transmission replies; immutable, so any thread may use it.

    Every method returns the buffers of exactly one message (send them
    contiguously, e.g. one ``sendmsg`` under the connection's send lock).
    With structured replies every READ reply is chunked and errors are
    ``ERROR`` chunks carrying the message; other successes are simple
    replies (allowed in both modes).
    """

    __slots__ = ("structured", "size", "context_selected")

    def __init__(self, structured: bool, size: int, context_selected: bool) -> None:
        self.structured = structured
        self.size = size
        self.context_selected = context_selected

    def ok(self, cookie: int) -> bytes:
        return _SIMPLE.pack(SIMPLE_REPLY_MAGIC, 0, cookie)

    def error(self, cookie: int, error: int, message: str = "") -> bytes:
        """An error reply; ``error`` is an NBD error value (see ``nbd_error``)."""
        if not self.structured:
            return _SIMPLE.pack(SIMPLE_REPLY_MAGIC, error, cookie)
        msg = message.encode("utf-8", "replace")[:MAX_STRING]
        return (_CHUNK.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, REPLY_TYPE_ERROR, cookie,
                            6 + len(msg)) + _ERROR_BODY.pack(error, len(msg)) + msg)

    def read(self, cookie: int, offset: int, data: memoryview) -> list[bytes | memoryview]:
        """A successful READ of ``data`` (all of the requested range)."""
        if not self.structured:
            return [_SIMPLE.pack(SIMPLE_REPLY_MAGIC, 0, cookie), data]
        if not len(data):
            return [_CHUNK.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, REPLY_TYPE_NONE, cookie, 0)]
        return [_CHUNK_OFFSET.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA,
                                   cookie, 8 + len(data), offset), data]

    def sparse_read(self, cookie: int, offset: int, data: memoryview,
                    zero_runs: Sequence[tuple[int, int]]) -> list[bytes | memoryview]:
        """A successful structured READ whose ``zero_runs`` go as hole chunks.

        ``zero_runs`` are sorted, disjoint (start, length) pairs relative to
        ``offset`` inside ``data``; the rest of ``data`` goes as data chunks.
        Only valid with structured replies.
        """
        if not zero_runs:
            return self.read(cookie, offset, data)
        parts: list[bytes | memoryview] = []
        total = len(data)
        pos = 0
        pieces: list[tuple[int, int, bool]] = []
        for start, length in zero_runs:
            if start > pos:
                pieces.append((pos, start - pos, True))
            pieces.append((start, length, False))
            pos = start + length
        if pos < total:
            pieces.append((pos, total - pos, True))
        last = len(pieces) - 1
        for i, (start, length, is_data) in enumerate(pieces):
            flags = REPLY_FLAG_DONE if i == last else 0
            if is_data:
                parts.append(_CHUNK_OFFSET.pack(STRUCTURED_REPLY_MAGIC, flags, REPLY_TYPE_OFFSET_DATA,
                                                cookie, 8 + length, offset + start))
                parts.append(data[start:start + length])
            else:
                parts.append(_CHUNK_HOLE.pack(STRUCTURED_REPLY_MAGIC, flags, REPLY_TYPE_OFFSET_HOLE,
                                              cookie, 12, offset + start, length))
        return parts

    def block_status(self, cookie: int, offset: int, length: int, req_one: bool,
                     extents: Iterable[tuple[int, int]]) -> bytes:
        """The ``base:allocation`` reply for a validated BLOCK_STATUS request.

        ``extents`` come from the export, (length, NBD_STATE_* flags) from
        ``offset`` on; they are clipped to the request and to the export's
        end, neighbours with equal flags are merged, unknown flag bits are
        dropped, and with ``req_one`` only the first is kept. If the export
        described nothing usable, one extent with the safe status 0 covers
        the request.
        """
        limit = min(length, self.size - offset)
        lengths: list[int] = []
        states: list[int] = []
        pos = 0
        for ext_len, state in extents:
            if ext_len <= 0 or pos >= limit:
                break
            ext_len = min(ext_len, limit - pos)
            state &= NBD_STATE_HOLE | NBD_STATE_ZERO
            if states and states[-1] == state:
                lengths[-1] += ext_len
            else:
                if len(lengths) == MAX_EXTENTS:
                    break
                lengths.append(ext_len)
                states.append(state)
            pos += ext_len
        if not lengths:
            lengths, states = [limit], [0]
        if req_one:
            del lengths[1:], states[1:]
        n = len(lengths)
        body = [0] * (2 * n)
        body[0::2] = lengths
        body[1::2] = states
        return (_CHUNK.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS,
                            cookie, 4 + 8 * n)
                + _U32.pack(BASE_ALLOCATION_ID) + struct.pack(f">{2 * n}I", *body))


# -- the connection state machine ----------------------------------------------

_ST_CLIENT_FLAGS = 0
_ST_OPTION = 1
_ST_AWAIT_LIST = 2
_ST_AWAIT_EXPORT = 3
_ST_AWAIT_TLS = 4
_ST_REQUEST = 5
_ST_PAYLOAD = 6
_ST_DISCARD = 7
_ST_CLOSED = 8


class ProtocolUsageError(RuntimeError):
    """The adapter called the machine out of turn (a programming error)."""


class ServerConnection:
    """One client connection, server side; not thread-safe (one reader).

    Typical loop::

        conn = ServerConnection(TLSMode.OFF)
        while True:
            send(conn.data_to_send())
            ev = conn.next_event()
            if ev is NEED_DATA: n = sock.recv_into(conn.get_buffer()); conn.buffer_updated(n)
            elif isinstance(ev, ExportRequest): conn.accept_export(info) ...

    ``allocate(n)`` returns a writable buffer of at least n bytes for a WRITE
    payload (default ``bytearray``). ``max_options`` bounds the options per
    connection (each export listed by LIST adds two, so a client may INFO
    and LIST_META_CONTEXT each one).
    """

    def __init__(self, tls_mode: TLSMode = TLSMode.OFF, *,
                 allocate: Callable[[int], bytearray] = bytearray,
                 max_option_length: int = 64 << 10, max_options: int = 64) -> None:
        if max_option_length + 16 > RECV_BUFFER_SIZE:
            raise ValueError("max_option_length does not fit the receive buffer")
        self.tls_mode = tls_mode
        self.tls_active = False
        self.structured = False
        self.no_zeroes = False
        self.export_info: ExportInfo | None = None
        self.replies: Replies | None = None
        self._allocate = allocate
        self._max_option_length = max_option_length
        self._option_budget = max_options
        self._listed = False
        self._buf = bytearray(RECV_BUFFER_SIZE)
        self._mv = memoryview(self._buf)
        self._start = 0
        self._end = 0
        self._eof = False
        self._out = bytearray(_GREETING)
        self._state = _ST_CLIENT_FLAGS
        self._closed_event: Closed | None = None
        # negotiation state
        self._meta_export: str | None = None  # export named by the last SET_META_CONTEXT
        self._meta_selected = False
        self._pending_option = 0
        self._pending_infos: tuple[int, ...] = ()
        self._pending_kind = ExportRequestKind.INFO
        # transmission state
        self._info: ExportInfo | None = None
        self._size = 0
        self._max_payload = 0
        self._align_mask = 0
        self._read_flags_bad = 0
        self._payload: Request | None = None
        self._payload_mv = _EMPTY
        self._payload_filled = 0
        self._direct = False
        self._discard_left = 0
        self._discard_event: InvalidRequest | None = None

    # -- input ------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._state == _ST_CLOSED

    def get_buffer(self) -> memoryview:
        """A writable view to receive into; report the count with ``buffer_updated``.

        Call it only after ``next_event`` returned NEED_DATA. During a large
        WRITE payload the view is the payload buffer itself (no copy).
        """
        if self._state == _ST_PAYLOAD and self._start == self._end:
            remaining = len(self._payload_mv) - self._payload_filled
            if remaining >= DIRECT_PAYLOAD_MIN:
                self._direct = True
                return self._payload_mv[self._payload_filled:]
        self._direct = False
        if self._start == self._end:
            self._start = self._end = 0
        elif len(self._buf) - self._end < RECV_WINDOW and self._start:
            n = self._end - self._start
            self._buf[:n] = self._mv[self._start:self._end]
            self._start, self._end = 0, n
        if self._end == len(self._buf):
            raise ProtocolUsageError("receive buffer full: call next_event() first")
        return self._mv[self._end:self._end + RECV_WINDOW]

    def buffer_updated(self, nbytes: int) -> None:
        """``nbytes`` were written at the start of the last ``get_buffer``; 0 = EOF."""
        if nbytes == 0:
            self._eof = True
        elif self._direct:
            self._payload_filled += nbytes
        else:
            self._end += nbytes
        self._direct = False

    def receive_data(self, data: bytes) -> None:
        """Feed received bytes (copying API); ``b""`` means EOF."""
        if not data:
            self._eof = True
            return
        pending = self._end - self._start
        if self._start:
            self._buf[:pending] = self._mv[self._start:self._end]
            self._start, self._end = 0, pending
        need = pending + len(data)
        if need > len(self._buf):
            self._mv.release()
            self._buf.extend(bytes(need - len(self._buf)))
            self._mv = memoryview(self._buf)
        self._buf[pending:need] = data
        self._end = need

    # -- output -----------------------------------------------------------

    def data_to_send(self) -> bytes:
        """Negotiation bytes queued for the client (and forgotten here)."""
        out = bytes(self._out)
        self._out.clear()
        return out

    # -- events -------------------------------------------------------------

    def next_event(self) -> Event:
        """The next event, or NEED_DATA when more input is needed."""
        state = self._state
        if state == _ST_REQUEST:
            return self._next_request()
        if state == _ST_PAYLOAD:
            return self._fill_payload()
        if state == _ST_DISCARD:
            return self._drain()
        if state == _ST_OPTION:
            while self._state == _ST_OPTION:
                ev = self._next_option()
                if ev is not None:
                    return ev
            return self.next_event()
        if state == _ST_CLIENT_FLAGS:
            return self._client_flags()
        if state == _ST_CLOSED:
            assert self._closed_event is not None
            return self._closed_event
        raise ProtocolUsageError("answer the pending event before asking for the next one")

    def _close(self, reason: str, clean: bool) -> Closed:
        self._state = _ST_CLOSED
        self._closed_event = Closed(reason, clean)
        self._payload = None
        self._payload_mv = _EMPTY
        return self._closed_event

    def _eof_event(self, where: str) -> Event:
        if not self._eof:
            return NEED_DATA
        if self._start == self._end and where != "payload":
            return self._close("EOF from the client", True)
        return self._close(f"EOF in the middle of {where}", False)

    def _client_flags(self) -> Event:
        if self._end - self._start < 4:
            return self._eof_event("the client flags")
        (flags,) = _U32.unpack_from(self._buf, self._start)
        self._start += 4
        if flags & ~(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES):
            return self._close(f"unknown client flags {flags:#x}", False)
        if not flags & FLAG_C_FIXED_NEWSTYLE:
            return self._close("client does not speak fixed newstyle negotiation", False)
        self.no_zeroes = bool(flags & FLAG_C_NO_ZEROES)
        self._state = _ST_OPTION
        return self.next_event()

    # -- negotiation --------------------------------------------------------

    def _reply(self, option: int, rtype: int, payload: bytes = b"") -> None:
        self._out += _OPT_REPLY.pack(OPTION_REPLY_MAGIC, option, rtype, len(payload))
        self._out += payload

    def _error(self, option: int, rtype: int, message: str) -> None:
        self._reply(option, rtype, message.encode())

    def _next_option(self) -> Event | None:
        avail = self._end - self._start
        if avail < 16:
            return self._eof_event("an option")
        magic, option, length = _OPT_HDR.unpack_from(self._buf, self._start)
        if magic != IHAVEOPT:
            return self._close(f"bad option magic {magic:#x}", False)
        if length > self._max_option_length:
            return self._close(f"option {option} carries {length} bytes (limit "
                               f"{self._max_option_length})", False)
        if avail < 16 + length:
            return self._eof_event("an option")
        data = bytes(self._mv[self._start + 16:self._start + 16 + length])
        self._start += 16 + length
        self._option_budget -= 1
        if self._option_budget < 0:
            return self._close("too many options", False)
        return self._option(option, data)

    def _option(self, option: int, data: bytes) -> Event | None:
        if self.tls_mode is TLSMode.REQUIRED and not self.tls_active \
                and option not in (OPT_STARTTLS, OPT_ABORT):
            if option == OPT_EXPORT_NAME:
                return self._close("NBD_OPT_EXPORT_NAME before TLS, which is required", False)
            self._error(option, REP_ERR_TLS_REQD, "TLS is required: use NBD_OPT_STARTTLS first")
            return None
        if option == OPT_ABORT:
            self._reply(option, REP_ACK)
            return self._close("client sent NBD_OPT_ABORT", True)
        if option == OPT_EXPORT_NAME:
            name = self._decode_name(data)
            if name is None:
                return self._close("NBD_OPT_EXPORT_NAME with an invalid name", False)
            return self._await_export(option, name, ExportRequestKind.EXPORT_NAME, ())
        if option in (OPT_INFO, OPT_GO):
            return self._info_go(option, data)
        if option == OPT_LIST:
            if data:
                self._error(option, REP_ERR_INVALID, "NBD_OPT_LIST takes no data")
                return None
            self._state = _ST_AWAIT_LIST
            return ListExports()
        if option == OPT_STRUCTURED_REPLY:
            if data:
                self._error(option, REP_ERR_INVALID, "NBD_OPT_STRUCTURED_REPLY takes no data")
            elif self.structured:
                self._error(option, REP_ERR_INVALID, "structured replies already negotiated")
            else:
                self.structured = True
                self._reply(option, REP_ACK)
            return None
        if option in (OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT):
            self._meta_context(option, data)
            return None
        if option == OPT_STARTTLS:
            return self._starttls(data)
        self._error(option, REP_ERR_UNSUP, f"option {option} is not supported")
        return None

    @staticmethod
    def _decode_name(raw: bytes | memoryview) -> str | None:
        if len(raw) > MAX_STRING:
            return None
        try:
            name = bytes(raw).decode("utf-8")
        except UnicodeDecodeError:
            return None
        return None if "\0" in name else name

    def _info_go(self, option: int, data: bytes) -> Event | None:
        n = len(data)
        what = "NBD_OPT_GO" if option == OPT_GO else "NBD_OPT_INFO"
        if n < 6:
            self._error(option, REP_ERR_INVALID, f"{what} data too short")
            return None
        (name_len,) = _U32.unpack_from(data, 0)
        if name_len > n - 6:
            self._error(option, REP_ERR_INVALID, f"{what} name length exceeds the option")
            return None
        (count,) = _U16.unpack_from(data, 4 + name_len)
        if n != 6 + name_len + 2 * count:
            self._error(option, REP_ERR_INVALID, f"{what} information request count does not match")
            return None
        name = self._decode_name(data[4:4 + name_len])
        if name is None:
            self._error(option, REP_ERR_INVALID, f"{what} export name is not valid UTF-8 text")
            return None
        infos = struct.unpack_from(f">{count}H", data, 6 + name_len)
        kind = ExportRequestKind.GO if option == OPT_GO else ExportRequestKind.INFO
        return self._await_export(option, name, kind, infos)

    def _await_export(self, option: int, name: str, kind: ExportRequestKind,
                      infos: tuple[int, ...]) -> ExportRequest:
        self._pending_option = option
        self._pending_kind = kind
        self._pending_infos = infos
        self._state = _ST_AWAIT_EXPORT
        return ExportRequest(name, kind)

    def _meta_context(self, option: int, data: bytes) -> None:
        setting = option == OPT_SET_META_CONTEXT
        if setting:
            self._meta_export, self._meta_selected = None, False
        parsed = self._parse_meta(data)
        if parsed is None:
            self._error(option, REP_ERR_INVALID, "malformed meta context request")
            return
        export, queries = parsed
        if setting and not self.structured:
            self._error(option, REP_ERR_INVALID, "NBD_OPT_SET_META_CONTEXT needs structured replies first")
            return
        if setting:
            match = BASE_ALLOCATION in queries
            self._meta_export, self._meta_selected = export, match
        else:
            match = not queries or any(q in ("base:", BASE_ALLOCATION) for q in queries)
        if match:
            ctx_id = BASE_ALLOCATION_ID if setting else 0
            self._reply(option, REP_META_CONTEXT, _U32.pack(ctx_id) + BASE_ALLOCATION.encode())
        self._reply(option, REP_ACK)

    def _parse_meta(self, data: bytes) -> tuple[str, list[str]] | None:
        n = len(data)
        if n < 8:
            return None
        (name_len,) = _U32.unpack_from(data, 0)
        if name_len > n - 8:
            return None
        export = self._decode_name(data[4:4 + name_len])
        pos = 4 + name_len
        (count,) = _U32.unpack_from(data, pos)
        pos += 4
        if export is None or count > (n - pos) // 4:
            return None
        queries = []
        for _ in range(count):
            if n - pos < 4:
                return None
            (qlen,) = _U32.unpack_from(data, pos)
            pos += 4
            if qlen > n - pos:
                return None
            query = self._decode_name(data[pos:pos + qlen])
            if query is None:
                return None
            queries.append(query)
            pos += qlen
        return (export, queries) if pos == n else None

    def _starttls(self, data: bytes) -> Event | None:
        option = OPT_STARTTLS
        if data:
            self._error(option, REP_ERR_INVALID, "NBD_OPT_STARTTLS takes no data")
        elif self.tls_mode is TLSMode.OFF:
            self._error(option, REP_ERR_POLICY, "TLS is not enabled on this server")
        elif self.tls_active:
            self._error(option, REP_ERR_INVALID, "TLS is already active")
        elif self._start != self._end:
            return self._close("client sent data after NBD_OPT_STARTTLS before the TLS handshake", False)
        else:
            self._reply(option, REP_ACK)
            self._state = _ST_AWAIT_TLS
            return StartTLS()
        return None

    def tls_started(self) -> None:
        """The TLS handshake succeeded; what was negotiated before is forgotten."""
        if self._state != _ST_AWAIT_TLS:
            raise ProtocolUsageError("tls_started() without a StartTLS event")
        self.tls_active = True
        self.structured = False
        self._meta_export, self._meta_selected = None, False
        self._start = self._end = 0
        self._state = _ST_OPTION

    def reply_list(self, exports: Iterable[tuple[str, str]]) -> None:
        """Answer ListExports with (name, description) pairs."""
        if self._state != _ST_AWAIT_LIST:
            raise ProtocolUsageError("reply_list() without a ListExports event")
        count = 0
        for name, description in exports:
            raw = name.encode()
            self._reply(OPT_LIST, REP_SERVER,
                        _U32.pack(len(raw)) + raw + description.encode()[:MAX_STRING])
            count += 1
        self._reply(OPT_LIST, REP_ACK)
        if not self._listed:
            self._listed = True
            self._option_budget += 2 * count
        self._state = _ST_OPTION

    def reject_list(self, message: str, error: int = REP_ERR_POLICY) -> None:
        """Refuse the pending ListExports with an option error."""
        if self._state != _ST_AWAIT_LIST:
            raise ProtocolUsageError("reject_list() without a ListExports event")
        self._error(OPT_LIST, error, message)
        self._state = _ST_OPTION

    def reject_export(self, message: str, error: int = REP_ERR_UNKNOWN) -> None:
        """Refuse the pending ExportRequest; after EXPORT_NAME that ends the connection."""
        if self._state != _ST_AWAIT_EXPORT:
            raise ProtocolUsageError("reject_export() without an ExportRequest event")
        if self._pending_kind is ExportRequestKind.EXPORT_NAME:
            self._close(f"NBD_OPT_EXPORT_NAME refused: {message}", False)
            return
        self._error(self._pending_option, error, message)
        self._state = _ST_OPTION

    def accept_export(self, info: ExportInfo) -> None:
        """Answer the pending ExportRequest with the export's description.

        For GO and EXPORT_NAME the machine then enters transmission with
        ``export_info`` and ``replies`` set.
        """
        if self._state != _ST_AWAIT_EXPORT:
            raise ProtocolUsageError("accept_export() without an ExportRequest event")
        kind = self._pending_kind
        option = self._pending_option
        flags = info.transmission_flags(self.structured)
        if kind is ExportRequestKind.EXPORT_NAME:
            self._out += _EXPORT_NAME_REPLY.pack(info.size, flags)
            if not self.no_zeroes:
                self._out += bytes(124)
        else:
            self._reply(option, REP_INFO, _INFO_BLOCK_SIZE.pack(INFO_BLOCK_SIZE, *info.block_sizes))
            self._reply(option, REP_INFO, _INFO_EXPORT.pack(INFO_EXPORT, info.size, flags))
            if INFO_NAME in self._pending_infos:
                self._reply(option, REP_INFO, _U16.pack(INFO_NAME) + info.name.encode())
            if INFO_DESCRIPTION in self._pending_infos and info.description:
                self._reply(option, REP_INFO, _U16.pack(INFO_DESCRIPTION)
                            + info.description.encode()[:MAX_STRING])
            self._reply(option, REP_ACK)
            if kind is ExportRequestKind.INFO:
                self._state = _ST_OPTION
                return
        selected = self._meta_selected and self._meta_export == info.name and self.structured
        self.export_info = self._info = info
        self._size = info.size
        self._max_payload = info.block_sizes[2]
        self._align_mask = info.block_sizes[0] - 1
        self._read_flags_bad = ~(CMD_FLAG_FUA | (CMD_FLAG_DF if self.structured else 0))
        self.replies = Replies(self.structured, info.size, selected)
        self._state = _ST_REQUEST

    # -- transmission -------------------------------------------------------

    def _invalid(self, cookie: int, command: int, error: int, message: str) -> InvalidRequest:
        assert self.replies is not None
        return InvalidRequest(cookie, command, error, message, self.replies.error(cookie, error, message))

    def _next_request(self) -> Event:
        start = self._start
        if self._end - start < 28:
            return self._eof_event("a request header")
        magic, flags, command, cookie, offset, length = _unpack_request(self._buf, start)
        self._start = start + 28
        if magic != REQUEST_MAGIC:
            return self._close(f"bad request magic {magic:#x}", False)
        # fast path for the common case; anything unusual is judged by _check
        if (command == CMD_READ and not flags & self._read_flags_bad and length <= self._max_payload
                and offset + length <= self._size and not (offset | length) & self._align_mask):
            return Request(cookie, CMD_READ, flags, offset, length)
        if command == CMD_WRITE:
            return self._begin_write(cookie, flags, offset, length)
        if command == CMD_DISC:
            return self._close("client sent NBD_CMD_DISC", True)
        problem = self._check(command, flags, offset, length)
        if problem is not None:
            return self._invalid(cookie, command, problem[0], problem[1])
        return Request(cookie, command, flags, offset, length)

    def _range_problem(self, offset: int, length: int, err: int) -> tuple[int, str] | None:
        info = self._info
        assert info is not None
        if offset > info.size or length > info.size - offset:
            return err, f"range {offset}+{length} is beyond the end of the export ({info.size})"
        minimum = info.block_sizes[0]
        if minimum > 1 and (offset % minimum or (length % minimum and offset + length != info.size)):
            return NBD_EINVAL, f"range {offset}+{length} is not aligned to {minimum} bytes"
        return None

    def _check(self, command: int, flags: int, offset: int, length: int) -> tuple[int, str] | None:
        info = self._info
        assert info is not None and self.replies is not None
        if command == CMD_READ:
            allowed = CMD_FLAG_FUA | (CMD_FLAG_DF if self.structured else 0)
            if flags & ~allowed:
                return NBD_EINVAL, f"flags {flags:#x} not valid for NBD_CMD_READ"
            if length > info.block_sizes[2]:
                return NBD_EINVAL, f"read of {length} bytes exceeds the maximum payload {info.block_sizes[2]}"
            return self._range_problem(offset, length, NBD_EINVAL)
        if command == CMD_FLUSH:
            if flags & ~CMD_FLAG_FUA:
                return NBD_EINVAL, f"flags {flags:#x} not valid for NBD_CMD_FLUSH"
            if offset or length:
                return NBD_EINVAL, "NBD_CMD_FLUSH must have offset and length 0"
            return None
        if command == CMD_TRIM:
            if info.read_only:
                return NBD_EPERM, "export is read-only"
            if not info.can_trim:
                return NBD_EINVAL, "NBD_CMD_TRIM is not supported by this export"
            if flags & ~CMD_FLAG_FUA:
                return NBD_EINVAL, f"flags {flags:#x} not valid for NBD_CMD_TRIM"
            return self._range_problem(offset, length, NBD_EINVAL)
        if command == CMD_WRITE_ZEROES:
            if info.read_only:
                return NBD_EPERM, "export is read-only"
            if not info.can_zero:
                return NBD_EINVAL, "NBD_CMD_WRITE_ZEROES is not supported by this export"
            allowed = CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | (CMD_FLAG_FAST_ZERO if info.can_fast_zero else 0)
            if flags & ~allowed:
                return NBD_EINVAL, f"flags {flags:#x} not valid for NBD_CMD_WRITE_ZEROES"
            return self._range_problem(offset, length, NBD_ENOSPC)
        if command == CMD_CACHE:
            if flags & ~CMD_FLAG_FUA:
                return NBD_EINVAL, f"flags {flags:#x} not valid for NBD_CMD_CACHE"
            return self._range_problem(offset, length, NBD_EINVAL)
        if command == CMD_BLOCK_STATUS:
            if flags & ~(CMD_FLAG_FUA | CMD_FLAG_REQ_ONE):
                return NBD_EINVAL, f"flags {flags:#x} not valid for NBD_CMD_BLOCK_STATUS"
            if not self.replies.context_selected:
                return NBD_EINVAL, "no metadata context was negotiated"
            if length == 0:
                return NBD_EINVAL, "NBD_CMD_BLOCK_STATUS needs a non-zero length"
            return self._range_problem(offset, length, NBD_EINVAL)
        return NBD_EINVAL, f"unknown command {command}"

    def _begin_write(self, cookie: int, flags: int, offset: int, length: int) -> Event:
        info = self._info
        assert info is not None
        if length > PAYLOAD_HARD_CAP:
            return self._close(f"write payload of {length} bytes exceeds the {PAYLOAD_HARD_CAP} byte limit",
                               False)
        problem: tuple[int, str] | None
        if (not flags & ~CMD_FLAG_FUA and length <= self._max_payload and offset + length <= self._size
                and not (offset | length) & self._align_mask and not info.read_only):
            problem = None
        elif info.read_only:
            problem = NBD_EPERM, "export is read-only"
        elif flags & ~CMD_FLAG_FUA:
            problem = NBD_EINVAL, f"flags {flags:#x} not valid for NBD_CMD_WRITE"
        elif length > info.block_sizes[2]:
            problem = NBD_EINVAL, f"write of {length} bytes exceeds the maximum payload {info.block_sizes[2]}"
        else:
            problem = self._range_problem(offset, length, NBD_ENOSPC)
        if problem is not None:
            self._discard_left = length
            self._discard_event = self._invalid(cookie, CMD_WRITE, problem[0], problem[1])
            self._state = _ST_DISCARD
            return self._drain()
        buffer = self._allocate(length)
        view = memoryview(buffer)[:length]
        self._payload = Request(cookie, CMD_WRITE, flags, offset, length, view, buffer)
        self._payload_mv = view
        self._payload_filled = 0
        self._state = _ST_PAYLOAD
        return self._fill_payload()

    def _fill_payload(self) -> Event:
        view = self._payload_mv
        missing = len(view) - self._payload_filled
        avail = self._end - self._start
        if avail and missing:
            n = min(avail, missing)
            view[self._payload_filled:self._payload_filled + n] = self._mv[self._start:self._start + n]
            self._start += n
            self._payload_filled += n
            missing -= n
        if missing:
            return self._eof_event("payload")
        request = self._payload
        assert request is not None
        self._payload = None
        self._payload_mv = _EMPTY
        self._state = _ST_REQUEST
        return request

    def _drain(self) -> Event:
        n = min(self._discard_left, self._end - self._start)
        self._start += n
        self._discard_left -= n
        if self._discard_left:
            return self._eof_event("payload")
        event = self._discard_event
        assert event is not None
        self._discard_event = None
        self._state = _ST_REQUEST
        return event
