"""The NBD server against real clients: qemu-img, qemu-io, nbdinfo, nbdcopy, fio.

The exports are raw sparse files (tests/nbd_file_export.py); what the clients
see is checked against the files themselves (contents with cmp, allocation
with SEEK_DATA/SEEK_HOLE). Raw-socket tests cover what libnbd and qemu refuse
to send (hostile or broken input), concurrency and shutdown.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import socket
import stat
import struct
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest

from conftest import require_tool
from nbd_file_export import FileCatalog, FileExport
from thinpool.errors import DataPathError
from thinpool.nbd import protocol as P
from thinpool.nbd.server import NBDServer, NBDServerError, TLSConfig

MiB = 1 << 20
SIZE = 64 * MiB


def run(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    require_tool(args[0])
    r = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({r.returncode}): {r.stdout}{r.stderr}")
    return r


def allocated_ranges(path: Path) -> list[tuple[int, int]]:
    """(offset, length) of the data extents of a file, from SEEK_DATA/SEEK_HOLE."""
    out = []
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        pos = 0
        while pos < size:
            try:
                data = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as e:
                assert e.errno == errno.ENXIO
                break
            hole = os.lseek(fd, data, os.SEEK_HOLE)
            out.append((data, hole - data))
            pos = hole
    finally:
        os.close(fd)
    return out


class ServerFixture:
    def __init__(self, root: Path, sockdir: Path) -> None:
        self.root = root
        self.disk = root / "disk.raw"
        self.ro = root / "ro.raw"
        for p in (self.disk, self.ro):
            with open(p, "wb") as f:
                f.truncate(SIZE)
        with open(self.ro, "r+b") as f:
            f.write(b"read only!")
        self.catalog = FileCatalog({"disk": self.disk, "ro": self.ro}, read_only=frozenset({"ro"}))
        self.sock = sockdir / "nbd.sock"
        self.server: NBDServer | None = None

    def start(self, **kw: object) -> NBDServer:
        self.server = NBDServer(self.catalog, unix_path=self.sock, **kw)  # type: ignore[arg-type]
        self.server.start()
        return self.server

    def uri(self, name: str = "disk") -> str:
        return f"nbd+unix:///{name}?socket={self.sock}"

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None


def _open_fds() -> set[int]:
    return {int(n) for n in os.listdir("/proc/self/fd")}


def _nbd_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("nbd")]


def _until(done: Callable[[], bool], timeout: float = 10,
           describe: Callable[[], str] | None = None) -> None:
    """Wait up to ``timeout`` s for ``done()``; fail (with ``describe()``) if it never is."""
    deadline = time.monotonic() + timeout
    while not done() and time.monotonic() < deadline:
        time.sleep(0.005)
    if not done():
        raise AssertionError(describe() if describe else f"not done within {timeout} s")


@pytest.fixture
def sockdir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="nbdt", dir="/tmp"))  # short: unix socket paths max 107 bytes
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def srv(tmp_path: Path, sockdir: Path) -> Iterator[ServerFixture]:
    """A started server on a unix socket; on teardown: stopped, nothing leaked."""
    fds = _open_fds()
    fx = ServerFixture(tmp_path, sockdir)
    fx.start()
    yield fx
    fx.stop()
    assert not fx.sock.exists(), "the unix socket was not removed"
    assert fx.catalog.open_count() == 0, "an export was left open"
    _until(lambda: not _nbd_threads(), 5, lambda: f"threads left: {_nbd_threads()}")
    assert _open_fds() <= fds, f"fds leaked: {_open_fds() - fds}"


# -- nbdinfo -------------------------------------------------------------------

def test_nbdinfo_shows_the_truth(srv: ServerFixture) -> None:
    out = json.loads(run("nbdinfo", "--json", srv.uri()).stdout)
    assert out["protocol"] == "newstyle-fixed" and out["TLS"] is False and out["structured"] is True
    [e] = out["exports"]
    assert e["export-name"] == "disk" and e["export-size"] == SIZE
    assert e["description"] == "raw file disk.raw"
    assert e["contexts"] == ["base:allocation"]
    assert not e["is_read_only"] and not e["is_rotational"]
    for cap in ("can_cache", "can_df", "can_fast_zero", "can_flush", "can_fua", "can_multi_conn",
                "can_trim", "can_zero"):
        assert e[cap] is True, cap
    assert (e["block_size_minimum"], e["block_size_preferred"], e["block_size_maximum"]) == (1, 4096, 32 * MiB)
    text = run("nbdinfo", srv.uri()).stdout
    assert "newstyle-fixed without TLS, using structured packets" in text


def test_nbdinfo_read_only_export(srv: ServerFixture) -> None:
    e = json.loads(run("nbdinfo", "--json", srv.uri("ro")).stdout)["exports"][0]
    assert e["is_read_only"] and not e["can_trim"] and not e["can_zero"] and not e["can_fast_zero"]
    assert e["can_flush"] and e["can_fua"] and e["can_multi_conn"]
    assert run("nbdinfo", "--is", "read-only", srv.uri("ro"), check=False).returncode == 0
    assert run("nbdinfo", "--is", "read-only", srv.uri(), check=False).returncode == 2


@pytest.mark.parametrize("cap", ["multi-conn", "trim", "fast-zero", "zero", "flush", "fua", "cache", "df",
                                 "structured-reply", "connect"])
def test_nbdinfo_can(srv: ServerFixture, cap: str) -> None:
    assert run("nbdinfo", "--can", cap, srv.uri(), check=False).returncode == 0


def test_nbdinfo_size_list_and_unknown_export(srv: ServerFixture) -> None:
    assert run("nbdinfo", "--size", srv.uri()).stdout.strip() == str(SIZE)
    listing = json.loads(run("nbdinfo", "--list", "--json", f"nbd+unix:///?socket={srv.sock}").stdout)
    assert {(e["export-name"], e["description"], e["export-size"]) for e in listing["exports"]} == {
        ("disk", "raw file disk.raw", SIZE), ("ro", "raw file ro.raw", SIZE)}
    r = run("nbdinfo", srv.uri("nosuch"), check=False)
    # NBD_REP_ERR_UNKNOWN: libnbd 1.14 reports ENOENT, newer ones "server has no export named"
    assert r.returncode != 0 and ("No such file" in r.stderr or "no export named" in r.stderr)
    r = run("nbdinfo", f"nbd+unix:///?socket={srv.sock}", check=False)  # no default export here
    assert r.returncode != 0
    assert run("nbdinfo", "--size", srv.uri()).stdout.strip() == str(SIZE)  # still serving


def test_nbdinfo_map(srv: ServerFixture) -> None:
    assert run("nbdinfo", "--map", srv.uri()).stdout.split() == ["0", str(SIZE), "3", "hole,zero"]
    with open(srv.disk, "r+b") as f:
        f.seek(MiB)
        f.write(b"x" * 65536)
        f.seek(40 * MiB)
        f.write(b"y" * 4096)
    expected = []
    pos = 0
    for off, length in allocated_ranges(srv.disk):
        if off > pos:
            expected.append({"offset": pos, "length": off - pos, "type": 3})
        expected.append({"offset": off, "length": length, "type": 0})
        pos = off + length
    expected.append({"offset": pos, "length": SIZE - pos, "type": 3})
    got = json.loads(run("nbdinfo", "--map", "--json", srv.uri()).stdout)
    assert [{k: e[k] for k in ("offset", "length", "type")} for e in got] == expected
    totals = run("nbdinfo", "--map", "--totals", srv.uri()).stdout
    assert abs(sum(float(line.split()[1].rstrip("%")) for line in totals.splitlines()) - 100) < 0.1


# -- qemu-io / qemu-img ----------------------------------------------------------

def qemu_io(uri: str, *cmds: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    args = ["qemu-io", "-f", "raw"]
    for c in cmds:
        args += ["-c", c]
    r = run(*args, uri, check=check)
    if check:
        assert "fail" not in r.stdout.lower() and "error" not in r.stdout.lower(), r.stdout
    return r


def file_bytes(path: Path, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


def test_qemu_io_write_read(srv: ServerFixture) -> None:
    qemu_io(srv.uri(), "write -P 0xab 0 1M", "read -P 0xab 0 1M", "write -P 7 12345 3", "read -P 7 12345 3",
            "write -f -P 0x33 2M 64k", "flush")
    assert file_bytes(srv.disk, 0, 12345) == b"\xab" * 12345
    assert file_bytes(srv.disk, 12345, 3) == b"\x07" * 3
    assert file_bytes(srv.disk, 2 * MiB, 65536) == b"\x33" * 65536
    kinds = {c[0] for c in srv.catalog.calls}
    assert "write_fua" in kinds and "flush" in kinds  # qemu-io writes through (FUA) and flushes
    r = qemu_io(srv.uri(), "read -P 0xab 0 12288", "read -P 0 3M 1M")
    assert r.stdout.count("read ") == 2


def test_qemu_io_zero_and_discard(srv: ServerFixture) -> None:
    qemu_io(srv.uri(), "write -P 0x11 0 8M")
    srv.catalog.calls.clear()
    qemu_io(srv.uri(), "write -z 1M 1M", "write -z -u 3M 1M", "discard 5M 1M",
            "read -P 0 1M 1M", "read -P 0 3M 1M", "read -P 0x11 0 1M", "read -P 0x11 2M 1M")
    ops = [c for c in srv.catalog.calls if c[0] in ("zero", "zero_trim", "trim")]
    assert ("zero", MiB, MiB) in ops          # write -z: NO_HOLE, stays allocated
    assert ("zero_trim", 3 * MiB, MiB) in ops  # write -z -u: may punch
    assert ("trim", 5 * MiB, MiB) in ops
    assert file_bytes(srv.disk, MiB, MiB) == bytes(MiB)
    assert file_bytes(srv.disk, 3 * MiB, MiB) == bytes(MiB)
    allocated = allocated_ranges(srv.disk)
    def is_allocated(off: int) -> bool:
        return any(a <= off < a + n for a, n in allocated)
    assert not is_allocated(3 * MiB) and not is_allocated(5 * MiB)
    assert is_allocated(0) and is_allocated(2 * MiB)


def test_qemu_io_on_read_only_export(srv: ServerFixture) -> None:
    r = run("qemu-io", "-r", "-f", "raw", "-c", "read -v 0 10", srv.uri("ro"))
    assert "72 65 61 64 20 6f 6e 6c 79 21" in r.stdout  # "read only!"
    r = run("qemu-io", "-f", "raw", "-c", "write 0 512", srv.uri("ro"), check=False)
    assert r.returncode != 0 and "Permission denied" in r.stderr  # qemu sees READ_ONLY and refuses
    assert file_bytes(srv.ro, 0, 10) == b"read only!"


def test_two_qemu_io_processes_at_once(srv: ServerFixture) -> None:
    require_tool("qemu-io")
    procs = [subprocess.Popen(["qemu-io", "-f", "raw", "-c", f"write -P {i + 1} {i * 8}M 8M",
                               "-c", f"read -P {i + 1} {i * 8}M 8M", srv.uri()],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    for p in procs:
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0 and "failed" not in out, out + err
    assert file_bytes(srv.disk, 0, 8 * MiB) == b"\x01" * 8 * MiB
    assert file_bytes(srv.disk, 8 * MiB, 8 * MiB) == b"\x02" * 8 * MiB


def make_source(path: Path) -> None:
    """A sparse 64 MiB image with data islands of random and constant bytes."""
    rnd = os.urandom(3 * MiB)
    with open(path, "wb") as f:
        f.truncate(SIZE)
        f.seek(0)
        f.write(rnd[:MiB])
        f.seek(10 * MiB)
        f.write(rnd[MiB:] + b"\x5a" * MiB)
        f.seek(SIZE - 4096)
        f.write(b"end!" * 1024)


def test_qemu_img_info_convert_compare_map(srv: ServerFixture, tmp_path: Path) -> None:
    info = json.loads(run("qemu-img", "info", "--output=json", "-f", "raw", srv.uri()).stdout)
    assert info["virtual-size"] == SIZE
    src = tmp_path / "src.img"
    make_source(src)
    run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(src), srv.uri())
    r = run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(src), srv.uri())
    assert "Images are identical" in r.stdout
    assert file_bytes(src, 0, SIZE) == file_bytes(srv.disk, 0, SIZE)
    # thin: the holes of the source stayed holes
    src_alloc = sum(n for _, n in allocated_ranges(src))
    dst_alloc = sum(n for _, n in allocated_ranges(srv.disk))
    assert dst_alloc <= src_alloc + MiB
    qmap = json.loads(run("qemu-img", "map", "--output=json", "-f", "raw", srv.uri()).stdout)
    data_q = [(e["start"], e["length"]) for e in qmap if e["data"]]
    assert data_q == allocated_ranges(srv.disk)
    assert all(e["zero"] for e in qmap if not e["data"])
    nmap = json.loads(run("nbdinfo", "--map", "--json", srv.uri()).stdout)
    assert [(e["offset"], e["length"]) for e in nmap if e["type"] == 0] == data_q
    with open(src, "r+b") as f:
        f.seek(10 * MiB + 5)
        f.write(b"!")
    r = run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(src), srv.uri(), check=False)
    assert r.returncode == 1
    out = tmp_path / "out.img"
    run("qemu-img", "convert", "-f", "raw", "-O", "raw", srv.uri(), str(out))
    assert file_bytes(out, 0, SIZE) == file_bytes(srv.disk, 0, SIZE)


# -- nbdcopy ---------------------------------------------------------------------

def test_nbdcopy_both_directions_multi_conn(srv: ServerFixture, tmp_path: Path) -> None:
    src = tmp_path / "src.img"
    make_source(src)
    run("nbdcopy", "--connections=4", "--threads=4", "--flush", str(src), srv.uri())
    assert len(srv.catalog.opened) >= 4  # multi-conn: several connections were used
    assert file_bytes(srv.disk, 0, SIZE) == file_bytes(src, 0, SIZE)
    before = len(srv.catalog.opened)
    out = tmp_path / "out.img"
    run("nbdcopy", "--connections=4", "--threads=4", "--request-size=4194304", srv.uri(), str(out))
    assert len(srv.catalog.opened) - before >= 4
    assert file_bytes(out, 0, SIZE) == file_bytes(src, 0, SIZE)
    assert sum(n for _, n in allocated_ranges(srv.disk)) <= sum(n for _, n in allocated_ranges(src)) + MiB
    run("nbdcopy", srv.uri(), "null:")
    nmap = run("nbdinfo", "--map", srv.uri()).stdout
    assert "hole,zero" in nmap


def test_fio_random_write_verify_and_disc_less_closes(srv: ServerFixture) -> None:
    r = run("fio", "--name=v", "--ioengine=nbd", f"--uri={srv.uri()}", "--rw=randwrite", "--bs=4k",
            "--iodepth=32", "--size=16M", "--verify=crc32c", "--do_verify=1", "--randrepeat=0",
            "--verify_state_save=0", "--output-format=json")
    result = json.loads(r.stdout[r.stdout.index("{"):])
    assert result["jobs"][0]["error"] == 0
    r = run("fio", "--name=m", "--ioengine=nbd", f"--uri={srv.uri()}", "--rw=randrw", "--bs=4k",
            "--iodepth=8", "--size=8M", "--numjobs=4", "--output-format=json")
    result = json.loads(r.stdout[r.stdout.index("{"):])
    assert all(j["error"] == 0 for j in result["jobs"])


# -- TLS -------------------------------------------------------------------------

def make_pki(d: Path) -> None:
    """A CA, a server certificate (localhost, 127.0.0.1) and a client certificate."""
    require_tool("openssl")
    d.mkdir()

    def ossl(*args: str) -> None:
        run("openssl", *args)

    ossl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", str(d / "ca-key.pem"), "-out", str(d / "ca-cert.pem"), "-days", "2",
         "-subj", "/CN=thinpool test CA", "-addext", "basicConstraints=critical,CA:TRUE",
         "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    for who, eku in (("server", "serverAuth"), ("client", "clientAuth")):
        ext = d / f"{who}.ext"
        ext.write_text("basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
                       f"extendedKeyUsage={eku}\nsubjectAltName=DNS:localhost,IP:127.0.0.1\n")
        ossl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", str(d / f"{who}-key.pem"), "-out", str(d / f"{who}.csr"), "-subj", "/CN=localhost")
        ossl("x509", "-req", "-in", str(d / f"{who}.csr"), "-CA", str(d / "ca-cert.pem"),
             "-CAkey", str(d / "ca-key.pem"), "-CAcreateserial", "-out", str(d / f"{who}-cert.pem"),
             "-days", "2", "-extfile", str(ext))


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("tls") / "pki"
    make_pki(d)
    return d


@pytest.fixture
def tls_srv(tmp_path: Path, sockdir: Path, pki: Path) -> Iterator[ServerFixture]:
    fx = ServerFixture(tmp_path, sockdir)
    fx.start(tcp=("127.0.0.1", 0), tls=TLSConfig(pki, P.TLSMode.REQUIRED))
    yield fx
    fx.stop()
    assert fx.catalog.open_count() == 0


def test_tls_required_with_real_clients(tls_srv: ServerFixture, pki: Path, tmp_path: Path) -> None:
    uri = f"nbds+unix:///disk?socket={tls_srv.sock}&tls-certificates={pki}"
    out = json.loads(run("nbdinfo", "--json", uri).stdout)
    assert out["TLS"] is True and out["structured"] is True
    assert run("nbdinfo", "--is", "tls", uri, check=False).returncode == 0
    src = tmp_path / "src.img"
    make_source(src)
    run("nbdcopy", "--connections=2", str(src), uri)
    assert file_bytes(tls_srv.disk, 0, SIZE) == file_bytes(src, 0, SIZE)
    assert tls_srv.server is not None and tls_srv.server.tcp_address is not None
    port = tls_srv.server.tcp_address[1]
    creds = f"tls-creds-x509,id=tls0,dir={pki},endpoint=client"
    r = run("qemu-img", "compare", "--object", creds, "--image-opts", f"driver=raw,file.driver=file,file.filename={src}",
            f"driver=nbd,server.type=inet,server.host=localhost,server.port={port},export=disk,tls-creds=tls0")
    assert "Images are identical" in r.stdout
    r = run("qemu-io", "--object", creds, "--image-opts", "-c", "write -P 0x42 0 64k", "-c", "read -P 0x42 0 64k",
            f"driver=nbd,server.type=unix,server.path={tls_srv.sock},export=disk,tls-creds=tls0,"
            "tls-hostname=localhost")
    assert "failed" not in r.stdout
    assert file_bytes(tls_srv.disk, 0, 65536) == b"\x42" * 65536


def test_tls_required_refuses_plain_and_certless_clients(tls_srv: ServerFixture, pki: Path,
                                                         tmp_path: Path) -> None:
    r = run("nbdinfo", tls_srv.uri(), check=False)
    assert r.returncode != 0 and "Operation not supported" in r.stderr  # NBD_REP_ERR_TLS_REQD
    r = run("qemu-img", "info", "-f", "raw", tls_srv.uri(), check=False)
    assert r.returncode != 0
    no_cert = tmp_path / "nocert"
    no_cert.mkdir()
    shutil.copy(pki / "ca-cert.pem", no_cert)
    r = run("nbdinfo", f"nbds+unix:///disk?socket={tls_srv.sock}&tls-certificates={no_cert}", check=False)
    assert r.returncode != 0
    # a raw client: every option but STARTTLS/ABORT gets ERR_TLS_REQD, EXPORT_NAME is cut off
    with RawClient(tls_srv.sock) as c:
        c.option(P.OPT_GO, go_payload("disk"))
        assert c.option_reply()[1] == P.REP_ERR_TLS_REQD
        c.option(P.OPT_EXPORT_NAME, b"disk")
        assert c.sock.recv(100) == b""
    assert run("nbdinfo", "--size", f"nbds+unix:///disk?socket={tls_srv.sock}&tls-certificates={pki}").stdout \
        .strip() == str(SIZE)


def test_tls_allowed_serves_both(tmp_path: Path, sockdir: Path, pki: Path) -> None:
    fx = ServerFixture(tmp_path, sockdir)
    fx.start(tls=TLSConfig(pki, P.TLSMode.ALLOWED, verify_peer=False))
    try:
        assert json.loads(run("nbdinfo", "--json", fx.uri()).stdout)["TLS"] is False
        tls_uri = f"nbds+unix:///disk?socket={fx.sock}&tls-certificates={pki}"
        assert json.loads(run("nbdinfo", "--json", tls_uri).stdout)["TLS"] is True
        no_cert = tmp_path / "nocert"  # without verify_peer a client needs no certificate
        no_cert.mkdir()
        shutil.copy(pki / "ca-cert.pem", no_cert)
        no_cert_uri = f"nbds+unix:///disk?socket={fx.sock}&tls-certificates={no_cert}"
        assert json.loads(run("nbdinfo", "--json", no_cert_uri).stdout)["TLS"] is True
    finally:
        fx.stop()


def test_tls_bad_credentials_are_one_line_errors(tmp_path: Path, sockdir: Path) -> None:
    fx = ServerFixture(tmp_path, sockdir)
    with pytest.raises(NBDServerError) as e:
        fx.start(tls=TLSConfig(tmp_path / "missing"))
    assert "TLS credentials" in str(e.value) and "\n" not in str(e.value)
    assert not fx.sock.exists()


# -- sockets, lifecycle -----------------------------------------------------------

def test_unix_socket_mode_stale_and_live(tmp_path: Path, sockdir: Path) -> None:
    fds = _open_fds()
    fx = ServerFixture(tmp_path, sockdir)
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(fx.sock))
    stale.close()  # a socket file nobody listens on
    fx.start()
    try:
        assert stat.S_IMODE(os.stat(fx.sock).st_mode) == 0o600
        assert run("nbdinfo", "--size", fx.uri()).stdout.strip() == str(SIZE)
        other = NBDServer(fx.catalog, unix_path=fx.sock)
        with pytest.raises(NBDServerError, match="another server is listening"):
            other.start()
        assert fx.sock.exists()
    finally:
        fx.stop()
    assert not fx.sock.exists()
    fx.sock.write_text("precious")
    with pytest.raises(NBDServerError, match="not a socket"):
        NBDServer(fx.catalog, unix_path=fx.sock).start()
    assert fx.sock.read_text() == "precious"
    assert not [p for p in sockdir.iterdir() if p.name.startswith(".nbd-")]
    assert _open_fds() <= fds  # failed starts leave nothing open


def test_start_stop_lifecycle(tmp_path: Path, sockdir: Path) -> None:
    fx = ServerFixture(tmp_path, sockdir)
    server = NBDServer(fx.catalog, unix_path=fx.sock)
    server.stop()  # never started: nothing to do
    with pytest.raises(NBDServerError, match="already started"):
        server.start()
    server = fx.start()
    with pytest.raises(NBDServerError, match="already started"):
        server.start()
    fx.stop()
    server.stop()  # twice is harmless


def test_tcp(tmp_path: Path, sockdir: Path) -> None:
    fx = ServerFixture(tmp_path, sockdir)
    server = NBDServer(fx.catalog, tcp=("127.0.0.1", 0))
    with server:
        assert server.tcp_address is not None
        host, port = server.tcp_address
        qemu_io(f"nbd://{host}:{port}/disk", "write -P 9 0 4k", "read -P 9 0 4k")
        assert run("nbdinfo", "--size", f"nbd://{host}:{port}/disk").stdout.strip() == str(SIZE)
    with pytest.raises(NBDServerError, match="TCP address"):
        NBDServer(fx.catalog, tcp=("203.0.113.1", 1)).start()


def test_needs_an_address(tmp_path: Path, sockdir: Path) -> None:
    with pytest.raises(NBDServerError):
        NBDServer(ServerFixture(tmp_path, sockdir).catalog)


# -- raw-socket client ------------------------------------------------------------

def go_payload(name: str, infos: tuple[int, ...] = ()) -> bytes:
    raw = name.encode()
    return struct.pack(">I", len(raw)) + raw + struct.pack(f">H{len(infos)}H", len(infos), *infos)


class RawClient:
    """A tiny hand-written NBD client speaking exactly what a test says."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(20)
        self.sock.connect(str(path))
        assert self.recv_exact(18)[:16] == b"NBDMAGICIHAVEOPT"
        self.sock.sendall(struct.pack(">I", 3))

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    def recv_exact(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            got = self.sock.recv(n - len(buf))
            if not got:
                raise EOFError(f"EOF after {len(buf)} of {n} bytes")
            buf += got
        return bytes(buf)

    def option(self, code: int, data: bytes = b"") -> None:
        self.sock.sendall(struct.pack(">QII", 0x49484156454F5054, code, len(data)) + data)

    def option_reply(self) -> tuple[int, int, bytes]:
        magic, opt, rtype, length = struct.unpack(">QIII", self.recv_exact(20))
        assert magic == 0x0003E889045565A9
        return opt, rtype, self.recv_exact(length)

    def go(self, name: str = "disk", structured: bool = True) -> None:
        if structured:
            self.option(P.OPT_STRUCTURED_REPLY)
            assert self.option_reply()[1] == P.REP_ACK
            meta = (struct.pack(">I", len(name)) + name.encode() + struct.pack(">I", 1)
                    + struct.pack(">I", 15) + b"base:allocation")
            self.option(P.OPT_SET_META_CONTEXT, meta)
            while self.option_reply()[1] != P.REP_ACK:
                pass
        self.option(P.OPT_GO, go_payload(name))
        while True:
            _, rtype, _ = self.option_reply()
            if rtype == P.REP_ACK:
                return
            assert rtype == P.REP_INFO

    @staticmethod
    def header(cmd: int, offset: int = 0, length: int = 0, *, flags: int = 0, cookie: int = 1) -> bytes:
        """A request header, to send as it is or joined with others."""
        return struct.pack(">IHHQQI", 0x25609513, flags, cmd, cookie, offset, length)

    def request(self, cmd: int, offset: int = 0, length: int = 0, *, flags: int = 0, cookie: int = 1,
                payload: bytes = b"") -> None:
        self.sock.sendall(self.header(cmd, offset, length, flags=flags, cookie=cookie) + payload)

    def simple_reply(self, data_len: int = 0) -> tuple[int, int, bytes]:
        magic, err, cookie = struct.unpack(">IIQ", self.recv_exact(16))
        assert magic == 0x67446698
        return cookie, err, self.recv_exact(data_len) if err == 0 else b""

    def reply(self) -> tuple[int, int, list[tuple[int, bytes]]]:
        """One full reply (simple, or all chunks up to DONE): cookie, error, [(type, payload)]."""
        magic = struct.unpack(">I", self.recv_exact(4))[0]
        if magic == 0x67446698:
            err, cookie = struct.unpack(">IQ", self.recv_exact(12))
            return cookie, err, []
        assert magic == 0x668E33EF
        chunks = []
        while True:
            flags, ctype, cookie, length = struct.unpack(">HHQI", self.recv_exact(16))
            payload = self.recv_exact(length)
            chunks.append((ctype, payload))
            if flags & 1:
                break
            assert struct.unpack(">I", self.recv_exact(4))[0] == 0x668E33EF
        err = 0
        for ctype, payload in chunks:
            if ctype & 0x8000:
                err = struct.unpack_from(">I", payload)[0]
        return cookie, err, chunks


def test_raw_pipelined_requests_matched_by_cookie(srv: ServerFixture) -> None:
    with RawClient(srv.sock) as c:
        c.go()
        for i in range(100):
            c.request(P.CMD_WRITE, i * 4096, 4096, cookie=1000 + i, payload=bytes([i]) * 4096)
        c.request(P.CMD_FLUSH, cookie=0)
        c.request(P.CMD_READ, 0, 4096, cookie=(1 << 64) - 1)
        seen = {}
        for _ in range(102):
            cookie, err, chunks = c.reply()
            seen[cookie] = (err, chunks)
        assert set(seen) == {0, (1 << 64) - 1} | {1000 + i for i in range(100)}
        assert all(err == 0 for err, _ in seen.values())
        c.request(P.CMD_DISC)
        assert c.sock.recv(10) == b""
    assert file_bytes(srv.disk, 99 * 4096, 4096) == bytes([99]) * 4096


def test_raw_sparse_and_df_reads(srv: ServerFixture) -> None:
    with open(srv.disk, "r+b") as f:
        f.seek(256 * 1024)
        f.write(b"D" * 65536)
    with RawClient(srv.sock) as c:
        c.go()
        c.request(P.CMD_READ, 0, MiB, cookie=1)
        cookie, err, chunks = c.reply()
        assert (cookie, err) == (1, 0)
        covered = []
        for ctype, payload in chunks:
            off = struct.unpack_from(">Q", payload)[0]
            if ctype == P.REPLY_TYPE_OFFSET_HOLE:
                covered.append((off, struct.unpack_from(">I", payload, 8)[0], None))
            else:
                assert ctype == P.REPLY_TYPE_OFFSET_DATA
                covered.append((off, len(payload) - 8, payload[8:]))
        covered.sort(key=lambda x: x[0])
        assert [(o, n) for o, n, _ in covered] == [(0, 256 * 1024), (256 * 1024, 65536),
                                                   (320 * 1024, MiB - 320 * 1024)]
        assert covered[1][2] == b"D" * 65536 and covered[0][2] is None and covered[2][2] is None
        c.request(P.CMD_READ, 0, MiB, cookie=2, flags=P.CMD_FLAG_DF)
        cookie, err, chunks = c.reply()
        assert len(chunks) == 1 and chunks[0][0] == P.REPLY_TYPE_OFFSET_DATA
        assert chunks[0][1][8:] == file_bytes(srv.disk, 0, MiB)
        c.request(P.CMD_BLOCK_STATUS, 0, MiB, cookie=3, flags=P.CMD_FLAG_REQ_ONE)
        cookie, err, chunks = c.reply()
        [(ctype, payload)] = chunks
        assert ctype == P.REPLY_TYPE_BLOCK_STATUS and struct.unpack(">III", payload) == (1, 256 * 1024, 3)


def test_raw_reads_without_sparse_chunks(tmp_path: Path, sockdir: Path) -> None:
    fx = ServerFixture(tmp_path, sockdir)
    fx.start(sparse_read_min=None)
    try:
        with RawClient(fx.sock) as c:
            c.go()
            c.request(P.CMD_READ, 0, MiB, cookie=1)
            cookie, err, chunks = c.reply()
            assert (cookie, err) == (1, 0) and len(chunks) == 1
            assert chunks[0][0] == P.REPLY_TYPE_OFFSET_DATA and chunks[0][1] == bytes(8 + MiB)
    finally:
        fx.stop()


def test_raw_simple_replies_without_structured(srv: ServerFixture) -> None:
    with RawClient(srv.sock) as c:
        c.go(structured=False)
        c.request(P.CMD_WRITE, 100, 5, cookie=4, payload=b"hello")
        assert c.simple_reply() == (4, 0, b"")
        c.request(P.CMD_READ, 98, 9, cookie=5)
        assert c.simple_reply(9) == (5, 0, b"\0\0hello\0\0")
        c.request(P.CMD_BLOCK_STATUS, 0, 512, cookie=6)
        assert c.simple_reply() == (6, P.NBD_EINVAL, b"")
        c.request(P.CMD_WRITE, SIZE - 2, 4, cookie=7, payload=b"abcd")
        assert c.simple_reply() == (7, P.NBD_ENOSPC, b"")
        c.request(P.CMD_WRITE, 0, 33 * MiB, cookie=8, payload=bytes(33 * MiB))  # over the maximum: drained
        assert c.simple_reply() == (8, P.NBD_EINVAL, b"")
        c.request(P.CMD_READ, 100, 5, cookie=9)
        assert c.simple_reply(5) == (9, 0, b"hello")


def test_raw_read_only_export_and_unknown_command(srv: ServerFixture) -> None:
    with RawClient(srv.sock) as c:
        c.go("ro")
        c.request(P.CMD_WRITE, 0, 4, cookie=1, payload=b"evil")
        assert c.reply()[:2] == (1, P.NBD_EPERM)
        c.request(P.CMD_TRIM, 0, 4096, cookie=2)
        assert c.reply()[:2] == (2, P.NBD_EPERM)
        c.request(99, cookie=3)
        assert c.reply()[:2] == (3, P.NBD_EINVAL)
        c.request(P.CMD_READ, 0, 10, cookie=4)
        cookie, err, chunks = c.reply()
        assert chunks[0][1][8:] == b"read only!"
    assert file_bytes(srv.ro, 0, 10) == b"read only!"


def test_requests_in_flight_are_bounded_across_connections(tmp_path: Path, sockdir: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Large writes of two clients wait in the server while the server-wide budget is
    used up (each connection may still start one), and all complete once it frees."""
    import nbd_file_export

    gate = threading.Event()
    entered: list[int] = []
    real_write = nbd_file_export.FileExport.write

    def blocked_write(self: nbd_file_export.FileExport, offset: int, data: memoryview,
                      fua: bool) -> None:
        entered.append(offset)
        gate.wait(30)
        real_write(self, offset, data, fua)

    monkeypatch.setattr(nbd_file_export.FileExport, "write", blocked_write)
    fx = ServerFixture(tmp_path, sockdir)
    server = fx.start(total_inflight_bytes=MiB)
    n = 256 << 10  # FUA: each write goes to a worker
    try:
        with RawClient(fx.sock) as a, RawClient(fx.sock) as b:
            a.go()
            b.go()
            senders = [threading.Thread(target=lambda c=c, base=base: [
                c.request(P.CMD_WRITE, base + i * n, n, cookie=i, flags=P.CMD_FLAG_FUA,
                          payload=bytes([i + 1 + base // n]) * n)
                for i in range(8)], daemon=True) for c, base in ((a, 0), (b, 8 * n))]
            for t in senders:
                t.start()
            _until(lambda: any(o < 8 * n for o in entered) and any(o >= 8 * n for o in entered),
                   10, lambda: f"writes entered: {entered}")
            time.sleep(0.5)
            assert MiB <= server.total_inflight <= MiB + 2 * n
            gate.set()
            for c in (a, b):
                assert sorted(c.reply()[:2] for _ in range(8)) == [(i, 0) for i in range(8)]
            for t in senders:
                t.join(10)
    finally:
        gate.set()
        fx.stop()
    assert server.total_inflight == 0
    for i in range(16):
        assert file_bytes(fx.disk, i * n, n) == bytes([i + 1]) * n


def test_eof_inside_a_write_applies_nothing(srv: ServerFixture) -> None:
    with RawClient(srv.sock) as c:
        c.go()
        c.request(P.CMD_WRITE, 0, MiB, cookie=1, payload=b"P" * (MiB - 1))
    with RawClient(srv.sock) as c:  # other connections are unaffected
        c.go()
        c.request(P.CMD_READ, 0, 4096, cookie=2)
        assert c.reply()[:2] == (2, 0)
    _until(lambda: srv.catalog.open_count() == 0, 5)
    assert not [c for c in srv.catalog.calls if c[0].startswith("write")]
    assert allocated_ranges(srv.disk) == []


@pytest.mark.parametrize("garbage", [
    b"\xff" * 4,                                          # bad client flags
    struct.pack(">I", 3) + b"NOTMAGIC" + bytes(8),       # bad option magic
    struct.pack(">I", 3) + struct.pack(">QII", 0x49484156454F5054, 7, 0xFFFFFFFF),  # absurd option length
    struct.pack(">I", 3) + os.urandom(5000),
])
def test_garbage_in_negotiation_is_dropped(srv: ServerFixture, garbage: bytes) -> None:
    with RawClient.__new__(RawClient) as c:
        c.sock = socket.socket(socket.AF_UNIX)
        c.sock.settimeout(20)
        c.sock.connect(str(srv.sock))
        c.recv_exact(18)
        c.sock.sendall(garbage)
        try:
            while c.sock.recv(65536):
                pass
        except ConnectionResetError:
            pass
    assert run("nbdinfo", "--size", srv.uri()).stdout.strip() == str(SIZE)


def test_garbage_in_transmission_is_dropped(srv: ServerFixture) -> None:
    with RawClient(srv.sock) as c:
        c.go()
        c.sock.sendall(os.urandom(100))
        try:
            while c.sock.recv(65536):
                pass
        except ConnectionResetError:
            pass
    assert run("nbdinfo", "--size", srv.uri()).stdout.strip() == str(SIZE)


def test_stalled_handshake_times_out(tmp_path: Path, sockdir: Path) -> None:
    fx = ServerFixture(tmp_path, sockdir)
    server = fx.start(handshake_timeout=0.5)
    try:
        s = socket.socket(socket.AF_UNIX)
        s.connect(str(fx.sock))
        s.settimeout(10)
        t0 = time.monotonic()
        assert s.recv(18).startswith(b"NBDMAGIC")
        s.sendall(struct.pack(">I", 3) + b"IHAVE")  # half an option header, then silence
        assert s.recv(100) == b""
        assert time.monotonic() - t0 < 5
        s.close()
        _until(lambda: server.connection_count == 0, 5)
    finally:
        fx.stop()


def test_client_not_reading_replies_is_cut_off(tmp_path: Path, sockdir: Path) -> None:
    fx = ServerFixture(tmp_path, sockdir)
    server = fx.start(send_timeout=0.5)
    try:
        c = RawClient(fx.sock)
        c.go()
        c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        try:
            for i in range(200):  # 200 MiB of read replies that are never read
                c.request(P.CMD_READ, 0, MiB, cookie=i, flags=P.CMD_FLAG_DF)
        except OSError:
            pass
        _until(lambda: server.connection_count == 0, 20)
        c.sock.close()
        assert run("nbdinfo", "--size", fx.uri()).stdout.strip() == str(SIZE)
    finally:
        fx.stop()
    assert fx.catalog.open_count() == 0


def test_max_connections(tmp_path: Path, sockdir: Path) -> None:
    fx = ServerFixture(tmp_path, sockdir)
    fx.start(max_connections=2)
    clients = [RawClient(fx.sock) for _ in range(2)]
    try:
        s = socket.socket(socket.AF_UNIX)
        s.connect(str(fx.sock))
        s.settimeout(10)
        assert s.recv(100) == b""
        s.close()
    finally:
        for c in clients:
            c.sock.close()
        fx.stop()


class SlowExport(FileExport):
    """Writes take a while, reads of offset 0 hit a bug, writes at 1 MiB run out of space.
    ``concurrency`` records the most writes ever running at once (over all instances)."""

    active = 0
    concurrency = 0
    lock = threading.Lock()

    def write(self, offset: int, data: memoryview, fua: bool) -> None:
        if offset == MiB:
            raise DataPathError(errno.ENOSPC, "pool out of data space")
        with SlowExport.lock:
            SlowExport.active += 1
            SlowExport.concurrency = max(SlowExport.concurrency, SlowExport.active)
        try:
            time.sleep(0.2)
            super().write(offset, data, fua)
        finally:
            with SlowExport.lock:
                SlowExport.active -= 1

    def readinto(self, offset: int, buf: memoryview) -> None:
        if offset == 0:
            raise KeyError("a bug")
        super().readinto(offset, buf)


class SlowCatalog(FileCatalog):
    export_type = SlowExport


def test_export_errors_and_bugs(tmp_path: Path, sockdir: Path, caplog: pytest.LogCaptureFixture) -> None:
    fx = ServerFixture(tmp_path, sockdir)
    fx.catalog = SlowCatalog({"disk": fx.disk})
    fx.start()
    try:
        with RawClient(fx.sock) as c, caplog.at_level(logging.ERROR, logger="thinpool.nbd"):
            c.go()
            c.request(P.CMD_READ, 0, 4096, cookie=1)
            cookie, err, chunks = c.reply()
            assert (cookie, err) == (1, P.NBD_EIO)
            c.request(P.CMD_WRITE, MiB, 4, cookie=2, payload=b"full")
            cookie, err, chunks = c.reply()
            assert (cookie, err) == (2, P.NBD_ENOSPC)
            assert b"pool out of data space" in chunks[0][1]
            c.request(P.CMD_READ, 4096, 4096, cookie=3)
            assert c.reply()[:2] == (3, 0)
        assert "a bug" in caplog.text
        r = run("qemu-io", "-f", "raw", "-c", f"write 1M 4k", fx.uri(), check=False)
        assert "No space left on device" in r.stdout + r.stderr
    finally:
        fx.stop()


@pytest.mark.parametrize("flags,inline_max,size,concurrency", [
    (P.CMD_FLAG_FUA, 128 << 10, 4096, 4),  # FUA writes always go to the workers
    (0, None, 4096, 4),                    # so does everything without inline execution
    (0, 128 << 10, 4096, 1),               # plain writes run in the reader thread
    (0, 128 << 10, 256 << 10, 1),          # ... large ones too
])
def test_stop_finishes_in_flight_requests(tmp_path: Path, sockdir: Path, flags: int, inline_max: int | None,
                                          size: int, concurrency: int) -> None:
    fx = ServerFixture(tmp_path, sockdir)
    fx.catalog = SlowCatalog({"disk": fx.disk})
    SlowExport.concurrency = 0
    server = fx.start(workers_per_connection=4, inline_max=inline_max)
    c = RawClient(fx.sock)
    c.go()
    for i in range(8):
        c.request(P.CMD_WRITE, (i + 2) * MiB, size, cookie=i, flags=flags, payload=bytes([i + 1]) * size)
    time.sleep(0.1)  # the requests are in flight (each write sleeps 0.2 s)
    stopper = threading.Thread(target=server.stop)
    stopper.start()
    replies = {c.reply()[:2] for _ in range(8)}
    assert replies == {(i, 0) for i in range(8)}
    assert c.sock.recv(10) == b""  # then the server hangs up
    stopper.join(20)
    assert not stopper.is_alive()
    c.sock.close()
    assert not fx.sock.exists() and fx.catalog.open_count() == 0
    for i in range(8):
        assert file_bytes(fx.disk, (i + 2) * MiB, size) == bytes([i + 1]) * size
    assert SlowExport.concurrency == concurrency


class ThreadRecordingExport(FileExport):
    """Records the name of the thread that ran each ``readinto``, by offset."""

    readers: dict[int, str] = {}

    def readinto(self, offset: int, buf: memoryview) -> None:
        ThreadRecordingExport.readers[offset] = threading.current_thread().name
        super().readinto(offset, buf)


class ThreadRecordingCatalog(FileCatalog):
    export_type = ThreadRecordingExport


STREAM_READ = 256 << 10  # a large READ: more than SHARED_MAX, so its connection streams
STREAM_PATTERN = bytes(range(256)) * (SIZE // 256)


def _streaming_server(tmp_path: Path, sockdir: Path,
                      stream_idle: float) -> tuple[ServerFixture, NBDServer]:
    """A server whose export records the thread of every READ, on a disk of STREAM_PATTERN."""
    fx = ServerFixture(tmp_path, sockdir)
    fx.catalog = ThreadRecordingCatalog({"disk": fx.disk})
    with open(fx.disk, "r+b") as f:
        f.write(STREAM_PATTERN)
    ThreadRecordingExport.readers = {}
    return fx, fx.start(workers_per_connection=4, stream_idle=stream_idle)


def _read_batch(c: RawClient, first: int, count: int = 4) -> set[str]:
    """``count`` pipelined large READs at blocks first.., sent in one piece (so the reader
    receives them together), each reply checked; the kinds of thread that ran them."""
    size = STREAM_READ
    c.sock.sendall(b"".join(c.header(P.CMD_READ, i * size, size, cookie=i)
                            for i in range(first, first + count)))
    for _ in range(count):
        cookie, err, chunks = c.reply()
        assert err == 0
        data = b"".join(payload[8:] for kind, payload in chunks
                        if kind == P.REPLY_TYPE_OFFSET_DATA)
        assert data == STREAM_PATTERN[cookie * size:(cookie + 1) * size]
    return {ThreadRecordingExport.readers[i * size].split()[0]
            for i in range(first, first + count)}


def test_large_reads_run_in_the_reader_while_two_connections_stream(tmp_path: Path,
                                                                    sockdir: Path) -> None:
    """A lone connection's large READs go to worker threads (its reads overlap one another);
    while two connections stream large requests, they run in the readers; when one of the two
    closes, the other's go back to the workers. Every reply carries the right bytes."""
    fx, server = _streaming_server(tmp_path, sockdir, stream_idle=60.0)
    a, b = RawClient(fx.sock), RawClient(fx.sock)
    try:
        a.go()
        b.go()

        def streaming(n: int) -> None:
            """Wait until ``n`` connections stream (a reader counts itself after its batch,
            which may be after its replies went out)."""
            _until(lambda: server.streaming == n)

        assert _read_batch(a, 0) == {"nbd-worker"}   # a streams alone
        streaming(1)
        assert _read_batch(b, 4) == {"nbd-worker"}   # b's first batch: a alone streamed before it
        streaming(2)
        assert _read_batch(a, 8) == {"nbd-conn"}     # now two connections stream: in the readers
        assert _read_batch(b, 12) == {"nbd-conn"}
        b.sock.close()
        _until(lambda: server.connection_count == 1)
        streaming(1)
        assert _read_batch(a, 16) == {"nbd-worker"}  # a streams alone again
    finally:
        a.sock.close()
        b.sock.close()
        fx.stop()


def test_a_stream_that_falls_silent_stops_counting(tmp_path: Path, sockdir: Path) -> None:
    """Two connections stream, then both fall silent without closing: after ``stream_idle``
    neither counts, so the next large READs of one of them go to its workers again."""
    fx, server = _streaming_server(tmp_path, sockdir, stream_idle=1.0)
    a, b = RawClient(fx.sock), RawClient(fx.sock)
    try:
        a.go()
        b.go()
        _read_batch(a, 0, 2)
        _read_batch(b, 2, 2)
        _until(lambda: server.streaming == 2, 0.5)  # both count (after their batches) ...
        _until(lambda: server.streaming == 0, 5)    # ... and neither once both waited stream_idle
        assert server.connection_count == 2
        assert _read_batch(a, 4, 2) == {"nbd-worker"}  # a streams alone
    finally:
        a.sock.close()
        b.sock.close()
        fx.stop()


def test_stop_cuts_idle_and_stuck_connections(tmp_path: Path, sockdir: Path) -> None:
    fds = _open_fds()
    fx = ServerFixture(tmp_path, sockdir)
    server = fx.start()
    idle = RawClient(fx.sock)
    idle.go()
    half = RawClient(fx.sock)
    half.go()
    half.request(P.CMD_WRITE, 0, 4096, payload=b"x" * 100)  # a payload that never completes
    negotiating = RawClient(fx.sock)
    time.sleep(0.2)
    t0 = time.monotonic()
    server.stop()
    assert time.monotonic() - t0 < 5
    for c in (idle, half, negotiating):
        try:
            assert c.sock.recv(100) == b""
        except ConnectionResetError:
            pass
        c.sock.close()
    assert fx.catalog.open_count() == 0 and not _nbd_threads()
    assert _open_fds() <= fds


# -- threads of pipelining connections share one CPU ------------------------------------------

def _reader_cpus() -> list[set[int]]:
    """The CPUs each connection's reader thread may run on."""
    out = []
    for t in threading.enumerate():
        if t.name.startswith("nbd-conn") and t.native_id is not None:
            try:
                out.append(os.sched_getaffinity(t.native_id))
            except OSError:  # the thread just ended
                pass
    return out


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 CPUs or more")
def test_pipelining_connections_share_a_cpu_and_lone_requests_do_not(srv: ServerFixture) -> None:
    """Two clients pipelining small reads get one CPU for their reader threads (the
    GIL is handed over on that CPU); a client sending one request at a time keeps every
    CPU; a member that sends larger reads, or pauses, leaves, and the other gets every CPU
    back."""
    from nbdclient import NBDClient

    every = os.sched_getaffinity(0)
    assert srv.server is not None and srv.server.shared_cpu is not None
    with open(srv.disk, "r+b") as f:
        f.write(bytes(range(256)) * 64)
    with NBDClient(str(srv.sock), "disk") as a, NBDClient(str(srv.sock), "disk") as b, \
            NBDClient(str(srv.sock), "disk") as lone:
        offsets = [i * 512 for i in range(32)]
        for _ in range(50):  # a burst usually arrives in one receive; allow for splits
            for c in (a, b):
                got = c.read_pipelined(offsets, 512)
                assert got[512] == bytes(range(256)) * 2
            for _ in range(3):
                lone.read(0, 512)
            if srv.server.shared_cpu.cpu is not None:
                break
        cpu = srv.server.shared_cpu.cpu
        assert cpu in every
        assert sorted(map(len, _reader_cpus())) == [1, 1, len(every)]
        assert {cpu} in _reader_cpus()
        a.read_pipelined([0, 64 << 10], 64 << 10)  # larger reads: copies in the kernel
        # The reader leaves when it next waits for data, which may come after the replies.
        _until(lambda: srv.server.shared_cpu.cpu is None, 5)
        assert _reader_cpus() == [every] * 3
        for _ in range(50):
            a.read_pipelined(offsets, 512)
            b.read_pipelined(offsets, 512)
            if srv.server.shared_cpu.cpu is not None:
                break
        assert srv.server.shared_cpu.cpu is not None
        time.sleep(0.05)  # a pause: the next request makes a reader leave
        a.read(0, 512)
        assert srv.server.shared_cpu.cpu is None
        assert _reader_cpus() == [every] * 3
    assert srv.server.shared_cpu.cpu is None


def test_a_given_shared_cpu_is_used(tmp_path: Path, sockdir: Path) -> None:
    """Servers of one process share its GIL: given one SharedCpu, a server uses it."""
    from thinpool.linux.cpu import SharedCpu

    shared = SharedCpu()
    fx = ServerFixture(tmp_path, sockdir)
    server = fx.start(share_cpu=shared)
    try:
        assert server.shared_cpu is shared
    finally:
        fx.stop()


def test_share_cpu_off(tmp_path: Path, sockdir: Path) -> None:
    from nbdclient import NBDClient

    fx = ServerFixture(tmp_path, sockdir)
    server = fx.start(share_cpu=False)
    try:
        assert server.shared_cpu is None
        with NBDClient(str(fx.sock), "disk") as a, NBDClient(str(fx.sock), "disk") as b:
            for c in (a, b):
                assert c.read_pipelined([0, 512, 1024], 512)[1024] == bytes(512)
            assert _reader_cpus() == [os.sched_getaffinity(0)] * 2
    finally:
        fx.stop()
