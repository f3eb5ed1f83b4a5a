"""The plugin's sans-I/O HTTP/1.1 server side: heads, bodies, framing errors, limits."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from thinpool.plugin import http as H


def events(conn: H.ServerConnection, data: bytes, eof: bool = False) -> list:
    """Feed ``data`` (and EOF) and collect events until NEED_DATA or the end."""
    conn.receive_data(data)
    if eof:
        conn.receive_data(b"")
    out = []
    while True:
        ev = conn.next_event()
        if ev is H.NEED_DATA:
            return out
        out.append(ev)
        if isinstance(ev, (H.EndOfMessage, H.ConnectionClosed)):
            return out


def body_of(evs: list) -> bytes:
    return b"".join(e.data for e in evs if isinstance(e, H.Data))


DOCKERD_HEAD = (b"POST /GraphDriver.Create HTTP/1.1\r\nHost: plugin\r\nUser-Agent: Go-http-client/1.1\r\n"
                b"Content-Length: 14\r\nAccept: application/vnd.docker.plugins.v1.2+json\r\n"
                b"Accept-Encoding: gzip\r\n\r\n")


def test_content_length_request_as_dockerd_sends_it() -> None:
    conn = H.ServerConnection()
    evs = events(conn, DOCKERD_HEAD + b'{"ID":"abc"}\n\n')
    req = evs[0]
    assert isinstance(req, H.Request)
    assert (req.method, req.target, req.version) == ("POST", "/GraphDriver.Create", "HTTP/1.1")
    assert req.header("accept") == "application/vnd.docker.plugins.v1.2+json"
    assert req.keep_alive and not req.expects_continue
    assert body_of(evs) == b'{"ID":"abc"}\n\n'
    assert isinstance(evs[-1], H.EndOfMessage) and conn.request_complete


def test_keep_alive_two_requests_and_clean_close() -> None:
    conn = H.ServerConnection()
    two = (b"POST /Plugin.Activate HTTP/1.1\r\nHost: x\r\n\r\n"
           b"POST /GraphDriver.Status HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}")
    first = events(conn, two)
    assert first[0].target == "/Plugin.Activate" and body_of(first) == b""
    conn.start_next_cycle()
    second = events(conn, b"")
    assert second[0].target == "/GraphDriver.Status" and body_of(second) == b"{}"
    conn.start_next_cycle()
    assert events(conn, b"", eof=True) == [H.ConnectionClosed()]


def test_body_split_across_every_byte_boundary() -> None:
    payload = b"x" * 1000
    raw = b"POST /m HTTP/1.1\r\nContent-Length: 1000\r\n\r\n" + payload
    conn = H.ServerConnection()
    got = []
    for i in range(len(raw)):
        got += events(conn, raw[i:i + 1])
    assert body_of(got) == payload and isinstance(got[-1], H.EndOfMessage)


def chunked(data: bytes, sizes: list[int], ext: bool = False) -> bytes:
    out, pos = [], 0
    for size in sizes:
        piece = data[pos:pos + size]
        pos += size
        if piece:
            out.append(b"%x%s\r\n%s\r\n" % (len(piece), b";name=val" if ext else b"", piece))
    out.append(b"%x\r\n%s\r\n" % (len(data) - pos, data[pos:]) if pos < len(data) else b"")
    return b"".join(out) + b"0\r\nX-Trailer: 1\r\n\r\n"


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=3000), st.lists(st.integers(1, 700), max_size=8), st.integers(1, 97),
       st.booleans())
def test_chunked_body_any_chunking_any_feeding(data: bytes, sizes: list[int], step: int,
                                               ext: bool) -> None:
    raw = (b"POST /GraphDriver.ApplyDiff?id=a&parent= HTTP/1.1\r\nHost: plugin\r\n"
           b"Transfer-Encoding: chunked\r\n\r\n") + chunked(data, sizes, ext)
    conn = H.ServerConnection()
    got = []
    for i in range(0, len(raw), step):
        got += events(conn, raw[i:i + step])
    assert isinstance(got[0], H.Request) and got[0].target.endswith("parent=")
    assert body_of(got) == data and isinstance(got[-1], H.EndOfMessage)
    assert conn.body_bytes_received == len(data)


def test_expect_continue_and_http10() -> None:
    conn = H.ServerConnection()
    req = events(conn, b"POST /m HTTP/1.1\r\nExpect: 100-continue\r\nConnection: close\r\n"
                       b"Content-Length: 0\r\n\r\n")[0]
    assert req.expects_continue and not req.keep_alive
    conn = H.ServerConnection()
    req = events(conn, b"POST /m HTTP/1.0\r\n\r\n")[0]
    assert req.version == "HTTP/1.0" and not req.keep_alive
    conn = H.ServerConnection()
    assert events(conn, b"POST /m HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")[0].keep_alive


def test_bare_lf_and_leading_empty_lines_are_tolerated() -> None:
    conn = H.ServerConnection()
    evs = events(conn, b"\r\n\nPOST /m HTTP/1.1\nContent-Length: 2\n\nok")
    assert evs[0].target == "/m" and body_of(evs) == b"ok"


@pytest.mark.parametrize("raw, status, words", [
    (b"GARBAGE\r\n\r\n", 400, "malformed request line"),
    (b"\x16\x03\x01\x02\x00 / HTTP/1.1\r\n\r\n", 400, "malformed request line"),
    (b"POST /m HTTP/2.0\r\n\r\n", 505, "unsupported protocol version"),
    (b"POST /m HTTP/1.1\r\nbad header\r\n\r\n", 400, "malformed header field"),
    (b"POST /m HTTP/1.1\r\nName : v\r\n\r\n", 400, "malformed header field"),
    (b"POST /m HTTP/1.1\r\n folded\r\n\r\n", 400, "malformed header field"),
    (b"POST /m HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 400, "invalid Content-Length"),
    (b"POST /m HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", 400, "conflicting"),
    (b"POST /m HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n", 501, "unsupported Transfer-Encoding"),
    (b"POST /m HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n", 400, "both"),
    (b"POST /m HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n", 400, "HTTP/1.0"),
    (b"POST /m HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 400, "malformed chunk size"),
    (b"POST /m HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n-1\r\n", 400, "malformed chunk size"),
    (b"POST /m HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcdef\r\n", 400,
     "longer than its chunk size"),
    (b"POST /m HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n" + b"1" * 17 + b"\r\n", 400,
     "malformed chunk size"),
    (b"POST /m HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n" + b"1;" + b"e" * 5000, 400,
     "chunk-size line longer"),
])
def test_malformed_requests_get_a_status_and_a_clear_message(raw: bytes, status: int,
                                                             words: str) -> None:
    conn = H.ServerConnection()
    with pytest.raises(H.HTTPError) as err:
        events(conn, raw)
    assert err.value.status == status and words in str(err.value)
    with pytest.raises(H.HTTPError):  # the connection stays failed
        conn.next_event()


def test_oversized_head_and_too_many_fields_are_431() -> None:
    conn = H.ServerConnection(max_head_bytes=1024)
    with pytest.raises(H.HTTPError) as err:
        events(conn, b"POST /m HTTP/1.1\r\nX-Big: " + b"a" * 2000)
    assert err.value.status == 431
    conn = H.ServerConnection(max_header_fields=5)
    with pytest.raises(H.HTTPError) as err:
        events(conn, b"POST /m HTTP/1.1\r\n" + b"X: y\r\n" * 6 + b"\r\n")
    assert err.value.status == 431
    conn = H.ServerConnection(max_head_bytes=1024)
    with pytest.raises(H.HTTPError) as err:
        events(conn, b"POST /m HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n"
                     + b"X-T: aaaaaaaaaaa\r\n" * 100)
    assert err.value.status == 431


@pytest.mark.parametrize("raw, words", [
    (b"POST /m HTTP/1.1\r\nHost", "inside a request head"),
    (b"POST /m HTTP/1.1\r\nContent-Length: 10\r\n\r\nabc", "3 bytes (7 missing)"),
    (b"POST /m HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab", "inside a chunk after 2"),
    (b"POST /m HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nabcde\r\n", "after 5 bytes"),
    (b"POST /m HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n", "inside its trailer"),
])
def test_eof_inside_a_request_is_incomplete(raw: bytes, words: str) -> None:
    conn = H.ServerConnection()
    with pytest.raises(H.IncompleteRequest) as err:
        events(conn, raw, eof=True)
    assert words in str(err.value) and "closed the connection" in str(err.value)


def test_responses() -> None:
    assert H.simple_response(200, b"{}", "application/json", keep_alive=True) == (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}")
    assert b"Connection: close" in H.simple_response(404, b"", "t", keep_alive=False)
    assert H.chunk(b"abc") == b"3\r\nabc\r\n" and H.LAST_CHUNK == b"0\r\n\r\n"
    # what we send decodes with our own parser (as a request body)
    conn = H.ServerConnection()
    evs = events(conn, b"POST /m HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
                 + H.chunk(b"x" * 300) + H.chunk(b"yz") + H.LAST_CHUNK)
    assert body_of(evs) == b"x" * 300 + b"yz"
