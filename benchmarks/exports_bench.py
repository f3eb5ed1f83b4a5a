#!/usr/bin/env python3
"""Exports benchmark: the pool server (`thinpool serve`) against qemu-nbd, nbdkit and raw files.

Every figure is a ratio measured in one run, on the same disk, with the same
client for every target; rounds interleave the targets (a fresh pool, file and
server per round and part), and the tables show medians of the per-round
ratios. Parts (``--parts``, default all):

nbd          NBD with no kernel involved. Targets: ``thinpool`` (thin volumes of
             a pool served by ``thinpool serve``), ``qcow2`` (qemu-nbd on a
             qcow2), ``nbdkit`` (``nbdkit file`` on a raw file) and ``raw`` (the
             limit: fio libaio O_DIRECT on a raw file, no server). On a fresh
             volume: seqw/seqr (``nbdcopy --request-size=1M``, 512 MiB; raw:
             fio 1 MiB iodepth 8), randw/randr at queue depth 1 and 16 (fio's
             nbd engine, 4 KiB, time based), prov1/prov16 (one 4 KiB write into
             every 64 KiB block of a fresh volume: provisioning). On a fresh
             snapshot of a fully written origin (thinpool) against a fresh
             qcow2 overlay over a fully written qcow2 (``overlay``): snap-seqr
             (read through to shared data), cow-seqw (nbdcopy over it: whole
             blocks), cow1/cow16 (one 4 KiB write into every 64 KiB block:
             every write copies a block).
kernel       A block device. ``thinpool attach`` (FUSE file + loop, direct I/O)
             against qemu-nbd -> nbdfuse -> loop (direct I/O) and loop on a raw
             sparse file (the limit): fio libaio O_DIRECT on the device
             (dev-*), then mkfs.ext4 (same options for all), mount
             (``thinpool mount`` for ours) and fio on a 512 MiB file in it
             (fs-*): 1 MiB iodepth 8 sequential, 4 KiB iodepth 16 random.
concurrency  8 fio clients on 8 volumes (one connection each) against one
             client on one volume, aggregate throughput; the same jobs in the
             same rounds on 8 qemu-nbd processes (one per qcow2) and 8 ``nbdkit
             file`` processes (one per raw file), each image filled first like
             thinpool's volumes: their 8 / 1 ratios show what the machine
             allows (targets ``qemu-nbd``, ``nbdkit``). The 4 KiB jobs run a
             third time with 8 clients each over an eighth of its volume
             ("same data": as many bytes as the one client touches), which
             tells concurrency apart from a working set 8 times as large
             (page cache, the kernel's per-page structures, the CPU's
             caches). And read latency (4 KiB
             random reads, queue depth 1) on one volume idle and while another
             volume takes copy-on-write writes (a fresh snapshot of a fully
             written origin, one 4 KiB write into every block, iodepth 16).
rss          VmHWM of the server process with 100 volumes exported and 16
             clients connected, each writing (1 MiB, iodepth 8) and then
             reading and writing at random (4 KiB, iodepth 16).

Server CPU time (user + system of the serving processes, /proc/PID/stat) per
GiB or per request is printed next to throughput: it is far less sensitive to
other load on a shared machine. Everything started (servers, FUSE mounts, loop
devices, mounts) is torn down in reverse order, also on errors and Ctrl-C.

Usage (root): python3 benchmarks/exports_bench.py [--quick] [--rounds 3]
    [--seconds 10] [--parts nbd,kernel,concurrency,rss] [--tmp DIR] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT / "src"))
from _benchlib import fs_of, median, steady_guest_memory, table  # noqa: E402

from thinpool.pool.config import PoolConfig  # noqa: E402
from thinpool.pool.engine import Pool  # noqa: E402
from thinpool.server import control  # noqa: E402

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
BLOCK = 64 * KiB  # thinpool data block = qcow2 cluster
CLK = os.sysconf("SC_CLK_TCK")
PARTS = ("nbd", "kernel", "concurrency", "rss")
MKFS = ["mkfs.ext4", "-q", "-F", "-E", "nodiscard,lazy_itable_init=0,lazy_journal_init=0"]


@dataclass
class Params:
    rounds: int
    seconds: float  # each time-based random job
    copy: int  # bytes of the sequential jobs = NBD volume size
    kvol: int  # kernel part volume size
    kfile: int  # fio file / device span in the kernel part
    origin: int  # latency part: origin size (copy-on-write writes keep going this long)
    rss_volumes: int = 100
    rss_clients: int = 16
    rss_vol: int = 64 * MiB


FULL = Params(rounds=3, seconds=10, copy=512 * MiB, kvol=GiB, kfile=512 * MiB,
              origin=2 * GiB)
QUICK = Params(rounds=1, seconds=2, copy=128 * MiB, kvol=512 * MiB, kfile=128 * MiB,
               origin=512 * MiB, rss_vol=32 * MiB)


# ---- processes and cleanup -----------------------------------------------------------------

def _on_signal(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


class Cleanup:
    """A stack of undo actions, run in reverse order; each failure is reported, not raised."""

    def __init__(self) -> None:
        self._stack: list[tuple[str, Callable[[], None]]] = []

    def push(self, what: str, fn: Callable[[], None]) -> Callable[[], None]:
        item = (what, fn)
        self._stack.append(item)

        def run_now() -> None:
            if item in self._stack:
                self._stack.remove(item)
                fn()
        return run_now

    def run_all(self) -> None:
        while self._stack:
            what, fn = self._stack.pop()
            try:
                fn()
            except BaseException as e:  # noqa: BLE001 - keep cleaning up
                print(f"cleanup: {what}: {e}", file=sys.stderr)


CLEANUP = Cleanup()


def sh(*args: object, check: bool = True, timeout: float | None = 600) -> subprocess.CompletedProcess[str]:
    r = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout,
                       start_new_session=True)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, args))}: {(r.stderr or r.stdout).strip()[-500:]}")
    return r


def spawn(argv: list[str], log: Path | None = None, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    out = open(log, "ab") if log else subprocess.DEVNULL
    try:
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT if log else subprocess.DEVNULL,
                                stdin=subprocess.DEVNULL, env=env, start_new_session=True)
    finally:
        if log:
            out.close()  # type: ignore[union-attr]


def end_process(p: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 30) -> None:
    if p.poll() is None:
        p.send_signal(sig)
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def wait_for(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.02)


def cpu_seconds(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / CLK
        except (OSError, IndexError):
            pass
    return total


def status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/{pid}/status")


def nbd_ready(uri: str) -> bool:
    return sh("nbdinfo", "--size", uri, check=False, timeout=10).returncode == 0


def settle() -> None:
    """Write back dirty pages left by the previous target, so it does not slow the next one."""
    os.sync()


# ---- fio and nbdcopy -------------------------------------------------------------------------

@dataclass
class Result:
    value: float  # MiB/s or IOPS
    ios: int  # requests (random jobs) for CPU per request
    nbytes: int
    p50_us: float = float("nan")
    p99_us: float = float("nan")
    runtime: float = float("nan")  # seconds


def fio_args(rw: str, bs: str, depth: int, size: int, seconds: float | None = None,
             strided: bool = False) -> list[str]:
    a = [f"--rw={rw}", f"--bs={bs}", f"--iodepth={depth}", f"--size={size}",
         "--output-format=json"]
    if seconds is not None:
        a += [f"--runtime={seconds}", "--time_based", "--randrepeat=0"]
    if strided:  # one 4 KiB write into every 64 KiB block
        a += [f"--io_size={size // BLOCK * 4 * KiB}", "--zonemode=strided", "--zonesize=4k",
              f"--zoneskip={BLOCK - 4 * KiB}"]
    if "write" in rw:
        a.append("--end_fsync=1")
    return a


def run_fio(target: list[str], args: list[str], name: str = "b") -> list[dict[str, Any]]:
    """fio on ``target`` (``--ioengine=... --uri/--filename``); one dict per job."""
    r = sh("fio", f"--name={name}", *target, *args)
    out = r.stdout
    return json.loads(out[out.index("{"):])["jobs"]  # the nbd engine prints a line first


def job_result(job: dict[str, Any], rw: str, iops: bool) -> Result:
    """A fio job's figure: IOPS (4 KiB jobs) or MiB/s, with clat percentiles."""
    side = job["write" if "write" in rw else "read"]
    pct = side["clat_ns"].get("percentile", {})
    return Result(side["iops"] if iops else side["bw_bytes"] / MiB, side["total_ios"],
                  side["io_bytes"], pct.get("50.000000", float("nan")) / 1000,
                  pct.get("99.000000", float("nan")) / 1000, side["runtime"] / 1000)


def nbd_target(uri: str) -> list[str]:
    return ["--ioengine=nbd", f"--uri={uri}"]


def file_target(path: str | Path) -> list[str]:
    return ["--ioengine=libaio", "--direct=1", f"--filename={path}"]


def fio_one(target: list[str], rw: str, bs: str, depth: int, size: int,
            seconds: float | None = None, strided: bool = False) -> Result:
    job = run_fio(target, fio_args(rw, bs, depth, size, seconds, strided))[0]
    return job_result(job, rw, bs == "4k")


def nbdcopy(src: str, dst: str, nbytes: int) -> Result:
    argv = ["nbdcopy", "--request-size=1048576"] + (["--flush"] if not dst.startswith("null") else []) \
        + [src, dst]
    t0 = time.perf_counter()
    sh(*argv)
    wall = time.perf_counter() - t0
    return Result(nbytes / MiB / wall, 0, nbytes, runtime=wall)


# ---- servers ---------------------------------------------------------------------------------

class ThinpoolServer:
    """A fresh pool in ``path`` and ``thinpool serve`` on it."""

    def __init__(self, path: Path, data_size: int, src: Path = ROOT / "src",
                 workers: int = 0) -> None:
        self.path = path
        Pool.create(str(path), data_size, 512 * MiB, PoolConfig(data_block_sectors=BLOCK // 512))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            [str(src)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
        self.proc = spawn([sys.executable, "-m", "thinpool.cli", "serve", str(path),
                           *(["--workers", str(workers)] if workers else [])],
                          log=path / "serve.log", env=env)
        self._undo = CLEANUP.push(f"thinpool server {path}", self._shutdown)
        self.control = str(path / "control.sock")
        self.socket = str(path / "nbd.sock")

        def up() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"thinpool serve exited: {self.log_tail()}")
            try:
                control.connect(self.control).close()
                return True
            except OSError:
                return False
        wait_for(up, 60, "thinpool serve")
        self.next_id = 1

    @property
    def pids(self) -> list[int]:
        """The server's process and its NBD workers'."""
        workers = self.call("server-info").get("workers") or []
        return [self.proc.pid] + [w["pid"] for w in workers]

    def log_tail(self) -> str:
        try:
            return (self.path / "serve.log").read_text().strip().splitlines()[-1]
        except (OSError, IndexError):
            return "(no log)"

    def call(self, command: str, **args: Any) -> dict[str, Any]:
        return control.request(self.control, command, args)

    def create_thin(self, size: int) -> int:
        i = self.next_id
        self.next_id += 1
        self.call("create-thin", id=i, size=size, name=None, origin=None)
        return i

    def create_snap(self, origin: int) -> int:
        i = self.next_id
        self.next_id += 1
        self.call("create-snap", id=i, origin_id=origin, name=None)
        return i

    def uri(self, dev_id: int) -> str:
        return f"nbd+unix:///{dev_id}?socket={self.socket}"

    def stop(self) -> None:
        self._undo()

    def _shutdown(self) -> None:
        try:
            if self.proc.poll() is None:
                self.call("stop", force=True)
                self.proc.wait(120)
        except BaseException:
            end_process(self.proc, signal.SIGTERM, 60)
            if self.proc.poll() is None:
                end_process(self.proc, signal.SIGKILL)
        # whatever a dead server left (mounts, loop devices, its FUSE mount)
        if (self.path / "server.json").exists() or (self.path / ".fuse").is_dir() and \
                sh("mountpoint", "-q", self.path / ".fuse", check=False).returncode == 0:
            sh(sys.executable, "-m", "thinpool.cli", "stop", "--force", self.path, check=False)


class NbdProcess:
    """qemu-nbd or nbdkit serving one image on a unix socket (foreground process)."""

    def __init__(self, kind: str, image: Path, sock: Path, fmt: str = "qcow2") -> None:
        sock.unlink(missing_ok=True)
        if kind == "qemu-nbd":
            argv = ["qemu-nbd", "-f", fmt, "-k", str(sock), "-t", "-e", "8", "--discard=unmap",
                    str(image)]
        else:
            argv = ["nbdkit", "-f", "-U", str(sock), "file", str(image)]
        self.proc = spawn(argv)
        self.sock = sock
        self._undo = CLEANUP.push(f"{kind} {image}", lambda: end_process(self.proc))
        self.uri = f"nbd+unix:///?socket={sock}"

        def up() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{kind} on {image} exited with {self.proc.returncode}")
            return sock.exists() and nbd_ready(self.uri)
        wait_for(up, 30, f"{kind} on {image}")

    @property
    def pids(self) -> list[int]:
        return [self.proc.pid]

    def stop(self) -> None:
        self._undo()
        self.sock.unlink(missing_ok=True)


def new_sparse(path: Path, size: int) -> Path:
    path.unlink(missing_ok=True)
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def qcow2(path: Path, size: int, backing: Path | None = None) -> Path:
    path.unlink(missing_ok=True)
    if backing is None:
        sh("qemu-img", "create", "-q", "-f", "qcow2", path, str(size))
    else:
        sh("qemu-img", "create", "-q", "-f", "qcow2", "-b", backing, "-F", "qcow2", path, str(size))
    return path


# ---- measurement bookkeeping -----------------------------------------------------------------

class Book:
    """results[part][workload][target] = per-round values; cpu likewise (per GiB or request)."""

    def __init__(self) -> None:
        self.values: dict[str, dict[str, dict[str, list[float]]]] = {}
        self.cpu: dict[str, dict[str, dict[str, list[float]]]] = {}
        self.extra: dict[str, Any] = {}

    def add(self, part: str, workload: str, target: str, value: float, cpu: float | None = None) -> None:
        self.values.setdefault(part, {}).setdefault(workload, {}).setdefault(target, []).append(value)
        if cpu is not None:
            self.cpu.setdefault(part, {}).setdefault(workload, {}).setdefault(target, []).append(cpu)

    def get(self, part: str, workload: str, target: str) -> list[float]:
        return self.values.get(part, {}).get(workload, {}).get(target, [])

    def ratio(self, part: str, workload: str, ours: str, peer: str,
              peer_workload: str | None = None) -> float:
        a = self.get(part, workload, ours)
        b = self.get(part, peer_workload or workload, peer)
        rs = [x / y for x, y in zip(a, b) if y]
        return median(rs)

    def cpu_median(self, part: str, workload: str, target: str) -> float:
        return median(self.cpu.get(part, {}).get(workload, {}).get(target, []))


def steal_seconds() -> float:
    """CPU time the hypervisor has taken from this machine so far (all CPUs, /proc/stat)."""
    with open("/proc/stat") as f:
        return int(f.readline().split()[8]) / CLK


def measured(book: Book, part: str, workload: str, target: str, pids: list[int],
             run: Callable[[], Result], unit: str) -> Result:
    """Run one job, record its value, the servers' CPU per GiB (seq) or per request (random),
    and the CPUs the hypervisor took meanwhile (``<workload> steal``, on average)."""
    c0, s0, t0 = cpu_seconds(pids), steal_seconds(), time.monotonic()
    r = run()
    c = cpu_seconds(pids) - c0
    book.add(part, workload + " steal", target,
             (steal_seconds() - s0) / max(time.monotonic() - t0, 1e-9))
    if not pids:
        per = None
    elif unit == "IOPS":
        per = c / max(r.ios, 1) * 1e6  # µs per request
    else:
        per = c / (r.nbytes / GiB)  # s per GiB
    book.add(part, workload, target, r.value, per)
    if not math.isnan(r.p99_us):
        book.add(part, workload + " p99", target, r.p99_us)
        book.add(part, workload + " p50", target, r.p50_us)
    return r


class Targets:
    """The ``--targets`` filter (all by default), and the optional ``baseline``: thinpool
    served from another source tree (``--baseline-src``), to measure a change in one run."""

    chosen: set[str] | None = None
    baseline: Path | None = None
    workers = 0  # ``serve --workers`` of target thinpool (``--workers``)
    baseline_workers = 0  # ... and of target baseline (``--baseline-workers``)

    def workers_of(self, target: str) -> int:
        return self.baseline_workers if target == "baseline" else self.workers

    def select(self, names: list[str]) -> list[str]:
        if self.baseline is not None and names[0] == "thinpool":
            names = names[:1] + ["baseline"] + names[1:]
        return [n for n in names if self.chosen is None or n in self.chosen or n == "baseline"]

    def src(self, target: str) -> Path:
        return self.baseline if target == "baseline" and self.baseline else ROOT / "src"


TARGETS = Targets()
ALL_TARGETS = ("thinpool", "qcow2", "nbdkit", "raw", "overlay", "qemu-nbdfuse", "raw-loop",
               "qemu-nbd")


def baseline_report(book: Book) -> str:
    """thinpool against the baseline source tree, where both ran."""
    rows = []
    for part, jobs in (("nbd", NBD_FRESH + NBD_SNAP), ("kernel", KERNEL)):
        for w, unit in jobs:
            if book.get(part, w, "baseline") and book.get(part, w, "thinpool"):
                per = "s/GiB" if unit == "MiB/s" else "µs/req"
                ca, cb = book.cpu_median(part, w, "thinpool"), book.cpu_median(part, w, "baseline")
                rows.append([part, w, unit, median(book.get(part, w, "thinpool")),
                             median(book.get(part, w, "baseline")),
                             fmt_ratio(book.ratio(part, w, "thinpool", "baseline")), per, ca, cb,
                             fmt_ratio(cb / ca if ca else float("nan"))])
    return table(["part", "job", "unit", "thinpool", "baseline", "ratio", "CPU", "thinpool",
                  "baseline", "CPU base/ours"], rows)


def rotate(xs: list[str], r: int) -> list[str]:
    if not xs:
        return xs
    k = r % len(xs)
    return xs[k:] + xs[:k]


# ---- part 1: NBD -----------------------------------------------------------------------------

NBD_FRESH = [("seqw", "MiB/s"), ("seqr", "MiB/s"), ("randw1", "IOPS"), ("randw16", "IOPS"),
             ("randr1", "IOPS"), ("randr16", "IOPS"), ("prov1", "IOPS"), ("prov16", "IOPS")]
NBD_SNAP = [("snap-seqr", "MiB/s"), ("cow-seqw", "MiB/s"), ("cow1", "IOPS"), ("cow16", "IOPS")]
UNIT = dict(NBD_FRESH + NBD_SNAP)


def nbd_fresh_jobs(book: Book, target: str, pids: Callable[[], list[int]],
                   fresh: Callable[[], str], p: Params, src: Path) -> None:
    """The fresh-volume jobs on one target; ``fresh()`` gives a new export (URI or file path)."""
    raw = target == "raw"
    part = "nbd"
    size = p.copy
    t = (lambda e: file_target(e)) if raw else (lambda e: nbd_target(e))
    e = fresh()
    settle()
    if raw:
        measured(book, part, "seqw", target, [], lambda: fio_one(t(e), "write", "1M", 8, size), "MiB/s")
        measured(book, part, "seqr", target, [], lambda: fio_one(t(e), "read", "1M", 8, size), "MiB/s")
    else:
        measured(book, part, "seqw", target, pids(), lambda: nbdcopy(str(src), e, size), "MiB/s")
        measured(book, part, "seqr", target, pids(), lambda: nbdcopy(e, "null:", size), "MiB/s")
    for rw, name in (("randwrite", "randw"), ("randread", "randr")):
        for depth in (1, 16):
            measured(book, part, f"{name}{depth}", target, pids(),
                     lambda: fio_one(t(e), rw, "4k", depth, size, p.seconds), "IOPS")
    for depth in (1, 16):
        e = fresh()
        measured(book, part, f"prov{depth}", target, pids(),
                 lambda: fio_one(t(e), "write", "4k", depth, size, strided=True), "IOPS")


def nbd_snap_jobs(book: Book, target: str, pids: Callable[[], list[int]],
                  fresh_snap: Callable[[], str], p: Params, src: Path) -> None:
    part = "nbd"
    size = p.copy
    e = fresh_snap()
    settle()
    measured(book, part, "snap-seqr", target, pids(), lambda: nbdcopy(e, "null:", size), "MiB/s")
    measured(book, part, "cow-seqw", target, pids(), lambda: nbdcopy(str(src), e, size), "MiB/s")
    for depth in (1, 16):
        e = fresh_snap()
        measured(book, part, f"cow{depth}", target, pids(),
                 lambda: fio_one(nbd_target(e), "write", "4k", depth, size, strided=True), "IOPS")


def part_nbd(book: Book, p: Params, work: Path, src: Path, r: int) -> None:
    d = work / f"nbd-{r}"
    d.mkdir()
    try:
        for target in rotate(TARGETS.select(["thinpool", "qcow2", "nbdkit", "raw"]), r):
            t0 = time.monotonic()
            if target in ("thinpool", "baseline"):
                srv = ThinpoolServer(d / "pool", 6 * p.copy + 4 * GiB, TARGETS.src(target),
                                     TARGETS.workers_of(target))
                try:
                    nbd_fresh_jobs(book, target, lambda: srv.pids,
                                   lambda: srv.uri(srv.create_thin(p.copy)), p, src)
                finally:
                    srv.stop()
                    shutil.rmtree(d / "pool", ignore_errors=True)
            elif target in ("qcow2", "nbdkit"):
                current: list[NbdProcess] = []

                def fresh_export() -> str:
                    for s in current:
                        s.stop()
                    current.clear()
                    n = len(list(d.glob("img*")))
                    img = qcow2(d / f"img{n}.qcow2", p.copy) if target == "qcow2" else \
                        new_sparse(d / f"img{n}.raw", p.copy)
                    current.append(NbdProcess("qemu-nbd" if target == "qcow2" else "nbdkit", img,
                                              d / "s.sock"))
                    return current[0].uri
                try:
                    nbd_fresh_jobs(book, target, lambda: current[0].pids, fresh_export, p, src)
                finally:
                    for s in current:
                        s.stop()
            else:
                files: list[Path] = []

                def fresh_file() -> str:
                    files.append(new_sparse(d / f"raw{len(files)}.img", p.copy))
                    return str(files[-1])
                nbd_fresh_jobs(book, target, lambda: [], fresh_file, p, src)
            for f in d.glob("*"):
                if f.is_file():
                    f.unlink()
            print(f"  nbd round {r + 1} {target:8s} {time.monotonic() - t0:5.0f} s: "
                  + ", ".join(f"{w} {book.get('nbd', w, target)[-1]:,.0f}" for w, _ in NBD_FRESH),
                  flush=True)
        for target in rotate(TARGETS.select(["thinpool", "overlay"]), r):
            t0 = time.monotonic()
            if target in ("thinpool", "baseline"):
                srv = ThinpoolServer(d / "pool", 6 * p.copy + 4 * GiB, TARGETS.src(target),
                                     TARGETS.workers_of(target))
                try:
                    origin = srv.create_thin(p.copy)
                    nbdcopy(str(src), srv.uri(origin), p.copy)
                    nbd_snap_jobs(book, target, lambda: srv.pids,
                                  lambda: srv.uri(srv.create_snap(origin)), p, src)
                finally:
                    srv.stop()
                    shutil.rmtree(d / "pool", ignore_errors=True)
            else:
                base = d / "base.qcow2"
                sh("qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", src, base)
                current = []

                def fresh_overlay() -> str:
                    for s in current:
                        s.stop()
                    current.clear()
                    n = len(list(d.glob("ov*")))
                    img = qcow2(d / f"ov{n}.qcow2", p.copy, backing=base)
                    current.append(NbdProcess("qemu-nbd", img, d / "s.sock"))
                    return current[0].uri
                try:
                    nbd_snap_jobs(book, target, lambda: current[0].pids, fresh_overlay, p, src)
                finally:
                    for s in current:
                        s.stop()
            for f in d.glob("*"):
                if f.is_file():
                    f.unlink()
            print(f"  nbd round {r + 1} {target:8s} {time.monotonic() - t0:5.0f} s: "
                  + ", ".join(f"{w} {book.get('nbd', w, target)[-1]:,.0f}" for w, _ in NBD_SNAP),
                  flush=True)
    finally:
        shutil.rmtree(d, ignore_errors=True)


# ---- part 2: kernel block devices --------------------------------------------------------------

KERNEL = [("dev-seqw", "MiB/s"), ("dev-seqr", "MiB/s"), ("dev-randw16", "IOPS"),
          ("dev-randr16", "IOPS"), ("fs-seqw", "MiB/s"), ("fs-seqr", "MiB/s"),
          ("fs-randw16", "IOPS"), ("fs-randr16", "IOPS")]
UNIT.update(KERNEL)


def kernel_jobs(book: Book, target: str, device: str, pids: list[int], mnt: Path,
                mount: Callable[[], None], umount: Callable[[], None], p: Params) -> None:
    part = "kernel"
    dio = Path(f"/sys/block/{os.path.basename(device)}/loop/dio").read_text().strip()
    if dio != "1":
        raise RuntimeError(f"{target}: {device} did not get direct I/O")
    settle()
    for prefix, where in (("dev", device), ("fs", str(mnt / "fio.dat"))):
        if prefix == "fs":
            sh(*MKFS, device)
            mount()
        try:
            for name, rw, bs, depth in (("seqw", "write", "1M", 8), ("seqr", "read", "1M", 8),
                                        ("randw16", "randwrite", "4k", 16),
                                        ("randr16", "randread", "4k", 16)):
                measured(book, part, f"{prefix}-{name}", target, pids,
                         lambda: fio_one(file_target(where), rw, bs, depth, p.kfile,
                                         p.seconds if name.startswith("rand") else None),
                         UNIT[f"{prefix}-{name}"])
        finally:
            if prefix == "fs":
                umount()


def part_kernel(book: Book, p: Params, work: Path, r: int) -> None:
    d = work / f"kernel-{r}"
    d.mkdir()
    mnt = d / "mnt"
    mnt.mkdir()
    try:
        for target in rotate(TARGETS.select(["thinpool", "qemu-nbdfuse", "raw-loop"]), r):
            t0 = time.monotonic()
            if target in ("thinpool", "baseline"):
                srv = ThinpoolServer(d / "pool", 2 * p.kvol + 4 * GiB, TARGETS.src(target),
                                     TARGETS.workers_of(target))
                try:
                    vid = srv.create_thin(p.kvol)
                    device = srv.call("attach", id=vid)["device"]
                    kernel_jobs(book, target, device, srv.pids, mnt,
                                lambda: srv.call("mount", id=vid, mountpoint=str(mnt)),
                                lambda: srv.call("umount", mountpoint=str(mnt)), p)
                    srv.call("detach", target=str(vid))
                finally:
                    srv.stop()
                    shutil.rmtree(d / "pool", ignore_errors=True)
            elif target == "qemu-nbdfuse":
                img = qcow2(d / "vol.qcow2", p.kvol)
                srv2 = NbdProcess("qemu-nbd", img, d / "q.sock")
                fmnt = d / "fuse"
                fmnt.mkdir(exist_ok=True)
                fuse = spawn(["nbdfuse", str(fmnt / "vol"), srv2.uri])

                def stop_fuse() -> None:
                    if sh("mountpoint", "-q", fmnt, check=False).returncode == 0:
                        if sh("fusermount3", "-u", fmnt, check=False).returncode != 0:
                            sh("umount", "-l", fmnt, check=False)
                    end_process(fuse, signal.SIGTERM, 20)
                undo_fuse = CLEANUP.push("nbdfuse", stop_fuse)
                try:
                    wait_for(lambda: (fmnt / "vol").exists(), 30, "nbdfuse")
                    device = loop_attach(fmnt / "vol")
                    undo_loop = CLEANUP.push(f"loop {device}", lambda: loop_detach(device))
                    try:
                        kernel_jobs(book, target, device, srv2.pids + [fuse.pid], mnt,
                                    lambda: mount_fs(device, mnt), lambda: umount_fs(mnt), p)
                    finally:
                        undo_loop()
                finally:
                    undo_fuse()
                    srv2.stop()
            else:
                img = new_sparse(d / "raw.img", p.kvol)
                device = loop_attach(img)
                undo_loop = CLEANUP.push(f"loop {device}", lambda: loop_detach(device))
                try:
                    kernel_jobs(book, target, device, [], mnt, lambda: mount_fs(device, mnt),
                                lambda: umount_fs(mnt), p)
                finally:
                    undo_loop()
            for f in d.glob("*"):
                if f.is_file():
                    f.unlink()
            print(f"  kernel round {r + 1} {target:12s} {time.monotonic() - t0:5.0f} s: "
                  + ", ".join(f"{w} {book.get('kernel', w, target)[-1]:,.0f}" for w, _ in KERNEL),
                  flush=True)
    finally:
        shutil.rmtree(d, ignore_errors=True)


def loop_attach(path: Path) -> str:
    return sh("losetup", "-f", "--show", "--direct-io=on", path).stdout.strip()


def loop_detach(device: str) -> None:
    for _ in range(50):
        if sh("losetup", "-d", device, check=False).returncode == 0:
            return
        time.sleep(0.1)
    raise RuntimeError(f"losetup -d {device} keeps failing")


_MOUNTS: dict[Path, Callable[[], None]] = {}


def mount_fs(device: str, mnt: Path) -> None:
    sh("mount", device, mnt)
    _MOUNTS[mnt] = CLEANUP.push(f"mount {mnt}", lambda: _umount(mnt))


def umount_fs(mnt: Path) -> None:
    undo = _MOUNTS.pop(mnt, None)
    if undo is not None:
        undo()


def _umount(mnt: Path) -> None:
    if sh("mountpoint", "-q", mnt, check=False).returncode == 0:
        sh("umount", mnt)


# ---- part 3: concurrency -----------------------------------------------------------------------

CONC = [("randr16", "randread", "4k", 16), ("randw16", "randwrite", "4k", 16),
        ("seqr", "read", "1M", 8)]


def multi_fio(uris: list[str], rw: str, bs: str, depth: int, size: int, seconds: float | None,
              strided: bool = False) -> Result:
    """One fio process, one job (one NBD connection) per URI; the aggregate."""
    args = ["--ioengine=nbd", "--group_reporting"] + fio_args(rw, bs, depth, size, seconds, strided)
    jobs: list[str] = []
    for i, u in enumerate(uris):
        jobs += [f"--name=c{i}", f"--uri={u}"]
    r = sh("fio", *args, *jobs)
    out = r.stdout
    job = json.loads(out[out.index("{"):])["jobs"][0]
    return job_result(job, rw, bs == "4k")


CONC_PEERS = ("qemu-nbd", "nbdkit")  # 8 processes, one per image: what the machine allows


def conc_jobs(book: Book, target: str, pids: list[int], uris: list[str], p: Params, r: int) -> None:
    """The CONC jobs with 1 client, with 8 (one per URI) and, 4 KiB ones, with 8 over an eighth
    of their volumes each ("x8s"), the order alternating by round."""
    for name, rw, bs, depth in CONC:
        runs = [("x1", 1, p.copy), ("x8", 8, p.copy)] + \
            ([("x8s", 8, p.copy // 8)] if bs == "4k" else [])
        for key, clients, size in (runs if r % 2 == 0 else runs[::-1]):
            measured(book, "concurrency", f"{name} {key}", target, pids,
                     lambda: multi_fio(uris[:clients], rw, bs, depth, size, p.seconds),
                     "IOPS" if bs == "4k" else "MiB/s")


def conc_peer(book: Book, target: str, d: Path, src: Path, p: Params, r: int) -> None:
    """``target`` (qemu-nbd on qcow2 images or nbdkit file on raw files) as 8 processes, one
    per image, each image filled from ``src`` through its server first."""
    servers: list[NbdProcess] = []
    try:
        for i in range(8):
            img = qcow2(d / f"c{i}.qcow2", p.copy) if target == "qemu-nbd" else \
                new_sparse(d / f"c{i}.raw", p.copy)
            servers.append(NbdProcess(target, img, d / f"c{i}.sock"))
        for s in servers:
            nbdcopy(str(src), s.uri, p.copy)
        settle()
        conc_jobs(book, target, [pid for s in servers for pid in s.pids],
                  [s.uri for s in servers], p, r)
    finally:
        for s in servers:
            s.stop()


def conc_thinpool(book: Book, target: str, d: Path, src: Path, p: Params, r: int) -> None:
    """thinpool (or the baseline) serving 8 volumes, each filled from ``src``: the CONC jobs,
    then read latency on one volume, idle and beside copy-on-write writes to another."""
    srv = ThinpoolServer(d / "pool", 8 * p.copy + 3 * p.origin + 4 * GiB, TARGETS.src(target),
                         TARGETS.workers_of(target))
    try:
        vols = [srv.create_thin(p.copy) for _ in range(8)]
        for v in vols:
            nbdcopy(str(src), srv.uri(v), p.copy)
        settle()
        conc_jobs(book, target, srv.pids, [srv.uri(v) for v in vols], p, r)
        origin = srv.create_thin(p.origin)
        fio_one(nbd_target(srv.uri(origin)), "write", "1M", 8, p.origin)
        settle()
        read_latency(book, target, srv.uri(vols[0]), lambda: srv.uri(srv.create_snap(origin)),
                     lambda: None, p, r)
    finally:
        srv.stop()


def part_concurrency(book: Book, p: Params, work: Path, src: Path, r: int) -> None:
    d = work / f"conc-{r}"
    part = "concurrency"
    ours = ["thinpool"] + (["baseline"] if TARGETS.baseline else [])
    for target in rotate(ours + TARGETS.select(list(CONC_PEERS)), r):
        t0 = time.monotonic()
        d.mkdir()
        try:
            if target in ("thinpool", "baseline"):
                conc_thinpool(book, target, d, src, p, r)
            else:
                conc_peer(book, target, d, src, p, r)
        finally:
            shutil.rmtree(d, ignore_errors=True)
        print(f"  concurrency round {r + 1} {target:8s} {time.monotonic() - t0:5.0f} s: "
              + ", ".join(f"{w} {vals[target][-1]:,.1f} "
                          f"(steal {book.get(part, w + ' steal', target)[-1]:.2f})"
                          for w, vals in book.values[part].items()
                          if w.endswith((" x1", " x8", " x8s")) and target in vals), flush=True)
    t0 = time.monotonic()
    # the same latency test on qemu-nbd: one process per image, a qcow2 overlay takes the writes
    d.mkdir()
    try:
        a = d / "a.qcow2"
        sh("qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", src, a)
        base = qcow2(d / "base.qcow2", p.origin)
        q = NbdProcess("qemu-nbd", base, d / "b.sock")
        try:
            fio_one(nbd_target(q.uri), "write", "1M", 8, p.origin)
        finally:
            q.stop()
        qa = NbdProcess("qemu-nbd", a, d / "a.sock")
        overlays: list[NbdProcess] = []

        def overlay() -> str:
            img = qcow2(d / f"ov{len(overlays)}.qcow2", p.origin, backing=base)
            overlays.append(NbdProcess("qemu-nbd", img, d / "b.sock"))
            return overlays[-1].uri

        def drop_overlays() -> None:
            for o in overlays:
                o.stop()
            overlays.clear()
        try:
            settle()
            read_latency(book, "qemu-nbd", qa.uri, overlay, drop_overlays, p, r)
        finally:
            drop_overlays()
            qa.stop()
    finally:
        shutil.rmtree(d, ignore_errors=True)
    print(f"  concurrency round {r + 1} latency {time.monotonic() - t0:5.0f} s: read p99 idle, "
          "cow: " + "; ".join(f"{t} {book.get(part, 'read p99 idle', t)[-1]:,.0f}, "
                             f"{book.get(part, 'read p99 cow', t)[-1]:,.0f}"
                             for t in ("thinpool", "qemu-nbd")), flush=True)


def read_latency(book: Book, target: str, reader_uri: str, cow_uri: Callable[[], str],
                 done: Callable[[], None], p: Params, r: int) -> None:
    """4 KiB random reads at queue depth 1 on ``reader_uri`` for p.seconds, idle and while
    fio writes one 4 KiB block into every 64 KiB block of a fresh snapshot (``cow_uri()``)."""
    part = "concurrency"
    reader = nbd_target(reader_uri)
    for loaded in ((False, True) if r % 2 == 0 else (True, False)):
        if not loaded:
            res = fio_one(reader, "randread", "4k", 1, p.copy, p.seconds)
            book.add(part, "read p99 idle", target, res.p99_us)
            book.add(part, "read p50 idle", target, res.p50_us)
            book.add(part, "read IOPS idle", target, res.value)
            continue
        argv = ["fio", "--name=cow", *nbd_target(cow_uri()),
                *fio_args("write", "4k", 16, p.origin, strided=True), f"--runtime={p.seconds + 5}"]
        w = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                             start_new_session=True)
        undo_w = CLEANUP.push("fio writer", lambda: end_process(w))  # type: ignore[arg-type]
        try:
            time.sleep(0.5)
            res = fio_one(reader, "randread", "4k", 1, p.copy, p.seconds)
            out, _ = w.communicate()
        finally:
            undo_w()
        done()
        wjob = json.loads(out[out.index("{"):])["jobs"][0]["write"]
        book.add(part, "read p99 cow", target, res.p99_us)
        book.add(part, "read p50 cow", target, res.p50_us)
        book.add(part, "read IOPS cow", target, res.value)
        book.add(part, "cow writer IOPS", target, wjob["iops"])
        book.add(part, "cow writer s", target, wjob["runtime"] / 1000)


# ---- part 4: memory ------------------------------------------------------------------------------

def part_rss(book: Book, p: Params, work: Path) -> None:
    d = work / "rss"
    d.mkdir()
    part = "rss"
    t0 = time.monotonic()
    srv = ThinpoolServer(d / "pool", p.rss_volumes * p.rss_vol + 4 * GiB,
                         workers=TARGETS.workers)
    try:
        def mib(field: str) -> float:  # the server's processes together (with --workers)
            return sum(status_kib(pid, field) for pid in srv.pids) / 1024
        book.add(part, "VmHWM started MiB", "thinpool", mib("VmHWM"))
        vols = [srv.create_thin(p.rss_vol) for _ in range(p.rss_volumes)]
        listed = sh("nbdinfo", "--list", "--json", f"nbd+unix:///?socket={srv.socket}")
        n_exports = len(json.loads(listed.stdout)["exports"])
        book.extra["rss exports listed"] = n_exports
        book.add(part, f"VmHWM {p.rss_volumes} volumes MiB", "thinpool", mib("VmHWM"))
        uris = [srv.uri(v) for v in vols[:p.rss_clients]]
        multi_fio(uris, "write", "1M", 8, p.rss_vol, None)
        multi_fio(uris, "randrw", "4k", 16, p.rss_vol, p.seconds)
        book.add(part, f"VmHWM {p.rss_clients} clients MiB", "thinpool", mib("VmHWM"))
        book.add(part, "VmRSS after MiB", "thinpool", mib("VmRSS"))
        # the peer: one qemu-nbd process per volume; one of them after the same load
        img = qcow2(d / "q.qcow2", p.rss_vol)
        q = NbdProcess("qemu-nbd", img, d / "q.sock")
        try:
            multi_fio([q.uri], "write", "1M", 8, p.rss_vol, None)
            multi_fio([q.uri], "randrw", "4k", 16, p.rss_vol, p.seconds)
            book.add(part, "VmHWM 1 client MiB", "qemu-nbd (1 volume)",
                     status_kib(q.proc.pid, "VmHWM") / 1024)
        finally:
            q.stop()
    finally:
        srv.stop()
        shutil.rmtree(d, ignore_errors=True)
    print(f"  rss {time.monotonic() - t0:5.0f} s: "
          + ", ".join(f"{w} {next(iter(v.values()))[-1]:.1f}" for w, v in book.values[part].items()),
          flush=True)


# ---- report ----------------------------------------------------------------------------------

def fmt_ratio(x: float) -> str:
    return "-" if x != x else f"{x:.2f}"


def verdict(x: float, goal: float, higher: bool = True) -> str:
    if x != x:
        return "-"
    return "OK" if (x >= goal if higher else x <= goal) else "MISS"


def report(book: Book, p: Params) -> str:
    out: list[str] = []
    nbd = book.values.get("nbd", {})
    if nbd:
        rows = []
        for w, unit in NBD_FRESH:
            ours = median(book.get("nbd", w, "thinpool"))
            row: list[object] = [w, unit, ours]
            for peer in ("qcow2", "nbdkit", "raw"):
                row.append(median(book.get("nbd", w, peer)))
            for peer in ("qcow2", "nbdkit", "raw"):
                row.append(fmt_ratio(book.ratio("nbd", w, "thinpool", peer)))
            goal = 1.0 if w.startswith("seq") else 0.7
            row += [f">= {goal}", verdict(book.ratio("nbd", w, "thinpool", "qcow2"), goal)]
            rows.append(row)
        out.append("NBD, fresh volume (values: medians; ratios: medians of same-round ratios)\n")
        out.append(table(["job", "unit", "thinpool", "qcow2", "nbdkit", "raw", "/qcow2", "/nbdkit",
                          "/raw", "goal vs qcow2", ""], rows))
        rows = []
        for w, unit in NBD_SNAP:
            x = book.ratio("nbd", w, "thinpool", "overlay")
            goal = None if w == "snap-seqr" else 0.7
            rows.append([w, unit, median(book.get("nbd", w, "thinpool")),
                         median(book.get("nbd", w, "overlay")), fmt_ratio(x),
                         f">= {goal}" if goal else "-", verdict(x, goal) if goal else "-"])
        out.append("\nNBD, fresh snapshot of a fully written origin vs qcow2 overlay\n")
        out.append(table(["job", "unit", "thinpool", "overlay", "ratio", "goal", ""], rows))
        rows = []
        for w, unit in NBD_FRESH + NBD_SNAP:
            per = "s/GiB" if unit == "MiB/s" else "µs/req"
            peers = ("qcow2", "nbdkit") if w in dict(NBD_FRESH) else ("overlay",)
            rows.append([w, per, book.cpu_median("nbd", w, "thinpool")]
                        + [f"{pn} {book.cpu_median('nbd', w, pn):.3g}" for pn in peers])
        out.append("\nserver CPU (user + system) per GiB or per request\n")
        out.append(table(["job", "unit", "thinpool", "peers"], rows))
        rows = []
        for w in ("randw1", "randr1", "prov1", "cow1"):
            for t in ("thinpool", "qcow2", "nbdkit", "raw", "overlay"):
                if book.get("nbd", w + " p99", t):
                    rows.append([w, t, median(book.get("nbd", w + " p50", t)),
                                 median(book.get("nbd", w + " p99", t))])
        out.append("\nqueue depth 1 latency (fio clat, µs)\n")
        out.append(table(["job", "target", "p50 µs", "p99 µs"], rows))
    if book.values.get("kernel"):
        rows = []
        for w, unit in KERNEL:
            x = book.ratio("kernel", w, "thinpool", "qemu-nbdfuse")
            rows.append([w, unit, median(book.get("kernel", w, "thinpool")),
                         median(book.get("kernel", w, "qemu-nbdfuse")),
                         median(book.get("kernel", w, "raw-loop")), fmt_ratio(x),
                         fmt_ratio(book.ratio("kernel", w, "thinpool", "raw-loop")),
                         ">= 1.0", verdict(x, 1.0)])
        out.append("\nkernel block device (loop, direct I/O), fio libaio O_DIRECT\n")
        out.append(table(["job", "unit", "thinpool", "qemu-nbd->nbdfuse", "raw loop",
                          "/qemu-nbdfuse", "/raw loop", "goal", ""], rows))
        rows = []
        for w, unit in KERNEL:
            per = "s/GiB" if unit == "MiB/s" else "µs/req"
            rows.append([w, per, book.cpu_median("kernel", w, "thinpool"),
                         book.cpu_median("kernel", w, "qemu-nbdfuse")])
        out.append("\nserving CPU per GiB or request (qemu-nbd + nbdfuse together)\n")
        out.append(table(["job", "unit", "thinpool", "qemu-nbd + nbdfuse"], rows))
    conc = book.values.get("concurrency", {})
    if conc:
        def eight_over_one(name: str, t: str, key: str = "x8") -> float:
            one = book.get("concurrency", f"{name} x1", t)
            eight = book.get("concurrency", f"{name} {key}", t)
            return median([b / a for a, b in zip(one, eight) if a])
        rows = []
        for name, _, bs, _ in CONC:
            x = eight_over_one(name, "thinpool")
            cells: list[object] = [name, "IOPS" if bs == "4k" else "MiB/s",
                                   median(book.get("concurrency", f"{name} x1", "thinpool")),
                                   median(book.get("concurrency", f"{name} x8", "thinpool")),
                                   fmt_ratio(x)]
            cells += [fmt_ratio(eight_over_one(name, t)) for t in CONC_PEERS]
            cells += [fmt_ratio(eight_over_one(name, t, "x8s")) for t in ("thinpool",) + CONC_PEERS]
            cells += [">= 1.0", verdict(x, 1.0),
                      book.cpu_median("concurrency", f"{name} x1", "thinpool"),
                      book.cpu_median("concurrency", f"{name} x8", "thinpool"),
                      max(book.get("concurrency", f"{name} x1 steal", "thinpool")
                          + book.get("concurrency", f"{name} x8 steal", "thinpool"),
                          default=math.nan)]
            rows.append(cells)
        out.append("\nconcurrency: 8 clients on 8 volumes vs 1 client (8 / 1: medians of same-round "
                   "ratios; qemu-nbd, nbdkit: 8 processes, one per image, in the same rounds: what "
                   "the machine allows; same data: 8 clients over an eighth of their volumes each; "
                   "CPU: server µs per request, s per GiB; steal: the most CPUs the hypervisor "
                   "took during one of these jobs, on average over the job; a round with steal "
                   "near one CPU measures the host, not the server)\n")
        out.append(table(["job", "unit", "1 client", "8 clients", "8 / 1"]
                         + [f"{t} 8 / 1" for t in CONC_PEERS]
                         + [f"{t} 8 / 1 same data" for t in ("thinpool",) + CONC_PEERS]
                         + ["goal", "", "CPU 1", "CPU 8", "steal"], rows))
        rows = []
        for name, _, bs, _ in CONC:
            for t in ("baseline",) + CONC_PEERS:
                if book.get("concurrency", f"{name} x1", t):
                    rows.append([name, t, "IOPS" if bs == "4k" else "MiB/s",
                                 median(book.get("concurrency", f"{name} x1", t)),
                                 median(book.get("concurrency", f"{name} x8", t)),
                                 fmt_ratio(eight_over_one(name, t)),
                                 book.cpu_median("concurrency", f"{name} x1", t),
                                 book.cpu_median("concurrency", f"{name} x8", t)])
        if rows:
            out.append("\nconcurrency peers and baseline (CPU: all server processes together)\n")
            out.append(table(["job", "server", "unit", "1 client", "8 clients", "8 / 1", "CPU 1",
                              "CPU 8"], rows))
        rows = []
        for t in ("thinpool", "baseline", "qemu-nbd"):
            idle = book.get("concurrency", "read p99 idle", t)
            cow = book.get("concurrency", "read p99 cow", t)
            if not idle:
                continue
            x = median([b / a for a, b in zip(idle, cow) if a])
            rows.append([t, median(book.get("concurrency", "read p50 idle", t)),
                         median(book.get("concurrency", "read p50 cow", t)), median(idle),
                         median(cow), fmt_ratio(x),
                         "<= 2.0" if t == "thinpool" else "", verdict(x, 2.0, False)
                         if t == "thinpool" else "",
                         median(book.get("concurrency", "read IOPS idle", t)),
                         median(book.get("concurrency", "read IOPS cow", t)),
                         median(book.get("concurrency", "cow writer IOPS", t)),
                         median(book.get("concurrency", "cow writer s", t))])
        out.append("\n4 KiB random reads (queue depth 1) on one volume, idle and beside "
                   "copy-on-write writes to another (qemu-nbd: one process per image, the writes "
                   "go to a qcow2 overlay)\n")
        out.append(table(["server", "p50 idle µs", "p50 CoW µs", "p99 idle µs", "p99 CoW µs",
                          "p99 CoW/idle", "goal", "", "IOPS idle", "IOPS CoW", "writer IOPS",
                          "writer s"], rows))
    rss = book.values.get("rss", {})
    if rss:
        rows = []
        for w, vals in rss.items():
            for t, v in vals.items():
                last = "16 clients" in w and t == "thinpool"
                rows.append([w, t, median(v), "< 200" if last else "", verdict(median(v), 200, False)
                             if last else ""])
        out.append(f"\nserver memory ({book.extra.get('rss exports listed', '?')} exports listed)\n")
        out.append(table(["measure", "process", "MiB", "goal", ""], rows))
    return "\n".join(out)


# ---- main --------------------------------------------------------------------------------------

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1 round, short jobs, small volumes")
    ap.add_argument("--rounds", type=int)
    ap.add_argument("--seconds", type=float)
    ap.add_argument("--parts", default=",".join(PARTS))
    ap.add_argument("--targets", default=None,
                    help="only these targets of the nbd and kernel parts and these peers of the "
                    "concurrency part (qemu-nbd, nbdkit; thinpool always runs there) "
                    f"({','.join(ALL_TARGETS)})")
    ap.add_argument("--baseline-src", default=None, type=Path,
                    help="also run thinpool from this source tree as target 'baseline' (A/B)")
    ap.add_argument("--workers", type=int, default=0,
                    help="serve thinpool with --workers N (NBD worker processes)")
    ap.add_argument("--baseline-workers", type=int, default=0,
                    help="serve the baseline with --workers N; differing from --workers, the "
                         "baseline runs (from this tree unless --baseline-src) in the same rounds")
    ap.add_argument("--tmp", default=None, help="work directory parent (default /tmp)")
    ap.add_argument("--json", default=None, help="also write every per-round value here")
    ap.add_argument("--steady-memory", action="store_true",
                    help="in a VM that reports free pages to its host: turn that off for the "
                         "run and touch the memory once (root; docs/benchmarks.md, method notes)")
    a = ap.parse_args()
    p = QUICK if a.quick else FULL
    if a.rounds:
        p.rounds = a.rounds
    if a.seconds:
        p.seconds = a.seconds
    parts = [x for x in a.parts.split(",") if x]
    TARGETS.baseline = a.baseline_src.resolve() if a.baseline_src else None
    TARGETS.workers, TARGETS.baseline_workers = a.workers, a.baseline_workers
    if TARGETS.baseline is None and a.workers != a.baseline_workers:
        TARGETS.baseline = ROOT / "src"
    if a.targets:
        TARGETS.chosen = set(a.targets.split(","))
        for x in TARGETS.chosen:
            if x not in ALL_TARGETS:
                sys.exit(f"unknown target {x!r} (choose from {', '.join(ALL_TARGETS)})")
    for x in parts:
        if x not in PARTS:
            sys.exit(f"unknown part {x!r} (choose from {', '.join(PARTS)})")
    if os.geteuid() != 0 and ("kernel" in parts):
        sys.exit("the kernel part needs root (loop devices, mounts)")
    for tool in ("fio", "nbdcopy", "nbdinfo", "qemu-nbd", "qemu-img", "nbdkit", "nbdfuse",
                 "losetup", "mkfs.ext4", "fusermount3"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is not installed (apt-get install fio libnbd-bin qemu-utils nbdkit "
                     "fuse3 e2fsprogs)")
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGHUP, _on_signal)
    work = Path(tempfile.mkdtemp(prefix="exports-bench-", dir=a.tmp))
    CLEANUP.push(f"remove {work}", lambda: shutil.rmtree(work, ignore_errors=True))
    book = Book()
    try:
        if a.steady_memory:
            what, undo = steady_guest_memory()
            CLEANUP.push("free page reporting back on", undo)
            book.extra["steady memory"] = what
            print(what, flush=True)
        src = work / "src.bin"
        with open(src, "wb") as f:
            for _ in range(p.copy // (16 * MiB)):
                f.write(os.urandom(16 * MiB))
        with open(src, "rb") as f:
            assert f.seek(0, 2) >= p.copy
        uname = os.uname()
        print(f"work dir {work} ({fs_of(str(work))}); {os.cpu_count()} CPUs; kernel {uname.release}; "
              f"load {os.getloadavg()[0]:.1f}; {p.rounds} round(s); random jobs {p.seconds:g} s; "
              f"parts {','.join(parts)}", flush=True)
        t_all = time.monotonic()
        loads = []
        for r in range(p.rounds):
            loads.append(os.getloadavg()[0])
            if "nbd" in parts:
                part_nbd(book, p, work, src, r)
            if "kernel" in parts:
                part_kernel(book, p, work, r)
            if "concurrency" in parts:
                part_concurrency(book, p, work, src, r)
        if "rss" in parts:
            part_rss(book, p, work)
        loads.append(os.getloadavg()[0])
        book.extra["load averages"] = loads
        book.extra["minutes"] = (time.monotonic() - t_all) / 60
        print(f"\n{p.rounds} round(s) in {book.extra['minutes']:.1f} min; load average during the "
              f"run {min(loads):.1f}-{max(loads):.1f}\n")
        print(report(book, p))
        if TARGETS.baseline is not None:
            print(f"\nthinpool ({ROOT / 'src'}) against baseline ({TARGETS.baseline})\n")
            print(baseline_report(book))
        if a.json:
            Path(a.json).write_text(json.dumps({"params": p.__dict__, "values": book.values,
                                                "cpu": book.cpu, "extra": book.extra}, indent=1))
    except KeyboardInterrupt:
        print("\ninterrupted: cleaning up", file=sys.stderr)
        raise SystemExit(130)
    finally:
        CLEANUP.run_all()


if __name__ == "__main__":
    main()
