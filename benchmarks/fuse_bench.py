#!/usr/bin/env python3
"""FUSE volume-file benchmark: thinpool.fuse vs. pyfuse3 vs. qemu-nbd -> nbdfuse.

Each target serves one 1 GiB raw sparse file as a file on a FUSE mount, from
its own process(es), through the host page cache:

  ours      FuseMount (threads worker threads) serving tests/fuse_file_export
            FileExport (pread/pwrite; write_zeroes = fallocate)
  pyfuse3   the equivalent minimal filesystem on pyfuse3 (libfuse3, trio):
            lookup/getattr/open (direct_io)/read/write/fsync, same pread/pwrite;
            pyfuse3 3.5 has no fallocate handler
  nbdfuse   qemu-nbd -f raw --cache=writeback --discard=unmap on a unix socket
            -> nbdfuse (libnbd, libfuse3) -> the file

and then, as in shared/machine-and-benchmarks.md section 5 (K): losetup
--direct-io=on on the file, mkfs.ext4 (nodiscard, no lazy init, so no
background zeroing and no discard, which pyfuse3 lacks, skews a run), mount,
and fio (libaio, direct) on a 512 MiB file in it:

  seqw   1 MiB writes, iodepth 8, end_fsync     seqr   1 MiB reads, iodepth 8
  randw  4 KiB random writes, iodepth 16, time based, end_fsync
  randr  4 KiB random reads, iodepth 16, time based

Before each round the reference R runs (a fresh sparse file on the host fs,
O_DIRECT, seq write + read, same jobs). Every round gives each target a fresh
file, mount and loop device; rounds interleave the targets so drift hits
all. Printed: medians (MiB/s, IOPS), each target's median ratio to the
same-round reference, the ratios ours/pyfuse3 and ours/nbdfuse (higher is
better for us), and the serving processes' CPU seconds (user + system, from
/proc/PID/stat) per GiB moved or per 1000 4 KiB requests.

``--micro`` instead times FuseSession.handle alone (no kernel) on 4 KiB and
1 MiB READ/WRITE requests against an in-memory export: the per-request
Python cost of the path.

Usage (root): python benchmarks/fuse_bench.py [--rounds 3] [--seconds 10]
                  [--threads 4] [--only ours,pyfuse3] [--tmp DIR] [--micro]
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from _benchlib import fs_of, median, table  # noqa: E402

MiB = 1 << 20
SIZE = 1 << 30
TARGETS = ("ours", "pyfuse3", "nbdfuse")
JOBS = ("seqw", "seqr", "randw", "randr")
UNITS = {"seqw": "MiB/s", "seqr": "MiB/s", "randw": "IOPS", "randr": "IOPS"}
CLK = os.sysconf("SC_CLK_TCK")


# ---- server modes (run in a child process) -----------------------------------------------

def serve_ours(path: str, mnt: str, threads: int) -> None:
    sys.path.insert(0, str(ROOT / "tests"))
    from fuse_file_export import FileExport  # noqa: E402

    from thinpool.fuse import FuseMount  # noqa: E402

    m = FuseMount(mnt, threads=threads)
    done = threading.Event()

    def on_term(*_: object) -> None:
        m.stop()
        done.set()

    signal.signal(signal.SIGTERM, on_term)
    m.start()
    m.add_file("vol", FileExport(path, count=False))
    print("ready", flush=True)
    while not done.wait(1):
        pass


def serve_pyfuse3(path: str, mnt: str) -> None:
    import stat

    import pyfuse3
    import trio

    fd = os.open(path, os.O_RDWR)
    size = os.fstat(fd).st_size
    ino = pyfuse3.ROOT_INODE + 1

    def attrs(inode: int) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = inode
        if inode == pyfuse3.ROOT_INODE:
            a.st_mode, a.st_nlink, a.st_size = stat.S_IFDIR | 0o755, 2, 0
        else:
            a.st_mode, a.st_nlink, a.st_size = stat.S_IFREG | 0o600, 1, size
        a.st_blksize, a.st_blocks = 4096, (a.st_size + 511) // 512
        a.attr_timeout = a.entry_timeout = 1
        return a

    class VolFS(pyfuse3.Operations):
        async def getattr(self, inode, ctx=None):  # type: ignore[no-untyped-def]
            if inode not in (pyfuse3.ROOT_INODE, ino):
                raise pyfuse3.FUSEError(errno.ENOENT)
            return attrs(inode)

        async def lookup(self, parent_inode, name, ctx=None):  # type: ignore[no-untyped-def]
            if parent_inode != pyfuse3.ROOT_INODE or name != b"vol":
                raise pyfuse3.FUSEError(errno.ENOENT)
            return attrs(ino)

        async def opendir(self, inode, ctx):  # type: ignore[no-untyped-def]
            return inode

        async def readdir(self, fh, start_id, token):  # type: ignore[no-untyped-def]
            if start_id == 0:
                pyfuse3.readdir_reply(token, b"vol", attrs(ino), 1)

        async def open(self, inode, flags, ctx):  # type: ignore[no-untyped-def]
            return pyfuse3.FileInfo(fh=inode, direct_io=True)

        async def read(self, fh, off, size_):  # type: ignore[no-untyped-def]
            return os.pread(fd, min(size_, max(0, size - off)), off)

        async def write(self, fh, off, buf):  # type: ignore[no-untyped-def]
            return os.pwrite(fd, buf, off)

        async def fsync(self, fh, datasync):  # type: ignore[no-untyped-def]
            os.fdatasync(fd)

        async def flush(self, fh):  # type: ignore[no-untyped-def]
            pass

        async def release(self, fh):  # type: ignore[no-untyped-def]
            pass

    pyfuse3.init(VolFS(), mnt, set(pyfuse3.default_options) | {"fsname=pyfuse3bench"})
    print("ready", flush=True)
    try:
        trio.run(pyfuse3.main)
    finally:
        pyfuse3.close(unmount=False)


# ---- helpers ------------------------------------------------------------------------------

def sh(*args: str | os.PathLike[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run([str(a) for a in args], capture_output=True, text=True)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, args))}: {r.stderr.strip()}")
    return r


def cpu_seconds(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / CLK
        except (OSError, IndexError):
            pass
    return total


def wait_for(cond, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.02)


def fio(name: str, filename: str, seconds: int) -> float:
    rw, bs, depth = {"seqw": ("write", "1M", 8), "seqr": ("read", "1M", 8),
                     "randw": ("randwrite", "4k", 16), "randr": ("randread", "4k", 16)}[name]
    args = ["fio", f"--name={name}", f"--filename={filename}", "--ioengine=libaio", "--direct=1",
            f"--rw={rw}", f"--bs={bs}", f"--iodepth={depth}", "--size=512M",
            "--output-format=json"]
    if rw.startswith("rand"):
        args += [f"--runtime={seconds}", "--time_based", "--randrepeat=0"]
    if rw.endswith("write"):
        args.append("--end_fsync=1")
    out = sh(*args).stdout
    job = json.loads(out[out.index("{"):])["jobs"][0]
    side = job["write" if rw.endswith("write") else "read"]
    return side["iops"] if rw.startswith("rand") else side["bw_bytes"] / MiB


class Target:
    """One target's server, started on a fresh file; ``volfile`` is what loop gets."""

    def __init__(self, kind: str, tmp: Path, threads: int) -> None:
        self.kind, self.tmp, self.threads = kind, tmp, threads
        self.back = tmp / f"{kind}.img"
        self.fmnt = tmp / f"{kind}-fuse"
        self.procs: list[subprocess.Popen[str]] = []
        self.pids: list[int] = []

    @property
    def volfile(self) -> str:
        return str(self.fmnt / "vol")

    def start(self) -> None:
        self.back.unlink(missing_ok=True)
        with open(self.back, "wb") as f:
            f.truncate(SIZE)
        self.fmnt.mkdir(exist_ok=True)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src")] + sys.path))
        if self.kind in ("ours", "pyfuse3"):
            p = subprocess.Popen([sys.executable, __file__, "--serve", self.kind, str(self.back),
                                  str(self.fmnt), "--threads", str(self.threads)],
                                 stdout=subprocess.PIPE, text=True, env=env)
            self.procs.append(p)
            self.pids.append(p.pid)
            assert p.stdout is not None
            if p.stdout.readline().strip() != "ready":
                raise RuntimeError(f"{self.kind} server did not start")
        else:
            sock, pidf = self.tmp / "q.sock", self.tmp / "q.pid"
            sh("qemu-nbd", "-f", "raw", "--cache=writeback", "--discard=unmap", "-e", "8",
               "-k", sock, "-t", "--fork", f"--pid-file={pidf}", self.back)
            self.pids.append(int(pidf.read_text()))
            p = subprocess.Popen(["nbdfuse", self.volfile, f"nbd+unix:///?socket={sock}"],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            self.procs.append(p)
            self.pids.append(p.pid)
        wait_for(lambda: os.path.exists(self.volfile), 20, f"{self.volfile}")

    def stop(self) -> None:
        if self.kind == "ours":
            for p in self.procs:
                p.send_signal(signal.SIGTERM)
        else:
            sh("umount", self.fmnt, check=False)
        for p in self.procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        if self.kind == "nbdfuse":
            os.kill(self.pids[0], signal.SIGTERM)
            wait_for(lambda: not Path(f"/proc/{self.pids[0]}").exists(), 20, "qemu-nbd")
        if sh("mountpoint", "-q", self.fmnt, check=False).returncode == 0:
            sh("umount", "-l", self.fmnt, check=False)
        self.back.unlink(missing_ok=True)


def run_target(t: Target, mnt: Path, seconds: int) -> tuple[dict[str, float], dict[str, float]]:
    """fio results and server CPU seconds per job, through loop + ext4."""
    t.start()
    dev = None
    mounted = False
    try:
        dev = sh("losetup", "-f", "--show", "--direct-io=on", t.volfile).stdout.strip()
        dio = Path(f"/sys/block/{dev[5:]}/loop/dio").read_text().strip()
        if dio != "1":
            raise RuntimeError(f"{t.kind}: loop device did not get direct I/O")
        sh("mkfs.ext4", "-q", "-F", "-E", "nodiscard,lazy_itable_init=0,lazy_journal_init=0", dev)
        sh("mount", dev, mnt)
        mounted = True
        res, cpu = {}, {}
        for job in JOBS:
            c0 = cpu_seconds(t.pids)
            res[job] = fio(job, str(mnt / "fio.dat"), seconds)
            cpu[job] = cpu_seconds(t.pids) - c0
        return res, cpu
    finally:
        if mounted:
            sh("umount", mnt, check=False)
        if dev:
            sh("losetup", "-d", dev, check=False)
        t.stop()


def reference(tmp: Path) -> tuple[float, float]:
    ref = tmp / "ref.img"
    ref.unlink(missing_ok=True)
    with open(ref, "wb") as f:
        f.truncate(SIZE)
    try:
        return fio("seqw", str(ref), 0), fio("seqr", str(ref), 0)
    finally:
        ref.unlink()


# ---- the micro benchmark ----------------------------------------------------------------

def micro(seconds: float) -> None:
    from thinpool.fuse import protocol as P
    from thinpool.fuse.session import Buffers, FuseSession

    class Mem:
        size = 64 * MiB
        read_only = False

        def __init__(self) -> None:
            self.data = bytearray(self.size)

        def readinto(self, offset: int, buf: memoryview) -> None:
            buf[:] = memoryview(self.data)[offset:offset + len(buf)]

        def write(self, offset: int, data: memoryview, fua: bool) -> None:
            self.data[offset:offset + len(data)] = data

        def flush(self) -> None:
            pass

        def write_zeroes(self, offset: int, length: int, may_trim: bool, fast_only: bool,
                         fua: bool) -> None:
            pass

        def close(self) -> None:
            pass

    s = FuseSession()
    b = Buffers()
    req = b.request

    def put(data: bytes) -> int:
        req[:len(data)] = data
        return len(data)

    put(P.IN_HEADER.pack(56, P.Op.INIT, 1, 1, 0, 0, 0, 0, 0) + P.INIT_IN.pack(7, 45, 0, 0))
    s.handle(req, 56, b)
    s.add_file("vol", Mem())
    n = put(P.IN_HEADER.pack(44, P.Op.LOOKUP, 2, 1, 0, 0, 0, 0, 0) + b"vol\0")
    nodeid = P.ENTRY_OUT.unpack_from(bytes(s.handle(req, n, b)[0]), 16)[0]  # type: ignore[index]
    n = put(P.IN_HEADER.pack(48, P.Op.OPEN, 3, nodeid, 0, 0, 0, 0, 0) + P.OPEN_IN.pack(2, 0))
    fh = P.OPEN_OUT.unpack_from(bytes(s.handle(req, n, b)[0]), 16)[0]  # type: ignore[index]
    rows = []
    for size in (4096, MiB):
        for op in ("READ", "WRITE"):
            if op == "READ":
                n = put(P.IN_HEADER.pack(80, P.Op.READ, 4, nodeid, 0, 0, 0, 0, 0)
                        + P.READ_IN.pack(fh, 8192, size, 0, 0, 2, 0))
            else:
                n = put(P.IN_HEADER.pack(80 + size, P.Op.WRITE, 4, nodeid, 0, 0, 0, 0, 0)
                        + P.WRITE_IN.pack(fh, 8192, size, 0, 0, 2, 0) + bytes(size))
            handle = s.handle
            count = 0
            t0 = time.perf_counter()
            deadline = t0 + seconds
            while time.perf_counter() < deadline:
                for _ in range(1000):
                    handle(req, n, b)
                count += 1000
            dt = time.perf_counter() - t0
            rows.append([f"{op} {size // 1024} KiB", count / dt, dt / count * 1e6])
    print(table(["request", "per second", "µs each"], rows))


# ---- main -----------------------------------------------------------------------------------

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument("--only", default=",".join(TARGETS))
    ap.add_argument("--tmp", default=None)
    ap.add_argument("--micro", action="store_true")
    ap.add_argument("--serve", nargs=3, metavar=("KIND", "FILE", "MOUNTPOINT"),
                    help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.serve:
        kind, path, mnt = a.serve
        serve_ours(path, mnt, a.threads) if kind == "ours" else serve_pyfuse3(path, mnt)
        return
    if a.micro:
        micro(2.0)
        return
    targets = [t for t in a.only.split(",") if t]
    for t in targets:
        if t not in TARGETS:
            sys.exit(f"unknown target {t!r} (choose from {', '.join(TARGETS)})")
    for tool in ("fio", "losetup", "mkfs.ext4") + (("qemu-nbd", "nbdfuse") if "nbdfuse" in targets else ()):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is not installed")
    tmp = Path(tempfile.mkdtemp(prefix="fuse-bench-", dir=a.tmp))
    mnt = tmp / "mnt"
    mnt.mkdir()
    print(f"files in {tmp} ({fs_of(str(tmp))}); {a.rounds} round(s), {a.seconds} s random jobs, "
          f"ours with {a.threads} threads", flush=True)
    results: dict[str, dict[str, list[float]]] = {t: {j: [] for j in JOBS} for t in targets}
    ratios: dict[str, dict[str, list[float]]] = {t: {"w": [], "r": []} for t in targets}
    cpu: dict[str, dict[str, list[float]]] = {t: {j: [] for j in JOBS} for t in targets}
    try:
        for rnd in range(a.rounds):
            for kind in targets:
                ref_w, ref_r = reference(tmp)
                res, c = run_target(Target(kind, tmp, a.threads), mnt, a.seconds)
                for j in JOBS:
                    results[kind][j].append(res[j])
                    cpu[kind][j].append(c[j])
                ratios[kind]["w"].append(res["seqw"] / ref_w)
                ratios[kind]["r"].append(res["seqr"] / ref_r)
                print(f"round {rnd + 1} {kind:8s} ref {ref_w:6.0f}/{ref_r:6.0f} MiB/s  "
                      + "  ".join(f"{j} {res[j]:8.0f}" for j in JOBS), flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    rows = [[t] + [median(results[t][j]) for j in JOBS]
            + [f"{median(ratios[t]['w']):.2f} / {median(ratios[t]['r']):.2f}"] for t in targets]
    print()
    print(table(["target"] + [f"{j} {UNITS[j]}" for j in JOBS] + ["seq W / R vs plain"], rows))
    print()
    crow = []
    for t in targets:
        per = []
        for j in JOBS:
            c = median(cpu[t][j])
            if j.startswith("seq"):
                per.append(c / 0.5)  # 512 MiB per job
            else:
                per.append(c / (median(results[t][j]) * a.seconds) * 1000)
        crow.append([t] + per)
    print(table(["CPU s of the server", "seqw /GiB", "seqr /GiB", "randw /1k req",
                 "randr /1k req"], crow))
    if "ours" in targets:
        print()
        for other in (t for t in targets if t != "ours"):
            r = [median([x / y for x, y in zip(results["ours"][j], results[other][j])])
                 for j in JOBS]
            print(f"ours/{other}: " + "  ".join(f"{j} {x:.2f}" for j, x in zip(JOBS, r)))


if __name__ == "__main__":
    main()
