#!/usr/bin/env python3
"""Images and containers on thinpool against dockerd and plain tar, all measured in one run.

The image is multi-layer and made from real trees: the test kit's busybox
root filesystem (layer 1), this Python's standard library under /opt/tree
(layer 2, no site-packages or __pycache__), and a third layer that adds
/usr/share/perl under /opt/perl and deletes one stdlib package (a
whiteout), as a docker-save tarball.  Measured, each as a fresh process
(the CLI as a user runs it), ``--rounds`` times, the contenders of a round
back to back (medians; ratios are medians of per-round ratios):

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
* ``thinpool docker migrate`` of that root to overlay2: MiB/s of layer data
  (medians of ``--rounds`` runs each with the default reader and with
  ``--reader kernel``, interleaved).

Ratios are reference time / thinpool time (higher is better).  No timing
is asserted.  thinpool's modules are byte-compiled first (as pip installs
them), into a cache under the benchmark's temporary directory.  Needs root, /dev/fuse, docker.io, busybox-static.

Usage: python benchmarks/image_bench.py [--rounds N (3)] [--drivers vfs,overlay2,devicemapper]
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


def driver_args(driver: str) -> list[str]:
    return [a for o in (DM_OPTS if driver == "devicemapper" else []) for a in ("--storage-opt", o)]


def thinpool_load(driver: str, image: Path, root: Path) -> float:
    return timed([*THINPOOL, "image", "--root", str(root), "--driver", driver, *driver_args(driver),
                  "load", str(image)])[0]


def drop(root: Path) -> None:
    K.unmount_under(root)
    shutil.rmtree(root, ignore_errors=True)


def tar_x(layers: list[Path], dest: Path) -> float:
    dest.mkdir()
    t0 = time.perf_counter()
    for layer in layers:
        subprocess.run(["tar", "-xf", str(layer), "-C", str(dest)], check=True)
    wall = time.perf_counter() - t0
    shutil.rmtree(dest)
    return wall


def bench_loads_and_creates(image: Path, layers: list[Path], drivers: list[str], base: Path, rounds: int
                            ) -> tuple[dict[str, list[float]], dict[str, list[float]], dict[str, Path]]:
    """Seconds per round of every load (docker, tar -x, thinpool per driver) and create.

    The contenders of one round run back to back, so a round's ratios share the
    machine's state (this host's disk speed moves by 2-4x within minutes).  The
    roots of the last round are kept (for the creates, the export and migrate).
    """
    loads: dict[str, list[float]] = {name: [] for name in ["docker", "tar -x", *drivers]}
    creates: dict[str, list[float]] = {name: [] for name in ["docker", *drivers]}
    roots = {driver: base / f"{driver}-root" for driver in drivers}
    d = K.Dockerd(base / "d", "overlay2")
    try:
        d.start()
        for i in range(rounds):
            last = i == rounds - 1
            t0 = time.perf_counter()
            d.out("load", "-q", "-i", str(image))
            loads["docker"].append(time.perf_counter() - t0)
            if not last:
                d.out("rmi", TAG)
            loads["tar -x"].append(tar_x(layers, base / "tar-x"))
            for driver in drivers:
                loads[driver].append(thinpool_load(driver, image, roots[driver]))
                if not last:
                    drop(roots[driver])
        for _ in range(rounds):
            t0 = time.perf_counter()
            d.out("create", "--network", "none", TAG)
            creates["docker"].append(time.perf_counter() - t0)
            for driver in drivers:
                creates[driver].append(timed([*THINPOOL, "container", "--root", str(roots[driver]), "--driver",
                                              driver, *driver_args(driver), "create", TAG])[0])
    finally:
        d.cleanup()
    return loads, creates, roots


def ratio(reference: list[float], ours: list[float]) -> float:
    """Median over rounds of reference time / our time (higher is better)."""
    return statistics.median(r / o for r, o in zip(reference, ours))


def bench_export(root: Path, base: Path, rounds: int
                 ) -> tuple[list[float], list[float], list[float], list[float], int]:
    """Per round: thinpool docker export -o FILE s, ... > FILE s, ... --reader kernel -o FILE s, tar -c s;
    and the tar's bytes.

    ``-o FILE`` writes a temporary file, fsyncs and renames it (complete or nothing);
    ``> FILE`` (standard output) and ``tar -cf`` write without fsync.  The plain
    tree is the export unpacked (so in the page cache, as the reference's best case).
    ``--reader kernel`` is the read-only kernel mount the default reader falls back to.
    """
    container = json.loads(timed([*THINPOOL, "docker", "ls", str(root), "--json"])[1])["Containers"][0]["Id"]
    out = base / "export.tar"
    timed([*THINPOOL, "docker", "export", str(root), container, "-o", str(out)])
    tree = base / "plain-tree"
    tree.mkdir()
    subprocess.run(["tar", "-xf", str(out), "-C", str(tree)], check=True)
    size = out.stat().st_size
    to_file, to_stdout, kernel, tar_c = [], [], [], []
    for _ in range(rounds):
        to_file.append(timed([*THINPOOL, "docker", "export", str(root), container, "-o", str(out)])[0])
        with open(base / "export-stdout.tar", "wb") as f:
            t0 = time.perf_counter()
            subprocess.run([*THINPOOL, "docker", "export", str(root), container], stdout=f, check=True)
            to_stdout.append(time.perf_counter() - t0)
        kernel.append(timed([*THINPOOL, "docker", "export", str(root), container, "--reader", "kernel", "-o",
                             str(out)])[0])
        tar_c.append(timed(["tar", "-cf", str(base / "plain.tar"), "-C", str(tree), "."])[0])
    shutil.rmtree(tree)
    return to_file, to_stdout, kernel, tar_c, size


def bench_migrate(root: Path, base: Path, layer_bytes: int, rounds: int) -> dict[str, list[float]]:
    """MiB/s of layer data of ``thinpool docker migrate`` to overlay2 per round, with the default reader
    and with ``--reader kernel`` (order alternating; dirty pages written out before each)."""
    dest = base / "migrated"
    out: dict[str, list[float]] = {"auto": [], "kernel": []}
    for i in range(rounds):
        for reader in ("auto", "kernel") if i % 2 == 0 else ("kernel", "auto"):
            os.sync()
            wall, _ = timed([*THINPOOL, "docker", "migrate", str(root), "--to", "overlay2", "--dest", str(dest),
                             "--reader", reader])
            K.unmount_under(dest)
            shutil.rmtree(dest, ignore_errors=True)
            out[reader].append(layer_bytes / wall / 2**20)
    return out


def report_export(dm_root: Path, base: Path, rounds: int, layer_bytes: int) -> None:
    to_file, to_stdout, kernel, tar_c, size = bench_export(dm_root, base, rounds)
    med = statistics.median
    print(f"thinpool docker export of a devicemapper container ({size / 2**20:.0f} MiB tar): "
          f"-o FILE (fsync, rename) {med(to_file):.2f} s, > FILE {med(to_stdout):.2f} s, --reader kernel "
          f"-o FILE {med(kernel):.2f} s; tar -cf of the same tree from a plain directory: {med(tar_c):.2f} s; "
          f"tar/export {ratio(tar_c, to_file):.2f}x / {ratio(tar_c, to_stdout):.2f}x, kernel reader "
          f"{ratio(tar_c, kernel):.2f}x")
    mig = bench_migrate(dm_root, base, layer_bytes, rounds)
    print(f"thinpool docker migrate (devicemapper -> overlay2): {med(mig['auto']):.1f} MiB/s of layer data, "
          f"--reader kernel {med(mig['kernel']):.1f} MiB/s; auto/kernel {ratio(mig['auto'], mig['kernel']):.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--drivers", default="vfs,overlay2,devicemapper")
    ap.add_argument("--export-only", action="store_true",
                    help="only thinpool docker export and migrate of a devicemapper root (no dockerd, no loads)")
    args = ap.parse_args()
    drivers = args.drivers.split(",")
    base = K.short_tmp("ib")
    # as installed: byte-compiled modules (this environment may set PYTHONDONTWRITEBYTECODE,
    # which makes every thinpool process compile its ~100 modules again)
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    os.environ["PYTHONPYCACHEPREFIX"] = str(base / "pycache")
    subprocess.run([sys.executable, "-c", "import thinpool.cli, thinpool.graph, thinpool.images.dockerroot"],
                   check=True)
    try:
        image, layers = build_image(base)
        layer_bytes = sum(p.stat().st_size for p in layers)
        files = sum(1 for p in layers for m in tarfile.open(p).getmembers() if m.isfile())
        print(f"image: 3 layers, {files:,} files, {layer_bytes / 2**20:.0f} MiB of layer tars; "
              f"{args.rounds} interleaved round(s); medians, ratios are medians of per-round ratios")
        if args.export_only:
            dm_root = base / "devicemapper-root"
            thinpool_load("devicemapper", image, dm_root)
            timed([*THINPOOL, "container", "--root", str(dm_root), "--driver", "devicemapper",
                   *driver_args("devicemapper"), "create", TAG])
            report_export(dm_root, base, args.rounds, layer_bytes)
            return
        loads, creates, roots = bench_loads_and_creates(image, layers, drivers, base, args.rounds)
        med = statistics.median
        rows = [["docker load (built-in overlay2)", med(loads["docker"]), 1.0, ratio(loads["tar -x"], loads["docker"])],
                ["plain tar -x of the layer tars", med(loads["tar -x"]), ratio(loads["docker"], loads["tar -x"]), 1.0]]
        for driver in drivers:
            rows.append([f"thinpool image load ({driver})", med(loads[driver]),
                         ratio(loads["docker"], loads[driver]), ratio(loads["tar -x"], loads[driver])])
        print(table(["load", "s", "docker/this", "tar -x/this"], rows))
        rows = [["docker create", med(creates["docker"]), 1.0]]
        for driver in drivers:
            rows.append([f"thinpool container create ({driver})", med(creates[driver]),
                         ratio(creates["docker"], creates[driver])])
        print(table(["create", "s", "docker/this"], rows))
        for driver in drivers:
            if driver != "devicemapper":
                drop(roots[driver])
        if "devicemapper" in drivers:
            dm_root = roots["devicemapper"]
            report_export(dm_root, base, args.rounds, layer_bytes)
    finally:
        K.unmount_under(base)
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
