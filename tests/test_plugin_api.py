"""GraphPlugin (the plugin's methods, in process, on the real vfs driver) and PluginServer's socket."""

from __future__ import annotations

import io
import json
import os
import socket
import tarfile
from pathlib import Path
from typing import Iterator

import pytest

from dockerkit import unix_http
from thinpool.graph.driver import GraphDriver
from thinpool.graph.registry import new_driver
from thinpool.plugin.api import MAX_JSON_BYTES, GraphPlugin, JSONReply, StreamReply
from thinpool.plugin.server import PluginServer, PluginServerError


def opener(root: str, name: str, opts: list[str]) -> GraphDriver:
    return new_driver(root, name, opts)


def call(p: GraphPlugin, method: str, doc: object = None, raw: bytes | None = None) -> JSONReply:
    body = raw if raw is not None else json.dumps(doc or {}).encode()
    reply = p.handle("POST", "/" + method, io.BytesIO(body))
    assert isinstance(reply, JSONReply)
    return reply


def layer_tar(*files: tuple[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in files:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.fixture
def plugin(tmp_path: Path) -> GraphPlugin:
    p = GraphPlugin("vfs", opener, str(tmp_path / "state.json"))
    assert p.restore() is None
    assert call(p, "GraphDriver.Init", {"Home": str(tmp_path / "home")}).body == {}
    return p


def test_methods_and_replies(plugin: GraphPlugin, tmp_path: Path) -> None:
    p = plugin
    assert call(p, "GraphDriver.Create", {"id": "base"}).body == {}   # Go matches names loosely
    tar = layer_tar(("etc/hello", b"hi\n"))
    reply = p.handle("POST", "/GraphDriver.ApplyDiff?id=base&parent=", io.BytesIO(tar))
    assert isinstance(reply, JSONReply) and reply.body == {"Size": 3}
    assert call(p, "GraphDriver.CreateReadWrite", {"ID": "rw", "Parent": "base"}).body == {}
    got = call(p, "GraphDriver.Get", {"ID": "rw"}).body["Dir"]
    assert got == str(tmp_path / "home" / "vfs" / "dir" / "rw")
    Path(got, "etc", "new").write_text("x")
    assert call(p, "GraphDriver.Put", {"ID": "rw"}).body == {}
    assert call(p, "GraphDriver.Changes", {"ID": "rw", "Parent": "base"}).body == {
        "Changes": [{"Path": "/etc", "Kind": 0}, {"Path": "/etc/new", "Kind": 1}]}
    assert call(p, "GraphDriver.DiffSize", {"ID": "rw", "Parent": "base"}).body == {"Size": 1}
    diff = p.handle("POST", "/GraphDriver.Diff", io.BytesIO(b'{"ID": "rw", "Parent": "base"}'))
    assert isinstance(diff, StreamReply)
    names = [m.name for m in tarfile.open(fileobj=io.BytesIO(b"".join(diff.chunks)))]
    diff.close()
    assert names == ["etc", "etc/new"]
    status = call(p, "GraphDriver.Status").body["Status"]
    assert status[-1] == ["Thinpool Driver", "vfs"]
    assert call(p, "GraphDriver.GetMetadata", {"ID": "rw"}).body.keys() == {"Metadata"}
    assert call(p, "GraphDriver.Exists", {"ID": "nope"}).body == {"Exists": False}
    assert call(p, "GraphDriver.Remove", {"ID": "rw"}).body == {}
    assert call(p, "GraphDriver.Remove", {"ID": "rw"}).body == {}


def test_errors(plugin: GraphPlugin) -> None:
    p = plugin
    assert call(p, "GraphDriver.Create", raw=b"{nope").body["Err"].startswith(
        "GraphDriver.Create: malformed JSON request")
    assert "malformed JSON" in call(p, "GraphDriver.Create", raw=b"\xff\xfe").body["Err"]
    big = call(p, "GraphDriver.Create", raw=b" " * (MAX_JSON_BYTES + 1))
    assert big.status == 413 and "larger than" in big.body["Err"]
    unknown = call(p, "GraphDriver.Nope")
    assert unknown.status == 404
    assert p.handle("PUT", "/GraphDriver.Create", io.BytesIO(b"")).status == 405  # type: ignore[union-attr]
    assert "StorageOpt" in call(p, "GraphDriver.Create", {"ID": "a", "StorageOpt": ["x"]}).body["Err"]
    assert "Opts" in call(p, "GraphDriver.Init", {"Home": "/x", "Opts": "size=1"}).body["Err"]
    assert "invalid layer id" in call(p, "GraphDriver.Get", {"ID": "a/../../b"}).body["Err"]
    assert "missing" in call(p, "GraphDriver.Get", {}).body["Err"]
    diff = call(p, "GraphDriver.Diff", {"ID": "nope"})
    assert diff.status == 500 and "nope" in diff.body["Err"]
    # a bad layer id in ApplyDiff's query: an Err, and the body is not touched
    body = io.BytesIO(b"tar bytes")
    reply = p.handle("POST", "/GraphDriver.ApplyDiff?id=..&parent=", body)
    assert isinstance(reply, JSONReply) and "invalid layer id" in reply.body["Err"]


def test_state_across_restarts(plugin: GraphPlugin, tmp_path: Path) -> None:
    state_path = tmp_path / "state.json"
    assert call(plugin, "GraphDriver.Create", {"ID": "kept"}).body == {}
    doc = json.loads(state_path.read_text())
    assert doc == {"version": 1, "home": str(tmp_path / "home"), "opts": [], "driver": "vfs"}
    assert oct(state_path.stat().st_mode & 0o777) == "0o600"
    again = GraphPlugin("vfs", opener, str(state_path))
    assert "re-opened the vfs driver" in (again.restore() or "")
    assert call(again, "GraphDriver.Exists", {"ID": "kept"}).body == {"Exists": True}
    other = GraphPlugin("overlay2", opener, str(state_path))
    assert "written for driver vfs" in (other.restore() or "")
    assert "not been initialized" in call(other, "GraphDriver.Exists", {"ID": "kept"}).body["Err"]
    # Cleanup closes the driver; the next call re-opens it from the state
    assert call(again, "GraphDriver.Cleanup").body == {}
    assert call(again, "GraphDriver.Exists", {"ID": "kept"}).body == {"Exists": True}
    # the same Init again keeps the driver; another Home switches and is remembered
    # (the same driver object: a layer held by Get stays held, so it cannot be removed)
    call(again, "GraphDriver.Get", {"ID": "kept"})
    call(again, "GraphDriver.Init", {"Home": str(tmp_path / "home")})
    assert "Err" in call(again, "GraphDriver.Remove", {"ID": "kept"}).body
    call(again, "GraphDriver.Put", {"ID": "kept"})
    call(again, "GraphDriver.Init", {"Home": str(tmp_path / "home2"), "Opts": []})
    assert call(again, "GraphDriver.Exists", {"ID": "kept"}).body == {"Exists": False}
    assert json.loads(state_path.read_text())["home"] == str(tmp_path / "home2")
    # a damaged state file is reported and ignored, never trusted
    for junk in (b"{", b'{"version": 1, "home": "relative", "opts": [], "driver": "vfs"}', b"[]"):
        state_path.write_bytes(junk)
        fresh = GraphPlugin("vfs", opener, str(state_path))
        assert "not a docker-plugin state file" in (fresh.restore() or "")
        assert "not been initialized" in call(fresh, "GraphDriver.Exists", {"ID": "x"}).body["Err"]


# -- the socket adapter -----------------------------------------------------------------------------
@pytest.fixture
def served(plugin: GraphPlugin) -> Iterator[PluginServer]:
    import tempfile
    d = tempfile.mkdtemp(prefix="ps", dir="/tmp")
    server = PluginServer(plugin, os.path.join(d, "p.sock"), grace=1.0, max_connections=3)
    server.start()
    try:
        yield server
    finally:
        server.stop()
        import shutil
        shutil.rmtree(d, ignore_errors=True)


def test_server_continue_http10_and_connection_limit(served: PluginServer) -> None:
    tar = layer_tar(("f", b"12345"))
    call(served.plugin, "GraphDriver.Create", {"ID": "c"})
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(served.path)
        s.sendall(b"POST /GraphDriver.ApplyDiff?id=c HTTP/1.1\r\nExpect: 100-continue\r\n"
                  b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(tar))
        assert s.recv(100) == b"HTTP/1.1 100 Continue\r\n\r\n"
        s.sendall(tar)
        reply = b""
        while data := s.recv(65536):
            reply += data
    assert reply.startswith(b"HTTP/1.1 200 OK") and reply.endswith(b'{"Size": 5}')
    # HTTP/1.0: the Diff body is delimited by the end of the connection
    reply = unix_http(served.path, b'POST /GraphDriver.Diff HTTP/1.0\r\nContent-Length: 12\r\n\r\n'
                                   b'{"ID": "c"}\n')
    head, _, body = reply.partition(b"\r\n\r\n")
    assert b"Transfer-Encoding" not in head
    assert [m.name for m in tarfile.open(fileobj=io.BytesIO(body))] == ["f"]
    # at most max_connections at once: the next one is told so; the others go on
    idle = [socket.socket(socket.AF_UNIX) for _ in range(3)]
    try:
        for s in idle:
            s.connect(served.path)
        s.sendall(b"POST /Plugin.Activate HTTP/1.1\r\nContent-Length: 0\r\n\r\n")
        assert s.recv(1000).startswith(b"HTTP/1.1 200 OK")
        assert unix_http(served.path, b"").startswith(b"HTTP/1.1 503")
    finally:
        for s in idle:
            s.close()


def test_server_socket_ownership(plugin: GraphPlugin, tmp_path: Path) -> None:
    path = tmp_path / "not-a-socket"
    path.write_text("precious")
    with pytest.raises(PluginServerError, match="exists and is not a socket"):
        PluginServer(plugin, str(path)).start()
    assert path.read_text() == "precious"
    # stop removes the socket only while it is still the one it created
    import tempfile
    d = tempfile.mkdtemp(prefix="ps", dir="/tmp")
    try:
        sock_path = os.path.join(d, "p.sock")
        server = PluginServer(plugin, sock_path)
        server.start()
        os.unlink(sock_path)
        with socket.socket(socket.AF_UNIX) as newcomer:
            newcomer.bind(sock_path)
            server.stop()
            assert os.path.exists(sock_path)
    finally:
        import shutil
        shutil.rmtree(d, ignore_errors=True)
