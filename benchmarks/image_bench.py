#!/usr/bin/env python3
"""Images and containers on thinpool against dockerd and plain tar, all measured in one run.

The image is multi-layer and made from real trees: the test kit's busybox
root filesystem (layer 1), this Python's standard library under /opt/tree
(layer 2, no site-packages or __pycache__), and a third layer that adds
/usr/share/perl under /opt/perl and deletes one stdlib package (a
whiteout), as a docker-save tarball.  Measured, each as a fresh process
(the CLI as a user runs it), ``--rounds`` times (median):

* ``thinpool image load`` per driver (vfs, overlay2, devicemapper) against
  ``docker load`` of the same archive on dockerd's built-in overlay2
  (goal >= 1.0x for thinpool's overlay2, >= 0.5x for devicemapper) and
  against plain ``tar -x`` of the same layer tars into one directory (the
  limit: no digests, no layering);
* ``thinpool container create`` per driver against ``docker create``;
* ``thinpool docker export`` of a container of a devicemapper root (made
  by thinpool's devicemapper driver, read offline through a read-only
  FUSE + loop mount) against ``tar -c`` of the same tree from a plain
  directory (goal >= 0.5x);
* ``thinpool docker migrate`` of that root to overlay2: MiB/s of layer data.

Ratios are reference time / thinpool time (higher is better).  No timing
is asserted.  Needs root, /dev/fuse, docker.io, busybox-static.

Usage: python benchmarks/image_bench.py [--rounds N] [--drivers vfs,overlay2,devicemapper]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Callable

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))
from _benchlib import table  # noqa: E402
import dockerkit as K  # noqa: E402

TAG = "thinpool-bench/layers:1"
THINPOOL = [sys.executable, "-m", "thinpool.cli"]
DM_OPTS = ["dm.basesize=2G", "dm.loopdatasize=16G", "dm.loopmetadatasize=256M", "dm.fs=ext4"]


def _tree_tar(dest: Path, trees: list[tuple[str, str]], whiteouts: tuple[str, ...] = ()) -> None:
    def keep(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
        if os.path.basename(info.name) in ("site-packages", "__pycache__"):
            return None
        info.uid = info.gid = 0
        info.uname = info.gname = "root"
        return info
    with tarfile.open(dest, "w", format=tarfile.PAX_FORMAT) as tar:
        for src, arcname in trees:
            tar.add(src, arcname=arcname, filter=keep)
        for name in whiteouts:
            info = tarfile.TarInfo(name)
            tar.addfile(info, io.BytesIO(b""))


def build_image(work: Path) -> tuple[Path, list[Path]]:
    """The docker-save archive and its layer tars (as separate files, for tar -x)."""
    stdlib = os.path.dirname(os.__file__)
    layers = [work / "l1.tar", work / "l2.tar", work / "l3.tar"]
    layers[0].write_bytes(K.busybox_layers()[0])
    _tree_tar(layers[1], [(stdlib, "opt/tree")])
    _tree_tar(layers[2], [("/usr/share/perl", "opt/perl")], ("opt/tree/.wh.unittest",))
    diff_ids = []
    for layer in layers:
        h = hashlib.sha256()
        with open(layer, "rb") as f:
            while data := f.read(1 << 20):
                h.update(data)
        diff_ids.append("sha256:" + h.hexdigest())
    config = json.dumps({"architecture": "amd64", "os": "linux", "config": {"Cmd": ["/bin/sh"]},
                         "rootfs": {"type": "layers", "diff_ids": diff_ids}}).encode()
    config_name = hashlib.sha256(config).hexdigest() + ".json"
    names = [f"{d[7:]}/layer.tar" for d in diff_ids]
    path = work / "image.tar"
    with tarfile.open(path, "w") as out:
        for name, data in [(config_name, config),
                           ("manifest.json", json.dumps([{"Config": config_name, "RepoTags": [TAG],
                                                          "Layers": names}]).encode())]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            out.addfile(info, io.BytesIO(data))
        for name, layer in zip(names, layers):
            out.add(str(layer), arcname=name)
    return path, layers


def timed(argv: list[str], check: bool = True) -> tuple[float, str]:
    t0 = time.perf_counter()
    r = subprocess.run(argv, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if check and r.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed: {r.stderr.strip()}")
    return wall, r.stdout


def median_of(rounds: int, once: Callable[[int], float]) -> float:
    return statistics.median(once(i) for i in range(rounds))


def bench_driver(driver: str, image: Path, base: Path, rounds: int) -> tuple[float, float, Path | None]:
    """(load s, create s) for one driver; a devicemapper root is kept for the export and migrate runs."""
    opts = [a for o in (DM_OPTS if driver == "devicemapper" else []) for a in ("--storage-opt", o)]

    def load(i: int) -> float:
        root = base / f"{driver}-{i}"
        wall, _ = timed([*THINPOOL, "image", "--root", str(root), "--driver", driver, *opts, "load", str(image)])
        K.unmount_under(root)
        shutil.rmtree(root, ignore_errors=True)
        return wall

    load_s = median_of(rounds, load)
    root = base / f"{driver}-create"
    timed([*THINPOOL, "image", "--root", str(root), "--driver", driver, *opts, "load", str(image)])
    cmd = [*THINPOOL, "container", "--root", str(root), "--driver", driver, *opts, "create", TAG]
    create_s = median_of(rounds, lambda i: timed(cmd)[0])
    if driver == "devicemapper":
        return load_s, create_s, root
    K.unmount_under(root)
    shutil.rmtree(root, ignore_errors=True)
    return load_s, create_s, None


def bench_docker(image: Path, base: Path, rounds: int) -> tuple[float, float]:
    d = K.Dockerd(base / "d", "overlay2")
    try:
        d.start()
        loads = []
        for i in range(rounds):
            t0 = time.perf_counter()
            d.out("load", "-q", "-i", str(image))
            loads.append(time.perf_counter() - t0)
            if i < rounds - 1:
                d.out("rmi", TAG)
        creates = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            d.out("create", "--network", "none", TAG)
            creates.append(time.perf_counter() - t0)
        return statistics.median(loads), statistics.median(creates)
    finally:
        d.cleanup()


def bench_tar_x(layers: list[Path], base: Path, rounds: int) -> float:
    def once(i: int) -> float:
        dest = base / f"tar-x-{i}"
        dest.mkdir()
        t0 = time.perf_counter()
        for layer in layers:
            subprocess.run(["tar", "-xf", str(layer), "-C", str(dest)], check=True)
        wall = time.perf_counter() - t0
        shutil.rmtree(dest)
        return wall
    return median_of(rounds, once)


def bench_export(root: Path, base: Path, rounds: int) -> tuple[float, float, float, int]:
    """(thinpool docker export -o FILE s, ... > FILE s, tar -c s, bytes) of the root's container.

    ``-o FILE`` writes a temporary file, fsyncs and renames it (complete or nothing);
    ``> FILE`` (standard output) and ``tar -cf`` write without fsync.
    """
    container = json.loads(timed([*THINPOOL, "docker", "ls", str(root), "--json"])[1])["Containers"][0]["Id"]
    out = base / "export.tar"
    export_o = median_of(rounds, lambda i: timed([*THINPOOL, "docker", "export", str(root), container,
                                                   "-o", str(out)])[0])

    def to_stdout(i: int) -> float:
        with open(base / "export-stdout.tar", "wb") as f:
            t0 = time.perf_counter()
            subprocess.run([*THINPOOL, "docker", "export", str(root), container], stdout=f, check=True)
            return time.perf_counter() - t0
    export_stdout = median_of(rounds, to_stdout)
    tree = base / "plain-tree"
    tree.mkdir()
    subprocess.run(["tar", "-xf", str(out), "-C", str(tree)], check=True)
    size = out.stat().st_size
    tar_s = median_of(rounds, lambda i: timed(["tar", "-cf", str(base / "plain.tar"), "-C", str(tree), "."])[0])
    shutil.rmtree(tree)
    return export_o, export_stdout, tar_s, size


def bench_migrate(root: Path, base: Path, layer_bytes: int) -> float:
    dest = base / "migrated"
    wall, _ = timed([*THINPOOL, "docker", "migrate", str(root), "--to", "overlay2", "--dest", str(dest)])
    K.unmount_under(dest)
    shutil.rmtree(dest, ignore_errors=True)
    return layer_bytes / wall / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--drivers", default="vfs,overlay2,devicemapper")
    args = ap.parse_args()
    base = K.short_tmp("ib")
    try:
        image, layers = build_image(base)
        layer_bytes = sum(p.stat().st_size for p in layers)
        files = sum(1 for p in layers for m in tarfile.open(p).getmembers() if m.isfile())
        print(f"image: 3 layers, {files:,} files, {layer_bytes / 2**20:.0f} MiB of layer tars; "
              f"{args.rounds} round(s) each")
        docker_load, docker_create = bench_docker(image, base, args.rounds)
        tar_x = bench_tar_x(layers, base, args.rounds)
        rows = [["docker load / create (built-in overlay2)", docker_load, 1.0, docker_create, 1.0, tar_x / docker_load]]
        dm_root = None
        for driver in args.drivers.split(","):
            load_s, create_s, kept = bench_driver(driver, image, base, args.rounds)
            dm_root = kept or dm_root
            rows.append([f"thinpool image load / container create ({driver})", load_s, docker_load / load_s,
                         create_s, docker_create / create_s, tar_x / load_s])
        print(table(["what", "load s", "docker/this", "create s", "docker/this", "tar -x/this"], rows))
        print(f"plain tar -x of the 3 layer tars into one directory: {tar_x:.2f} s")
        if dm_root is not None:
            export_o, export_stdout, tar_s, size = bench_export(dm_root, base, args.rounds)
            print(f"thinpool docker export of a devicemapper container ({size / 2**20:.0f} MiB tar): "
                  f"-o FILE (fsync, rename) {export_o:.2f} s, > FILE {export_stdout:.2f} s; tar -cf of "
                  f"the same tree from a plain directory: {tar_s:.2f} s; ratio tar/export "
                  f"{tar_s / export_o:.2f}x / {tar_s / export_stdout:.2f}x")
            print(f"thinpool docker migrate (devicemapper -> overlay2): "
                  f"{bench_migrate(dm_root, base, layer_bytes):.1f} MiB/s of layer data")
    finally:
        K.unmount_under(base)
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
