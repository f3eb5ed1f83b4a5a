#!/usr/bin/env python3
"""NBD server benchmark: thinpool.nbd against nbdkit (file plugin) and qemu-nbd.

All three serve the same kind of raw sparse file, read-write, through the page
cache (nbdkit file's default cache, qemu-nbd --cache=writeback, our buffered
pread/pwrite), on a unix socket, with multi-conn allowed. Ours serves
tests/nbd_file_export.FileExport from a separate process (python
benchmarks/nbd_bench.py --serve FILE SOCKET). Every round gives each server a
fresh file and runs, in this order:

  seqw   nbdcopy --flush SRC URI      512 MiB of random bytes (cached source)
  seqr   nbdcopy URI null:            the same 512 MiB back
  fio-w  fio nbd engine, sequential 1 MiB writes, iodepth 8, 512 MiB, end_fsync
  fio-r  fio nbd engine, sequential 1 MiB reads, iodepth 8
  randw  fio nbd engine, 4 KiB random writes, iodepth 16, time based
  randr  fio nbd engine, 4 KiB random reads, iodepth 16, time based

and prints medians over the rounds (MiB/s, IOPS) and the ratios ours/theirs
(higher is better for us), then the server process's CPU time (user + system,
from /proc/PID/stat) per GiB moved or per 4 KiB request, which is less
sensitive than throughput to other load on a shared machine. Rounds
interleave the servers so drift hits all.

Usage: python benchmarks/nbd_bench.py [--rounds 3] [--seconds 10] [--tmp DIR] [--only seqw,randr]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from _benchlib import fs_of, median, table  # noqa: E402

MiB = 1 << 20
SIZE = 1 << 30
COPY = 512 * MiB
SERVERS = ("ours", "nbdkit", "qemu-nbd")
WORKLOADS = ("seqw", "seqr", "fio-w", "fio-r", "randw", "randr")
UNITS = {"seqw": "MiB/s", "seqr": "MiB/s", "fio-w": "MiB/s", "fio-r": "MiB/s", "randw": "IOPS", "randr": "IOPS"}


def serve(path: str, sock: str) -> None:
    """--serve mode: our server on one file until SIGTERM."""
    sys.path.insert(0, str(ROOT / "tests"))
    from nbd_file_export import FileCatalog  # noqa: E402

    from thinpool.nbd.server import NBDServer  # noqa: E402

    server = NBDServer(FileCatalog({"": Path(path)}), unix_path=sock)
    stop = False

    def on_term(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    server.start()
    try:
        while not stop:
            time.sleep(0.1)
    finally:
        server.stop()


def start_server(kind: str, path: Path, sock: Path) -> subprocess.Popen[bytes]:
    if kind == "ours":
        env = dict(os.environ, PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
        argv = [sys.executable, str(Path(__file__).resolve()), "--serve", str(path), str(sock)]
    elif kind == "nbdkit":
        env = None
        argv = ["nbdkit", "-f", "-U", str(sock), "file", str(path)]
    else:
        env = None
        argv = ["qemu-nbd", "-f", "raw", "-k", str(sock), "-t", "-e", "0", "--cache=writeback",
                "--discard=unmap", str(path)]
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if sock.exists() and subprocess.run(["nbdinfo", "--size", uri(sock)], capture_output=True).returncode == 0:
            return proc
        if proc.poll() is not None:
            raise SystemExit(f"{kind} exited with {proc.returncode}")
        time.sleep(0.05)
    proc.kill()
    raise SystemExit(f"{kind} did not start")


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def uri(sock: Path) -> str:
    return f"nbd+unix:///?socket={sock}"


def timed(argv: list[str]) -> float:
    t0 = time.perf_counter()
    r = subprocess.run(argv, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode:
        raise SystemExit(f"{' '.join(argv)}: {r.stderr.strip()}")
    return wall


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def fio(u: str, rw: str, bs: str, depth: int, seconds: float) -> dict:
    argv = ["fio", "--name=b", "--ioengine=nbd", f"--uri={u}", f"--rw={rw}", f"--bs={bs}",
            f"--iodepth={depth}", "--size=512M", "--output-format=json"]
    if rw.startswith("rand"):
        argv += [f"--runtime={seconds}", "--time_based", "--randrepeat=0"]
    if "write" in rw:
        argv += ["--end_fsync=1"]
    r = subprocess.run(argv, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"fio: {r.stderr.strip()}")
    job = json.loads(r.stdout[r.stdout.index("{"):])["jobs"][0]
    return job["write" if "write" in rw else "read"]


def round_for(kind: str, work: Path, src: Path, only: set[str],
              seconds: float) -> tuple[dict[str, float], dict[str, float]]:
    """One fresh server on a fresh file: (speed, server CPU per unit) by workload."""
    path = work / f"{kind}.raw"
    sock = work / f"{kind}.sock"
    path.unlink(missing_ok=True)
    sock.unlink(missing_ok=True)  # nbdkit leaves its socket behind and refuses an existing one
    with open(path, "wb") as f:
        f.truncate(SIZE)
    proc = start_server(kind, path, sock)
    u = uri(sock)
    speed: dict[str, float] = {}
    cpu: dict[str, float] = {}
    try:
        for w in WORKLOADS:
            if w not in only:
                continue
            c0 = cpu_seconds(proc.pid)
            if w in ("seqw", "seqr"):
                argv = ["nbdcopy", "--flush", str(src), u] if w == "seqw" else ["nbdcopy", u, "null:"]
                speed[w] = COPY / MiB / timed(argv)
                cpu[w] = (cpu_seconds(proc.pid) - c0) / (COPY / (1 << 30))  # s per GiB
            elif w in ("fio-w", "fio-r"):
                res = fio(u, "write" if w == "fio-w" else "read", "1M", 8, seconds)
                speed[w] = res["bw_bytes"] / MiB
                cpu[w] = (cpu_seconds(proc.pid) - c0) / (res["io_bytes"] / (1 << 30))
            else:
                res = fio(u, "randwrite" if w == "randw" else "randread", "4k", 16, seconds)
                speed[w] = res["iops"]
                cpu[w] = (cpu_seconds(proc.pid) - c0) / res["total_ios"] * 1e6  # us per request
    finally:
        stop_server(proc)
        path.unlink()
    return speed, cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--serve", nargs=2, metavar=("FILE", "SOCKET"), help=argparse.SUPPRESS)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=10.0, help="duration of each random I/O job")
    ap.add_argument("--tmp", default=None, help="work directory (default: a fresh one under /tmp)")
    ap.add_argument("--only", default=",".join(WORKLOADS))
    ap.add_argument("--servers", default=",".join(SERVERS))
    args = ap.parse_args()
    if args.serve:
        serve(*args.serve)
        return
    for tool in ("nbdcopy", "nbdinfo", "nbdkit", "qemu-nbd", "fio"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is not installed (apt-get install libnbd-bin nbdkit qemu-utils fio)")
    only = set(args.only.split(","))
    servers = [s for s in SERVERS if s in args.servers.split(",")]
    work = Path(tempfile.mkdtemp(prefix="nbdbench-", dir=args.tmp))
    try:
        src = work / "src.bin"
        with open(src, "wb") as f:
            for _ in range(COPY // (16 * MiB)):
                f.write(os.urandom(16 * MiB))
        print(f"work dir {work} ({fs_of(str(work))}), {os.cpu_count()} CPUs, {args.rounds} rounds, "
              f"random jobs {args.seconds:g} s", flush=True)
        results: dict[str, dict[str, list[float]]] = {s: {w: [] for w in WORKLOADS} for s in servers}
        cpus: dict[str, dict[str, list[float]]] = {s: {w: [] for w in WORKLOADS} for s in servers}
        for r in range(args.rounds):
            for kind in servers:
                speed, cpu = round_for(kind, work, src, only, args.seconds)
                for w, v in speed.items():
                    results[kind][w].append(v)
                    cpus[kind][w].append(cpu[w])
                print(f"round {r + 1} {kind}: " + ", ".join(f"{w} {v:,.0f}" for w, v in speed.items()), flush=True)
        wl = [w for w in WORKLOADS if w in only]
        others = [s for s in servers if s != "ours"]
        for title, data, unit_of, better in (
                ("throughput (higher is better)", results, UNITS, lambda ours, theirs: ours / theirs),
                ("server CPU (lower is better)", cpus,
                 {w: "us/req" if w.startswith("rand") else "s/GiB" for w in WORKLOADS},
                 lambda ours, theirs: theirs / ours)):
            rows = []
            for w in wl:
                meds = {s: median(data[s][w]) for s in servers}
                row: list[object] = [w, unit_of[w]] + [meds[s] for s in servers]
                if "ours" in meds:
                    row += [better(meds["ours"], meds[o]) if meds[o] and meds["ours"] else float("nan")
                            for o in others]
                rows.append(row)
            headers = ["workload", "unit"] + list(servers)
            if "ours" in servers:
                headers += [f"ratio vs {o}" for o in others]
            print(f"\n{title}; ratio > 1 means ours is better\n")
            print(table(headers, rows))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
