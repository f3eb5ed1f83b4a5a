#!/usr/bin/env python3
"""containerd on thinpool's snapshotter (a proxy plugin) against containerd's built-in snapshotters.

The image is the test kit's busybox image (three small layers, one with a
whiteout) plus a layer made from a real tree (by default this Python's
standard library without site-packages and __pycache__: thousands of files,
tens of MB), as a docker-save archive.  For each configuration a private
containerd (Debian's 1.6) is started - for thinpool ones with a fresh
``thinpool snapshotter serve --driver NAME`` as its proxy plugin - then:

* ``import``: ``ctr image import --snapshotter S IMAGE`` into an empty
  containerd root (and an empty snapshotter root), ``--rounds`` times;
* ``run``: ``ctr run --rm --snapshotter S IMAGE ID /bin/true`` (a container
  snapshot on the image, the mounts, runc, the removal), ``--rounds`` times
  after one warm-up run, on the last round's containerd;
* ``128 layers``: containerd's own conformance suite's 128LayersMount
  sub-test (128 nested Prepare / mount / apply / unmount / Commit, then a
  View of the whole chain) through the proxy client for thinpool's backends,
  and in-process for containerd's native and overlayfs snapshotters
  (``tests/containerd/suite_test.go``; the binary comes from
  ``THINPOOL_SUITE_BIN`` or is built by ``tests/containerd/build-suite.sh``).

Reported: median wall seconds, and the ratio built-in overlayfs time / this
configuration's time (higher is better; 1.0 = as fast as containerd's own
overlayfs).  Goals from the snapshotter issue: thinpool's devicemapper >= 0.5x
built-in overlayfs on import and >= 0.8x on run.  ctr's own start-up (~30 ms)
is inside every number.  No timing is asserted.

Usage: python benchmarks/snapshotter_bench.py [--rounds N] [--tree DIR] [--configs a,b,...]
Configurations: builtin:overlayfs, builtin:native, thinpool:devicemapper, thinpool:overlay2,
thinpool:vfs (default: all but thinpool:vfs).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(REPO, "tests"))
from _benchlib import table  # noqa: E402
import snapshotkit as K  # noqa: E402

REF = "thinpool.bench/image:1"
DEFAULT = ["builtin:overlayfs", "builtin:native", "thinpool:devicemapper", "thinpool:overlay2"]


def timed(fn, *args) -> float:  # type: ignore[no-untyped-def]
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


def bench_config(config: str, image: Path, rounds: int, work: Path) -> tuple[float, float]:
    """(median import seconds, median run seconds) of one configuration."""
    kind, name = config.split(":")
    snapshotter = "thinpool" if kind == "thinpool" else name
    imports, runs = [], []
    for r in range(rounds):
        base = Path(tempfile.mkdtemp(prefix="sb-", dir=work))
        sn = K.Snapshotter(base / "r", name).start() if kind == "thinpool" else None
        ctr = K.Containerd(base / "c", sn.socket if sn else base / "unused.sock").start()
        try:
            imports.append(timed(ctr.ctr, "image", "import", "--snapshotter", snapshotter,
                                 str(image)))
            if r == rounds - 1:
                ctr.ctr("run", "--rm", "--snapshotter", snapshotter, REF, "warm", "/bin/true")
                for i in range(rounds):
                    runs.append(timed(ctr.ctr, "run", "--rm", "--snapshotter", snapshotter, REF,
                                      f"r{i}", "/bin/true"))
        finally:
            ctr.stop()
            if sn is not None:
                sn.stop()
            K.clean_tree(base)
    return statistics.median(imports), statistics.median(runs)


def suite_binary(work: Path) -> Path:
    given = os.environ.get("THINPOOL_SUITE_BIN")
    if given:
        return Path(given)
    out = work / "snapshotter-suite.test"
    subprocess.run(["bash", os.path.join(REPO, "tests/containerd/build-suite.sh"), str(out)],
                   check=True, stdout=subprocess.DEVNULL)
    return out


def layers_128(config: str, binary: Path, work: Path) -> float:
    """Seconds of the suite's 128LayersMount sub-test for one configuration."""
    kind, name = config.split(":")
    tmp = K.scratch_dir("ts-")
    env = dict(os.environ, TMPDIR=str(tmp),
               PYTHONPATH=os.path.join(REPO, "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if kind == "thinpool":
        test = "TestThinpoolSnapshotter"
        env.update(THINPOOL_SNAPSHOTTER=f"{sys.executable} -m thinpool.cli", THINPOOL_DRIVER=name,
                   THINPOOL_STORAGE_OPTS="dm.basesize=1G" if name == "devicemapper" else "")
    else:
        test = "TestReferenceSnapshotter"
        env["THINPOOL_REFERENCE"] = name
    try:
        r = subprocess.run([str(binary), "-test.v", "-test.run", f"{test}/128LayersMount$"],
                           env=env, capture_output=True, text=True, timeout=1800)
    finally:
        K.clean_tree(tmp)
    m = re.search(r"--- PASS: \S+/128LayersMount \(([0-9.]+)s\)", r.stdout)
    if not m:
        raise SystemExit(f"{config}: 128LayersMount did not pass:\n{r.stdout[-3000:]}")
    return float(m.group(1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tree", default=sysconfig.get_paths()["stdlib"],
                    help="directory for the big layer (default: Python's standard library)")
    ap.add_argument("--configs", default=",".join(DEFAULT))
    ap.add_argument("--no-128", action="store_true", help="skip the 128-layer chain")
    args = ap.parse_args()
    if os.geteuid() != 0 or not K.containerd_available():
        raise SystemExit("needs root, containerd, ctr and runc")
    configs = args.configs.split(",")
    work = K.scratch_dir("tps-")
    try:
        image = work / "image.tar"
        info = K.busybox_image(image, REF, extra_layers=2, tree=args.tree)
        print(f"image: {info['layers']} layers, {image.stat().st_size / 1e6:.1f} MB "
              f"(tree layer: {args.tree}); {args.rounds} rounds; median seconds")
        results = {c: bench_config(c, image, args.rounds, work) for c in configs}
        chain = {}
        if not args.no_128:
            binary = suite_binary(work)
            chain = {c: layers_128(c, binary, work) for c in configs}
        ref = results.get("builtin:overlayfs")
        ref128 = chain.get("builtin:overlayfs")
        rows = []
        for c in configs:
            imp, run = results[c]
            rows.append([c, f"{imp:.3f}", f"{ref[0] / imp:.2f}x" if ref else "-",
                         f"{run:.3f}", f"{ref[1] / run:.2f}x" if ref else "-",
                         f"{chain[c]:.1f}" if c in chain else "-",
                         f"{ref128 / chain[c]:.2f}x" if ref128 and c in chain else "-"])
        print(table(["configuration", "import s", "vs overlayfs", "run s", "vs overlayfs",
                     "128 layers s", "vs overlayfs"], rows))
    finally:
        K.clean_tree(work)


if __name__ == "__main__":
    main()
