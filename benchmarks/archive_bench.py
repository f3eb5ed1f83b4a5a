#!/usr/bin/env python3
"""Archive layer benchmark: applying a layer tar against GNU tar -x of the same tar.

The layer is ~20,000 small files (0-8 KiB, in 200 directories) plus a few
large files, ~200 MB in all, written by GNU tar (plain tar, and gzip -1 of
it). Each round extracts into a fresh empty directory, in a fresh process:
GNU ``tar -xf`` (as root: owners and modes restored, like ours) and
``thinpool.archive.apply_layer`` (Python start-up and imports included).
Reported: median wall time and median CPU time (user + sys, from wait4) over
the rounds, the ratios ours / tar (lower is better), and our extra CPU per
entry. On a shared machine the wall times are noisy (other I/O); the CPU
ratio is the steadier figure. The two results are compared with
``changes()`` to make sure both extracted the same tree. Page cache is warm
for both (the tar was just written); by default everything lives on a tmpfs
(/dev/shm), which measures the per-entry cost of the two programs rather than
the disk. No timing is asserted anywhere.

Usage: python benchmarks/archive_bench.py [--rounds N] [--files N] [--tmp DIR] [--keep]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _benchlib import median, table  # noqa: E402

from thinpool.archive import changes  # noqa: E402

MiB = 1 << 20
APPLY = "import sys; from thinpool.archive import apply_layer; apply_layer(sys.argv[1], open(sys.argv[2], 'rb'))"


def timed(argv: list[str]) -> tuple[float, float, int]:
    """(wall s, CPU s = user + sys of the process and its children, exit status) of one run."""
    t0 = time.perf_counter()
    p = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    if p.stderr is not None:
        p.stderr.close()
    return wall, ru.ru_utime + ru.ru_stime, os.waitstatus_to_exitcode(status)


def build_tree(root: str, files: int, big_total: int, seed: int = 1) -> int:
    """Small files of 0-8 KiB in directories of 100, then large files up to ``big_total`` bytes."""
    rng = np.random.default_rng(seed)
    pool = rng.integers(0, 256, size=16 * MiB, dtype=np.uint8).tobytes()
    total = 0
    for i in range(files):
        d = os.path.join(root, f"usr/share/pkg{i // 100:03d}")
        if i % 100 == 0:
            os.makedirs(d)
        size = int(rng.integers(0, 8193))
        off = int(rng.integers(0, len(pool) - size))
        with open(os.path.join(d, f"file{i:05d}.txt"), "wb") as f:
            f.write(pool[off:off + size])
        total += size
    os.makedirs(os.path.join(root, "opt/big"))
    n = 0
    while total < big_total:
        chunk = min(20 * MiB, big_total - total)
        with open(os.path.join(root, f"opt/big/blob{n}"), "wb") as f:
            f.write(pool[:chunk] if chunk <= len(pool) else (pool * (chunk // len(pool) + 1))[:chunk])
        total += chunk
        n += 1
    return total


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--files", type=int, default=20_000)
    ap.add_argument("--total-mb", type=int, default=200)
    ap.add_argument("--tmp", default=None,
                    help="work directory (default: /dev/shm, a tmpfs, so that disk contention from other "
                         "processes does not drown the per-entry cost; pass e.g. /var/tmp for a disk)")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()

    default_tmp = "/dev/shm" if os.path.isdir("/dev/shm") else None
    work = tempfile.mkdtemp(prefix="archive-bench-", dir=args.tmp or default_tmp)
    try:
        src = os.path.join(work, "src")
        os.mkdir(src)
        total = build_tree(src, args.files, args.total_mb * 1_000_000)
        layer = os.path.join(work, "layer.tar")
        subprocess.run(["tar", "-cf", layer, "-C", src, "."], check=True)
        subprocess.run(["sh", "-c", f"gzip -1 -c {layer} > {layer}.gz"], check=True)
        entries = int(subprocess.run(["sh", "-c", f"tar -tf {layer} | wc -l"], capture_output=True,
                                     text=True, check=True).stdout)
        print(f"work dir {work}; layer: {entries:,} entries, {total / 1e6:.0f} MB of file data, "
              f"tar {os.path.getsize(layer) / 1e6:.0f} MB, gzip -1 {os.path.getsize(layer + '.gz') / 1e6:.0f} MB")

        rows = []
        for label, path, tar_flags in (("plain tar", layer, "-xf"), ("gzip", layer + ".gz", "-xzf")):
            times: dict[str, list[float]] = {"tar": [], "ours": [], "tar cpu": [], "ours cpu": []}
            for r in range(args.rounds):
                for who in ("tar", "ours"):
                    dest = os.path.join(work, f"out-{who}")
                    shutil.rmtree(dest, ignore_errors=True)
                    os.mkdir(dest)
                    subprocess.run(["sync"], check=True)
                    argv = (["tar", tar_flags, path, "-C", dest] if who == "tar"
                            else [sys.executable, "-c", APPLY, dest, path])
                    wall, cpu, rc = timed(argv)
                    if rc != 0:
                        print(f"{who} failed with status {rc}", file=sys.stderr)
                        return 1
                    times[who].append(wall)
                    times[who + " cpu"].append(cpu)
            diff = changes(os.path.join(work, "out-ours"), os.path.join(work, "out-tar"))
            if diff:
                print(f"MISMATCH between tar and ours: {diff[:5]}", file=sys.stderr)
                return 1
            t_tar, t_ours = median(times["tar"]), median(times["ours"])
            c_tar, c_ours = median(times["tar cpu"]), median(times["ours cpu"])
            rows.append([label, t_tar, t_ours, t_ours / t_tar, c_tar, c_ours, c_ours / c_tar,
                         (c_ours - c_tar) / entries * 1e6])
        print(table(["layer", "tar wall s", "ours wall s", "wall ratio", "tar CPU s", "ours CPU s",
                     "CPU ratio", "extra CPU us/entry"], rows))
        print(f"(median of {args.rounds} rounds, fresh process each; identical trees checked with changes())")
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
