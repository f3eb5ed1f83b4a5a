"""NBD worker processes (``thinpool serve --workers N``): a worker serves reads and in-place
overwrites of the pool's data file itself, and must never read or write a block whose
mapping the pool changed: after a snapshot, a discard, or its own death.

Each test runs ``thinpool serve --workers 1`` in a subprocess. The first client connection
stays in the pool process; the second, from another process, goes to the worker (checked
through ``server-info``).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from nbdclient import NBDClient, NBDError
from serverkit import ServerProcess, short_tmp
from test_cli import ok, tp
from thinmodel import assert_thin_check_clean
from thinpool.linux.cpu import spread_cpu
from thinpool.nbd.backend import ExportNotFound
from thinpool.server import control

MiB = 1 << 20
BS = 64 * 1024


@pytest.fixture
def pool() -> Iterator[Path]:
    d = short_tmp()
    try:
        ok("pool", "create", d / "p", "--data-size", "256M", "--metadata-size", "16M")
        ok("create-thin", d / "p", "0", "--size", "16M")
        yield d / "p"
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def server(pool: Path) -> Iterator[ServerProcess]:
    srv = ServerProcess(pool, "--workers", "1")
    try:
        yield srv
    finally:
        srv.stop()


def info(pool: Path) -> dict[str, Any]:
    return control.request(str(pool / "control.sock"), "server-info", {})


def wait_worker_idle(pool: Path) -> None:
    """Until the worker has no connection (it reports closes asynchronously)."""
    deadline = time.monotonic() + 10
    while info(pool)["workers"][0]["connections"] and time.monotonic() < deadline:
        time.sleep(0.02)


def two_clients(srv: ServerProcess, export: str = "0") -> tuple[NBDClient, NBDClient]:
    """A client served by the pool process and one served by the worker (connected from
    another process: one process's connections all go to one place)."""
    in_pool = NBDClient(str(srv.nbd_socket), export)
    in_worker = NBDClient(str(srv.nbd_socket), export, other_process=True)
    state = info(srv.directory)
    assert state["nbd_connections"] == 1, state
    assert [w["connections"] for w in state["workers"]] == [1], state
    return in_pool, in_worker


def pattern(tag: int, length: int) -> bytes:
    return bytes([tag]) * length


def test_worker_reads_and_overwrites_what_the_pool_sees(server: ServerProcess) -> None:
    a, b = two_clients(server)
    with a, b:
        data = os.urandom(4 * MiB)
        a.write(0, data)  # provisioned by the pool process
        for _ in range(2):  # the first read goes to the pool and publishes; the second is local
            assert b.read(0, 4 * MiB) == data
            assert b.read(BS + 512, 4096) == data[BS + 512:BS + 512 + 4096]
        new = os.urandom(4 * MiB)
        for off in range(0, 4 * MiB, 256 * 1024):  # in place: every block is exclusive
            b.write(off, new[off:off + 256 * 1024])
        assert a.read(0, 4 * MiB) == new
        fresh = os.urandom(3 * BS)
        b.write(8 * MiB + 100, fresh)  # unprovisioned: the worker sends it to the pool
        assert a.read(8 * MiB + 100, len(fresh)) == fresh
        assert b.read(8 * MiB, BS) == bytes(100) + fresh[:BS - 100]
        assert b.read(12 * MiB, BS) == bytes(BS)  # never written: zeros
        b.flush()
    server.kill()
    assert_thin_check_clean(server.directory / "metadata")
    got = tp("read", server.directory, "0", "--length", str(4 * MiB))
    assert got.stdout == new


def test_snapshot_stops_in_place_writes(server: ServerProcess) -> None:
    """After create_snap, the origin's blocks are shared: the worker must copy them first."""
    a, b = two_clients(server)
    with a, b:
        b.write(0, pattern(1, 2 * MiB))
        assert b.read(0, 2 * MiB) == pattern(1, 2 * MiB)
        b.write(0, pattern(2, 2 * MiB))  # in place
        ok("create-snap", server.directory, "5", "0")
        b.write(0, pattern(3, 2 * MiB))  # must not land in the snapshot's blocks
        assert a.read(0, 2 * MiB) == pattern(3, 2 * MiB)
        assert b.read(0, 2 * MiB) == pattern(3, 2 * MiB)
        with NBDClient(str(server.nbd_socket), "5") as snap:
            assert snap.read(0, 2 * MiB) == pattern(2, 2 * MiB)
        b.write(0, pattern(4, 2 * MiB))  # exclusive again after the copy: in place
        with NBDClient(str(server.nbd_socket), "5") as snap:
            assert snap.read(0, 2 * MiB) == pattern(2, 2 * MiB)
        assert a.read(0, 2 * MiB) == pattern(4, 2 * MiB)


def test_snapshot_during_worker_writes(server: ServerProcess) -> None:
    """Snapshots taken while the worker overwrites in place: each snapshot holds, block by
    block, one whole version, and nothing the worker writes after create-snap returned
    changes it (the snapshot waits for the worker's writes in flight)."""
    a, b = two_clients(server)
    blocks = 32
    with a, b:
        b.write(0, pattern(0, blocks * BS))
        b.read(0, blocks * BS)
        stop = threading.Event()
        errors: list[BaseException] = []

        def writer() -> None:
            tag = 1
            try:
                while not stop.is_set():
                    for v in range(blocks):
                        b.write(v * BS, pattern(tag % 250 + 1, BS))
                    tag += 1
            except BaseException as e:
                errors.append(e)

        t = threading.Thread(target=writer)
        t.start()
        first: dict[int, bytes] = {}
        try:
            for s in range(10, 16):
                time.sleep(0.1)
                ok("create-snap", server.directory, str(s), "0")
                with NBDClient(str(server.nbd_socket), str(s)) as c:  # the writer goes on
                    first[s] = c.read(0, blocks * BS)
        finally:
            stop.set()
            t.join(60)
        assert not errors, errors
        for s, content in first.items():
            for v in range(blocks):
                blk = content[v * BS:(v + 1) * BS]
                assert blk == blk[:1] * BS, (s, v)
        b.write(0, pattern(255, blocks * BS))
        for s, content in first.items():
            with NBDClient(str(server.nbd_socket), str(s)) as c:
                assert c.read(0, blocks * BS) == content, s


def test_discard_withdraws_the_mapping(server: ServerProcess) -> None:
    a, b = two_clients(server)
    with a, b:
        b.write(0, pattern(7, 2 * MiB))
        assert b.read(0, 2 * MiB) == pattern(7, 2 * MiB)  # now in the worker's table
        a.trim(0, 2 * MiB)
        assert b.read(0, 2 * MiB) == bytes(2 * MiB)
        b.write(BS, pattern(8, BS))  # provisions again (through the pool)
        assert a.read(0, 3 * BS) == bytes(BS) + pattern(8, BS) + bytes(BS)
        a.flush()  # the commit punches the freed blocks; the worker's table must not point there
        assert b.read(0, 3 * BS) == bytes(BS) + pattern(8, BS) + bytes(BS)


def test_external_origin_is_read_through_the_pool(pool: Path) -> None:
    origin = pool.parent / "origin.raw"
    base = os.urandom(2 * MiB)
    origin.write_bytes(base)
    ok("create-thin", pool, "3", "--size", "4M", "--origin", str(origin))
    srv = ServerProcess(pool, "--workers", "1")
    try:
        a, b = two_clients(srv, "3")
        with a, b:
            for _ in range(2):
                assert b.read(0, 2 * MiB) == base
                assert b.read(2 * MiB, BS) == bytes(BS)
            b.write(100, b"x" * 10)
            assert b.read(0, BS) == base[:100] + b"x" * 10 + base[110:BS]
    finally:
        assert srv.stop() == 0


def test_a_dead_worker_takes_only_its_connections(server: ServerProcess) -> None:
    a, b = two_clients(server)
    with a:
        b.write(0, pattern(5, MiB))
        b.flush()
        pid = info(server.directory)["workers"][0]["pid"]
        os.kill(pid, signal.SIGKILL)
        with pytest.raises((NBDError, OSError, ConnectionError)):
            b.read(0, 4096)
            b.read(0, 4096)
        b.close()
        deadline = time.monotonic() + 10
        while info(server.directory)["workers"][0]["alive"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert a.read(0, MiB) == pattern(5, MiB)
        with NBDClient(str(server.nbd_socket), "0", other_process=True) as c:  # by the pool
            assert c.read(0, MiB) == pattern(5, MiB)
            c.write(0, pattern(6, BS))
    assert server.stop() == 0
    assert "NBD worker 0" in server.output() and "died" in server.output()
    assert tp("read", server.directory, "0", "--length", str(BS)).stdout == pattern(6, BS)


def test_workers_die_with_the_pool_process(server: ServerProcess) -> None:
    a, b = two_clients(server)
    pid = info(server.directory)["workers"][0]["pid"]
    with a, b:
        b.write(0, pattern(9, BS))
        b.flush()
        server.kill()
    deadline = time.monotonic() + 10
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not Path(f"/proc/{pid}").exists()
    assert_thin_check_clean(server.directory / "metadata")
    srv = ServerProcess(server.directory, "--workers", "1")
    try:
        a, b = two_clients(srv)
        with a, b:
            assert b.read(0, BS) == pattern(9, BS)
    finally:
        assert srv.stop() == 0


def test_a_worker_lists_and_describes_exports_as_the_pool_does(server: ServerProcess) -> None:
    from thinpool.nbd.client import ClientExport, list_exports

    ok("create-thin", server.directory, "4", "--size", "8M", "--name", "web")
    path = str(server.nbd_socket)
    listing = subprocess.run(  # another process, alone: served by the pool process
        [sys.executable, "-c", "import json, sys; from thinpool.nbd.client import list_exports; "
         "print(json.dumps(list_exports(sys.argv[1])))", path],
        capture_output=True, text=True, check=True)
    from_pool = [tuple(e) for e in json.loads(listing.stdout)]
    with NBDClient(path, "0", other_process=True):  # the pool process is busy: this
        # process's next connections go to the worker
        assert list_exports(path) == from_pool
        assert ("web", "thin volume 4 (web), 8388608 bytes") in from_pool
        wait_worker_idle(server.directory)
        export = ClientExport.connect(path, "web")
        assert info(server.directory)["workers"][0]["connections"] == 1
        try:
            assert export.description == "thin volume 4 (web)" and export.size == 8 << 20
        finally:
            export.close()
        wait_worker_idle(server.directory)
        with pytest.raises(ExportNotFound, match="no volume is called 'nope'"):
            ClientExport.connect(path, "nope")


def test_one_client_process_is_served_in_one_place(server: ServerProcess) -> None:
    """nbdcopy's four connections (multi-conn) are one client: all stay where the first went."""
    path = str(server.nbd_socket)
    first = NBDClient(path, "0", other_process=True)  # to the pool process
    clients = [NBDClient(path, "0") for _ in range(3)]  # this process: the worker, then home
    try:
        state = info(server.directory)
        assert state["nbd_connections"] == 1 and state["workers"][0]["connections"] == 3, state
        data = os.urandom(4 * MiB)
        src = server.directory.parent / "src.bin"
        src.write_bytes(data)
        r = subprocess.run(["nbdcopy", "--connections=4", "--flush", str(src), server.uri(0)],
                           capture_output=True)
        assert r.returncode == 0, r.stderr
        assert clients[0].read(0, 4 * MiB) == data
    finally:
        first.close()
        for c in clients:
            c.close()


def _thread_cpus(pid: int) -> list[set[int]]:
    """The CPUs each thread of process ``pid`` may run on."""
    out = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            out.append(os.sched_getaffinity(int(tid)))
        except OSError:  # the thread just ended
            pass
    return out


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 CPUs or more")
def test_a_workers_pipelining_readers_share_the_next_cpu(server: ServerProcess) -> None:
    """The pool process's readers share spread_cpu(0), the worker's spread_cpu(1): two
    processes (two GILs) never pile onto one CPU while another waits."""
    path = str(server.nbd_socket)
    first = NBDClient(path, "0", other_process=True)  # the pool process
    a, b = NBDClient(path, "0"), NBDClient(path, "0")  # this process: both in the worker
    try:
        assert info(server.directory)["workers"][0]["connections"] == 2
        worker = info(server.directory)["workers"][0]["pid"]
        offsets = [i * 4096 for i in range(32)]
        every = os.sched_getaffinity(0)
        for _ in range(4):  # the CPU is chosen anew each time two readers join
            for _ in range(50):  # a burst usually arrives in one receive; allow for splits
                for c in (a, b):
                    c.read_pipelined(offsets, 4096)
                if _thread_cpus(worker).count({spread_cpu(1)}) >= 2:
                    break
            assert _thread_cpus(worker).count({spread_cpu(1)}) >= 2, _thread_cpus(worker)
            time.sleep(0.05)  # a pause: the next request makes a reader leave
            for c in (a, b):
                c.read(0, 4096)
            assert all(cpus == every for cpus in _thread_cpus(worker)), _thread_cpus(worker)
    finally:
        for c in (first, a, b):
            c.close()


def test_workers_and_tls_do_not_mix(pool: Path) -> None:
    r = tp("serve", pool, "--workers", "1", "--tls", "require", "--tls-creds", str(pool))
    assert r.returncode == 2 and b"--workers cannot be used with --tls" in r.stderr
