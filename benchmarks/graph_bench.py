#!/usr/bin/env python3
"""Graph driver benchmark: layer import, container creation and container diff, per driver.

The layer is a real root filesystem tree: the Python installation's own
standard library (``sysconfig`` stdlib, without site-packages: ~8,000
entries, ~260 MB), tarred once with GNU tar. Sections, all from one run:

1. **apply_diff** of that layer into a fresh layer of each driver (create +
   apply_diff, in this process), against ``tar -x`` of the same tar into a
   plain directory on the same filesystem (the limit). Median wall time and
   CPU time over the rounds; ratio driver / tar (lower is better).
2. **create-container latency**: what dockerd does for ``docker create``
   plus start: ``create_rw(<id>-init, image)``, ``get``, the init
   placeholders, ``put``, ``create_rw(<id>, <id>-init)``, ``get``. Median.
3. **diff of a container that changed 100 files** (one line appended to
   each): ``diff(<id>, <id>-init)`` read to the end, as ``docker commit``
   does. Median.

By default everything lives on a tmpfs (/dev/shm; btrfs on a loop-mounted
image file there), so the figures measure the drivers rather than the
disk. No timing is asserted anywhere.

Extension points: ``DRIVER_SETUPS`` maps a driver name to a context
manager that yields where (and with which options) to run it - the
devicemapper driver is added there; ``EXTRA_SECTIONS`` holds functions
``(BenchEnv) -> Section`` run after the built-in sections - the dockerd
comparisons (docker load / docker run on thinpool's drivers against
dockerd's built-in ones) are added there.

Usage: python benchmarks/graph_bench.py [--rounds N] [--tree DIR] [--tmp DIR] [--drivers a,b] [--keep]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable, ContextManager, Iterator

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _benchlib import median, table  # noqa: E402

from thinpool.graph import registry  # noqa: E402
from thinpool.linux import mounts  # noqa: E402
from thinpool.graph.driver import GraphDriver, NotSupported  # noqa: E402


@dataclass
class DriverSetup:
    """Where a driver runs in the benchmark."""

    root: str  # the graph root (the driver's home is root/<name>)
    options: list[str] = field(default_factory=list)
    scratch: str = ""  # a directory on the same filesystem, for the tar -x baseline
    label: str = ""  # the filesystem, as shown in the tables


@dataclass
class BenchEnv:
    """What every section sees."""

    work: str  # the benchmark's scratch directory
    layer_tar: str  # the layer: GNU tar of the tree
    tree: str  # the tree it was made from
    entries: int
    rounds: int
    results: dict[str, dict[str, float]] = field(default_factory=dict)  # section -> name -> seconds


@dataclass
class Section:
    title: str
    headers: list[str]
    rows: list[list[object]]
    note: str = ""


# -- where each driver runs ----------------------------------------------------------------------

@contextlib.contextmanager
def _plain(env: BenchEnv, name: str) -> Iterator[DriverSetup]:
    root = os.path.join(env.work, f"root-{name}")
    scratch = os.path.join(env.work, f"scratch-{name}")
    os.makedirs(scratch)
    yield DriverSetup(root, [], scratch, mounts.fs_name(env.work))


@contextlib.contextmanager
def _btrfs(env: BenchEnv, name: str) -> Iterator[DriverSetup]:
    image = os.path.join(env.work, "btrfs.img")
    mnt = os.path.join(env.work, "btrfs-mnt")
    os.makedirs(mnt)
    subprocess.run(["truncate", "-s", "4G", image], check=True)
    try:
        subprocess.run(["mkfs.btrfs", "-q", image], check=True, capture_output=True)
        subprocess.run(["mount", "-o", "loop", image, mnt], check=True, capture_output=True)
        try:
            os.makedirs(os.path.join(mnt, "scratch"))
            yield DriverSetup(os.path.join(mnt, "root"), [], os.path.join(mnt, "scratch"), "btrfs (loop)")
        finally:
            mounts.unmount_all_below(mnt)
    finally:
        os.unlink(image)


@contextlib.contextmanager
def _devicemapper(env: BenchEnv, name: str) -> Iterator[DriverSetup]:
    """devicemapper on a thinpool pool (loop files in the work directory), ext4 base."""
    root = os.path.join(env.work, f"root-{name}")
    scratch = os.path.join(env.work, f"scratch-{name}")
    os.makedirs(scratch)
    yield DriverSetup(root, ["dm.basesize=4G", "dm.loopdatasize=32G", "dm.loopmetadatasize=1G",
                             "dm.fs=ext4"], scratch, "ext4 on a thinpool volume")


DRIVER_SETUPS: dict[str, Callable[[BenchEnv, str], ContextManager[DriverSetup]]] = {
    "devicemapper": _devicemapper,
    "vfs": _plain,
    "overlay2": _plain,
    "btrfs": _btrfs,
}
"""Driver name -> where it runs. A driver registered but missing here runs in a plain directory."""


# -- measurements --------------------------------------------------------------------------------

def _cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def tar_x(env: BenchEnv, scratch: str) -> tuple[float, float]:
    """(wall, CPU) of one GNU tar -x of the layer into a fresh directory in ``scratch``."""
    dest = os.path.join(scratch, uuid.uuid4().hex)
    os.mkdir(dest)
    t0 = time.perf_counter()
    p = subprocess.Popen(["tar", "-x", "-f", env.layer_tar, "-C", dest])
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status):
        raise SystemExit("tar -x failed")
    shutil.rmtree(dest)
    return wall, ru.ru_utime + ru.ru_stime


def apply_once(env: BenchEnv, d: GraphDriver, id: str) -> tuple[float, float]:
    t0, c0 = time.perf_counter(), _cpu()
    d.create(id, None)
    with open(env.layer_tar, "rb") as f:
        d.apply_diff(id, None, f)
    return time.perf_counter() - t0, _cpu() - c0


INIT_DIRS = ("dev/pts", "dev/shm", "proc", "sys")
INIT_FILES = (".dockerenv", "etc/resolv.conf", "etc/hosts", "etc/hostname", "dev/console")


def create_container(d: GraphDriver, id: str, image: str) -> str:
    """dockerd's container set-up: the init layer with its placeholders, the rw layer on it, mounted."""
    d.create_rw(f"{id}-init", image)
    root = d.get(f"{id}-init")
    try:
        for sub in INIT_DIRS:
            os.makedirs(os.path.join(root, sub), exist_ok=True)
        for sub in INIT_FILES:
            os.makedirs(os.path.dirname(os.path.join(root, sub)), exist_ok=True)
            open(os.path.join(root, sub), "w").close()
        if not os.path.lexists(os.path.join(root, "etc/mtab")):
            os.symlink("/proc/mounts", os.path.join(root, "etc/mtab"))
    finally:
        d.put(f"{id}-init")
    d.create_rw(id, f"{id}-init")
    return d.get(id)


def drop_container(d: GraphDriver, id: str) -> None:
    d.put(id)
    d.remove(id)
    d.remove(f"{id}-init")


def change_files(root: str, count: int) -> int:
    """Append a line to ``count`` .py files of the tree under ``root``; how many were changed."""
    done = 0
    for dirpath, _, files in sorted(os.walk(root)):
        for name in sorted(files):
            if name.endswith(".py"):
                with open(os.path.join(dirpath, name), "a") as f:
                    f.write("# changed by graph_bench\n")
                done += 1
                if done == count:
                    return done
    return done


def bench_driver(env: BenchEnv, name: str, setup: DriverSetup) -> dict[str, object]:
    try:
        d = registry.new_driver(setup.root, name, setup.options)
    except NotSupported as e:
        return {"skipped": str(e)}
    out: dict[str, object] = {"label": setup.label}
    try:
        tar_x(env, setup.scratch)  # warm-up (untimed): the first writer on a fresh tmpfs pays for its pages
        tars = [tar_x(env, setup.scratch) for _ in range(env.rounds)]
        applies = []
        for i in range(env.rounds):
            applies.append(apply_once(env, d, f"img{i}"))
            if i:
                d.remove(f"img{i}")
        out["tar"] = (median([w for w, _ in tars]), median([c for _, c in tars]))
        out["apply"] = (median([w for w, _ in applies]), median([c for _, c in applies]))
        lat = []
        for i in range(env.rounds):
            t0 = time.perf_counter()
            create_container(d, f"ctr{i}", "img0")
            lat.append(time.perf_counter() - t0)
            if i:
                drop_container(d, f"ctr{i}")
        out["create"] = median(lat)
        root = d.get("ctr0")
        changed = change_files(root, 100)
        d.put("ctr0")
        diffs = []
        size = 0
        for _ in range(env.rounds):
            t0 = time.perf_counter()
            size = sum(len(chunk) for chunk in d.diff("ctr0", "ctr0-init"))
            diffs.append(time.perf_counter() - t0)
        out["diff"] = median(diffs)
        out["diff_bytes"] = size
        out["changed"] = changed
        drop_container(d, "ctr0")
        d.remove("img0")
    finally:
        d.cleanup()
    return out


# -- sections --------------------------------------------------------------------------------------

def run(env: BenchEnv, names: list[str]) -> list[Section]:
    per: dict[str, dict[str, object]] = {}
    for name in names:
        make = DRIVER_SETUPS.get(name, _plain)
        print(f"  {name}...", file=sys.stderr, flush=True)
        with make(env, name) as setup:
            per[name] = bench_driver(env, name, setup)
    ran = [n for n in names if "skipped" not in per[n]]
    apply_rows: list[list[object]] = []
    for n in ran:
        (tw, tc), (aw, ac) = per[n]["tar"], per[n]["apply"]  # type: ignore[misc]
        apply_rows.append([n, per[n]["label"], tw, aw, aw / tw, tc, ac, ac / tc])
        env.results.setdefault("apply", {})[n] = aw
        env.results.setdefault("tar", {})[n] = tw
    fastest = min((float(per[n]["create"]) for n in ran), default=float("nan"))  # type: ignore[arg-type]
    create_rows: list[list[object]] = []
    diff_rows: list[list[object]] = []
    for n in ran:
        c = float(per[n]["create"])  # type: ignore[arg-type]
        create_rows.append([n, per[n]["label"], c * 1000, c / fastest])
        env.results.setdefault("create", {})[n] = c
        dt = float(per[n]["diff"])  # type: ignore[arg-type]
        diff_rows.append([n, per[n]["label"], per[n]["changed"], per[n]["diff_bytes"], dt * 1000])
        env.results.setdefault("diff", {})[n] = dt
    fastest_diff = min((r[4] for r in diff_rows), default=float("nan"))  # type: ignore[type-var]
    for r in diff_rows:
        r.append(float(r[4]) / float(fastest_diff))  # type: ignore[arg-type]
    skipped = "".join(f"\n{n} skipped: {per[n]['skipped']}" for n in names if "skipped" in per[n])
    return [
        Section(f"apply_diff of a {env.entries}-entry layer ({os.path.getsize(env.layer_tar) / 1e6:.0f} MB) "
                "vs tar -x on the same filesystem",
                ["driver", "filesystem", "tar -x s", "apply s", "ratio", "tar CPU s", "apply CPU s", "CPU ratio"],
                apply_rows, "ratio = driver / tar -x (lower is better)" + skipped),
        Section("create-container latency (init layer + placeholders + rw layer + get)",
                ["driver", "filesystem", "ms", "x fastest"], create_rows),
        Section("diff of a container that changed 100 files (read to the end)",
                ["driver", "filesystem", "files", "tar bytes", "ms", "x fastest"], diff_rows),
    ]


EXTRA_SECTIONS: list[Callable[[BenchEnv], Section]] = []
"""More sections (e.g. dockerd on thinpool's drivers vs dockerd's built-in ones), run after the rest."""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tree", default=sysconfig.get_paths()["stdlib"],
                    help="the tree to make the layer from (default: this Python's stdlib, without site-packages)")
    ap.add_argument("--tmp", default=None, help="work directory (default: /dev/shm, a tmpfs)")
    ap.add_argument("--drivers", default=None, help="comma-separated drivers (default: every registered one)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("graph_bench needs root (mounts, device nodes, ownership)")
    names = args.drivers.split(",") if args.drivers else registry.registered()
    base = args.tmp or ("/dev/shm" if os.path.isdir("/dev/shm") else None)
    work = tempfile.mkdtemp(prefix="graph-bench-", dir=base)
    try:
        layer = os.path.join(work, "layer.tar")
        subprocess.run(["tar", "-c", "-f", layer, "--exclude=site-packages", "-C", args.tree, "."], check=True)
        entries = int(subprocess.run(["tar", "-t", "-f", layer], capture_output=True, text=True,
                                     check=True).stdout.count("\n"))
        env = BenchEnv(work, layer, args.tree, entries, args.rounds)
        print(f"layer: {args.tree} ({entries} entries), rounds: {args.rounds}, work: {work} "
              f"({mounts.fs_name(work)})", file=sys.stderr)
        sections = run(env, names)
        for extra in EXTRA_SECTIONS:
            sections.append(extra(env))
        for s in sections:
            print(f"\n### {s.title}\n")
            print(table(s.headers, s.rows))
            if s.note:
                print(f"\n{s.note}")
    finally:
        if not args.keep:
            mounts.unmount_all_below(work)
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
