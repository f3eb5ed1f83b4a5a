"""Byte-level tests of the sans-I/O NBD state machine (thinpool.nbd.protocol).

The expected bytes come from the protocol reference (/work/shared/nbd-protocol.md,
sections 1-3 and the conformance list of section 8): every test feeds what a
client would send and decodes what the server queues, independently of the
implementation's own helpers.
"""

from __future__ import annotations

import errno
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from thinpool.errors import ThinpoolError
from thinpool.nbd import protocol as P

IHAVEOPT = 0x49484156454F5054
OPT_REPLY_MAGIC = 0x0003E889045565A9
MiB = 1 << 20


# -- client-side encoders / decoders (written from the spec, not from the module) --

def opt(code: int, data: bytes = b"") -> bytes:
    return struct.pack(">QII", IHAVEOPT, code, len(data)) + data


def go_data(name: str, infos: tuple[int, ...] = ()) -> bytes:
    raw = name.encode()
    return struct.pack(">I", len(raw)) + raw + struct.pack(f">H{len(infos)}H", len(infos), *infos)


def meta_data(name: str, queries: list[str]) -> bytes:
    raw = name.encode()
    out = struct.pack(">I", len(raw)) + raw + struct.pack(">I", len(queries))
    for q in queries:
        out += struct.pack(">I", len(q.encode())) + q.encode()
    return out


def request(cmd: int, offset: int = 0, length: int = 0, *, flags: int = 0, cookie: int = 7,
            magic: int = 0x25609513) -> bytes:
    return struct.pack(">IHHQQI", magic, flags, cmd, cookie, offset, length)


def parse_option_replies(data: bytes) -> list[tuple[int, int, bytes]]:
    out = []
    pos = 0
    while pos < len(data):
        magic, option, rtype, length = struct.unpack_from(">QIII", data, pos)
        assert magic == OPT_REPLY_MAGIC
        out.append((option, rtype, data[pos + 20:pos + 20 + length]))
        pos += 20 + length
    assert pos == len(data)
    return out


def parse_chunks(data: bytes) -> list[tuple[int, int, int, bytes]]:
    """Structured reply chunks: (flags, type, cookie, payload)."""
    out = []
    pos = 0
    while pos < len(data):
        magic, flags, ctype, cookie, length = struct.unpack_from(">IHHQI", data, pos)
        assert magic == 0x668E33EF
        out.append((flags, ctype, cookie, data[pos + 20:pos + 20 + length]))
        pos += 20 + length
    assert pos == len(data)
    return out


def joined(bufs: list[bytes | memoryview]) -> bytes:
    return b"".join(bytes(b) for b in bufs)


def info(**kw: object) -> P.ExportInfo:
    args: dict[str, object] = dict(name="vol", size=16 * MiB, can_trim=True, can_zero=True,
                                   can_fast_zero=True, can_cache=True, can_multi_conn=True)
    args.update(kw)
    return P.ExportInfo(**args)  # type: ignore[arg-type]


def events(conn: P.ServerConnection) -> list[P.Event]:
    out: list[P.Event] = []
    while True:
        ev = conn.next_event()
        out.append(ev)
        if ev is P.NEED_DATA or isinstance(ev, (P.Closed, P.ExportRequest, P.ListExports, P.StartTLS)):
            return out


def negotiated(conn: P.ServerConnection | None = None, *, structured: bool = True,
               meta: bool = True, export: P.ExportInfo | None = None) -> P.ServerConnection:
    """A connection in transmission after STRUCTURED_REPLY, SET_META_CONTEXT and GO."""
    conn = conn or P.ServerConnection()
    conn.data_to_send()
    data = struct.pack(">I", 3)
    if structured:
        data += opt(P.OPT_STRUCTURED_REPLY)
    if meta:
        data += opt(P.OPT_SET_META_CONTEXT, meta_data("vol", ["base:allocation"]))
    data += opt(P.OPT_GO, go_data("vol", (P.INFO_BLOCK_SIZE,)))
    conn.receive_data(data)
    evs = events(conn)
    assert isinstance(evs[-1], P.ExportRequest) and evs[-1].kind is P.ExportRequestKind.GO
    conn.accept_export(export or info())
    conn.data_to_send()
    assert conn.replies is not None
    return conn


def start(mode: P.TLSMode = P.TLSMode.OFF, flags: int = 3) -> P.ServerConnection:
    conn = P.ServerConnection(mode)
    conn.data_to_send()
    conn.receive_data(struct.pack(">I", flags))
    return conn


# -- greeting and client flags ---------------------------------------------------

def test_greeting_is_18_bytes_fixed_newstyle_no_zeroes() -> None:
    conn = P.ServerConnection()
    assert conn.data_to_send() == b"NBDMAGIC" + b"IHAVEOPT" + b"\x00\x03"
    assert conn.next_event() is P.NEED_DATA


@pytest.mark.parametrize("flags", [0x80, 0x3 | 0x100, 0x0, 0x2])
def test_bad_client_flags_close(flags: int) -> None:
    conn = start(flags=flags)
    ev = conn.next_event()
    assert isinstance(ev, P.Closed) and not ev.clean
    assert conn.closed
    assert conn.data_to_send() == b""


def test_port_probe_eof_is_a_clean_close() -> None:
    conn = P.ServerConnection()
    conn.receive_data(b"")
    ev = conn.next_event()
    assert isinstance(ev, P.Closed) and ev.clean


# -- options ---------------------------------------------------------------------

def test_bad_option_magic_closes() -> None:
    conn = start()
    conn.receive_data(struct.pack(">QII", 0x1122334455667788, P.OPT_LIST, 0))
    ev = conn.next_event()
    assert isinstance(ev, P.Closed) and not ev.clean


def test_huge_option_length_closes_without_waiting_for_data() -> None:
    conn = start()
    conn.receive_data(struct.pack(">QII", IHAVEOPT, P.OPT_GO, 0xFFFFFFFF))
    ev = conn.next_event()
    assert isinstance(ev, P.Closed) and not ev.clean and "bytes" in ev.reason


def test_unknown_option_is_unsupported_and_stream_stays_in_step() -> None:
    conn = start()
    conn.receive_data(opt(0x1234, b"12345") + opt(11) + opt(4) + opt(P.OPT_STRUCTURED_REPLY))
    assert events(conn) == [P.NEED_DATA]
    replies = parse_option_replies(conn.data_to_send())
    assert [(o, t) for o, t, _ in replies] == [(0x1234, P.REP_ERR_UNSUP), (11, P.REP_ERR_UNSUP),
                                               (4, P.REP_ERR_UNSUP), (P.OPT_STRUCTURED_REPLY, P.REP_ACK)]
    assert replies[-1][2] == b""  # an ACK never carries data
    assert conn.structured


def test_option_split_across_many_receives() -> None:
    conn = start()
    for b in opt(P.OPT_LIST):
        assert conn.next_event() is P.NEED_DATA
        conn.receive_data(bytes([b]))
    assert isinstance(conn.next_event(), P.ListExports)


def test_structured_reply_with_data_or_twice_is_invalid() -> None:
    conn = start()
    conn.receive_data(opt(P.OPT_STRUCTURED_REPLY, b"x") + opt(P.OPT_STRUCTURED_REPLY)
                      + opt(P.OPT_STRUCTURED_REPLY))
    events(conn)
    assert [t for _, t, _ in parse_option_replies(conn.data_to_send())] == \
        [P.REP_ERR_INVALID, P.REP_ACK, P.REP_ERR_INVALID]


def test_list() -> None:
    conn = start()
    conn.receive_data(opt(P.OPT_LIST, b"junk"))
    assert events(conn) == [P.NEED_DATA]
    assert parse_option_replies(conn.data_to_send())[0][1] == P.REP_ERR_INVALID
    conn.receive_data(opt(P.OPT_LIST))
    assert isinstance(conn.next_event(), P.ListExports)
    with pytest.raises(P.ProtocolUsageError):
        conn.next_event()
    conn.reply_list([("a", "first"), ("bé", "")])
    replies = parse_option_replies(conn.data_to_send())
    assert replies == [(P.OPT_LIST, P.REP_SERVER, b"\0\0\0\x01afirst"),
                       (P.OPT_LIST, P.REP_SERVER, b"\0\0\0\x03b\xc3\xa9"),
                       (P.OPT_LIST, P.REP_ACK, b"")]
    assert conn.next_event() is P.NEED_DATA


def test_reject_list() -> None:
    conn = start()
    conn.receive_data(opt(P.OPT_LIST))
    assert isinstance(conn.next_event(), P.ListExports)
    conn.reject_list("catalog unavailable")
    assert parse_option_replies(conn.data_to_send()) == [
        (P.OPT_LIST, P.REP_ERR_POLICY, b"catalog unavailable")]


def test_abort_acks_then_closes_cleanly_and_ignores_the_rest() -> None:
    conn = start()
    conn.receive_data(opt(P.OPT_ABORT) + b"garbage after abort")
    ev = conn.next_event()
    assert isinstance(ev, P.Closed) and ev.clean
    assert parse_option_replies(conn.data_to_send()) == [(P.OPT_ABORT, P.REP_ACK, b"")]
    assert conn.next_event() is ev


def test_too_many_options_close() -> None:
    conn = P.ServerConnection(max_options=5)
    conn.data_to_send()
    conn.receive_data(struct.pack(">I", 3) + opt(99) * 6)
    evs = events(conn)
    assert isinstance(evs[-1], P.Closed) and "too many" in evs[-1].reason
    assert len(parse_option_replies(conn.data_to_send())) == 5


def test_list_extends_the_option_budget() -> None:
    conn = P.ServerConnection(max_options=2)
    conn.receive_data(struct.pack(">I", 3) + opt(P.OPT_LIST))
    assert isinstance(conn.next_event(), P.ListExports)
    conn.reply_list([("a", ""), ("b", "")])
    conn.receive_data(opt(99) * 5)
    assert events(conn) == [P.NEED_DATA]
    conn.receive_data(opt(99))
    assert isinstance(events(conn)[-1], P.Closed)


# -- INFO / GO / EXPORT_NAME ------------------------------------------------------

@pytest.mark.parametrize("data", [
    b"\0\0\0",                                     # shorter than 6
    struct.pack(">I", 10) + b"vol" + b"\0\0",      # name length > N - 6
    go_data("vol", (1, 2))[:-2],                   # fewer info codes than counted
    go_data("vol") + b"\0",                        # trailing byte
    struct.pack(">I", 2) + b"\xff\xfe" + b"\0\0",  # not UTF-8
    struct.pack(">I", 2) + b"a\0" + b"\0\0",       # embedded NUL
])
@pytest.mark.parametrize("code", [P.OPT_GO, P.OPT_INFO])
def test_malformed_info_go_is_invalid(code: int, data: bytes) -> None:
    conn = start()
    conn.receive_data(opt(code, data) + opt(P.OPT_STRUCTURED_REPLY))
    assert events(conn) == [P.NEED_DATA]
    assert [(o, t) for o, t, _ in parse_option_replies(conn.data_to_send())] == \
        [(code, P.REP_ERR_INVALID), (P.OPT_STRUCTURED_REPLY, P.REP_ACK)]


def test_go_unknown_export_then_retry() -> None:
    conn = start()
    conn.receive_data(opt(P.OPT_GO, go_data("nosuch")))
    ev = conn.next_event()
    assert ev == P.ExportRequest("nosuch", P.ExportRequestKind.GO)
    conn.reject_export("no export named 'nosuch'")
    assert parse_option_replies(conn.data_to_send()) == [
        (P.OPT_GO, P.REP_ERR_UNKNOWN, b"no export named 'nosuch'")]
    conn.receive_data(opt(P.OPT_GO, go_data("vol")))
    assert isinstance(conn.next_event(), P.ExportRequest)
    conn.accept_export(info())
    assert conn.replies is not None


def test_go_reply_always_has_export_and_block_size() -> None:
    conn = start()
    conn.receive_data(opt(P.OPT_GO, go_data("vol")))  # no info requested at all
    conn.next_event()
    conn.accept_export(info(block_sizes=(512, 4096, 8 * MiB)))
    replies = parse_option_replies(conn.data_to_send())
    by_type = {struct.unpack_from(">H", d)[0]: d for _, t, d in replies if t == P.REP_INFO}
    assert len(by_type[P.INFO_EXPORT]) == 12
    size, flags = struct.unpack(">QH", by_type[P.INFO_EXPORT][2:])
    assert size == 16 * MiB and flags == 0x0D6D  # no structured replies: no SEND_DF
    assert len(by_type[P.INFO_BLOCK_SIZE]) == 14
    assert struct.unpack(">III", by_type[P.INFO_BLOCK_SIZE][2:]) == (512, 4096, 8 * MiB)
    assert P.INFO_NAME not in by_type and P.INFO_DESCRIPTION not in by_type
    assert replies[-1] == (P.OPT_GO, P.REP_ACK, b"")
    assert conn.export_info is not None and conn.next_event() is P.NEED_DATA


def test_info_with_name_and_description_then_more_options() -> None:
    conn = start()
    conn.receive_data(opt(P.OPT_STRUCTURED_REPLY)
                      + opt(P.OPT_INFO, go_data("vol", (P.INFO_NAME, P.INFO_DESCRIPTION, 77))))
    ev = events(conn)[-1]
    assert ev == P.ExportRequest("vol", P.ExportRequestKind.INFO)
    conn.accept_export(info(description="my volume"))
    replies = parse_option_replies(conn.data_to_send())[1:]
    infos = {struct.unpack_from(">H", d)[0]: d[2:] for _, t, d in replies if t == P.REP_INFO}
    assert infos[P.INFO_NAME] == b"vol" and infos[P.INFO_DESCRIPTION] == b"my volume"
    assert struct.unpack(">QH", infos[P.INFO_EXPORT])[1] == 0x0DED
    assert conn.replies is None  # INFO does not start transmission
    conn.receive_data(opt(P.OPT_LIST))
    assert isinstance(conn.next_event(), P.ListExports)


@pytest.mark.parametrize("no_zeroes,length", [(True, 10), (False, 134)])
def test_export_name_reply_length(no_zeroes: bool, length: int) -> None:
    conn = P.ServerConnection()
    conn.data_to_send()
    conn.receive_data(struct.pack(">I", 1 | (2 if no_zeroes else 0)) + opt(P.OPT_EXPORT_NAME, b"vol"))
    assert conn.next_event() == P.ExportRequest("vol", P.ExportRequestKind.EXPORT_NAME)
    conn.accept_export(info())
    out = conn.data_to_send()
    assert len(out) == length
    assert struct.unpack_from(">QH", out) == (16 * MiB, 0x0D6D)
    assert out[10:] == bytes(length - 10)
    conn.receive_data(request(P.CMD_FLUSH))
    assert isinstance(conn.next_event(), P.Request)


def test_export_name_unknown_closes() -> None:
    conn = start()
    conn.receive_data(opt(P.OPT_EXPORT_NAME, b"nosuch"))
    conn.next_event()
    conn.reject_export("no such export")
    assert conn.data_to_send() == b""
    ev = conn.next_event()
    assert isinstance(ev, P.Closed) and not ev.clean


@pytest.mark.parametrize("kw,structured,flags", [
    ({}, True, 0x0DED), ({}, False, 0x0D6D),
    ({"read_only": True}, True, 0x058F), ({"read_only": True}, False, 0x050F),
    ({"can_trim": False, "can_zero": False, "can_cache": False, "can_multi_conn": False}, False, 0x000D),
    ({"can_fast_zero": False}, False, 0x056D),
])
def test_transmission_flags_tell_the_truth(kw: dict[str, bool], structured: bool, flags: int) -> None:
    assert info(**kw).transmission_flags(structured) == flags


@pytest.mark.parametrize("kw", [
    {"block_sizes": (3, 4096, MiB)}, {"block_sizes": (512, 256, MiB)},
    {"block_sizes": (512, 4096, 2048)}, {"block_sizes": (512, 4096, 64 * MiB)},
    {"block_sizes": (1 << 17, 1 << 17, 1 << 20)}, {"size": 1000, "block_sizes": (512, 4096, MiB)},
    {"size": -1}, {"name": "a" * 5000},
])
def test_export_info_rejects_bad_descriptions(kw: dict[str, object]) -> None:
    with pytest.raises(P.InvalidExportError) as e:
        info(**kw)
    assert isinstance(e.value, ThinpoolError) and "\n" not in str(e.value)


# -- meta contexts -----------------------------------------------------------------

def test_set_meta_context_needs_structured_replies() -> None:
    conn = start()
    conn.receive_data(opt(P.OPT_SET_META_CONTEXT, meta_data("vol", ["base:allocation"])))
    events(conn)
    assert parse_option_replies(conn.data_to_send())[0][1] == P.REP_ERR_INVALID


def test_set_meta_context_returns_only_known_contexts() -> None:
    conn = start()
    conn.receive_data(opt(P.OPT_STRUCTURED_REPLY) + opt(
        P.OPT_SET_META_CONTEXT, meta_data("vol", ["base:allocation", "x-unknown:foo", "base:", "qemu:x"])))
    events(conn)
    replies = parse_option_replies(conn.data_to_send())[1:]
    assert replies == [(P.OPT_SET_META_CONTEXT, P.REP_META_CONTEXT, struct.pack(">I", 1) + b"base:allocation"),
                       (P.OPT_SET_META_CONTEXT, P.REP_ACK, b"")]


@pytest.mark.parametrize("queries,expected", [([], True), (["base:"], True), (["base:allocation"], True),
                                              (["qemu:dirty-bitmap:"], False), (["nocolon"], False)])
def test_list_meta_context(queries: list[str], expected: bool) -> None:
    conn = start()
    conn.receive_data(opt(P.OPT_STRUCTURED_REPLY) + opt(P.OPT_LIST_META_CONTEXT, meta_data("vol", queries)))
    events(conn)
    replies = parse_option_replies(conn.data_to_send())[1:]
    contexts = [d for _, t, d in replies if t == P.REP_META_CONTEXT]
    assert contexts == ([struct.pack(">I", 0) + b"base:allocation"] if expected else [])
    assert replies[-1][1] == P.REP_ACK


@pytest.mark.parametrize("data", [
    b"\0\0\0",
    struct.pack(">I", 50) + b"vol" + struct.pack(">I", 0),
    meta_data("vol", ["base:allocation"])[:-1],
    meta_data("vol", ["base:allocation"]) + b"x",
    struct.pack(">I", 3) + b"vol" + struct.pack(">I", 1000),
    struct.pack(">I", 3) + b"vol" + struct.pack(">II", 1, 99) + b"base",
])
def test_malformed_meta_context_is_invalid(data: bytes) -> None:
    conn = start()
    conn.receive_data(opt(P.OPT_STRUCTURED_REPLY) + opt(P.OPT_SET_META_CONTEXT, data) + opt(P.OPT_ABORT))
    assert isinstance(events(conn)[-1], P.Closed)
    assert [t for _, t, _ in parse_option_replies(conn.data_to_send())] == \
        [P.REP_ACK, P.REP_ERR_INVALID, P.REP_ACK]


def test_meta_context_for_another_export_is_dropped_at_go() -> None:
    conn = start()
    conn.receive_data(opt(P.OPT_STRUCTURED_REPLY)
                      + opt(P.OPT_SET_META_CONTEXT, meta_data("other", ["base:allocation"]))
                      + opt(P.OPT_GO, go_data("vol")))
    events(conn)
    conn.accept_export(info())
    conn.receive_data(request(P.CMD_BLOCK_STATUS, 0, 4096))
    ev = conn.next_event()
    assert isinstance(ev, P.InvalidRequest) and ev.error == P.NBD_EINVAL


# -- TLS ---------------------------------------------------------------------------

def test_starttls_refused_when_tls_is_off() -> None:
    conn = start()
    conn.receive_data(opt(P.OPT_STARTTLS) + opt(P.OPT_STRUCTURED_REPLY))
    assert events(conn) == [P.NEED_DATA]
    assert [t for _, t, _ in parse_option_replies(conn.data_to_send())] == [P.REP_ERR_POLICY, P.REP_ACK]


def test_starttls_allowed_resets_negotiation() -> None:
    conn = start(P.TLSMode.ALLOWED)
    conn.receive_data(opt(P.OPT_STRUCTURED_REPLY) + opt(P.OPT_STARTTLS, b"x") + opt(P.OPT_STARTTLS))
    evs = events(conn)
    assert isinstance(evs[-1], P.StartTLS)
    assert [t for _, t, _ in parse_option_replies(conn.data_to_send())] == \
        [P.REP_ACK, P.REP_ERR_INVALID, P.REP_ACK]
    with pytest.raises(P.ProtocolUsageError):
        conn.next_event()
    conn.tls_started()
    assert conn.tls_active and not conn.structured
    conn.receive_data(opt(P.OPT_STARTTLS))
    events(conn)
    assert parse_option_replies(conn.data_to_send())[0][1] == P.REP_ERR_INVALID


def test_plaintext_pipelined_after_starttls_closes() -> None:
    conn = start(P.TLSMode.REQUIRED)
    conn.receive_data(opt(P.OPT_STARTTLS) + opt(P.OPT_GO, go_data("vol")))
    ev = events(conn)[-1]
    assert isinstance(ev, P.Closed) and not ev.clean


def test_tls_required() -> None:
    conn = start(P.TLSMode.REQUIRED)
    conn.receive_data(opt(P.OPT_STRUCTURED_REPLY) + opt(P.OPT_LIST) + opt(P.OPT_GO, go_data("vol"))
                      + opt(P.OPT_INFO, go_data("vol")))
    assert events(conn) == [P.NEED_DATA]
    assert [t for _, t, _ in parse_option_replies(conn.data_to_send())] == [P.REP_ERR_TLS_REQD] * 4
    conn.receive_data(opt(P.OPT_STARTTLS))
    assert isinstance(events(conn)[-1], P.StartTLS)
    conn.tls_started()
    conn.data_to_send()
    conn.receive_data(opt(P.OPT_GO, go_data("vol")))
    assert isinstance(conn.next_event(), P.ExportRequest)


def test_tls_required_export_name_before_tls_closes() -> None:
    conn = start(P.TLSMode.REQUIRED)
    conn.receive_data(opt(P.OPT_EXPORT_NAME, b"vol"))
    ev = conn.next_event()
    assert isinstance(ev, P.Closed) and not ev.clean


def test_tls_required_abort_is_allowed() -> None:
    conn = start(P.TLSMode.REQUIRED)
    conn.receive_data(opt(P.OPT_ABORT))
    ev = conn.next_event()
    assert isinstance(ev, P.Closed) and ev.clean
    assert parse_option_replies(conn.data_to_send())[0][1] == P.REP_ACK


# -- transmission ------------------------------------------------------------------

def test_bad_request_magic_closes() -> None:
    conn = negotiated()
    conn.receive_data(request(P.CMD_READ, 0, 512, magic=0x12560953))
    ev = conn.next_event()
    assert isinstance(ev, P.Closed) and not ev.clean


def test_unknown_command_then_read() -> None:
    conn = negotiated()
    conn.receive_data(request(99, cookie=1234) + request(P.CMD_READ, 0, 4096, cookie=5))
    ev = conn.next_event()
    assert isinstance(ev, P.InvalidRequest) and ev.cookie == 1234 and ev.error == P.NBD_EINVAL
    chunks = parse_chunks(ev.reply)
    assert len(chunks) == 1
    flags, ctype, cookie, payload = chunks[0]
    assert (flags, ctype, cookie) == (1, 0x8001, 1234)
    err, mlen = struct.unpack_from(">IH", payload)
    assert err == 22 and payload[6:].decode() == "unknown command 99" and mlen == len(payload) - 6
    ev2 = conn.next_event()
    assert isinstance(ev2, P.Request) and (ev2.command, ev2.cookie, ev2.offset, ev2.length) == (0, 5, 0, 4096)


def test_simple_error_reply_without_structured() -> None:
    conn = negotiated(structured=False, meta=False)
    conn.receive_data(request(99, cookie=3))
    ev = conn.next_event()
    assert isinstance(ev, P.InvalidRequest)
    assert ev.reply == struct.pack(">IIQ", 0x67446698, 22, 3)


SIZE = 16 * MiB


@pytest.mark.parametrize("cmd,offset,length,flags,error", [
    (P.CMD_READ, 0, 512, 0x8000, P.NBD_EINVAL),
    (P.CMD_READ, 0, 512, P.CMD_FLAG_NO_HOLE, P.NBD_EINVAL),
    (P.CMD_READ, SIZE, 1, 0, P.NBD_EINVAL),
    (P.CMD_READ, SIZE - 512, 1024, 0, P.NBD_EINVAL),
    (P.CMD_READ, (1 << 64) - 512, 1024, 0, P.NBD_EINVAL),
    (P.CMD_READ, 0, 33 * MiB, 0, P.NBD_EINVAL),
    (P.CMD_TRIM, SIZE - 4096, 8192, 0, P.NBD_EINVAL),
    (P.CMD_TRIM, 0, 4096, P.CMD_FLAG_NO_HOLE, P.NBD_EINVAL),
    (P.CMD_CACHE, SIZE, 4096, 0, P.NBD_EINVAL),
    (P.CMD_BLOCK_STATUS, SIZE + 1, 4096, 0, P.NBD_EINVAL),
    (P.CMD_BLOCK_STATUS, 0, 0, 0, P.NBD_EINVAL),
    (P.CMD_BLOCK_STATUS, 0, 4096, P.CMD_FLAG_DF, P.NBD_EINVAL),
    (P.CMD_WRITE_ZEROES, SIZE - 4096, 8192, 0, P.NBD_ENOSPC),
    (P.CMD_WRITE_ZEROES, (1 << 64) - 1, 1, 0, P.NBD_ENOSPC),
    (P.CMD_WRITE_ZEROES, 0, 4096, P.CMD_FLAG_REQ_ONE, P.NBD_EINVAL),
    (P.CMD_FLUSH, 0, 4096, 0, P.NBD_EINVAL),
    (P.CMD_FLUSH, 0, 0, P.CMD_FLAG_DF, P.NBD_EINVAL),
    (8, 0, 0, 0, P.NBD_EINVAL),  # NBD_CMD_RESIZE is not offered
])
def test_request_validation(cmd: int, offset: int, length: int, flags: int, error: int) -> None:
    conn = negotiated()
    conn.receive_data(request(cmd, offset, length, flags=flags, cookie=42) + request(P.CMD_FLUSH, cookie=43))
    ev = conn.next_event()
    assert isinstance(ev, P.InvalidRequest), ev
    assert (ev.cookie, ev.error) == (42, error)
    assert struct.unpack_from(">I", parse_chunks(ev.reply)[0][3])[0] == error
    nxt = conn.next_event()
    assert isinstance(nxt, P.Request) and nxt.cookie == 43


@pytest.mark.parametrize("cmd,offset,length,flags", [
    (P.CMD_READ, SIZE - 512, 512, P.CMD_FLAG_FUA | P.CMD_FLAG_DF),
    (P.CMD_READ, 0, 0, 0),
    (P.CMD_TRIM, 0, SIZE, P.CMD_FLAG_FUA),
    (P.CMD_WRITE_ZEROES, 0, SIZE, P.CMD_FLAG_FUA | P.CMD_FLAG_NO_HOLE | P.CMD_FLAG_FAST_ZERO),
    (P.CMD_BLOCK_STATUS, 0, SIZE, P.CMD_FLAG_REQ_ONE),
    (P.CMD_CACHE, 0, 4096, 0),
    (P.CMD_FLUSH, 0, 0, P.CMD_FLAG_FUA),
])
def test_valid_requests(cmd: int, offset: int, length: int, flags: int) -> None:
    conn = negotiated()
    conn.receive_data(request(cmd, offset, length, flags=flags, cookie=9))
    ev = conn.next_event()
    assert isinstance(ev, P.Request) and (ev.command, ev.flags, ev.offset, ev.length) == (cmd, flags, offset, length)


def test_huge_trim_and_zero_on_a_big_export() -> None:
    big = info(size=8 << 30)
    conn = negotiated(export=big)
    conn.receive_data(request(P.CMD_TRIM, 0, 1 << 30) + request(P.CMD_WRITE_ZEROES, 4096, (4 << 30) - 4096)
                      + request(P.CMD_BLOCK_STATUS, 0, 0xFFFFFFFF))
    for _ in range(3):
        assert isinstance(conn.next_event(), P.Request)


def test_df_and_block_status_need_structured_replies() -> None:
    conn = negotiated(structured=False, meta=False)
    conn.receive_data(request(P.CMD_READ, 0, 512, flags=P.CMD_FLAG_DF) + request(P.CMD_BLOCK_STATUS, 0, 512))
    assert conn.next_event().error == P.NBD_EINVAL  # type: ignore[union-attr]
    assert conn.next_event().error == P.NBD_EINVAL  # type: ignore[union-attr]


def test_block_status_without_selected_context() -> None:
    conn = negotiated(meta=False)
    conn.receive_data(request(P.CMD_BLOCK_STATUS, 0, 512))
    ev = conn.next_event()
    assert isinstance(ev, P.InvalidRequest) and "context" in ev.message


def test_read_only_export() -> None:
    conn = negotiated(export=info(read_only=True))
    conn.receive_data(request(P.CMD_WRITE, 0, 5, cookie=1) + b"hello" + request(P.CMD_TRIM, 0, 512, cookie=2)
                      + request(P.CMD_WRITE_ZEROES, 0, 512, cookie=3) + request(P.CMD_READ, 0, 512, cookie=4))
    assert [(e.cookie, e.error) for e in (conn.next_event() for _ in range(3))] == \
        [(1, P.NBD_EPERM), (2, P.NBD_EPERM), (3, P.NBD_EPERM)]  # type: ignore[union-attr]
    assert isinstance(conn.next_event(), P.Request)


def test_unsupported_trim_zero_fast_zero() -> None:
    conn = negotiated(export=info(can_trim=False, can_zero=True, can_fast_zero=False))
    conn.receive_data(request(P.CMD_TRIM, 0, 512) + request(P.CMD_WRITE_ZEROES, 0, 512, flags=P.CMD_FLAG_FAST_ZERO)
                      + request(P.CMD_WRITE_ZEROES, 0, 512, flags=P.CMD_FLAG_NO_HOLE))
    assert conn.next_event().error == P.NBD_EINVAL  # type: ignore[union-attr]
    assert conn.next_event().error == P.NBD_EINVAL  # type: ignore[union-attr]
    assert isinstance(conn.next_event(), P.Request)
    conn2 = negotiated(export=info(can_zero=False))
    conn2.receive_data(request(P.CMD_WRITE_ZEROES, 0, 512))
    assert conn2.next_event().error == P.NBD_EINVAL  # type: ignore[union-attr]


def test_alignment_to_minimum_block_size() -> None:
    conn = negotiated(export=info(size=SIZE, block_sizes=(512, 4096, MiB)))
    conn.receive_data(request(P.CMD_READ, 12345, 512) + request(P.CMD_READ, 512, 100)
                      + request(P.CMD_WRITE, 1, 0) + request(P.CMD_READ, 1024, 512))
    assert conn.next_event().error == P.NBD_EINVAL  # type: ignore[union-attr]
    assert conn.next_event().error == P.NBD_EINVAL  # type: ignore[union-attr]
    assert conn.next_event().error == P.NBD_EINVAL  # type: ignore[union-attr]
    assert isinstance(conn.next_event(), P.Request)


def test_cookies_are_echoed_untouched() -> None:
    conn = negotiated()
    conn.receive_data(request(99, cookie=0) + request(99, cookie=(1 << 64) - 1))
    assert [conn.next_event().cookie for _ in range(2)] == [0, (1 << 64) - 1]  # type: ignore[union-attr]


def test_write_payload_and_pipelining() -> None:
    conn = negotiated()
    stream = b"".join(request(P.CMD_WRITE, i * 4096, 4096, cookie=i, flags=P.CMD_FLAG_FUA if i % 2 else 0)
                      + bytes([i]) * 4096 for i in range(100))
    conn.receive_data(stream)
    seen = []
    while (ev := conn.next_event()) is not P.NEED_DATA:
        assert isinstance(ev, P.Request) and ev.data is not None
        assert bytes(ev.data) == bytes([ev.cookie]) * 4096 and ev.offset == ev.cookie * 4096
        seen.append(ev.cookie)
    assert seen == list(range(100))


def test_zero_length_write_is_a_request() -> None:
    conn = negotiated()
    conn.receive_data(request(P.CMD_WRITE, 0, 0) + request(P.CMD_FLUSH))
    ev = conn.next_event()
    assert isinstance(ev, P.Request) and ev.data is not None and len(ev.data) == 0
    assert isinstance(conn.next_event(), P.Request)


def test_large_payload_is_received_in_place() -> None:
    allocated: list[bytearray] = []

    def alloc(n: int) -> bytearray:
        allocated.append(bytearray(n + 100))
        return allocated[-1]

    conn = negotiated(P.ServerConnection(allocate=alloc))
    payload = bytes(range(256)) * 4096  # 1 MiB
    conn.receive_data(request(P.CMD_WRITE, 0, len(payload), cookie=77) + payload[:1000])
    assert conn.next_event() is P.NEED_DATA
    pos = 1000
    while True:
        view = conn.get_buffer()
        assert view.obj is allocated[0]  # straight into the payload buffer
        n = min(len(view), 300_000)
        view[:n] = payload[pos:pos + n]
        conn.buffer_updated(n)
        pos += n
        ev = conn.next_event()
        if ev is not P.NEED_DATA:
            break
    assert isinstance(ev, P.Request) and ev.buffer is allocated[0]
    assert ev.data is not None and bytes(ev.data) == payload
    view = conn.get_buffer()  # back to the receive buffer
    assert view.obj is not allocated[0]


def test_small_payloads_share_the_receive_buffer() -> None:
    conn = negotiated()
    conn.receive_data(request(P.CMD_WRITE, 0, 8, cookie=1))
    assert conn.next_event() is P.NEED_DATA
    view = conn.get_buffer()
    data = b"abcdefgh" + request(P.CMD_FLUSH, cookie=2)
    view[:len(data)] = data
    conn.buffer_updated(len(data))
    ev = conn.next_event()
    assert isinstance(ev, P.Request) and ev.data is not None and bytes(ev.data) == b"abcdefgh"
    assert conn.next_event().cookie == 2  # type: ignore[union-attr]


def test_oversized_write_is_drained_then_einval() -> None:
    conn = negotiated()
    n = 33 * MiB
    conn.receive_data(request(P.CMD_WRITE, 0, n, cookie=5))
    assert conn.next_event() is P.NEED_DATA
    fed = 0
    while fed < n:
        view = conn.get_buffer()
        k = min(len(view), n - fed)
        assert len(view) <= P.RECV_BUFFER_SIZE  # drained through the fixed buffer
        view[:k] = bytes(k)
        conn.buffer_updated(k)
        fed += k
        ev = conn.next_event()
        if fed < n:
            assert ev is P.NEED_DATA
    assert isinstance(ev, P.InvalidRequest) and (ev.cookie, ev.error) == (5, P.NBD_EINVAL)
    conn.receive_data(request(P.CMD_FLUSH, cookie=6))
    assert conn.next_event().cookie == 6  # type: ignore[union-attr]


def test_write_beyond_the_end_is_enospc_and_payload_consumed() -> None:
    conn = negotiated()
    conn.receive_data(request(P.CMD_WRITE, SIZE - 2, 4, cookie=5) + b"WXYZ" + request(P.CMD_FLUSH, cookie=6))
    ev = conn.next_event()
    assert isinstance(ev, P.InvalidRequest) and ev.error == P.NBD_ENOSPC
    assert conn.next_event().cookie == 6  # type: ignore[union-attr]


def test_payload_beyond_the_hard_cap_closes() -> None:
    allocated: list[int] = []
    conn = negotiated(P.ServerConnection(allocate=lambda n: allocated.append(n) or bytearray(n)))
    conn.receive_data(request(P.CMD_WRITE, 0, 0xFFFFFFFF))
    ev = conn.next_event()
    assert isinstance(ev, P.Closed) and not ev.clean
    assert allocated == []


def test_disc_then_garbage_is_ignored() -> None:
    conn = negotiated()
    conn.receive_data(request(P.CMD_FLUSH, cookie=1) + request(P.CMD_DISC, 5, 6) + request(P.CMD_WRITE, 0, 4)
                      + b"junkjunkjunk")
    assert isinstance(conn.next_event(), P.Request)
    ev = conn.next_event()
    assert isinstance(ev, P.Closed) and ev.clean and "DISC" in ev.reason
    assert conn.next_event() is ev


def test_eof_at_a_request_boundary_is_clean() -> None:
    conn = negotiated()
    conn.receive_data(request(P.CMD_FLUSH))
    conn.receive_data(b"")
    assert isinstance(conn.next_event(), P.Request)
    ev = conn.next_event()
    assert isinstance(ev, P.Closed) and ev.clean


@pytest.mark.parametrize("tail", [request(P.CMD_READ, 0, 512)[:10], request(P.CMD_WRITE, 0, 100) + b"x" * 99])
def test_eof_inside_a_message_is_unclean_and_executes_nothing(tail: bytes) -> None:
    conn = negotiated()
    conn.receive_data(tail)
    conn.receive_data(b"")
    ev = conn.next_event()
    assert isinstance(ev, P.Closed) and not ev.clean


def test_get_buffer_when_full_is_a_usage_error() -> None:
    conn = negotiated()
    while True:
        view = conn.get_buffer()
        view[:] = b"\0" * len(view)  # zero magic: the machine would close, but we never ask
        conn.buffer_updated(len(view))
        if len(view) == 0:
            break
        try:
            conn.get_buffer()
        except P.ProtocolUsageError:
            return
    pytest.fail("a full receive buffer was handed out again")


# -- replies -----------------------------------------------------------------------

def test_simple_read_reply() -> None:
    r = P.Replies(False, SIZE, False)
    assert joined(r.read(5, 0, memoryview(b"abc"))) == struct.pack(">IIQ", 0x67446698, 0, 5) + b"abc"
    assert r.ok(9) == struct.pack(">IIQ", 0x67446698, 0, 9)


def test_structured_read_reply() -> None:
    r = P.Replies(True, SIZE, True)
    chunks = parse_chunks(joined(r.read(5, 4096, memoryview(b"abc"))))
    assert chunks == [(1, 1, 5, struct.pack(">Q", 4096) + b"abc")]
    assert parse_chunks(joined(r.read(5, 0, memoryview(b"")))) == [(1, 0, 5, b"")]


def test_sparse_read_reply_covers_the_range_exactly() -> None:
    r = P.Replies(True, SIZE, True)
    data = memoryview(bytes(range(256)) * 64)  # 16 KiB
    chunks = parse_chunks(joined(r.sparse_read(3, 1 << 20, data, [(0, 4096), (8192, 4096)])))
    assert [c[0] for c in chunks] == [0, 0, 0, 1]  # DONE only on the last
    covered = []
    for _, ctype, cookie, payload in chunks:
        assert cookie == 3
        off = struct.unpack_from(">Q", payload)[0] - (1 << 20)
        if ctype == 2:
            assert len(payload) == 12
            covered.append((off, struct.unpack_from(">I", payload, 8)[0], "hole"))
        else:
            assert ctype == 1 and payload[8:] == bytes(data[off:off + len(payload) - 8])
            covered.append((off, len(payload) - 8, "data"))
    assert covered == [(0, 4096, "hole"), (4096, 4096, "data"), (8192, 4096, "hole"), (12288, 4096, "data")]


def test_block_status_reply_clips_merges_and_falls_back() -> None:
    r = P.Replies(True, 100_000, True)

    def decode(reply: bytes) -> tuple[int, list[tuple[int, int]]]:
        [(flags, ctype, cookie, payload)] = parse_chunks(reply)
        assert flags == 1 and ctype == 5 and cookie == 4
        vals = struct.unpack(f">I{(len(payload) - 4) // 4}I", payload)
        return vals[0], list(zip(vals[1::2], vals[2::2]))

    ctx, ext = decode(r.block_status(4, 0, 50_000, False, [(1000, 3), (1000, 3 | 8), (5000, 0), (10**9, 2)]))
    assert ctx == 1 and ext == [(2000, 3), (5000, 0), (43_000, 2)]  # merged, clipped to the request
    _, ext = decode(r.block_status(4, 90_000, 50_000, False, [(1 << 30, 3)]))
    assert ext == [(10_000, 3)]  # never beyond the end of the export
    _, ext = decode(r.block_status(4, 0, 50_000, True, [(1000, 0), (5000, 3)]))
    assert ext == [(1000, 0)]
    _, ext = decode(r.block_status(4, 0, 50_000, False, []))
    assert ext == [(50_000, 0)]
    _, ext = decode(r.block_status(4, 0, 50_000, False, [(0, 3), (10, 0)]))
    assert ext == [(50_000, 0)]


def test_error_chunk_message_is_bounded() -> None:
    r = P.Replies(True, SIZE, True)
    [(flags, ctype, cookie, payload)] = parse_chunks(r.error(1, P.NBD_ENOSPC, "é" * 5000))
    assert (flags, ctype) == (1, 0x8001)
    err, mlen = struct.unpack_from(">IH", payload)
    assert err == 28 and mlen == 4096 == len(payload) - 6


@pytest.mark.parametrize("err,fast,expected", [
    (errno.EIO, False, 5), (errno.ENOSPC, False, 28), (errno.EDQUOT, False, 28), (errno.EROFS, False, 1),
    (errno.EPERM, False, 1), (errno.EINVAL, False, 22), (errno.EOVERFLOW, False, 75),
    (errno.EOPNOTSUPP, True, 95), (errno.EOPNOTSUPP, False, 22), (errno.ENODEV, False, 22),
    (errno.ESHUTDOWN, False, 108), (errno.ENOMEM, False, 12),
])
def test_errno_mapping(err: int, fast: bool, expected: int) -> None:
    assert P.nbd_error(err, fast) == expected


# -- hostile streams ---------------------------------------------------------------

def drive(conn: P.ServerConnection, data: bytes, chunk: int) -> list[P.Event]:
    """Feed ``data`` in pieces like a socket would, answering events plausibly."""
    seen: list[P.Event] = []
    pos = 0
    while len(seen) < 10_000:
        ev = conn.next_event()
        seen.append(ev)
        if isinstance(ev, P.Closed):
            return seen
        if ev is P.NEED_DATA:
            view = conn.get_buffer()
            piece = data[pos:pos + min(chunk, len(view))]
            pos += len(piece)
            view[:len(piece)] = piece
            conn.buffer_updated(len(piece))
        elif isinstance(ev, P.ListExports):
            conn.reply_list([("vol", "d")])
        elif isinstance(ev, P.ExportRequest):
            if ev.name == "vol":
                conn.accept_export(info(size=1 << 20))
            else:
                conn.reject_export("no")
        elif isinstance(ev, P.StartTLS):
            return seen
        conn.data_to_send()
    pytest.fail("the machine did not make progress")


OPTION_CODES = st.sampled_from([1, 2, 3, 5, 6, 7, 8, 9, 10, 11, 99])


@st.composite
def option_streams(draw: st.DrawFn) -> bytes:
    parts = [struct.pack(">I", draw(st.sampled_from([3, 1, 2, 0, 0x7])))]
    for _ in range(draw(st.integers(0, 6))):
        code = draw(OPTION_CODES)
        if code in (6, 7):
            data = go_data(draw(st.sampled_from(["vol", "x", ""])), tuple(draw(st.lists(st.integers(0, 5), max_size=3))))
        elif code in (9, 10):
            data = meta_data("vol", draw(st.lists(st.sampled_from(["base:allocation", "base:", "x:y"]), max_size=3)))
        else:
            data = b""
        if draw(st.booleans()):
            data = draw(st.binary(max_size=40))
        parts.append(opt(code, data))
    for _ in range(draw(st.integers(0, 8))):
        cmd = draw(st.integers(0, 9))
        length = draw(st.sampled_from([0, 1, 512, 4096, 1 << 20, 0xFFFFFFFF]))
        parts.append(request(cmd, draw(st.sampled_from([0, 512, 1 << 20, (1 << 64) - 1])), length,
                             flags=draw(st.integers(0, 0x3F)), cookie=draw(st.integers(0, (1 << 64) - 1))))
        if cmd == 1 and length <= 4096:
            parts.append(bytes(length))
    if draw(st.booleans()):
        parts.append(draw(st.binary(max_size=64)))
    return b"".join(parts)


@settings(max_examples=300, deadline=None)
@given(stream=option_streams(), chunk=st.integers(1, 5000), eof=st.booleans())
def test_hostile_streams_only_produce_events(stream: bytes, chunk: int, eof: bool) -> None:
    conn = P.ServerConnection(P.TLSMode.ALLOWED)
    conn.data_to_send()
    seen = drive(conn, stream + (b"" if eof else bytes(200)), chunk)
    assert all(isinstance(e, (P._NeedData, P.ListExports, P.ExportRequest, P.StartTLS, P.Closed,
                              P.Request, P.InvalidRequest)) for e in seen)
    for e in seen:
        if isinstance(e, P.Request) and e.command == P.CMD_WRITE:
            assert e.data is not None and len(e.data) == e.length <= 1 << 20


@settings(max_examples=200, deadline=None)
@given(garbage=st.binary(min_size=1, max_size=3000), chunk=st.integers(1, 700))
def test_random_bytes_in_transmission(garbage: bytes, chunk: int) -> None:
    conn = negotiated()
    seen = drive(conn, garbage, chunk)
    assert seen[-1] is P.NEED_DATA or isinstance(seen[-1], P.Closed)
