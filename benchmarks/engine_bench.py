#!/usr/bin/env python3
"""Pool engine benchmark: snapshot latency, volume I/O against plain-file I/O, memory.

(a) create_snap + commit latency with 1, 100 and 10,000 devices in the pool and
    10^6 mapped blocks (the state is built with thinpool.tools.restore from
    generated XML over a pool made by Pool.create, registry written to match).
    Measured twice: PoolMetadata.create_snap + commit (metadata only) and
    Pool.create_snap (the message path: registry JSON + fsyncs + commit).
    Goal: median(10,000 devices) / median(1 device) <= 2.
(b) sequential 1 MiB I/O: ThinDevice.read of provisioned blocks vs os.pread of
    the same bytes from a plain file (page cache warm; goal >= 0.7), and first
    writes (provisioning) through ThinDevice.write vs os.pwrite into a fresh
    sparse file (goal >= 0.5).
(c) random 4 KiB writes, IOPS: a fresh volume (provisioning) and a fresh
    snapshot of a fully written volume (copy-on-write), each as uniform random
    writes and as "one write into every block, random block order", against the
    same os.pwrite offsets on a fresh sparse file / a fully written plain file.
(b) and (c) run with 64 KiB and 512 KiB data blocks.
(d) peak RSS of a fresh process that opens the pool with 10^6 mappings (and
    10,000 devices) and reads through it (goal < 200 MiB).

Throughput ratios are ours/plain (higher is better).  "loop" excludes the final
flush, "+flush" includes ThinDevice.flush() (commit) resp. os.fsync.

Usage: python benchmarks/engine_bench.py [--quick] [--tmp DIR] [--keep] [--only a,b,c,d]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _benchlib import Dev, fs_of, goal, median, py_child, run_child, table, write_xml  # noqa: E402

from thinpool.pool.config import PoolConfig  # noqa: E402
from thinpool.pool.engine import Pool  # noqa: E402
from thinpool.pool.registry import Registry, VolumeRecord  # noqa: E402
from thinpool.thin.metadata import PoolMetadata  # noqa: E402
from thinpool.tools.restore import restore  # noqa: E402

MiB = 1 << 20
SNAP_RATIO_GOAL = 2.0
READ_GOAL = 0.7
WRITE_GOAL = 0.5
RSS_GOAL_MB = 200.0
SNAPS_PER_STATE = 41


# -- (a) state building ---------------------------------------------------------------------

def _extent_mappings(rng: np.random.Generator, n: int, first_data: int):
    """n mappings in extents (mean 64 blocks, 10 % single blocks) with gaps, data allocated
    mostly sequentially: realistic range/single mix.  Returns vb, db, virtual size."""
    k = int(n / 50) + 64
    lens = np.where(rng.random(k) < 0.1, 1, rng.geometric(1 / 64, k))
    while lens.sum() < n:
        lens = np.concatenate([lens, lens])
    cum = np.cumsum(lens)
    k = int(np.searchsorted(cum, n)) + 1
    lens = lens[:k].copy()
    lens[-1] -= int(cum[k - 1]) - n
    vgaps = rng.geometric(1 / 16, k)
    dgaps = np.where(rng.random(k) < 0.2, rng.integers(1, 32, k), 0)
    vstart = np.cumsum(vgaps + lens) - lens
    dstart = first_data + np.cumsum(dgaps + lens) - lens
    within = np.arange(n) - np.repeat(np.cumsum(lens) - lens, lens)
    vb = np.repeat(vstart, lens) + within
    db = np.repeat(dstart, lens) + within
    return vb.astype(np.int64), db.astype(np.int64), int(vb[-1]) + 1


def build_pool(directory: str, n_devices: int, mapped: int, rng: np.random.Generator) -> dict:
    """A pool whose device 1 maps ``mapped`` blocks plus n_devices-1 small thin volumes."""
    bs_sectors = 128
    bs = bs_sectors * 512
    t0 = time.perf_counter()
    vb, db, vsize = _extent_mappings(rng, mapped, 0)
    next_data = int(db[-1]) + 1
    devs = [Dev(1, vb, db, np.zeros(vb.size, np.int64), 0, 0, 0)]
    small = 4
    for dev_id in range(2, n_devices + 1):
        v = np.sort(rng.choice(16384, small, replace=False)).astype(np.int64)
        d = np.arange(next_data, next_data + small, dtype=np.int64)
        next_data += small
        devs.append(Dev(dev_id, v, d, np.ones(small, np.int64), dev_id - 1, 1, 1))
    nr_data = max(1 << 21, (next_data // 1024 + 2) * 1024)
    Pool.create(directory, data_size=nr_data * bs, metadata_size="1G",
                config=PoolConfig(data_block_sectors=bs_sectors))
    xml = os.path.join(directory, "state.xml")
    nmap, nlines = write_xml(xml, devs, 1, n_devices, bs_sectors, nr_data)
    t1 = time.perf_counter()
    restore(xml, os.path.join(directory, "metadata"))
    t2 = time.perf_counter()
    os.unlink(xml)
    reg = Registry(directory)
    reg.volumes = {1: VolumeRecord(vsize * bs, "origin", None, time.time())}
    for dev_id in range(2, n_devices + 1):
        reg.volumes[dev_id] = VolumeRecord(1 << 30, f"vol{dev_id}", None, time.time())
    with PoolMetadata(os.path.join(directory, "metadata"), read_only=True) as md:
        assert md.nr_data_blocks == nr_data and md.details(1).mapped_blocks == mapped
    reg.compact()
    return dict(mappings=nmap, xml_lines=nlines, gen_s=t1 - t0, restore_s=t2 - t1,
                vsize_bytes=vsize * bs, nr_data=nr_data)


def _interleaved(counts: list[int], k: int, open_one, snap
                 ) -> tuple[dict[int, float], dict[int, list[float]]]:
    """Open one object per pool state (timed), then k rounds of ``snap(obj, n, i)``
    over the states in turn, timing each; every object is closed at the end."""
    objs, opened = {}, {}
    lat: dict[int, list[float]] = {n: [] for n in counts}
    try:
        for n in counts:
            t0 = time.perf_counter()
            objs[n] = open_one(n)
            opened[n] = time.perf_counter() - t0
        for i in range(k):
            for n in counts:
                t0 = time.perf_counter()
                snap(objs[n], n, i)
                lat[n].append(time.perf_counter() - t0)
    finally:
        for obj in objs.values():
            obj.close()
    return opened, lat


def bench_snap(work: str, quick: bool, rng: np.random.Generator) -> tuple[list, dict]:
    """Snapshot latency per pool state, the states interleaved round by round so that
    drift in the disk's fsync latency affects them alike."""
    mapped = 100_000 if quick else 1_000_000
    counts = [1, 100, 10_000] if not quick else [1, 100, 1_000]
    k = 5 if quick else SNAPS_PER_STATE
    dirs = {n: os.path.join(work, f"snap-{n}") for n in counts}
    infos = {n: build_pool(dirs[n], n, mapped, rng) for n in counts}
    # metadata only
    devices: dict[int, set[int]] = {}

    def open_md(n: int) -> PoolMetadata:
        md = PoolMetadata(os.path.join(dirs[n], "metadata"))
        md.details(1)
        return md

    def snap_md(md: PoolMetadata, n: int, i: int) -> None:
        md.create_snap(n + 1 + i, 1)
        md.commit()
        devices.setdefault(n, set(md.device_ids()))
        devices[n].add(n + 1 + i)

    opened_md, lat_md = _interleaved(counts, k, open_md, snap_md)
    for n in counts:
        reg = Registry(dirs[n])
        reg.load(devices[n], writable=True)
        for i in range(k):
            reg.volumes[n + 1 + i] = VolumeRecord(infos[n]["vsize_bytes"], None, None, time.time())
        reg.compact()
    # full message path
    opened_pool, lat_pool = _interleaved(
        counts, k, lambda n: Pool(dirs[n]),
        lambda pool, n, i: pool.message(f"create_snap {n + 1 + k + i} 1"))
    rows, res = [], {}
    for n in counts:
        md_l, pool_l = lat_md[n], lat_pool[n]
        res[n] = dict(md=median(md_l), pool=median(pool_l), dir=dirs[n])
        rows.append([n, infos[n]["mappings"], infos[n]["restore_s"], opened_md[n] * 1e3,
                     median(md_l) * 1e3, max(md_l) * 1e3, opened_pool[n] * 1e3,
                     median(pool_l) * 1e3, pool_l[0] * 1e3, max(pool_l) * 1e3])
    return rows, res


# -- (b) sequential ------------------------------------------------------------------------

def _fresh_file(path: str, size: int) -> int:
    if os.path.exists(path):
        os.unlink(path)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    os.ftruncate(fd, size)
    return fd


def _settle(fd: int, drop_from: int | None = 0) -> None:
    """Start a write phase from the same memory state for ours and plain.

    Earlier phases' dirty pages would throttle writes, so sync; and drop the
    file's clean cached pages from ``drop_from`` on, so that both sides fill the
    page cache from recently freed memory: in a VM, first-touched guest pages
    cost ~10 us each, which once made plain writes look 10x slower, or ours.
    Copy-on-write phases keep their sources cached as written (re-reading them
    after a drop brings them back as large folios, and then every 4 KiB plain
    write dirties a whole folio and is throttled ~10x).
    """
    os.sync()
    if drop_from is not None:
        os.posix_fadvise(fd, drop_from, 0, os.POSIX_FADV_DONTNEED)


def _seq_write_vol(vol, size: int, buf: bytes) -> tuple[float, float]:
    _settle(vol.dp.data_fd)
    t0 = time.perf_counter()
    for off in range(0, size, MiB):
        vol.write(off, buf)
    t1 = time.perf_counter()
    vol.flush()
    return t1 - t0, time.perf_counter() - t0


def _seq_write_ref(fd: int, size: int, buf: bytes) -> tuple[float, float]:
    _settle(fd)
    t0 = time.perf_counter()
    for off in range(0, size, MiB):
        os.pwrite(fd, buf, off)
    t1 = time.perf_counter()
    os.fsync(fd)
    return t1 - t0, time.perf_counter() - t0


def _seq_read_vol(vol, size: int) -> float:
    t0 = time.perf_counter()
    for off in range(0, size, MiB):
        vol.read(off, MiB)
    return time.perf_counter() - t0


def _seq_read_ref(fd: int, size: int) -> float:
    t0 = time.perf_counter()
    for off in range(0, size, MiB):
        os.pread(fd, MiB, off)
    return time.perf_counter() - t0


def bench_seq(pool: Pool, work: str, bs: int, size: int, reps: int, next_id: list) -> list:
    buf = os.urandom(MiB)
    ref_path = os.path.join(work, "ref-seq.img")
    w_ours, w_ref = [], []
    vol = fd = None
    for r in range(reps + 1):
        if vol is not None:
            vol.close()
            os.close(fd)
        dev = next_id[0]
        next_id[0] += 1
        pool.create_thin(dev, size=size)
        vol = pool.volume(dev)
        fd = _fresh_file(ref_path, size)
        if r % 2 == 0:
            wo, wr = _seq_write_vol(vol, size, buf), _seq_write_ref(fd, size, buf)
        else:
            wr, wo = _seq_write_ref(fd, size, buf), _seq_write_vol(vol, size, buf)
        if r:  # round 0 warms up: in a VM, the first touch of guest memory is slow
            w_ours.append(wo)
            w_ref.append(wr)
    # reads of the last written volume / file, page cache warm
    assert bytes(vol.read(size - MiB, MiB)) == buf and os.pread(fd, MiB, size - MiB) == buf
    _seq_read_vol(vol, size)
    _seq_read_ref(fd, size)
    r_ours, r_ref = [], []
    for r in range(max(3, reps)):
        if r % 2 == 0:
            r_ours.append(_seq_read_vol(vol, size))
            r_ref.append(_seq_read_ref(fd, size))
        else:
            r_ref.append(_seq_read_ref(fd, size))
            r_ours.append(_seq_read_vol(vol, size))
    vol.close()
    os.close(fd)
    os.unlink(ref_path)
    mb = size / MiB
    rows = []
    ro, rr = mb / median(r_ours), mb / median(r_ref)
    rows.append([f"{bs >> 10}K", "seq read 1M (warm)", ro, rr, ro / rr, "-", f">= {READ_GOAL}",
                 goal(ro / rr >= READ_GOAL)])
    wo = mb / median([w[0] for w in w_ours])
    wr = mb / median([w[0] for w in w_ref])
    wof = mb / median([w[1] for w in w_ours])
    wrf = mb / median([w[1] for w in w_ref])
    rows.append([f"{bs >> 10}K", "seq first write 1M", wo, wr, wo / wr, f"{wof / wrf:.2f}",
                 f">= {WRITE_GOAL}", goal(wo / wr >= WRITE_GOAL)])
    return rows, (wof, wrf)


# -- (c) random 4 KiB -------------------------------------------------------------------------

def _rand_vol(vol, offsets: list[int], buf: bytes, keep: int
              ) -> tuple[float, float, float, float]:
    """(loop s, loop+flush s, p99 write latency s, max write latency s).

    ``keep``: data file bytes whose cached pages stay (a CoW origin's blocks).
    """
    clock = time.perf_counter
    lat = []
    _settle(vol.dp.data_fd, keep)
    t0 = clock()
    t = t0
    for off in offsets:
        vol.write(off, buf)
        u = clock()
        lat.append(u - t)
        t = u
    t1 = clock()
    vol.flush()
    lat.sort()
    return t1 - t0, clock() - t0, lat[int(len(lat) * 0.99)], lat[-1]


def _rand_ref(fd: int, offsets: list[int], buf: bytes, cow: bool) -> tuple[float, float]:
    _settle(fd, None if cow else 0)  # a CoW reference file is a fresh, cached copy
    t0 = time.perf_counter()
    for off in offsets:
        os.pwrite(fd, buf, off)
    t1 = time.perf_counter()
    os.fsync(fd)
    return t1 - t0, time.perf_counter() - t0


def bench_rand(pool: Pool, work: str, bs: int, size: int, nwrites: int, reps: int,
               next_id: list, rng: np.random.Generator) -> list:
    buf = os.urandom(4096)
    big = os.urandom(MiB)
    nblocks = size // bs
    pattern = {
        "uniform": lambda: (rng.integers(0, size // 4096, nwrites) * 4096).tolist(),
        "1 per block": lambda: (rng.permutation(nblocks) * bs
                                + rng.integers(0, bs // 4096, nblocks) * 4096).tolist(),
    }
    # the CoW origin: fully written, committed
    origin = next_id[0]
    next_id[0] += 1
    pool.create_thin(origin, size=size)
    with pool.volume(origin) as ov:
        for off in range(0, size, MiB):
            ov.write(off, big)
        ov.flush()
    origin_end = (max(pool.md.data_blocks(origin, 0, nblocks).values()) + 1) * bs
    full_path = os.path.join(work, "ref-full.img")
    fd = _fresh_file(full_path, size)
    for off in range(0, size, MiB):
        os.pwrite(fd, big, off)
    os.fsync(fd)
    os.close(fd)
    rows = []
    for case in ("fresh volume", "snapshot (CoW)"):
        for pname, gen in pattern.items():
            ours, ref = [], []
            for r in range(reps):
                offsets = gen()
                dev = next_id[0]
                next_id[0] += 1
                if case == "fresh volume":
                    pool.create_thin(dev, size=size)
                    ref_path = os.path.join(work, "ref-rand.img")
                    fd = _fresh_file(ref_path, size)
                else:
                    pool.create_snap(dev, origin)
                    ref_path = os.path.join(work, "ref-rand.img")
                    shutil.copyfile(full_path, ref_path)
                    fd = os.open(ref_path, os.O_RDWR | os.O_CLOEXEC)
                    os.fsync(fd)
                cow = case != "fresh volume"
                with pool.volume(dev) as vol:
                    if r % 2 == 0:
                        ours.append(_rand_vol(vol, offsets, buf, origin_end if cow else 0))
                        ref.append(_rand_ref(fd, offsets, buf, cow))
                    else:
                        ref.append(_rand_ref(fd, offsets, buf, cow))
                        ours.append(_rand_vol(vol, offsets, buf, origin_end if cow else 0))
                    assert bytes(vol.read(offsets[-1], 4096)) == buf
                os.close(fd)
                os.unlink(ref_path)
                # no pool.delete(dev): a deleted volume's data blocks keep their bytes (no
                # passdown on delete), so a later volume that reuses them would pay a real
                # punch-hole per block; "fresh" here means never-used data blocks.
            n = len(offsets)
            io, ir = n / median([x[0] for x in ours]), n / median([x[0] for x in ref])
            iof, irf = n / median([x[1] for x in ours]), n / median([x[1] for x in ref])
            p99 = median([x[2] for x in ours]) * 1e3
            worst = max(x[3] for x in ours) * 1e3
            rows.append([f"{bs >> 10}K", case, pname, n, io, ir, io / ir, iof, irf, iof / irf,
                         p99, worst])
    os.unlink(full_path)
    return rows


# -- (d) memory ----------------------------------------------------------------------------------

def child_read(directory: str, dev: int, nrandom: int, seq_bytes: int) -> int:
    from thinpool.pool.engine import Pool as P
    t0 = time.perf_counter()
    pool = P(directory)
    vol = pool.volume(dev)
    t1 = time.perf_counter()
    rng = np.random.default_rng(7)
    offs = (rng.integers(0, vol.size // 4096, nrandom) * 4096).tolist()
    for off in offs:
        vol.read(off, 4096)
    t2 = time.perf_counter()
    for off in range(0, min(seq_bytes, vol.size), MiB):
        vol.read(off, MiB)
    t3 = time.perf_counter()
    count = sum(1 for _ in pool.md.mappings(dev))
    t4 = time.perf_counter()
    vol.close()
    pool.close()
    with open("/proc/self/status") as f:
        hwm = next(int(line.split()[1]) for line in f if line.startswith("VmHWM"))
    print("BENCH " + json.dumps(dict(open_s=t1 - t0, rand_s=t2 - t1, seq_s=t3 - t2,
                                     walk_s=t4 - t3, walked=count, hwm_kib=hwm)),
          file=sys.stderr)
    return 0


def child_floor() -> int:
    import thinpool.pool.engine  # noqa: F401
    import thinpool.block.device  # noqa: F401
    return 0


def _bench_json(err: str) -> dict:
    for line in err.splitlines():
        if line.startswith("BENCH "):
            return json.loads(line[6:])
    raise RuntimeError(f"child produced no result; stderr:\n{err[-3000:]}")


def bench_rss(directory: str, nrandom: int, seq_bytes: int) -> list:
    floor = run_child(py_child("engine_bench.py", "--child", "floor"))
    c = run_child(py_child("engine_bench.py", "--child", "read", directory, "1", str(nrandom),
                           str(seq_bytes)))
    if c.rc:
        raise RuntimeError(f"read child failed:\n{c.err[-3000:]}")
    j = _bench_json(c.err)
    return [[f"open pool + {nrandom:,} random 4K reads + {seq_bytes >> 20} MiB seq 1M reads "
             f"+ walk all {j['walked']:,} mappings of dev 1",
             c.maxrss_mb, goal(c.maxrss_mb < RSS_GOAL_MB), floor.maxrss_mb,
             j["open_s"], nrandom / j["rand_s"], (seq_bytes / MiB) / j["seq_s"], j["walk_s"]]]


# -- main ---------------------------------------------------------------------------------------

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small smoke run (< 60 s)")
    ap.add_argument("--tmp", default="/tmp", help="parent of the scratch directory")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--only", default="a,b,c,d", help="comma list of parts to run")
    ap.add_argument("--child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        if args.child[0] == "read":
            return child_read(args.child[1], int(args.child[2]), int(args.child[3]),
                              int(args.child[4]))
        return child_floor()
    parts = set(args.only.split(","))
    quick = args.quick
    reps = 1 if quick else 3
    seq_reps = 3 if quick else 7
    seq_size = 64 * MiB if quick else 128 * MiB
    rand_size = 128 * MiB if quick else 1024 * MiB
    nwrites = 2000 if quick else 20000
    nrandom = 5000 if quick else 100_000
    seq_read_bytes = 128 * MiB if quick else 2048 * MiB
    work = tempfile.mkdtemp(prefix="thinpool-engbench-", dir=args.tmp)
    rng = np.random.default_rng(1234)
    t_start = time.perf_counter()
    print(f"# engine_bench{' --quick' if quick else ''}: scratch {work} ({fs_of(work)}), "
          f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs")
    try:
        snap_res = {}
        if "a" in parts or "d" in parts:
            rows, snap_res = bench_snap(work, quick, rng)
            if "a" in parts:
                ns = sorted(snap_res)
                lo, hi = snap_res[ns[0]], snap_res[ns[-1]]
                print(f"\n(a) create_snap of device 1 (10^{6 if not quick else 5} mapped blocks) "
                      f"+ commit, latency in ms ({5 if quick else SNAPS_PER_STATE} snapshots per "
                      f"state, states interleaved; median / max)")
                print(table(["devices", "mappings", "restore s", "md open ms", "md snap+commit med",
                             "md max", "Pool() open ms", "Pool.create_snap med", "first", "max"],
                            rows))
                r_md, r_pool = hi["md"] / lo["md"], hi["pool"] / lo["pool"]
                print(f"ratio {ns[-1]:,} devices / {ns[0]} device: metadata path {r_md:.2f}, "
                      f"Pool.create_snap {r_pool:.2f} (goal <= {SNAP_RATIO_GOAL}: "
                      f"{goal(r_md <= SNAP_RATIO_GOAL)} / {goal(r_pool <= SNAP_RATIO_GOAL)})")
                sys.stdout.flush()
        if "b" in parts or "c" in parts:
            seq_rows, rand_rows = [], []
            for bs in (64 << 10, 512 << 10):
                d = os.path.join(work, f"io-{bs >> 10}k")
                Pool.create(d, data_size="64G", metadata_size="256M",
                            config=PoolConfig(data_block_sectors=bs // 512))
                next_id = [1]
                with Pool(d) as pool:
                    if "b" in parts:
                        rows, _ = bench_seq(pool, work, bs, seq_size, seq_reps, next_id)
                        seq_rows += rows
                    if "c" in parts:
                        rand_rows += bench_rand(pool, work, bs, rand_size, nwrites, reps,
                                                next_id, rng)
                shutil.rmtree(d)
            if seq_rows:
                print(f"\n(b) sequential 1 MiB, MiB/s, {seq_size >> 20} MiB per pass, median of "
                      f"{seq_reps} read passes / {seq_reps} write rounds after a warm-up round "
                      f"(fresh volume and file each)")
                print(table(["block", "test", "ours MiB/s", "plain MiB/s", "ratio", "ratio +flush",
                             "goal", "ok"], seq_rows))
            if rand_rows:
                print(f"\n(c) random 4 KiB writes, IOPS over a {rand_size >> 20} MiB volume, median "
                      f"of {reps}; plain = os.pwrite same offsets (fresh sparse file / fully "
                      f"written file)")
                print(table(["block", "target", "pattern", "writes", "ours IOPS", "plain IOPS",
                             "ratio", "ours +flush", "plain +fsync", "ratio +flush",
                             "ours p99 ms", "ours max ms"], rand_rows))
                print("(max latency: typically a write that waited for the background commit, which holds "
                      "the pool's exclusive I/O lock while it fsyncs the data file)")
            sys.stdout.flush()
        if "d" in parts:
            n_max = max(snap_res)
            rows = bench_rss(snap_res[n_max]["dir"], nrandom, seq_read_bytes)
            print(f"\n(d) peak RSS of a fresh process on the {n_max:,}-device pool "
                  f"(GNU time %M; floor = python + thinpool imports only)")
            print(table(["workload", "peak RSS MiB", f"goal<{RSS_GOAL_MB:.0f}", "floor MiB",
                         "open s", "rand 4K reads/s", "seq MiB/s", "walk s"], rows))
        print(f"\n# total {time.perf_counter() - t_start:.0f} s")
    finally:
        if args.keep:
            print(f"# kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
