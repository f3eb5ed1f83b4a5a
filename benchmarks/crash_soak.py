"""Crash-safety soak: many SIGKILLs of the crash workload, each one verified.

    python benchmarks/crash_soak.py --kills 2000 --seed 7

Uses the pieces of tests/test_crash.py (tests/crash_workload.py is the process
that gets killed, tests/crash_check.py verifies; see its docstring for what is
accepted after a kill).  A pool lives for --per-pool kills, then a new pool
starts with the next seed.  Every --chosen-every-th kill dies at a chosen
step of the commit protocol instead of after a random sleep.  Stops at the
first violation, prints it with the seed, the kill index and where the pool
and log were kept (--keep keeps everything), and exits 1.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "tests"))

from crash_check import KILL_POINTS, CrashCheckError, CrashRunner, KillStats  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=1000, help="total kills (default 1000)")
    ap.add_argument("--seed", type=int, default=int(time.time()) % 100000,
                    help="first seed (default: from the clock)")
    ap.add_argument("--per-pool", type=int, default=50, help="kills per pool (default 50)")
    ap.add_argument("--chosen-every", type=int, default=5,
                    help="every Nth kill dies at a chosen function call (0: never; default 5)")
    ap.add_argument("--min-sleep", type=float, default=0.05)
    ap.add_argument("--max-sleep", type=float, default=1.5)
    ap.add_argument("--metadata-snap", action="store_true",
                    help="also reserve/release metadata snapshots (see test_crash.py xfail)")
    ap.add_argument("--strict-ro-registry", action="store_true",
                    help="fail when a read-only open shows a stale registry")
    ap.add_argument("--workdir", help="where pools go (default: a new temporary directory)")
    ap.add_argument("--keep", action="store_true", help="keep the pools of passed seeds")
    ap.add_argument("-v", "--verbose", action="store_true", help="one line per kill")
    args = ap.parse_args()

    workdir = args.workdir or tempfile.mkdtemp(prefix="thinpool-soak-")
    os.makedirs(workdir, exist_ok=True)
    stats = KillStats()
    rng = random.Random(args.seed)
    echo = print if args.verbose else None
    print(f"soak: {args.kills} kills from seed {args.seed}, {args.per_pool} per pool, in {workdir}")
    t0 = time.monotonic()
    seed = args.seed
    done = 0
    try:
        while done < args.kills:
            pool_dir = os.path.join(workdir, f"seed{seed}")
            runner = CrashRunner(pool_dir, seed, min_sleep=args.min_sleep,
                                 max_sleep=args.max_sleep, metadata_snap=args.metadata_snap,
                                 strict_ro_registry=args.strict_ro_registry, stats=stats,
                                 echo=echo)
            for k in range(min(args.per_pool, args.kills - done)):
                kill_at = None
                if args.chosen_every and (done + 1) % args.chosen_every == 0:
                    name, *after = rng.choice(KILL_POINTS).split(":")
                    kill_at = f"{name}:{rng.randint(1, 12)}" + (":after" if after else "")
                runner.kill_once(k, kill_at=kill_at, kill_at_timeout=3.0)
                done += 1
                if not args.verbose and done % 50 == 0:
                    rate = done / (time.monotonic() - t0)
                    print(f"  {done}/{args.kills} kills ({rate:.1f}/s), {stats.ops} ops, "
                          f"lost blocks {stats.lost_blocks}, torn {stats.torn_blocks}",
                          flush=True)
            if not args.keep:
                shutil.rmtree(pool_dir)
            seed += 1
    except CrashCheckError as e:
        print(f"\nFAILED after {done} good kills:\n{e}", file=sys.stderr)
        print("\n" + stats.summary())
        return 1
    print("\nPASSED: " + stats.summary())
    if not args.keep and not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
