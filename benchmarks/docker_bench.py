#!/usr/bin/env python3
"""dockerd on thinpool's graph drivers (through ``thinpool docker-plugin``) against its built-in drivers.

The image is the test kit's two-layer busybox image plus a third layer made
from a real tree (by default this Python's standard library, without
site-packages and __pycache__: ~2,500 files, ~100 MB), as a docker-save
tarball.  For each configuration a private dockerd is started (for the
plugin ones on a fresh ``thinpool docker-plugin --driver NAME``), then:

* ``docker load``: ``docker load -i IMAGE`` into an empty store, on a
  fresh dockerd (and plugin) each round, ``--rounds`` times;
* ``docker run``: ``docker run --rm --pull never --network none IMAGE true``
  (create: two layers, mounts; start; remove), ``--rounds`` times after one
  warm-up run, on the last round's dockerd.

Reported: median wall seconds of each, and the ratio built-in overlay2 time
/ this configuration's time (higher is better; 1.0 = as fast as dockerd's
own overlay2).  Goals from the graph-driver issue: thinpool's devicemapper
>= 0.5x built-in overlay2 on load and >= 0.8x on run.  The docker client's
own start-up (~50 ms) is inside every number.  No timing is asserted.

Usage: python benchmarks/docker_bench.py [--rounds N] [--tree DIR] [--configs a,b,...]
Configurations: builtin:overlay2, builtin:vfs, and plugin:DRIVER for every
driver this build registers.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tarfile
import time
from pathlib import Path

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))
from _benchlib import table  # noqa: E402
import dockerkit as K  # noqa: E402

from thinpool.graph import registry  # noqa: E402

TAG = "thinpool-bench/image:1"


def tree_layer(tree: str, dest: Path) -> None:
    """A layer tar of ``tree`` under /opt/tree (no site-packages, no __pycache__)."""
    def keep(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
        base = os.path.basename(info.name)
        if base in ("site-packages", "__pycache__"):
            return None
        info.uid = info.gid = 0
        info.uname = info.gname = "root"
        return info
    with tarfile.open(dest, "w", format=tarfile.PAX_FORMAT) as tar:
        tar.add(tree, arcname="opt/tree", filter=keep)


def build_image(work: Path, tree: str) -> tuple[Path, int, int]:
    """The bench image (busybox layers + the tree layer); (path, files, bytes) of the tree layer."""
    import hashlib
    import io
    import json

    layers = K.busybox_layers()
    big = work / "tree-layer.tar"
    tree_layer(tree, big)
    sha = hashlib.sha256()
    with open(big, "rb") as f:
        while data := f.read(1 << 20):
            sha.update(data)
    diff_ids = ["sha256:" + hashlib.sha256(layer).hexdigest() for layer in layers]
    diff_ids.append("sha256:" + sha.hexdigest())
    config = json.dumps({"architecture": "amd64", "os": "linux",
                         "config": {"Cmd": ["/bin/sh"], "Env": ["PATH=/bin:/usr/bin"]},
                         "rootfs": {"type": "layers", "diff_ids": diff_ids}}).encode()
    names = [f"{d[7:]}/layer.tar" for d in diff_ids]
    manifest = json.dumps([{"Config": "config.json", "RepoTags": [TAG], "Layers": names}]).encode()
    path = work / "image.tar"
    with tarfile.open(path, "w") as out:
        for name, data in [("config.json", config), *zip(names[:2], layers),
                           ("manifest.json", manifest)]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            out.addfile(info, io.BytesIO(data))
        out.add(str(big), arcname=names[2])
    with tarfile.open(big) as t:
        members = t.getmembers()
    files = sum(1 for m in members if m.isfile())
    size = big.stat().st_size
    big.unlink()
    return path, files, size


RUN = ("run", "--rm", "--pull", "never", "--network", "none", TAG, "true")


def measure(d: K.Dockerd, image: Path, runs: int) -> tuple[float, list[float]]:
    """Seconds of one load into the empty store, then of ``runs`` runs (after a warm-up)."""
    t0 = time.perf_counter()
    d.out("load", "-q", "-i", str(image))
    load = time.perf_counter() - t0
    times = []
    if runs:
        d.out(*RUN)
    for _ in range(runs):
        t0 = time.perf_counter()
        d.out(*RUN)
        times.append(time.perf_counter() - t0)
    return load, times


def one_round(config: str, image: Path, runs: int) -> tuple[float, list[float]]:
    kind, _, driver = config.partition(":")
    base = K.short_tmp("db")
    try:
        if kind == "builtin":
            d = K.Dockerd(base / "d", driver)
            try:
                d.start()
                return measure(d, image, runs)
            finally:
                d.cleanup()
        with K.docker_env(base, driver) as (d, _plugin):
            return measure(d, image, runs)
    finally:
        K.stop_pool_servers(base)
        K.unmount_under(base)
        shutil.rmtree(base, ignore_errors=True)


def run_config(config: str, image: Path, rounds: int) -> tuple[float, float]:
    """(median load s, median run s) of one configuration."""
    rounds_done = [one_round(config, image, rounds if i == rounds - 1 else 0)
                   for i in range(rounds)]
    return (statistics.median(load for load, _ in rounds_done),
            statistics.median(rounds_done[-1][1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tree", default=None, help="Tree for the big layer (default: the stdlib).")
    plugins = [f"plugin:{n}" for n in registry.registered() if n != "btrfs"]
    ap.add_argument("--configs", default=",".join(["builtin:overlay2", "builtin:vfs", *plugins]))
    args = ap.parse_args()
    tree = args.tree or os.path.dirname(os.__file__)
    work = K.short_tmp("dbimg")
    try:
        image, files, size = build_image(work, tree)
        print(f"image: busybox (2 layers) + {files:,} files / {size / 2**20:.0f} MiB from {tree}; "
              f"{args.rounds} rounds each")
        results = {c: run_config(c, image, args.rounds) for c in args.configs.split(",")}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ref_load, ref_run = results.get("builtin:overlay2", (float("nan"), float("nan")))
    rows = [[c, load, ref_load / load, run, ref_run / run] for c, (load, run) in results.items()]
    print(table(["dockerd storage", "load s", "overlay2/this", "run s", "overlay2/this"], rows))


if __name__ == "__main__":
    main()
