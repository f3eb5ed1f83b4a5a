#!/usr/bin/env python3
"""Metadata tools benchmark: thinpool's restore / dump / check against thin-provisioning-tools 0.9.0.

Generates thin_dump XML of a realistic pool (an origin with five snapshots that
share most data blocks and diverge through CoW writes, a snapshot chain of a
second volume, independent volumes; range and single mappings; 1,000,000
mappings in total by default), then measures in the same run, each command in
a fresh process (peak RSS from ``os.wait4``):

* restore: ``thinpool.tools.restore.restore`` vs ``thin_restore -i X -o M``
* dump:    ``thinpool.tools.dump.dump`` vs ``thin_dump M``, on the metadata
           restored by us AND on the one restored by thin_restore;
           our output must equal thin_dump's byte for byte
* check:   ``thinpool.tools.check.check`` vs ``thin_check M``, on both files

Ratios are ours/theirs (lower is better); goals: ratio <= 2.0, RSS < 200 MiB.

Usage: python benchmarks/metadata_bench.py [--quick] [--mappings N] [--reps R]
       [--keep] [--tmp DIR]
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _benchlib import Dev, fs_of, goal, median, py_child, run_child, table, write_xml  # noqa: E402

RATIO_GOAL = 2.0
RSS_GOAL_MB = 200.0
DATA_BLOCK_SIZE = 128  # sectors (64 KiB)


# -- workload generation -----------------------------------------------------------------

class _PoolModel:
    """Dense per-device arrays driven by a kernel-like write model.

    A write to a shared mapping (time < the device's snap_time) gets a new
    data block stamped with the current time; a write to an exclusive mapping
    changes nothing in the metadata; a write to an unmapped block provisions.
    """

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng
        self.time = 0
        self.trans = 0
        self.next_free = 0
        self.devs: dict[int, dict] = {}

    def alloc(self, n: int) -> np.ndarray:
        # the allocator mostly continues where it stopped; sometimes it skips (freed holes)
        if self.rng.random() < 0.05:
            self.next_free += int(self.rng.integers(1, 64))
        out = np.arange(self.next_free, self.next_free + n, dtype=np.int64)
        self.next_free += n
        return out

    def create(self, dev_id: int, vsize: int) -> None:
        self.devs[dev_id] = dict(data=np.full(vsize, -1, np.int64), tm=np.zeros(vsize, np.int64),
                                 trans=self.trans, ctime=self.time, stime=self.time)
        self.trans += 1

    def snapshot(self, dev_id: int, origin: int) -> None:
        self.time += 1
        o = self.devs[origin]
        o["stime"] = self.time
        self.devs[dev_id] = dict(data=o["data"].copy(), tm=o["tm"].copy(), trans=self.trans,
                                 ctime=self.time, stime=self.time)
        self.trans += 1

    def extents(self, vsize: int, fill: float, mean_len: float, lo: int = 0):
        """(start, length) extents covering about ``fill`` of [lo, vsize): 30 % singles."""
        rng = self.rng
        n = int((vsize - lo) / mean_len * 1.5) + 16
        lens = np.where(rng.random(n) < 0.3, 1, rng.geometric(1.0 / mean_len, n))
        mean_ext = 0.3 + 0.7 * mean_len
        gaps = rng.geometric(min(1.0, fill / (mean_ext * (1 - fill))), n)
        starts = lo + np.cumsum(gaps + lens) - lens
        keep = starts + lens <= vsize
        return starts[keep], lens[keep]

    def write_runs(self, dev_id: int, starts: np.ndarray, lens: np.ndarray) -> None:
        """Write whole runs of virtual blocks at the current time."""
        d = self.devs[dev_id]
        for s, n in zip(starts.tolist(), lens.tolist()):
            self._write(d, np.arange(s, s + n))

    def _write(self, d: dict, vblocks: np.ndarray) -> None:
        data, tm = d["data"], d["tm"]
        need = (data[vblocks] < 0) | (tm[vblocks] < d["stime"])
        v = vblocks[need]
        if v.size:
            data[v] = self.alloc(v.size)
            tm[v] = self.time

    def scattered_writes(self, dev_id: int, frac_overwrite: float, frac_new: float,
                         mean_run: float = 2.0) -> None:
        """Clustered overwrites of mapped blocks plus clustered writes into unmapped space."""
        d, rng = self.devs[dev_id], self.rng
        for pool_, frac in ((np.flatnonzero(d["data"] >= 0), frac_overwrite),
                            (np.flatnonzero(d["data"] < 0), frac_new)):
            if pool_.size == 0 or frac <= 0:
                continue
            nclusters = max(1, int(pool_.size * frac / mean_run))
            at = rng.integers(0, pool_.size, nclusters)
            lens = rng.geometric(1.0 / mean_run, nclusters)
            for a, n in zip(at.tolist(), lens.tolist()):
                self._write(d, pool_[a:a + n])

    def mapped(self) -> int:
        return int(sum((d["data"] >= 0).sum() for d in self.devs.values()))


def generate(target: int, seed: int = 42, workload: str = "mixed"):
    """The pool history; returns (devices, time, transaction, nr_data_blocks).

    ``mixed``: the allocator hands out mostly consecutive blocks, so runs become
    range_mappings.  ``singles``: the same history with data block numbers
    permuted at random (sharing kept), so nearly every mapping is a
    single_mapping: the per-element worst case.
    """
    rng = np.random.default_rng(seed)
    m = _PoolModel(rng)
    s = target / 1_000_000
    sizes = {1: int(130_000 * s) + 64, 7: int(200_000 * s) + 64, 8: int(90_000 * s) + 64,
             9: int(40_000 * s) + 64}
    fills = {1: 0.85, 7: 0.75, 8: 0.6, 9: 0.8}
    for dev_id in (1, 7, 8, 9):
        m.create(dev_id, sizes[dev_id])
    # initial fill, writers interleaved: extents of all four volumes in random order
    work = []
    for dev_id in (1, 7, 8, 9):
        st, ln = m.extents(sizes[dev_id], fills[dev_id], 24.0)
        work += [(dev_id, a, b) for a, b in zip(st.tolist(), ln.tolist())]
    for i in rng.permutation(len(work)).tolist():
        dev_id, a, b = work[i]
        m._write(m.devs[dev_id], np.arange(a, a + b))
    snaps = []
    for k in range(1, 6):
        snap = 1 + k
        m.snapshot(snap, 1)
        snaps.append(snap)
        if k == 3:
            m.snapshot(10, 9)
        m.scattered_writes(1, 0.05, 0.005)
        for sdev in snaps:
            m.scattered_writes(sdev, 0.02, 0.002)
        for other in (7, 8, 9) + ((10,) if k >= 3 else ()):
            m.scattered_writes(other, 0.01, 0.01)
    # make the total exact through dev 7 (grow into its empty upper half, or trim its top)
    d7 = m.devs[7]
    deficit = target - m.mapped()
    if deficit > 0:
        lo = d7["data"].size  # the volume grows: new space after its end
        grow = int(deficit / 0.8) + 1024
        d7["data"] = np.concatenate([d7["data"], np.full(grow, -1, np.int64)])
        d7["tm"] = np.concatenate([d7["tm"], np.zeros(grow, np.int64)])
        st, ln = m.extents(lo + grow, 0.9, 48.0, lo)
        room = np.cumsum(ln)
        k = int(np.searchsorted(room, deficit)) + 1
        st, ln = st[:k].copy(), ln[:k].copy()
        if k and room[k - 1] > deficit:
            ln[-1] -= room[k - 1] - deficit
        m.write_runs(7, st, ln)
    elif deficit < 0:
        mapped7 = np.flatnonzero(d7["data"] >= 0)
        d7["data"][mapped7[deficit:]] = -1
    assert m.mapped() == target, (m.mapped(), target)
    perm = rng.permutation(m.next_free) if workload == "singles" else None
    devs = []
    for dev_id, d in sorted(m.devs.items()):
        vb = np.flatnonzero(d["data"] >= 0)
        db = d["data"][vb] if perm is None else perm[d["data"][vb]]
        devs.append(Dev(dev_id, vb, db, d["tm"][vb], d["trans"], d["ctime"], d["stime"]))
    nr_data = (int(m.next_free * 1.25) // 1024 + 1) * 1024
    return devs, m.time, m.trans, nr_data


# -- child processes ---------------------------------------------------------------------

def child(argv: list[str]) -> int:
    op = argv[0]
    t0 = time.perf_counter()
    if op == "noop":
        import thinpool.tools.check  # noqa: F401
        import thinpool.tools.dump  # noqa: F401
        import thinpool.tools.restore  # noqa: F401
        t1 = time.perf_counter()
        res = {}
    elif op == "restore":
        from thinpool.tools.restore import restore
        t1 = time.perf_counter()
        restore(argv[1], argv[2])
        res = {}
    elif op == "dump":
        from thinpool.tools.dump import dump
        t1 = time.perf_counter()
        with open(argv[2], "w") as out:
            dump(argv[1], out)
        res = {}
    elif op == "check":
        from thinpool.tools.check import check
        t1 = time.perf_counter()
        rep = check(argv[1])
        res = {"clean": rep.clean, "errors": rep.errors[:5], "leaks": rep.leaks[:5],
               "nr_mappings": rep.nr_mappings}
    else:
        raise SystemExit(f"unknown child op {op}")
    t2 = time.perf_counter()
    res.update(import_s=t1 - t0, op_s=t2 - t1)
    print("BENCH " + json.dumps(res), file=sys.stderr)
    return 0


def _bench_json(err: str) -> dict:
    for line in err.splitlines():
        if line.startswith("BENCH "):
            return json.loads(line[6:])
    raise RuntimeError(f"child produced no result; stderr:\n{err[-3000:]}")


def _fresh(path: str, size: int) -> None:
    if os.path.exists(path):
        os.unlink(path)
    with open(path, "wb") as f:
        f.truncate(size)


# -- main ----------------------------------------------------------------------------------

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small smoke run (< 60 s)")
    ap.add_argument("--mappings", type=int, help="total mappings (default 1,000,000; quick 50,000)")
    ap.add_argument("--reps", type=int, help="repetitions per measurement (default 3; quick 1)")
    ap.add_argument("--tmp", default="/tmp", help="parent of the scratch directory")
    ap.add_argument("--keep", action="store_true", help="keep the scratch directory")
    ap.add_argument("--workload", default="mixed,singles",
                    help="comma list of workloads: mixed (range+single), singles (default: both)")
    ap.add_argument("--child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child)
    target = args.mappings or (50_000 if args.quick else 1_000_000)
    reps = args.reps or (1 if args.quick else 3)
    for tool in ("thin_restore", "thin_dump", "thin_check"):
        if not shutil.which(tool):
            print(f"{tool} not found (apt-get install thin-provisioning-tools)", file=sys.stderr)
            return 2
    work = tempfile.mkdtemp(prefix="thinpool-mdbench-", dir=args.tmp)
    print(f"# metadata_bench: {target:,} mappings, {reps} rep(s), scratch {work} ({fs_of(work)}), "
          f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs")
    try:
        rc = 0
        for workload in args.workload.split(","):
            sub = os.path.join(work, workload)
            os.mkdir(sub)
            rc |= _run(sub, target, reps, workload)
            shutil.rmtree(sub, ignore_errors=True)
        return rc
    finally:
        if args.keep:
            print(f"# kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def _run(work: str, target: int, reps: int, workload: str) -> int:
    t0 = time.perf_counter()
    devs, time_, trans, nr_data = generate(target, workload=workload)
    xml = os.path.join(work, "pool.xml")
    nmap, nlines = write_xml(xml, devs, time_, trans, DATA_BLOCK_SIZE, nr_data)
    shared = _shared_blocks(devs)
    print(f"\n## workload '{workload}': {len(devs)} devices ({', '.join(f'{d.dev_id}:{d.vb.size}' for d in devs)}), "
          f"{nmap:,} mappings in {nlines:,} XML elements, {shared:,} data blocks shared by "
          f"2+ devices, nr_data_blocks {nr_data:,}, XML {os.path.getsize(xml) / 2**20:.1f} MiB, "
          f"generated in {time.perf_counter() - t0:.1f} s")
    # metadata file: room for the trees (~16-32 bytes per mapping) with a wide margin
    meta_size = max(64 << 20, (nmap * 64 // (1 << 20) + 64) << 20)
    ours_meta = os.path.join(work, "ours.meta")
    theirs_meta = os.path.join(work, "theirs.meta")

    # floor: interpreter + imports, no work
    base = run_child(py_child("metadata_bench.py", "--child", "noop"))
    base_j = _bench_json(base.err)

    rows = []
    failures = []

    # restore -----------------------------------------------------------------------------
    o_wall, o_op, o_rss, t_wall, t_rss = [], [], [], [], []
    for r in range(reps):
        order = ("ours", "theirs") if r % 2 == 0 else ("theirs", "ours")
        for who in order:
            if who == "ours":
                _fresh(ours_meta, meta_size)
                c = run_child(py_child("metadata_bench.py", "--child", "restore", xml, ours_meta))
                if c.rc:
                    raise RuntimeError(f"our restore failed:\n{c.err[-3000:]}")
                o_wall.append(c.wall)
                o_op.append(_bench_json(c.err)["op_s"])
                o_rss.append(c.maxrss_mb)
            else:
                _fresh(theirs_meta, meta_size)
                c = run_child(["thin_restore", "-i", xml, "-o", theirs_meta])
                if c.rc:
                    raise RuntimeError(f"thin_restore failed:\n{c.err[-3000:]}")
                t_wall.append(c.wall)
                t_rss.append(c.maxrss_mb)
    valid = run_child(["thin_check", ours_meta])
    note = "thin_check(ours.meta) rc=%d" % valid.rc
    if valid.rc:
        failures.append(f"thin_check rejects our restored metadata: {valid.err.strip()[-500:]}")
    rows.append(_row("restore", "xml", o_wall, o_op, o_rss, t_wall, t_rss, note))
    used = {n: _allocated(p) for n, p in (("ours", ours_meta), ("theirs", theirs_meta))}

    # dump on both files ---------------------------------------------------------------------
    for label, meta in (("ours.meta", ours_meta), ("theirs.meta", theirs_meta)):
        o_wall, o_op, o_rss, t_wall, t_rss = [], [], [], [], []
        ours_out = os.path.join(work, f"dump-ours-{label}.xml")
        theirs_out = os.path.join(work, f"dump-theirs-{label}.xml")
        for r in range(reps):
            order = ("ours", "theirs") if r % 2 == 0 else ("theirs", "ours")
            for who in order:
                if who == "ours":
                    c = run_child(py_child("metadata_bench.py", "--child", "dump", meta, ours_out))
                    if c.rc:
                        raise RuntimeError(f"our dump failed:\n{c.err[-3000:]}")
                    o_wall.append(c.wall)
                    o_op.append(_bench_json(c.err)["op_s"])
                    o_rss.append(c.maxrss_mb)
                else:
                    c = run_child(["thin_dump", meta], stdout_path=theirs_out)
                    if c.rc:
                        raise RuntimeError(f"thin_dump failed:\n{c.err[-3000:]}")
                    t_wall.append(c.wall)
                    t_rss.append(c.maxrss_mb)
        same = filecmp.cmp(ours_out, theirs_out, shallow=False)
        roundtrip = filecmp.cmp(theirs_out, xml, shallow=False)
        if not same:
            failures.append(f"dump of {label}: our output differs from thin_dump "
                            f"({_first_diff(ours_out, theirs_out)})")
        note = f"ours==thin_dump: {'yes' if same else 'NO'}; thin_dump==input xml: " \
               f"{'yes' if roundtrip else 'no'}"
        rows.append(_row("dump", label, o_wall, o_op, o_rss, t_wall, t_rss, note))

    # check on both files ---------------------------------------------------------------------
    for label, meta in (("ours.meta", ours_meta), ("theirs.meta", theirs_meta)):
        o_wall, o_op, o_rss, t_wall, t_rss = [], [], [], [], []
        verdicts = set()
        for r in range(reps):
            order = ("ours", "theirs") if r % 2 == 0 else ("theirs", "ours")
            for who in order:
                if who == "ours":
                    c = run_child(py_child("metadata_bench.py", "--child", "check", meta))
                    if c.rc:
                        raise RuntimeError(f"our check crashed:\n{c.err[-3000:]}")
                    j = _bench_json(c.err)
                    verdicts.add(("ours", j["clean"], j["nr_mappings"]))
                    if not j["clean"]:
                        failures.append(f"our check on {label}: {j['errors']} {j['leaks']}")
                    o_wall.append(c.wall)
                    o_op.append(j["op_s"])
                    o_rss.append(c.maxrss_mb)
                else:
                    c = run_child(["thin_check", meta])
                    verdicts.add(("theirs", c.rc == 0, None))
                    t_wall.append(c.wall)
                    t_rss.append(c.maxrss_mb)
        ok_ours = all(v[1] for v in verdicts if v[0] == "ours")
        ok_theirs = all(v[1] for v in verdicts if v[0] == "theirs")
        nm = [v[2] for v in verdicts if v[0] == "ours"]
        note = (f"ours clean={ok_ours} ({nm[0]:,} mappings); thin_check rc0={ok_theirs}"
                if nm and nm[0] is not None else f"ours clean={ok_ours}; thin_check rc0={ok_theirs}")
        rows.append(_row("check", label, o_wall, o_op, o_rss, t_wall, t_rss, note))

    print(f"Medians of {reps} run(s); every command in a fresh process. 'wall' = fork..exit "
          f"(ours includes ~{base.wall:.2f} s of interpreter start + imports); 'op' = the call itself "
          f"in our process. Ratios ours/theirs; goals: ratio <= {RATIO_GOAL}, our RSS < {RSS_GOAL_MB:.0f} MiB.")
    print(table(["op", "input", "ours wall s", "ours op s", "thin_* s", "ratio wall", "ratio op",
                 "goal<=2", "ours RSS MiB", "goal<200M", "thin RSS MiB", "verified"], rows))
    print(f"floor: python + numpy + thinpool.tools imports alone: wall {base.wall:.2f} s, imports "
          f"{base_j['import_s']:.2f} s, RSS {base.maxrss_mb:.1f} MiB")
    print(f"metadata allocated on disk: ours {used['ours'] / 2**20:.1f} MiB, thin_restore "
          f"{used['theirs'] / 2**20:.1f} MiB (file size {meta_size >> 20} MiB, sparse)")
    if failures:
        print("CORRECTNESS FAILURES:")
        for f in failures:
            print("  - " + f)
        return 1
    print("correctness: all dumps identical to thin_dump, all checks clean")
    return 0


def _row(op, label, o_wall, o_op, o_rss, t_wall, t_rss, note):
    ow, oo, tw = median(o_wall), median(o_op), median(t_wall)
    rw, ro = ow / tw, oo / tw
    rss = max(o_rss)
    return [op, label, ow, oo, tw, rw, ro, goal(rw <= RATIO_GOAL), rss,
            goal(rss < RSS_GOAL_MB), max(t_rss), note]


def _shared_blocks(devs) -> int:
    allb = np.concatenate([d.db for d in devs])
    _, counts = np.unique(allb, return_counts=True)
    return int((counts > 1).sum())


def _allocated(path: str) -> int:
    return os.stat(path).st_blocks * 512


def _first_diff(a: str, b: str) -> str:
    with open(a) as fa, open(b) as fb:
        for n, (x, y) in enumerate(zip(fa, fb), 1):
            if x != y:
                return f"line {n}: ours {x.strip()[:120]!r} vs {y.strip()[:120]!r}"
    return "one output is a prefix of the other"


if __name__ == "__main__":
    sys.exit(main())
