"""Shared helpers for the benchmark scripts (not a test module).

* ``run_child``: run a command in a fresh process, return wall time, peak RSS
  (from ``os.wait4`` for exactly that child) and its stdout.
* ``write_xml``: write thin_dump 0.9.0 XML (byte-identical layout) for devices
  given as dense numpy arrays, merging runs into ``range_mapping`` elements.
* ``table``: a plain-text table.
* ``steady_guest_memory``: stop a VM from handing freed memory back to its host
  for the run, and touch it once, so first touches do not swing the figures.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import mmap
import tempfile
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))


@dataclass
class ChildResult:
    wall: float  # seconds, fork to reap
    maxrss_mb: float  # peak resident set of that child, MiB
    rc: int
    out: str
    err: str


GNU_TIME = "/usr/bin/time"


def run_child(argv: Sequence[str], stdout_path: str | None = None,
              env: dict[str, str] | None = None) -> ChildResult:
    """Run argv in a fresh process; wall time and that process's own peak RSS.

    Peak RSS comes from GNU time's %M. (ru_maxrss from wait4 on a child forked
    by this Python process is useless: Linux carries the forking process's
    high-water mark across fork+exec, so every child would show ours.)
    stdout goes to ``stdout_path`` (or a temp file that is read back).
    """
    with tempfile.TemporaryFile() as err_f, tempfile.TemporaryFile() as tmp_out, \
            tempfile.NamedTemporaryFile("r", suffix=".rss") as rss_f:
        wrapped = list(argv)
        if os.access(GNU_TIME, os.X_OK):
            wrapped = [GNU_TIME, "-q", "-f", "%M", "-o", rss_f.name] + wrapped
        out_f = open(stdout_path, "wb") if stdout_path else tmp_out
        try:
            t0 = time.perf_counter()
            p = subprocess.Popen(wrapped, stdout=out_f, stderr=err_f, env=env)
            _, status, ru = os.wait4(p.pid, 0)
            wall = time.perf_counter() - t0
            p.returncode = os.waitstatus_to_exitcode(status)
        finally:
            if stdout_path:
                out_f.close()
        err_f.seek(0)
        err = err_f.read().decode(errors="replace")
        out = ""
        if not stdout_path:
            tmp_out.seek(0)
            out = tmp_out.read().decode(errors="replace")
        rss_text = rss_f.read().strip().splitlines()
        try:
            rss_kib = int(rss_text[-1])
        except (IndexError, ValueError):
            rss_kib = ru.ru_maxrss  # upper bound only (see above)
    return ChildResult(wall, rss_kib / 1024.0, p.returncode, out, err)


def py_child(script: str, *args: str) -> list[str]:
    return [sys.executable, os.path.join(BENCH_DIR, script), *args]


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(h) for h in headers]] + [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for n, r in enumerate(cells):
        lines.append("| " + " | ".join(c.rjust(w) if n and _num(c) else c.ljust(w)
                                        for c, w in zip(r, widths)) + " |")
        if n == 0:
            lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def _fmt(c: object) -> str:
    if isinstance(c, float):
        if c != c:
            return "-"
        if abs(c) >= 1000:
            return f"{c:,.0f}"
        if abs(c) >= 100:
            return f"{c:.1f}"
        if abs(c) >= 1:
            return f"{c:.2f}"
        return f"{c:.3f}"
    if isinstance(c, int):
        return f"{c:,}"
    return str(c)


def _num(s: str) -> bool:
    return bool(s) and (s[0].isdigit() or s[0] in "-.") and s != "-"


def goal(ok: bool) -> str:
    return "OK" if ok else "MISS"


# -- XML ------------------------------------------------------------------------------

_SINGLE = '    <single_mapping origin_block="%d" data_block="%d" time="%d"/>\n'
_RANGE = '    <range_mapping origin_begin="%d" data_begin="%d" length="%d" time="%d"/>\n'


@dataclass
class Dev:
    dev_id: int
    vb: np.ndarray  # sorted virtual blocks (int64)
    db: np.ndarray  # data blocks
    tm: np.ndarray  # mapping times
    transaction: int
    creation_time: int
    snap_time: int


def runs(vb: np.ndarray, db: np.ndarray, tm: np.ndarray):
    """thin_dump's run merging: consecutive vblock and data block, equal time."""
    if vb.size == 0:
        return vb, db, tm, vb
    brk = np.ones(vb.size, dtype=bool)
    brk[1:] = (np.diff(vb) != 1) | (np.diff(db) != 1) | (tm[1:] != tm[:-1])
    starts = np.flatnonzero(brk)
    lengths = np.diff(np.append(starts, vb.size))
    return vb[starts], db[starts], tm[starts], lengths


def write_xml(path: str, devs: Sequence[Dev], time_: int, transaction: int,
              data_block_size: int, nr_data_blocks: int) -> tuple[int, int]:
    """Write the document; returns (mappings, XML lines of mappings)."""
    nmap = nlines = 0
    with open(path, "w", buffering=1 << 20) as f:
        f.write(f'<superblock uuid="" time="{time_}" transaction="{transaction}" flags="0" '
                f'version="2" data_block_size="{data_block_size}" '
                f'nr_data_blocks="{nr_data_blocks}">\n')
        for d in sorted(devs, key=lambda d: d.dev_id):
            f.write(f'  <device dev_id="{d.dev_id}" mapped_blocks="{d.vb.size}" '
                    f'transaction="{d.transaction}" creation_time="{d.creation_time}" '
                    f'snap_time="{d.snap_time}">\n')
            v, b, t, n = runs(d.vb, d.db, d.tm)
            step = 65536
            for i in range(0, v.size, step):
                vv, bb, tt, nn = (x[i:i + step].tolist() for x in (v, b, t, n))
                f.write("".join(_SINGLE % (a, c, e) if l == 1 else _RANGE % (a, c, l, e)
                                for a, c, e, l in zip(vv, bb, tt, nn)))
            nmap += d.vb.size
            nlines += v.size
            f.write("  </device>\n")
        f.write("</superblock>\n")
    return nmap, nlines


def fs_of(path: str) -> str:
    """'ext4 on /dev/vda' style description of the filesystem holding path."""
    try:
        out = subprocess.run(["df", "-T", path], capture_output=True, text=True).stdout.split("\n")[1]
        dev, fstype = out.split()[:2]
        return f"{fstype} on {dev}"
    except Exception:  # noqa: BLE001 - informational only
        return "unknown"


PAGE_REPORTING_ORDER = "/sys/module/page_reporting/parameters/page_reporting_order"
NO_REPORTING_ORDER = 11  # above the largest buddy order (10): no free block is ever reported


def steady_guest_memory(fraction: float = 0.9) -> tuple[str, Callable[[], None]]:
    """In a VM whose kernel reports free pages to the host (virtio-balloon free page reporting,
    Firecracker here), every page the kernel frees goes back to the host within moments, and its
    next first touch costs a host fault (about 10 µs a page): a benchmark's page cache, freed when
    one target's files are deleted, makes the next target's writes pay again, by chance. This
    turns reporting off (``page_reporting_order`` above the largest order; needs root) and
    touches ``fraction`` of the available memory once, so every target runs on memory the host
    already backs. Returns what it did and an undo (reporting back on) for the end of the run;
    where there is no such parameter it does nothing."""
    try:
        with open(PAGE_REPORTING_ORDER) as f:
            before = f.read().strip()
        with open(PAGE_REPORTING_ORDER, "w") as f:
            f.write(str(NO_REPORTING_ORDER))
    except OSError as e:
        return f"free page reporting left as is ({e.strerror})", lambda: None

    def undo() -> None:
        with open(PAGE_REPORTING_ORDER, "w") as f:
            f.write(before)

    t0 = time.monotonic()
    chunk = 1 << 30
    maps = []
    try:
        with open("/proc/meminfo") as f:
            avail = next(int(line.split()[1]) * 1024 for line in f
                         if line.startswith("MemAvailable"))
        for _ in range(int(avail * fraction) // chunk):
            m = mmap.mmap(-1, chunk, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            maps.append(m)
            for off in range(0, chunk, mmap.PAGESIZE):
                m[off] = 1
    except BaseException:  # interrupted or out of memory: the machine's setting goes back first
        undo()
        raise
    finally:
        for m in maps:
            m.close()
    return (f"free page reporting off for the run (was order {before}), "
            f"{len(maps)} GiB touched in {time.monotonic() - t0:.0f} s"), undo
