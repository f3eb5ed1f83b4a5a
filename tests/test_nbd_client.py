"""The NBD client (``thinpool.nbd.client``) against real servers.

Our own ``NBDServer`` serving thin volumes of a real pool (what the client
did is checked through the pool itself), ``qemu-nbd`` serving a raw file
(checked against the file), our server forwarding through the client
(``qemu-io`` -> worker server -> ClientExport -> pool server), and small
hand-made servers (the real server-side protocol machine for the handshake)
that break the protocol on purpose.
"""

from __future__ import annotations

import errno
import os
import random
import shutil
import socket
import struct
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest

from conftest import require_tool
from thinmodel import assert_thin_check_clean
from thinpool.errors import DataPathError
from thinpool.nbd import protocol as P
from thinpool.nbd.backend import NBD_STATE_HOLE, NBD_STATE_ZERO, ExportNotFound
from thinpool.nbd.client import ClientExport, NBDClientError, list_exports
from thinpool.nbd.server import NBDServer
from thinpool.pool.engine import Pool
from thinpool.server.exports import PoolCatalog

MiB = 1 << 20
VOL = 48 * MiB
BS = 64 << 10


@pytest.fixture
def sockdir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="nbdc", dir="/tmp"))  # unix socket paths: 107 bytes at most
    yield d
    shutil.rmtree(d, ignore_errors=True)


class Served:
    def __init__(self, pool: Pool, server: NBDServer, sock: str) -> None:
        self.pool, self.server, self.sock = pool, server, sock

    def volume_bytes(self, dev_id: int, offset: int, length: int) -> bytes:
        with self.pool.volume(dev_id) as v:
            return bytes(v.read(offset, length))


@pytest.fixture
def served(tmp_path: Path, sockdir: Path) -> Iterator[Served]:
    """A pool with volume 0 "web" (48 MiB) and read-only volume 1 (4 MiB), served over NBD."""
    d = str(tmp_path / "pool")
    Pool.create(d, "128M", "8M")
    pool = Pool(d)
    pool.create_thin(0, size=VOL, name="web")
    pool.create_thin(1, size=4 * MiB)
    with pool.volume(1) as v:
        v.write(0, b"read only!")
    server = NBDServer(PoolCatalog(pool, {1}), unix_path=sockdir / "pool.sock")
    server.start()
    try:
        yield Served(pool, server, str(sockdir / "pool.sock"))
    finally:
        server.stop()
        pool.close()
    assert_thin_check_clean(f"{d}/metadata")


def merged(extents: list[tuple[int, int]], length: int) -> list[tuple[int, int]]:
    """Extents clipped to ``length`` with equal neighbours merged (what the server sends)."""
    out: list[tuple[int, int]] = []
    pos = 0
    for n, flags in extents:
        n = min(n, length - pos)
        if n <= 0:
            break
        if out and out[-1][1] == flags:
            out[-1] = (out[-1][0] + n, flags)
        else:
            out.append((n, flags))
        pos += n
    return out


# -- against our own server -------------------------------------------------------------------

def test_handshake_matches_what_the_server_advertises(served: Served) -> None:
    for name in ("web", "1"):
        direct = PoolCatalog(served.pool, {1}).open_export(name)
        try:
            with ClientExport.connect(served.sock, name) as c:
                for attr in ("size", "read_only", "can_trim", "can_zero", "can_fast_zero", "can_cache",
                             "can_multi_conn", "block_sizes", "description"):
                    assert getattr(c, attr) == getattr(direct, attr), (name, attr)
                assert c.structured and c.context_id == P.BASE_ALLOCATION_ID
        finally:
            direct.close()
    assert list_exports(served.sock) == PoolCatalog(served.pool).list_exports()


def test_io_is_byte_exact_against_the_pool(served: Served) -> None:
    rng = random.Random(1)
    with ClientExport.connect(served.sock, "web") as c:
        blob = rng.randbytes(300_000)
        c.write(123_457, memoryview(blob), False)
        assert served.volume_bytes(0, 123_457, len(blob)) == blob
        back = bytearray(len(blob))
        c.readinto(123_457, memoryview(back))
        assert back == blob
        c.write(5 * MiB, memoryview(b"fua!" * 1024), True)
        c.flush()
        assert served.volume_bytes(0, 5 * MiB, 4096) == b"fua!" * 1024
        c.write_many([(10 * MiB + i * 8192, memoryview(bytes([i]) * 4096)) for i in range(40)])
        for i in range(40):
            assert served.volume_bytes(0, 10 * MiB + i * 8192, 4096) == bytes([i]) * 4096
        # a read larger than the maximum payload is split and pipelined
        c.write(VOL - 4096, memoryview(b"E" * 4096), False)
        whole = bytearray(40 * MiB)
        c.readinto(8 * MiB, memoryview(whole))
        assert bytes(whole) == served.volume_bytes(0, 8 * MiB, 40 * MiB)
        # trim and zeroing, then extents as the pool sees them
        c.trim(0, 4 * BS, False)
        assert served.volume_bytes(0, 0, 4 * BS) == bytes(4 * BS)
        c.write(20 * MiB, memoryview(b"z" * (3 * BS)), False)
        c.write_zeroes(20 * MiB, BS, False, False, False)
        c.write_zeroes(20 * MiB + BS, BS, True, False, True)
        c.write_zeroes(20 * MiB + 2 * BS + 100, 1000, True, True, False)
        got = served.volume_bytes(0, 20 * MiB, 3 * BS)
        assert got == bytes(2 * BS) + b"z" * 100 + bytes(1000) + b"z" * (BS - 1100)
        with served.pool.volume(0) as v:
            for off, length in ((0, VOL), (20 * MiB, 3 * BS), (123_457, 1)):
                assert c.extents(off, length) == merged(v.extents(off, length), length)
            states = dict(c.extents(20 * MiB, 3 * BS)[:1])
        assert 0 in states.values() or NBD_STATE_HOLE in states.values()
        assert c.extents(30 * MiB, BS) == [(BS, NBD_STATE_HOLE | NBD_STATE_ZERO)]
        c.cache(0, VOL)


def test_large_sparse_read_comes_back_as_zeros(served: Served) -> None:
    with ClientExport.connect(served.sock, "web") as c:
        c.write(MiB + 512, memoryview(b"a" * 5000), False)
        c.write(7 * MiB, memoryview(b"b" * BS), False)
        buf = bytearray(b"\xff") * (16 * MiB)  # holes must be zeroed, not left as they were
        c.readinto(0, memoryview(buf))
        expected = bytearray(16 * MiB)
        expected[MiB + 512:MiB + 5512] = b"a" * 5000
        expected[7 * MiB:7 * MiB + BS] = b"b" * BS
        assert buf == expected


def test_eight_threads_pipelining_mixed_requests(served: Served) -> None:
    region = 4 * MiB
    errors: list[BaseException] = []
    models = [bytearray(region) for _ in range(8)]
    with ClientExport.connect(served.sock, "web") as c:
        def work(t: int) -> None:
            rng = random.Random(t)
            base, model = t * region, models[t]
            try:
                for _ in range(500):
                    op = rng.random()
                    off = rng.randrange(0, region - BS) // 512 * 512
                    n = rng.randrange(1, 64) * 512
                    if op < 0.4:
                        data = rng.randbytes(n)
                        c.write(base + off, memoryview(data), rng.random() < 0.1)
                        model[off:off + n] = data
                    elif op < 0.8:
                        buf = bytearray(n)
                        c.readinto(base + off, memoryview(buf))
                        assert buf == model[off:off + n], (t, off, n)
                    elif op < 0.87:
                        c.write_zeroes(base + off, n, rng.random() < 0.5, False, False)
                        model[off:off + n] = bytes(n)
                    elif op < 0.92:
                        blk = off // BS * BS
                        c.trim(base + blk, BS, False)
                        model[blk:blk + BS] = bytes(BS)
                    elif op < 0.97:
                        assert sum(length for length, _ in c.extents(base + off, n)) == n
                    else:
                        c.flush()
            except BaseException as e:
                errors.append(e)

        threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(120)
        assert not errors, errors[0]
        assert not any(th.is_alive() for th in threads)
    for t in range(8):
        assert served.volume_bytes(0, t * region, region) == models[t], t


def test_unknown_export_is_export_not_found(served: Served) -> None:
    for name in ("nosuch", "", "77"):
        with pytest.raises(ExportNotFound) as e:
            ClientExport.connect(served.sock, name)
        assert "\n" not in str(e.value)
    assert "no volume is called 'nosuch'" in str(pytest.raises(
        ExportNotFound, ClientExport.connect, served.sock, "nosuch").value)


def test_server_errors_become_data_path_errors(served: Served) -> None:
    with ClientExport.connect(served.sock, "1") as ro:
        assert ro.read_only
        with pytest.raises(DataPathError) as e:
            ro.write(0, memoryview(b"x" * 512), False)
        assert e.value.errno == errno.EPERM and "read-only" in str(e.value)
        with pytest.raises(DataPathError) as e:
            ro.trim(0, 4096, False)
        assert e.value.errno == errno.EPERM
        buf = bytearray(10)
        ro.readinto(0, memoryview(buf))  # the connection goes on
        assert buf == b"read only!"
    with ClientExport.connect(served.sock, "web") as c:
        with pytest.raises(DataPathError) as e:
            c.write(VOL - 512, memoryview(bytes(1024)), False)
        assert e.value.errno == errno.ENOSPC and "beyond the end" in str(e.value)
        with pytest.raises(DataPathError) as e:
            c.readinto(VOL, memoryview(bytearray(512)))
        assert e.value.errno == errno.EINVAL
        with pytest.raises(DataPathError) as e:
            c.extents(VOL - 512, 1024)
        assert e.value.errno == errno.EINVAL
        c.write(0, memoryview(b"still fine"), False)
        assert served.volume_bytes(0, 0, 10) == b"still fine"


def test_server_stopped_while_requests_are_in_flight(served: Served) -> None:
    c = ClientExport.connect(served.sock, "web")
    outcome: list[BaseException] = []
    started = threading.Barrier(9)

    def hammer(t: int) -> None:
        buf = memoryview(bytearray(64 << 10))
        started.wait()
        try:
            while True:
                if t % 2:
                    c.write(t * MiB, buf, False)
                else:
                    c.readinto(t * MiB, buf)
        except BaseException as e:
            outcome.append(e)

    threads = [threading.Thread(target=hammer, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    started.wait()
    time.sleep(0.2)
    t0 = time.monotonic()
    served.server.stop()
    for th in threads:
        th.join(10)
    assert not any(th.is_alive() for th in threads), "a caller hangs after the server stopped"
    assert time.monotonic() - t0 < 10
    assert len(outcome) == 8
    for e in outcome:
        assert isinstance(e, DataPathError) and e.errno == errno.EIO, repr(e)
        assert "connection to the pool server lost" in str(e)
    t0 = time.monotonic()
    with pytest.raises(DataPathError) as later:
        c.flush()
    assert later.value.errno == errno.EIO and time.monotonic() - t0 < 1
    c.close()
    c.close()
    assert not any(t.name.startswith("nbd-client") for t in threading.enumerate())


def test_forwarding_worker_serves_real_clients(served: Served, sockdir: Path) -> None:
    """The use case: a second NBDServer whose exports are ClientExports to the pool server."""

    class Forward:
        def list_exports(self) -> list[tuple[str, str]]:
            return list_exports(served.sock)

        def open_export(self, name: str) -> ClientExport:
            return ClientExport.connect(served.sock, name)

    worker = NBDServer(Forward(), unix_path=sockdir / "worker.sock")
    worker.start()
    try:
        uri = f"nbd+unix:///web?socket={sockdir / 'worker.sock'}"
        r = subprocess.run([require_tool("qemu-io"), "-f", "raw", "-c", "write -P 0x5a 1M 3M",
                            "-c", "write -z 8M 1M", "-c", "read -P 0x5a 1M 3M", "-c", "flush", uri],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and "Pattern verification failed" not in r.stdout, r.stdout + r.stderr
        assert served.volume_bytes(0, MiB, 3 * MiB) == b"\x5a" * (3 * MiB)
        r = subprocess.run([require_tool("nbdinfo"), "--map", uri], capture_output=True, text=True,
                           timeout=60)
        assert r.returncode == 0, r.stderr
        with served.pool.volume(0) as v:
            expected = merged(v.extents(0, VOL), VOL)
        rows = [line.split() for line in r.stdout.splitlines()]
        assert [(int(row[1]), int(row[2])) for row in rows] == expected
        r = subprocess.run([require_tool("nbdinfo"), f"nbd+unix:///nosuch?socket={sockdir / 'worker.sock'}"],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode != 0 and ("No such file" in r.stderr or "no export named" in r.stderr)
    finally:
        worker.stop()


# -- against qemu-nbd ---------------------------------------------------------------------------

@pytest.fixture
def qemu(tmp_path: Path, sockdir: Path) -> Iterator[tuple[str, Path]]:
    image = tmp_path / "disk.raw"
    with open(image, "wb") as f:
        f.truncate(16 * MiB)
        f.seek(3 * MiB)
        f.write(b"q" * 8192)
    sock = sockdir / "qemu.sock"
    proc = subprocess.Popen([require_tool("qemu-nbd"), "-k", str(sock), "-f", "raw", "-x", "disk",
                             "--persistent", "--shared=8", str(image)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while not sock.exists():
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline, "qemu-nbd did not start"
            time.sleep(0.02)
        yield str(sock), image
    finally:
        proc.terminate()
        proc.wait(10)
        if proc.stderr:
            proc.stderr.close()


def test_against_qemu_nbd(qemu: tuple[str, Path]) -> None:
    sock, image = qemu
    assert [name for name, _ in list_exports(sock)] == ["disk"]
    with pytest.raises(ExportNotFound):
        ClientExport.connect(sock, "nosuch")
    with ClientExport.connect(sock, "disk") as c:
        assert c.size == 16 * MiB and not c.read_only and c.structured and c.context_id is not None
        assert c.can_trim and c.can_zero and c.block_sizes[2] == 32 * MiB
        data = os.urandom(200_000)
        c.write(5 * MiB + 512, memoryview(data), False)
        c.flush()
        with open(image, "rb") as f:
            f.seek(5 * MiB + 512)
            assert f.read(len(data)) == data
        whole = bytearray(b"\xee") * (16 * MiB)
        c.readinto(0, memoryview(whole))
        assert whole == image.read_bytes()
        c.write_zeroes(3 * MiB, 4096, False, False, False)
        with open(image, "rb") as f:
            f.seek(3 * MiB)
            assert f.read(8192) == bytes(4096) + b"q" * 4096
        ext = c.extents(0, 16 * MiB)
        assert sum(n for n, _ in ext) <= 16 * MiB and ext[0] == (3 * MiB, NBD_STATE_HOLE | NBD_STATE_ZERO)
        pos = 0
        for n, flags in ext:  # the data qemu reports is where the file has data
            if not flags & NBD_STATE_ZERO:
                assert any(b for b in whole[pos:pos + n])
            else:
                assert not any(whole[pos:pos + n])
            pos += n
        with pytest.raises(DataPathError) as e:
            c.readinto(16 * MiB, memoryview(bytearray(512)))
        assert e.value.errno == errno.EINVAL


# -- servers that break the protocol --------------------------------------------------------------

class FakeServer:
    """Negotiates with the real protocol machine, then lets ``after`` misbehave."""

    def __init__(self, path: Path, after: Callable[[socket.socket, bytes], None],
                 greeting: bytes | None = None) -> None:
        self.path = path
        self.after = after
        self.greeting = greeting
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.listener.listen(1)
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        conn, _ = self.listener.accept()
        with conn:
            if self.greeting is not None:
                try:
                    conn.sendall(self.greeting)
                    conn.shutdown(socket.SHUT_WR)
                    while conn.recv(100):
                        pass
                except OSError:  # the client may hang up first
                    pass
                return
            proto = P.ServerConnection()
            while True:
                conn.sendall(proto.data_to_send())
                ev = proto.next_event()
                if ev is P.NEED_DATA:
                    conn.sendall(proto.data_to_send())
                    proto.buffer_updated(conn.recv_into(proto.get_buffer()))
                elif isinstance(ev, P.ExportRequest):
                    proto.accept_export(P.ExportInfo(name=ev.name, size=MiB))
                    if ev.kind is P.ExportRequestKind.GO:
                        conn.sendall(proto.data_to_send())
                        break
                elif isinstance(ev, P.Closed):
                    return
            request = conn.recv(28 + 4096)
            self.after(conn, request)

    def close(self) -> None:
        self.thread.join(10)
        self.listener.close()


def _cookie(request: bytes) -> int:
    return int.from_bytes(request[8:16], "big")


def _data_chunk(cookie: int, offset: int, data: bytes) -> bytes:
    return struct.pack(">IHHQIQ", P.STRUCTURED_REPLY_MAGIC, P.REPLY_FLAG_DONE, P.REPLY_TYPE_OFFSET_DATA,
                       cookie, 8 + len(data), offset) + data


@pytest.mark.parametrize("reply", ["bad magic", "outside", "short read", "eof"])
def test_broken_replies_end_the_connection_without_a_hang(sockdir: Path, reply: str) -> None:
    def after(conn: socket.socket, request: bytes) -> None:
        cookie = _cookie(request)
        if reply == "bad magic":
            conn.sendall(b"\xde\xad\xbe\xef" + bytes(40))
        elif reply == "outside":  # a data chunk beyond the requested range
            conn.sendall(_data_chunk(cookie, 4096, bytes(512)))
        elif reply == "short read":  # DONE after half of the data
            conn.sendall(_data_chunk(cookie, 0, bytes(256)))
            conn.recv(100)
            return
        time.sleep(0.2)

    fake = FakeServer(sockdir / "fake.sock", after)
    try:
        c = ClientExport.connect(str(sockdir / "fake.sock"), "x")
        assert c.size == MiB
        t0 = time.monotonic()
        with pytest.raises(DataPathError) as e:
            c.readinto(0, memoryview(bytearray(512)))
        assert e.value.errno == errno.EIO and time.monotonic() - t0 < 5
        if reply == "short read":  # only that read failed; then the server hangs up
            assert "covered 256 of 512 bytes" in str(e.value)
        else:
            assert "connection to the pool server lost" in str(e.value)
            with pytest.raises(DataPathError) as later:
                c.flush()
            assert later.value.errno == errno.EIO
        c.close()
    finally:
        fake.close()


def test_close_while_callers_wait_fails_them_at_once(sockdir: Path) -> None:
    """A server that never answers: one caller reads (inside recv), others sleep;
    close() fails them all with EIO and returns."""
    def after(conn: socket.socket, request: bytes) -> None:
        while conn.recv(4096):
            pass

    fake = FakeServer(sockdir / "fake.sock", after)
    try:
        c = ClientExport.connect(str(sockdir / "fake.sock"), "x")
        outcome: list[BaseException] = []

        def call(k: int) -> None:
            try:
                c.readinto(k * 4096, memoryview(bytearray(4096)))
            except BaseException as e:
                outcome.append(e)

        threads = [threading.Thread(target=call, args=(k,)) for k in range(4)]
        for th in threads:
            th.start()
        time.sleep(0.3)
        assert not outcome  # all waiting
        t0 = time.monotonic()
        c.close()
        for th in threads:
            th.join(5)
        assert not any(th.is_alive() for th in threads) and time.monotonic() - t0 < 5
        assert len(outcome) == 4
        assert all(isinstance(e, DataPathError) and e.errno == errno.EIO for e in outcome), outcome
        with pytest.raises(DataPathError):
            c.flush()
    finally:
        fake.close()


@pytest.mark.parametrize("greeting, message", [
    (b"HTTP/1.1 400 Bad Request\r\n", "not an NBD server"),
    (P.NBDMAGIC.to_bytes(8, "big") + (0x00420281861253).to_bytes(8, "big") + bytes(2), "oldstyle"),
    (P.NBDMAGIC.to_bytes(8, "big") + P.IHAVEOPT.to_bytes(8, "big") + bytes(2), "fixed newstyle"),
    (b"NBDMAG", "closed the connection"),
])
def test_handshake_garbage_is_a_one_line_error(sockdir: Path, greeting: bytes, message: str) -> None:
    fake = FakeServer(sockdir / "fake.sock", lambda c, r: None, greeting=greeting)
    try:
        with pytest.raises(NBDClientError) as e:
            ClientExport.connect(str(sockdir / "fake.sock"), "x", timeout=5)
        assert message in str(e.value) and "\n" not in str(e.value)
    finally:
        fake.close()


def test_no_server_and_handshake_timeout(sockdir: Path) -> None:
    with pytest.raises(NBDClientError, match="cannot connect to the NBD server at .*No such file"):
        ClientExport.connect(str(sockdir / "none.sock"), "x")
    silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    silent.bind(str(sockdir / "silent.sock"))
    silent.listen(1)
    try:
        t0 = time.monotonic()
        with pytest.raises(NBDClientError, match="timed out"):
            list_exports(str(sockdir / "silent.sock"), timeout=0.3)
        assert time.monotonic() - t0 < 3
    finally:
        silent.close()
