#!/usr/bin/env python3
"""Run latency of two thinpool trees against the built-in reference, interleaved.

``docker_bench.py`` and ``snapshotter_bench.py`` time one configuration after
the other, so on a shared machine the reference and the contender run under
different loads (their ratios moved by 40% between runs).  Here every daemon
is up at once and the runs alternate:

* ``docker``: three dockerds - built-in overlay2, and ``thinpool
  docker-plugin --driver devicemapper`` from ``--baseline-src`` and from this
  tree - each with the bench image loaded (``docker_bench.build_image``);
  then ``docker run --rm --pull never --network none IMAGE true`` on each in
  turn;
* ``containerd``: three containerds - built-in overlayfs, and ``thinpool
  snapshotter serve`` (devicemapper) from ``--baseline-src`` and from this
  tree as proxy plugins - each with the bench image imported; then ``ctr run
  --rm IMAGE ID /bin/true`` on each in turn.

After two warm-up runs each, ``--rounds`` rounds, the order rotated every
round.  Reported: the median run time of each, and the median of the
per-round ratios reference time / this time (higher is better).

Usage: python benchmarks/run_ab.py docker|containerd --baseline-src DIR [--rounds N]
[--tree DIR].  DIR is another checkout's ``src`` (for example ``git archive``
of the main branch, unpacked).  Needs root and dockerd, or containerd, ctr and runc.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import sysconfig
import time
from pathlib import Path
from typing import Callable

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(REPO, "tests"))


def interleave(runners: dict[str, Callable[[int], None]], rounds: int) -> dict[str, list[float]]:
    """Seconds of each runner per round, the order rotated every round."""
    names = list(runners)
    times: dict[str, list[float]] = {n: [] for n in names}
    for i in range(rounds):
        k = i % len(names)
        for name in names[k:] + names[:k]:
            t0 = time.perf_counter()
            runners[name](i)
            times[name].append(time.perf_counter() - t0)
    return times


def report(times: dict[str, list[float]], ref: str) -> None:
    print(f"{len(times[ref])} interleaved rounds, load {os.getloadavg()[0]:.1f}")
    for name, ts in times.items():
        ratio = statistics.median(a / b for a, b in zip(times[ref], ts))
        print(f"  {name:22s} {statistics.median(ts) * 1000:7.0f} ms   {ref}/this {ratio:.2f}")


def docker(baseline: str, rounds: int, tree: str) -> None:
    import docker_bench as B
    import dockerkit as K

    work = K.short_tmp("abimg")
    base = K.short_tmp("ab")
    daemons: dict[str, K.Dockerd] = {}
    plugins: list[K.PluginProcess] = []
    saved = os.environ.get("PYTHONPATH")
    try:
        image, _, _ = B.build_image(work, tree)
        d = K.Dockerd(base / "ref", "overlay2")
        d.start()
        daemons["built-in overlay2"] = d
        for label, src in (("baseline devicemapper", baseline),
                           ("this devicemapper", os.path.join(REPO, "src"))):
            os.environ["PYTHONPATH"] = src  # the plugin and its pool server run this tree
            p = K.PluginProcess(K.unique_plugin_name(), "devicemapper", log_dir=base)
            p.start()
            plugins.append(p)
            d = K.Dockerd(base / label.split()[0], p.name, ())
            d.start()
            daemons[label] = d
        for d in daemons.values():
            d.out("load", "-q", "-i", str(image))
            d.out(*B.RUN)
            d.out(*B.RUN)
        report(interleave({n: (lambda i, d=d: d.out(*B.RUN)) for n, d in daemons.items()},
                          rounds), "built-in overlay2")
    finally:
        if saved is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved
        for d in daemons.values():
            d.cleanup()
        for p in plugins:
            p.cleanup()
        K.stop_pool_servers(base)
        K.unmount_under(base)
        shutil.rmtree(base, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)


def containerd(baseline: str, rounds: int, tree: str) -> None:
    import snapshotkit as K

    ref = "thinpool.bench/image:1"
    work = K.scratch_dir("abs-")
    snapshotters: list[K.Snapshotter] = []
    daemons: dict[str, tuple[K.Containerd, str]] = {}
    try:
        image = work / "image.tar"
        K.busybox_image(image, ref, extra_layers=2, tree=tree)
        daemons["built-in overlayfs"] = (K.Containerd(work / "ref", work / "none.sock").start(),
                                         "overlayfs")
        for label, repo in (("baseline devicemapper", Path(baseline).parent),
                            ("this devicemapper", Path(REPO))):
            K.REPO = repo  # the snapshotter runs REPO/src
            sn = K.Snapshotter(work / f"r-{label.split()[0]}", "devicemapper").start()
            snapshotters.append(sn)
            daemons[label] = (K.Containerd(work / label.split()[0], sn.socket).start(),
                              "thinpool")
        for ctr, snapshotter in daemons.values():
            ctr.ctr("image", "import", "--snapshotter", snapshotter, str(image))
            for j in range(2):
                ctr.ctr("run", "--rm", "--snapshotter", snapshotter, ref, f"warm{j}",
                        "/bin/true")

        def runner(ctr: K.Containerd, snapshotter: str) -> Callable[[int], None]:
            return lambda i: ctr.ctr("run", "--rm", "--snapshotter", snapshotter, ref, f"r{i}",
                                     "/bin/true")
        report(interleave({n: runner(*v) for n, v in daemons.items()}, rounds),
               "built-in overlayfs")
    finally:
        for ctr, _ in daemons.values():
            ctr.stop()
        for sn in snapshotters:
            sn.stop()
        K.clean_tree(work)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=("docker", "containerd"))
    ap.add_argument("--baseline-src", required=True,
                    help="the src directory of the tree to compare with")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--tree", default=sysconfig.get_paths()["stdlib"],
                    help="directory for the image's big layer (default: Python's stdlib)")
    args = ap.parse_args()
    baseline = os.path.abspath(args.baseline_src)
    if not os.path.isdir(os.path.join(baseline, "thinpool")):
        raise SystemExit(f"{baseline} holds no thinpool package")
    if os.geteuid() != 0:
        raise SystemExit("needs root")
    (docker if args.what == "docker" else containerd)(baseline, args.rounds, args.tree)


if __name__ == "__main__":
    main()
