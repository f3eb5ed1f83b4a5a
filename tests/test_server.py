"""The pool server: NBD for real clients, the control socket for the CLI, stop and kills.

Each test starts ``thinpool serve`` in a subprocess on a pool in a short temporary
directory and stops it (SIGTERM, then SIGKILL) whatever happens.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import struct
import subprocess
import threading
from pathlib import Path
from typing import Iterator

import pytest

from conftest import require_tool
from serverkit import ServerProcess, short_tmp
from test_cli import fails, ok, tp
from thinmodel import assert_thin_check_clean

MiB = 1 << 20
BS = 64 * 1024


def run(*args: str, check: bool = True, timeout: float = 300,
        input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    require_tool(args[0])
    r = subprocess.run(args, capture_output=True, timeout=timeout, input=input)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({r.returncode}): "
                             f"{r.stdout.decode(errors='replace')}{r.stderr.decode(errors='replace')}")
    return r


@pytest.fixture
def workdir() -> Iterator[Path]:
    d = short_tmp()
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def pool(workdir: Path) -> Path:
    d = workdir / "p"
    ok("pool", "create", d, "--data-size", "512M", "--metadata-size", "32M")
    ok("create-thin", d, "0", "--size", "64M", "--name", "base")
    ok("create-thin", d, "1", "--size", "32M")
    return d


@pytest.fixture
def server(pool: Path) -> Iterator[ServerProcess]:
    srv = ServerProcess(pool)
    try:
        yield srv
    finally:
        killed = srv.proc.poll() is not None and srv.proc.returncode < 0
        srv.stop()
    if not killed:  # a clean stop removes what the server made
        assert not (pool / "control.sock").exists() and not (pool / "server.json").exists()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def pool_map(pool: Path, dev: int, size: int) -> list[tuple[int, int, bool]]:
    """(offset, length, mapped) runs of a volume, from the metadata (thin_dump)."""
    xml = run("thin_dump", str(pool / "metadata")).stdout.decode()
    mapped = set()
    import re
    dev_xml = re.search(rf'<device dev_id="{dev}".*?</device>', xml, re.S)
    assert dev_xml is not None
    for m in re.finditer(r'origin_(?:begin|block)="(\d+)"(?: data_(?:begin|block)="\d+")?'
                         r'(?: length="(\d+)")?', dev_xml.group(0)):
        start, n = int(m.group(1)), int(m.group(2) or 1)
        mapped.update(range(start, start + n))
    runs: list[tuple[int, int, bool]] = []
    for b in range(size // BS):
        on = b in mapped
        if runs and runs[-1][2] == on:
            runs[-1] = (runs[-1][0], runs[-1][1] + BS, on)
        else:
            runs.append((b * BS, BS, on))
    return runs


# -- the CLI through the control socket ------------------------------------------------------

def test_cli_commands_go_through_the_server(pool: Path, workdir: Path) -> None:
    """Same outputs with a server running as without; no 'in use by pid' errors."""
    img = workdir / "img"
    img.write_bytes(os.urandom(3 * MiB))
    offline = {
        "status": ok("status", pool), "thin": ok("status", pool, "--thin", "0"),
        "list": ok("list", pool),
    }
    srv = ServerProcess(pool)
    try:
        assert ok("status", pool) == offline["status"]
        assert ok("status", pool, "--thin", "0") == offline["thin"]
        assert ok("list", pool) == offline["list"]
        ok("write", pool, "0", "--offset", "1M", "-", input=b"through the server")
        assert ok("read", pool, "0", "--offset", "1M", "--length", "18") == "through the server"
        ok("message", pool, "create_snap 2 0")
        ok("create-snap", pool, "3", "2", "--name", "grand")
        ok("import-image", pool, "1", img)
        ok("import-image", pool, "1", "/dev/stdin", input=img.read_bytes())
        out = workdir / "out"
        ok("export-image", pool, "1", out)
        assert out.read_bytes()[:3 * MiB] == img.read_bytes()
        ok("discard", pool, "1", "--offset", "0", "--length", "1M")
        ok("pool", "resize", pool, "--data-size", "1G")
        tree = json.loads(ok("list", pool, "--tree", "--json"))
        assert tree[0]["snapshots"][0]["id"] == 2
        r = tp("check", pool)
        assert r.returncode == 0 and b"clean" in r.stderr
        # errors are the same one line, and the server keeps serving
        fails("create-thin", pool, "0", "--size", "1M", match="EEXIST")
        fails("read", pool, "0", "--offset", "64M", "--length", "1", match="beyond the end")
        fails("delete", pool, "77", match="does not exist")
        fails("export-image", pool, "0", pool / "metadata", match="refusing to write")
        ok("delete", pool, "3")
        status = ok("status", pool)
    finally:
        assert srv.stop() == 0, srv.output()
    assert ok("status", pool) == status  # the same state offline
    assert ok("read", pool, "0", "--offset", "1M", "--length", "18") == "through the server"
    assert_thin_check_clean(pool / "metadata")


def test_stop_command(pool: Path) -> None:
    srv = ServerProcess(pool)
    try:
        ok("write", pool, "0", "-", input=b"committed by stop")
        ok("stop", pool)
        assert srv.proc.wait(30) == 0
    finally:
        srv.kill()
    assert not (pool / "control.sock").exists() and not (pool / "nbd.sock").exists()
    fails("stop", pool, match="no pool server runs")
    assert ok("read", pool, "0", "--length", "17") == "committed by stop"


def test_control_socket_survives_garbage(server: ServerProcess, pool: Path) -> None:
    path = str(pool / "control.sock")
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"
    for payload in (b"", b"\x00\x00\x00\x05{bad}", struct.pack(">I", 1 << 30),
                    b"\x00\x00\x00\x02[]", b"\x00\x00\x00\x0f" + json.dumps(
                        {"version": 9, "command": "x"}).encode()[:15],
                    b"\x00\x00\x00\x2b" + json.dumps({"version": 1, "command": "nope",
                                                      "args": {}}).encode().ljust(43)):
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(path)
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
            s.settimeout(10)
            s.recv(4096)
    assert ok("status", pool).split()[4] == "rw"


# -- NBD with real clients --------------------------------------------------------------------

def test_nbd_clients_see_the_volumes(server: ServerProcess, pool: Path, workdir: Path) -> None:
    lst = run("nbdinfo", "--list", "--json", f"nbd+unix:///?socket={server.nbd_socket}")
    exports = {e["export-name"]: e for e in json.loads(lst.stdout)["exports"]}
    assert set(exports) == {"0", "base", "1"}
    assert exports["base"]["export-size"] == 64 * MiB and exports["base"]["can_multi_conn"]
    info = json.loads(run("qemu-img", "info", "--output=json", server.uri("base")).stdout)
    assert info["virtual-size"] == 64 * MiB
    data = os.urandom(20 * MiB)
    src = workdir / "src.bin"
    src.write_bytes(data)
    run("nbdcopy", "--flush", str(src), server.uri(0))
    back = run("nbdcopy", server.uri("base"), "-").stdout
    assert back[:20 * MiB] == data and back[20 * MiB:] == bytes(44 * MiB)
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(src), server.uri(0), check=False)
    # qemu-io patterns, zeroes with and without holes, discard
    run("qemu-io", "-f", "raw", "-c", "write -P 0x5a 40M 3M", "-c", "read -P 0x5a 40M 3M",
        "-c", "write -z 40M 1M", "-c", "write -z -u 41M 1M", "-c", "discard 0 2M",
        "-c", "read -P 0 0 2M", server.uri(0))
    run("nbdcopy", "--flush", str(src), server.uri(1), check=False)  # too big: refused
    ok("status", pool)  # still alive
    # the allocation map is the pool's mapping
    run("qemu-io", "-f", "raw", "-c", "flush", server.uri(0))
    nbd_map = json.loads(run("nbdinfo", "--map", "--json", server.uri(0)).stdout)
    holes = [(e["offset"], e["length"], e["type"] & 1 == 0) for e in nbd_map]
    merged: list[tuple[int, int, bool]] = []
    for off, ln, on in holes:
        if merged and merged[-1][2] == on:
            merged[-1] = (merged[-1][0], merged[-1][1] + ln, on)
        else:
            merged.append((off, ln, on))
    assert merged == pool_map(pool, 0, 64 * MiB)
    assert json.loads(run("qemu-img", "map", "--output=json", server.uri(0)).stdout)


def test_nbd_multi_conn_flush_and_pipelining(server: ServerProcess, pool: Path,
                                             workdir: Path) -> None:
    """nbdcopy with 4 connections, then a flush on one; after SIGKILL the data is there."""
    data = os.urandom(24 * MiB)
    src = workdir / "src.bin"
    src.write_bytes(data)
    run("nbdcopy", "--connections=4", "--requests=16", "--flush", str(src), server.uri(0))
    server.kill()  # everything nbdcopy saw flushed must survive
    assert_thin_check_clean(pool / "metadata")
    r = tp("read", pool, "0", "--length", str(24 * MiB))
    assert r.returncode == 0 and r.stdout == data


def test_concurrent_clients_on_many_volumes(pool: Path, workdir: Path) -> None:
    """Eight nbdcopy processes at once, spread over the pool process and two NBD workers."""
    for v in range(2, 8):
        ok("create-thin", pool, str(v), "--size", "16M")
    srv = ServerProcess(pool, "--workers", "2")
    try:
        blobs = {v: os.urandom(8 * MiB) for v in (0, 1, 2, 3, 4, 5, 6, 7)}
        for v, b in blobs.items():
            (workdir / f"in{v}").write_bytes(b)
        errors: list[str] = []

        def client(v: int) -> None:
            r = subprocess.run(["nbdcopy", "--flush", str(workdir / f"in{v}"), srv.uri(v)],
                               capture_output=True)
            if r.returncode:
                errors.append(r.stderr.decode())
            got = subprocess.run(["nbdcopy", srv.uri(v), "-"], capture_output=True).stdout
            if got[:8 * MiB] != blobs[v]:
                errors.append(f"volume {v} differs")

        threads = [threading.Thread(target=client, args=(v,)) for v in blobs]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        assert not errors, errors
    finally:
        assert srv.stop() == 0
    assert_thin_check_clean(pool / "metadata")


def test_read_only_volumes(pool: Path) -> None:
    srv = ServerProcess(pool, "--read-only", "1")
    try:
        lst = json.loads(run("nbdinfo", "--list", "--json",
                             f"nbd+unix:///?socket={srv.nbd_socket}").stdout)
        ro = {e["export-name"]: e["is_read_only"] for e in lst["exports"]}
        assert ro == {"0": False, "base": False, "1": True}
        r = run("qemu-io", "-f", "raw", "-c", "write 0 4k", srv.uri(1), check=False)
        assert r.returncode != 0 or b"failed" in r.stdout + r.stderr
        assert ok("status", pool, "--thin", "1").split()[0] == "0"
    finally:
        srv.stop()
    fails("serve", pool, "--read-only", "9", match="do not exist")


def test_listen_needs_tls_off_loopback(pool: Path) -> None:
    r = tp("serve", pool, "--listen", "0.0.0.0:0")
    assert r.returncode == 2 and b"without TLS" in r.stderr
    r = tp("serve", pool, "--tls", "require")
    assert r.returncode == 2 and b"--tls-creds" in r.stderr


def test_tcp_with_tls(pool: Path, workdir: Path) -> None:
    from test_nbd_server import make_pki

    pki = workdir / "pki"
    make_pki(pki)
    srv = ServerProcess(pool, "--listen", "127.0.0.1:0", "--tls", "require", "--tls-creds",
                        str(pki))
    try:
        state = json.loads((pool / "server.json").read_text())
        port = state["tcp"][1]
        client = workdir / "client"
        client.mkdir()
        shutil.copy(pki / "ca-cert.pem", client / "ca-cert.pem")
        shutil.copy(pki / "client-cert.pem", client / "client-cert.pem")
        shutil.copy(pki / "client-key.pem", client / "client-key.pem")
        r = run("nbdinfo", "--json", f"nbds://127.0.0.1:{port}/base?tls-certificates={client}")
        assert json.loads(r.stdout)["exports"][0]["export-size"] == 64 * MiB
        plain = run("nbdinfo", f"nbd://127.0.0.1:{port}/base", check=False)
        assert plain.returncode != 0
        # the unix socket is refused too: TLS is required for every client
        assert run("nbdinfo", srv.uri("base"), check=False).returncode != 0
    finally:
        srv.stop()


def test_server_kill_loses_nothing_flushed(pool: Path, workdir: Path) -> None:
    """qemu-io writes with FUA and flushes; SIGKILL; restart: exactly that data."""
    srv = ServerProcess(pool)
    try:
        run("qemu-io", "-f", "raw", "-c", "write -P 0x11 0 1M", "-c", "flush",
            "-c", "write -P 0x22 -f 2M 1M", "-c", "write -P 0x33 4M 64k", srv.uri(0))
    finally:
        srv.kill()
    assert_thin_check_clean(pool / "metadata")
    srv = ServerProcess(pool)
    try:
        run("qemu-io", "-f", "raw", "-c", "read -P 0x11 0 1M", "-c", "read -P 0x22 2M 1M",
            srv.uri(0))
    finally:
        srv.stop()


def test_nbd_fuzz_for_a_bounded_time(server: ServerProcess, pool: Path) -> None:
    """Random handshakes, options, requests, truncations and disconnects for a bounded time
    (THINPOOL_FUZZ_SECONDS, default 8): the server keeps serving, loses nothing flushed, and
    the pool stays consistent."""
    import random
    import time

    from nbdclient import NBDClient

    seconds = float(os.environ.get("THINPOOL_FUZZ_SECONDS", "8"))
    rng = random.Random(int(os.environ.get("THINPOOL_FUZZ_SEED", "4242")))
    keep = os.urandom(3 * BS)
    with NBDClient(str(server.nbd_socket), "base") as c:
        c.write(5 * BS, keep)
        c.flush()

    def session() -> None:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(2)
            s.connect(str(server.nbd_socket))
            s.recv(18)
            style = rng.random()
            if style < 0.2:  # garbage straight away
                s.sendall(os.urandom(rng.randint(1, 300)))
            else:
                s.sendall(struct.pack(">I", rng.choice([0, 1, 3, 0xFFFFFFFF])))
                if style < 0.5:  # random options, possibly lying about their length
                    for _ in range(rng.randint(1, 5)):
                        body = os.urandom(rng.randint(0, 64))
                        s.sendall(struct.pack(">QII", 0x49484156454F5054, rng.randint(0, 12),
                                              rng.choice([len(body), 1 << 31, 0, 5])) + body)
                else:  # a real OPT_GO, then random requests
                    name = rng.choice([b"base", b"1", b"nope", b"", os.urandom(8)])
                    data = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
                    s.sendall(struct.pack(">QII", 0x49484156454F5054, 7, len(data)) + data)
                    for _ in range(rng.randint(1, 20)):
                        cmd = rng.choice([0, 1, 2, 3, 4, 5, 6, 7, 9, 200])
                        length = rng.choice([0, 1, 512, BS, 1 << 20, 1 << 31, 0xFFFFFFFF])
                        offset = rng.choice([0, 4096, 63 * MiB, 64 * MiB, 1 << 62])
                        flags = rng.choice([0, 1, 2, 4, 0xFFFF])
                        if cmd in (1, 4, 6) and 5 * BS < offset + length and offset < 8 * BS:
                            offset = 63 * MiB  # keep the flushed bytes out of reach
                        req = struct.pack(">IHHQQI", rng.choice([0x25609513, 0x25609513, 1]),
                                          flags, cmd, rng.randint(0, 1 << 63), offset, length)
                        payload = os.urandom(min(length, rng.choice([0, 100, 4096])))
                        s.sendall(req + payload)
            try:
                while s.recv(1 << 16):
                    if rng.random() < 0.3:
                        break
            except OSError:
                pass

    deadline = time.monotonic() + seconds
    sessions = 0
    while time.monotonic() < deadline:
        try:
            session()
        except OSError:
            pass
        sessions += 1
    assert sessions > 20
    with NBDClient(str(server.nbd_socket), "base") as c:
        assert c.read(5 * BS, 3 * BS) == keep
    assert ok("status", pool).split()[4] == "rw"
    server.stop()
    assert_thin_check_clean(pool / "metadata")


def test_protocol_cases_through_libnbd(server: ServerProcess) -> None:
    """Meta contexts, block status, pipelining, multi-conn and strict-mode-off bad requests,
    through libnbd's own Python binding (Debian's python3-libnbd, for /usr/bin/python3)."""
    script = Path(__file__).parent / "libnbd_cases" / "protocol_cases.py"
    probe = subprocess.run(["/usr/bin/python3", "-c", "import nbd"], capture_output=True)
    if probe.returncode != 0:
        pytest.fail("python3-libnbd is not installed for /usr/bin/python3 (see .ci/run)")
    r = run("/usr/bin/python3", str(script), str(server.nbd_socket))
    seen = json.loads(r.stdout)
    assert seen["meta_contexts"] == ["base:allocation"]
    assert seen["pipelined"] == 64 and seen["multi_conn"]
    assert set(seen["strict_off_errors"]) == {"read beyond end", "write beyond end",
                                              "zero beyond end", "trim beyond end"}


def test_pipelined_small_writes_in_batches(workdir: Path) -> None:
    """Small writes a client sends back to back are done in batches: overlapping ones in
    order, and when the pool runs out of space (error_if_no_space) each write gets its own
    answer - exactly the ones that found a free block succeed. A flush, SIGKILL, restart:
    everything acknowledged is there."""
    from test_nbd_server import RawClient

    from thinpool.nbd import protocol as P

    d = workdir / "small"
    ok("pool", "create", d, "--data-size", "1M", "--metadata-size", "8M", "--error-if-no-space")
    ok("create-thin", d, "0", "--size", "4M")
    srv = ServerProcess(d)
    try:
        with RawClient(srv.nbd_socket) as c:
            c.go("0")
            reqs = b""
            writes = [(100, b"first" * 800), (100, b"later" * 800)]
            writes += [(v * BS + 7, bytes([v]) * 4096) for v in range(1, 20)]
            for i, (off, data) in enumerate(writes):
                reqs += struct.pack(">IHHQQI", 0x25609513, 0, P.CMD_WRITE, i, off, len(data)) + data
            c.sock.sendall(reqs)
            errors = dict(c.reply()[:2] for _ in writes)
            assert errors == {i: 0 if i < 17 else P.NBD_ENOSPC for i in range(len(writes))}
            c.request(P.CMD_FLUSH, cookie=99)
            assert c.reply()[:2] == (99, 0)
    finally:
        srv.kill()
    assert_thin_check_clean(d / "metadata")
    got = tp("read", d, "0", "--length", str(20 * BS)).stdout
    assert got[100:4100] == b"later" * 800
    for v in range(1, 20):
        want = bytes([v]) * 4096 if v < 16 else bytes(4096)
        assert got[v * BS + 7:v * BS + 4103] == want, v
