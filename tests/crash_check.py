"""Crash-safety checking by SIGKILL: content pattern, log replay, post-crash verification.

Shared by ``tests/crash_workload.py`` (the process that gets killed),
``tests/test_crash.py`` and ``benchmarks/crash_soak.py``.

The log
-------
The workload appends one JSON object per line to LOGFILE, ``fdatasync``-ed
after every line:

* ``{"ev": "start", "run": R, "seed": S, "devices": {id: size}, ...}`` after
  the pool opened (the devices it found: the recovered state);
* ``{"ev": "op", "i": STEP, "op": KIND, ...}`` *before* issuing an operation
  (the intent);
* ``{"ev": "flushed", "i": STEP}`` after a flush or a committing message
  (create_thin, create_snap, delete, set_transaction_id, reserve/release
  metadata snapshot) returned: everything up to STEP is acknowledged durable.

After verifying a crash, the checker appends ``{"ev": "checked", ...}``;
replay only considers events after the last such marker, on top of the
contents the checker read back (the recovered state).

What is accepted after a SIGKILL
--------------------------------
Let F be the last acknowledged flush and N the last logged intent (op N may
have been in flight or not started at all).  S_k is the model state after op
k (S_F is the acknowledged state).

* The metadata passes ``thin_check`` and ``thinpool.tools.check``; the
  on-disk registry (volumes.json plus the committed prefix of the
  volumes.log journal) agrees with the metadata devices and the model's
  sizes; the pool opens read-write (the dead process's lock is gone) and its
  registry then lists exactly the metadata devices.  Recorded as a note, not
  a failure: a read-only open showing a stale registry (``strict_ro_registry``).
* Transaction id: only set_transaction_id changes it (device changes do not):
  the ``new`` of the last completed one in the window, either value of one
  in flight, or the run's starting id when there was none.
* Device set: that of S_N; or that of S_{N-1} when op N is a device change
  (create_thin, create_snap, delete).
* Contents, per volume and per 64 KiB block b: the block equals S_k[b] for
  some k in F..N (each block may come from a different k: unflushed writes
  are lost or kept block by block, never half of an op in a block) - except
  that a block written by op N itself (a write still in flight) may be torn
  at 4 KiB page granularity between S_{N-1}[b] and S_N[b] (a killed pwrite
  stops between pages).  A volume created by op N equals S_N exactly.
  Nothing else is accepted: no zeros where data was acknowledged, no
  garbage, no data of another volume or of a step that did not write there.
"""

from __future__ import annotations

import json
import os
import random
import select
import shutil
import signal
import subprocess
import tempfile
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

BS = 64 * 1024  # pool data block size used by these tests
PAGE = 4096
MIB = 1 << 20
DATA_SIZE = 256 * MIB
METADATA_SIZE = 16 * MIB
VOLUME_SIZES = (4 * MIB, 6 * MIB, 8 * MIB)
MAX_VOLUMES = 7
MAGIC = 0x7A70
HERE = Path(__file__).resolve().parent
WORKLOAD = HERE / "crash_workload.py"

# One 16-byte record per 16 bytes of volume space: recognisable and self-describing.
RECORD = np.dtype([("magic", "<u2"), ("run", "<u2"), ("step", "<u4"), ("vol", "<u2"),
                   ("seed", "<u2"), ("unit", "<u4")])
# Function calls to die at: every step of a commit and of a device change.
KILL_POINTS = [
    "thinpool.pool.registry.Registry.prepare",  # device change: before the journal line
    "thinpool.pool.registry.Registry.prepare:after",  # journal line synced, metadata not committed
    "thinpool.pdata.block_manager.BlockManager.flush",  # commit: before the metadata blocks
    "thinpool.pdata.block_manager.BlockManager.write_superblock",  # blocks synced, no superblock
    "thinpool.pdata.block_manager.BlockManager.write_superblock:after",  # superblock written
    "thinpool.pool.registry.Registry.finish",  # metadata committed, registry not updated in memory
    "thinpool.block.core.DataPath.zero_block",  # zeroing a new block / passdown after commit
    "thinpool.block.core.punch_hole",  # the hole punch itself
    "thinpool.block.device._copy_range",  # copy-on-write of a shared block
]
PWRITE_OPS = ("write", "write_zeroes")  # ops that pwrite data in place
DEVICE_OPS = ("create_thin", "create_snap", "delete")


class CrashCheckError(AssertionError):
    pass


# -- content ----------------------------------------------------------------------------------

def pattern(seed: int, run: int, step: int, vol: int, offset: int, length: int) -> bytes:
    """The bytes written at volume offset ``offset`` by step ``step`` of run ``run``."""
    u0 = offset // 16
    u1 = (offset + length + 15) // 16
    rec = np.empty(u1 - u0, dtype=RECORD)
    rec["magic"] = MAGIC
    rec["run"] = run & 0xFFFF
    rec["step"] = step
    rec["vol"] = vol & 0xFFFF
    rec["seed"] = seed & 0xFFFF
    rec["unit"] = np.arange(u0, u1, dtype=np.uint64) & 0xFFFFFFFF
    skip = offset - u0 * 16
    return rec.tobytes()[skip:skip + length]


def describe(buf: bytes | bytearray | memoryview, vol_offset: int) -> str:
    """What the 16-byte record at (16-aligned) ``vol_offset`` of ``buf`` looks like."""
    raw = bytes(buf[:16])
    if raw == bytes(16):
        return "zeros"
    r = np.frombuffer(raw.ljust(16, b"\0"), dtype=RECORD)[0]
    if int(r["magic"]) != MAGIC:
        return f"garbage {raw.hex()}"
    where = int(r["unit"]) * 16
    text = (f"seed {int(r['seed'])} run {int(r['run'])} step {int(r['step'])} "
            f"vol {int(r['vol'])} offset {where:#x}")
    if where != vol_offset:
        text += f" (MISPLACED: found at offset {vol_offset:#x})"
    return text


# -- log --------------------------------------------------------------------------------------

class Log:
    """Append-only JSON-lines log, each line made durable before returning."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        self._end_last_line()

    def _end_last_line(self) -> None:
        """Make the file end with a newline before anything is appended.

        A writer killed inside ``write`` can leave part of a line (the kernel stops copying at
        a page boundary once SIGKILL is pending). A last line that parses is finished with its
        newline (``read_events`` already counts it); one that does not is cut off, so the next
        event starts a line of its own instead of being glued to the fragment.
        """
        size = os.fstat(self.fd).st_size
        if size == 0 or os.pread(self.fd, 1, size - 1) == b"\n":
            return
        text = os.pread(self.fd, size, 0)
        cut = text.rfind(b"\n") + 1  # 0 when the fragment is the whole file
        if _is_json(text[cut:]):
            os.write(self.fd, b"\n")
        else:
            os.ftruncate(self.fd, cut)
        os.fdatasync(self.fd)

    def __call__(self, **event: object) -> None:
        line = (json.dumps(event, separators=(",", ":"), sort_keys=True) + "\n").encode()
        done = 0
        while done < len(line):
            done += os.write(self.fd, line[done:])
        os.fdatasync(self.fd)

    def close(self) -> None:
        os.close(self.fd)


def _is_json(line: bytes) -> bool:
    try:
        json.loads(line)
    except ValueError:
        return False
    return True


def read_events(path: str | os.PathLike[str]) -> list[dict]:
    """Events after the last ``checked`` marker; a torn last line is ignored."""
    events: list[dict] = []
    try:
        with open(path, "rb") as f:
            lines = f.read().split(b"\n")
    except FileNotFoundError:
        return events
    tail = lines.pop()  # b"" when the file ends with a newline
    if tail and _is_json(tail):  # a complete line whose newline was not written yet counts
        lines.append(tail)
    for n, line in enumerate(lines):
        if not line:
            continue
        try:
            ev = json.loads(line)
        except ValueError:
            raise CrashCheckError(f"{path}: line {n + 1} is not JSON: {line[:200]!r}") from None
        if ev.get("ev") == "checked":
            events.clear()
        else:
            events.append(ev)
    return events


# -- model ------------------------------------------------------------------------------------

@dataclass
class Model:
    """Volume contents: dev id -> bytearray (its length is the volume size)."""

    vols: dict[int, bytearray] = field(default_factory=dict)

    def copy(self) -> Model:
        return Model({v: bytearray(b) for v, b in self.vols.items()})

    def sizes(self) -> dict[int, int]:
        return {v: len(b) for v, b in self.vols.items()}


def op_blocks(op: dict) -> range:
    """Blocks whose content an op may change."""
    kind, off, n = op["op"], op.get("off", 0), op.get("len", 0)
    if kind == "discard":
        return range(-(-off // BS), (off + n) // BS)
    if kind in PWRITE_OPS and n:
        return range(off // BS, (off + n - 1) // BS + 1)
    return range(0)


def apply_op(model: Model, op: dict, seed: int, run: int) -> None:
    kind = op["op"]
    if kind == "write":
        v, off, n = op["vol"], op["off"], op["len"]
        model.vols[v][off:off + n] = pattern(seed, run, op["i"], v, off, n)
    elif kind == "write_zeroes":
        v, off, n = op["vol"], op["off"], op["len"]
        model.vols[v][off:off + n] = bytes(n)
    elif kind == "discard":
        blocks = op_blocks(op)
        if len(blocks):
            model.vols[op["vol"]][blocks.start * BS:blocks.stop * BS] = bytes(len(blocks) * BS)
    elif kind == "create_thin":
        model.vols[op["vol"]] = bytearray(op["size"])
    elif kind == "create_snap":
        model.vols[op["vol"]] = bytearray(model.vols[op["origin"]])
    elif kind == "delete":
        del model.vols[op["vol"]]
    elif kind in ("flush", "set_transaction_id", "reserve_metadata_snap",
                  "release_metadata_snap"):
        pass
    else:
        raise CrashCheckError(f"unknown op in log: {op}")


@dataclass
class Replay:
    """What the log says about the state at the kill."""

    model: Model  # S_N
    before_last: Model  # S_{N-1}
    pending: dict[tuple[int, int], list[tuple[int | None, bytes]]]  # block -> (step, state)
    last: dict | None  # op N
    last_done: bool  # a "flushed" event followed op N: it completed
    last_flushed: int | None  # step F
    start: dict | None
    seed: int
    run: int
    nr_ops: int

    def candidates(self, v: int, b: int) -> list[bytes]:
        """States of block b of volume v since the last flush (S_F first)."""
        return [data for _step, data in self.pending.get((v, b), [])]

    def steps(self, v: int, b: int) -> list[int]:
        return [step for step, _data in self.pending.get((v, b), []) if step is not None]


def replay(events: list[dict], base: Model, seed: int) -> Replay:
    model = base.copy()
    before: Model | _BlocksBefore = model
    pending: dict[tuple[int, int], list[tuple[int | None, bytes]]] = {}
    last = None
    last_done = False
    last_flushed = None
    start = None
    run = 0
    nr_ops = 0
    for ev in events:
        kind = ev.get("ev")
        if kind == "start":
            if start is not None:
                raise CrashCheckError(f"two runs in one check window: {start} and {ev}")
            start = ev
            run = ev["run"]
        elif kind == "op":
            if start is None:
                raise CrashCheckError(f"op before start: {ev}")
            nr_ops += 1
            v = ev.get("vol")
            if ev["op"] in DEVICE_OPS:
                # S_{N-1} as a shallow copy: it only matters while this op is the last one,
                # and device ops never change an existing volume's bytes.
                before = Model(dict(model.vols))
                if ev["op"] != "delete":
                    for key in [k for k in pending if k[0] == v]:
                        del pending[key]
            else:
                before = model
            blocks = op_blocks(ev)
            if len(blocks):
                saved = {}
                for b in blocks:
                    cur = bytes(model.vols[v][b * BS:(b + 1) * BS])
                    pending.setdefault((v, b), [(None, cur)])
                    saved[b] = cur
                before = _BlocksBefore(model, v, saved)
            apply_op(model, ev, seed, run)
            for b in blocks:
                pending[(v, b)].append((ev["i"], bytes(model.vols[v][b * BS:(b + 1) * BS])))
            last = ev
            last_done = False
        elif kind == "flushed":
            pending.clear()
            last_done = True
            last_flushed = ev["i"]
        else:
            raise CrashCheckError(f"unknown event {ev}")
    if isinstance(before, _BlocksBefore):
        before = before.materialise()
    return Replay(model, before, pending, last, last_done, last_flushed, start, seed, run, nr_ops)


class _BlocksBefore:
    """S_{N-1} for a write-type op N, materialised only at the end of the replay."""

    def __init__(self, model: Model, v: int, blocks: dict[int, bytes]) -> None:
        self.model, self.v, self.blocks = model, v, blocks

    def materialise(self) -> Model:
        out = Model(dict(self.model.vols))  # shares untouched volumes (read-only use)
        vol = bytearray(self.model.vols[self.v])
        for b, data in self.blocks.items():
            vol[b * BS:(b + 1) * BS] = data
        out.vols[self.v] = vol
        return out


# -- copying and inspecting a pool -----------------------------------------------------------

def copy_sparse(src: str, dst: str) -> None:
    """Copy a file keeping its holes (SEEK_DATA / SEEK_HOLE + copy_file_range)."""
    size = os.path.getsize(src)
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        fo.truncate(size)
        a, b = fi.fileno(), fo.fileno()
        pos = 0
        while pos < size:
            try:
                start = os.lseek(a, pos, os.SEEK_DATA)
            except OSError:  # ENXIO: only a hole is left
                break
            end = os.lseek(a, start, os.SEEK_HOLE)
            off_in, off_out, left = start, start, end - start
            while left:
                n = os.copy_file_range(a, b, left, off_in, off_out)
                if n <= 0:
                    raise OSError(f"copy_file_range returned {n}")
                off_in, off_out, left = off_in + n, off_out + n, left - n
            pos = end


def copy_pool(src: str, dst: str) -> None:
    """Copy a (stopped) pool directory: config, registry files, data and metadata."""
    os.makedirs(dst)
    for name in os.listdir(src):
        if name == "lock":
            continue
        s, d = os.path.join(src, name), os.path.join(dst, name)
        if os.path.isfile(s):
            copy_sparse(s, d)


def _registry_on_disk(pool_dir: str, md_devs: list[int]) -> tuple[dict[int, int], list[str]]:
    """Volume sizes the next open will see, and what it will cut (uncommitted lines)."""
    from thinpool.pool.registry import Registry

    reg = Registry(pool_dir)
    reg.load(set(md_devs), writable=False)
    return {k: v.size for k, v in reg.volumes.items()}, reg.problems


@dataclass
class Outcome:
    """Result of one verification."""

    recovered: Model = field(repr=False)
    last_op: str | None
    nr_ops: int
    steps_after_flush: int
    lost_blocks: int  # blocks showing an older state than S_N (unflushed work lost)
    torn_blocks: int  # blocks torn by the in-flight write (page mix)
    device_op_undone: bool  # in-flight device change not visible
    notes: list[str] = field(default_factory=list)


def _thin_check(meta: str) -> tuple[int, str]:
    r = subprocess.run(["thin_check", meta], capture_output=True, text=True)
    return r.returncode, (r.stdout + r.stderr).strip()


def verify(pool_dir: str, log_path: str, base: Model, seed: int, *,
           context: str = "", strict_ro_registry: bool = False) -> Outcome:
    """Check the pool in ``pool_dir`` (nobody running) against the log; see module doc.

    Returns the recovered contents (the base for the next run).  Raises
    ``CrashCheckError`` with a precise description on any violation.
    """
    from thinpool.pool.engine import Pool
    from thinpool.thin.metadata import PoolMetadata

    events = read_events(log_path)
    rp = replay(events, base, seed)
    last = rp.last
    ctx = (f"[{context}] seed {seed} run {rp.run} ops {rp.nr_ops} last op "
           f"{json.dumps(last) if last else None} last flushed step {rp.last_flushed}")
    problems: list[str] = []
    notes: list[str] = []

    def fail(msg: str) -> None:
        raise CrashCheckError(f"{ctx}: {msg}")

    # The run started from the state verified last time.
    if rp.start is not None:
        seen = {int(k): v for k, v in rp.start["devices"].items()}
        if seen != base.sizes():
            fail(f"the workload reopened the pool and saw devices {seen}, expected the "
                 f"recovered state {base.sizes()}")

    meta = os.path.join(pool_dir, "metadata")
    # 1. metadata passes both checkers, before anything opens the pool
    rc, out = _thin_check(meta)
    if rc != 0:
        fail(f"thin_check exit {rc}:\n{out}")
    try:
        from thinpool.tools.check import check
    except ImportError:
        check = None
    if check is not None:
        rep = check(meta)
        if not rep.clean:
            fail("thinpool check: " + "; ".join(rep.errors + rep.leaks)[:4000])
    with PoolMetadata(meta, read_only=True) as md:
        md_tid, md_devs = md.trans_id, md.device_ids()
        if md.needs_check:
            fail("needs_check is set")

    # 2. transaction id: set only by set_transaction_id
    tid_ops = [e for e in events if e.get("ev") == "op" and e["op"] == "set_transaction_id"]
    if tid_ops:
        t = tid_ops[-1]
        want_tids = {t["new"]} if (t is not last or rp.last_done) else {t["old"], t["new"]}
    else:
        want_tids = {rp.start.get("trans_id", md_tid)} if rp.start is not None else {md_tid}
    if md_tid not in want_tids:
        fail(f"metadata transaction id {md_tid}, expected {sorted(want_tids)}")

    # 3. device set
    want = set(rp.model.vols)
    allowed = [want]
    if last is not None and last["op"] in DEVICE_OPS and not rp.last_done:
        allowed.append(set(rp.before_last.vols))
    if set(md_devs) not in allowed:
        fail(f"metadata devices {md_devs}, expected {sorted(want)}"
             + (f" or {sorted(allowed[1])}" if len(allowed) > 1 else ""))
    undone = set(md_devs) != want
    state = rp.before_last if undone else rp.model

    # 4. registry files on disk: what the next read-write open will use
    eff_sizes, reg_problems = _registry_on_disk(pool_dir, md_devs)
    if set(eff_sizes) != set(md_devs):
        fail(f"registry on disk lists {sorted(eff_sizes)}, metadata (transaction {md_tid}) "
             f"has {md_devs}")
    if any("skipped" in p for p in reg_problems):
        fail(f"registry journal damaged: {reg_problems}")
    if reg_problems:
        notes.append("registry journal line not committed")
    if eff_sizes != state.sizes():
        fail(f"registry sizes {eff_sizes} differ from the model {state.sizes()}")

    # 5. a read-only open sees the same registry (it does not roll forward)
    with Pool(pool_dir, read_only=True) as ro:
        ro_sizes = {v.dev_id: v.size for v in ro.list_volumes()}
    if ro_sizes != eff_sizes:
        msg = (f"read-only open shows volumes {ro_sizes}, the committed registry is "
               f"{eff_sizes}")
        if strict_ro_registry:
            fail(msg)
        notes.append("ro-registry-stale: " + msg)

    # 6. read-write open (the lock died with the process), registry agreement, contents
    recovered = Model()
    lost = torn = 0
    with Pool(pool_dir) as pool:
        if sorted(pool.registry.volumes) != pool.md.device_ids():
            fail(f"after opening, registry {sorted(pool.registry.volumes)} != metadata "
                 f"{pool.md.device_ids()}")
        for v in md_devs:
            with pool.volume(v) as vol:
                actual = vol.read(0, vol.size)
            recovered.vols[v] = actual
            expect = state.vols[v]
            if actual == expect:
                continue
            for b in range(len(actual) // BS):
                a = actual[b * BS:(b + 1) * BS]
                e = expect[b * BS:(b + 1) * BS]
                if a == e:
                    continue
                verdict = _block_verdict(rp, v, b, bytes(a), undone)
                if verdict == "lost":
                    lost += 1
                elif verdict == "torn":
                    torn += 1
                else:
                    problems.append(_explain(rp, v, b, a, e, state is rp.model))
                    if len(problems) >= 8:
                        break
            if len(problems) >= 8:
                break
        if pool.md.dirty:
            problems.append("opening and reading the pool dirtied the metadata")
    if problems:
        fail("\n  " + "\n  ".join(problems))
    after = rp.last_flushed
    return Outcome(recovered, last["op"] if last else None, rp.nr_ops,
                   (last["i"] - (after or 0)) if last else 0, lost, torn, undone, notes)


def _block_verdict(rp: Replay, v: int, b: int, actual: bytes, undone: bool) -> str:
    """'lost' (an older state since the flush), 'torn' (page mix of op N), or 'bad'."""
    if actual in rp.candidates(v, b):
        return "lost"
    last = rp.last
    if undone or last is None or rp.last_done or last["op"] not in PWRITE_OPS \
            or last["vol"] != v or b not in op_blocks(last):
        return "bad"
    old = rp.before_last.vols[v][b * BS:(b + 1) * BS]
    new = rp.model.vols[v][b * BS:(b + 1) * BS]
    for p in range(0, BS, PAGE):
        page = actual[p:p + PAGE]
        if page != old[p:p + PAGE] and page != new[p:p + PAGE]:
            return "bad"
    return "torn"


def _explain(rp: Replay, v: int, b: int, actual, expect, is_model: bool) -> str:
    bad = [i for i in range(0, BS, 16) if actual[i:i + 16] != expect[i:i + 16]]
    nbad = len(bad)
    rec = bad[0]
    for i in bad[:4]:  # prefer a record the expected state holds whole (not an op's edge)
        if not describe(expect[i:i + 16], b * BS + i).startswith("garbage"):
            rec = i
            break
    touched = rp.steps(v, b)
    cands = rp.candidates(v, b)
    return (f"volume {v} block {b} (offset {b * BS:#x}): {nbad} of {BS // 16} records differ "
            f"from {'S_N' if is_model else 'S_N-1'}; first at {b * BS + rec:#x}: found "
            f"[{describe(actual[rec:rec + 16], b * BS + rec)}], expected "
            f"[{describe(expect[rec:rec + 16], b * BS + rec)}]; "
            f"{len(cands)} states since the last flush (steps touching it: {touched})")


# -- the driver shared by the test and the soak ------------------------------------------------

def create_pool(directory: str) -> None:
    from thinpool.pool.config import PoolConfig
    from thinpool.pool.engine import Pool

    cfg = PoolConfig(data_block_sectors=BS // 512, error_if_no_space=True, no_space_timeout=1.0)
    Pool.create(directory, DATA_SIZE, METADATA_SIZE, cfg)


def lock_is_free(pool_dir: str) -> bool:
    from thinpool.pool.locks import PoolBusyError, PoolLock

    try:
        lock = PoolLock(pool_dir)
    except PoolBusyError:
        return False
    lock.release()
    return True


@dataclass
class KillStats:
    kills: int = 0
    early: int = 0
    targeted: int = 0  # kills at a chosen function call (THINPOOL_CRASH_AT)
    in_place: int = 0
    lost_blocks: int = 0
    torn_blocks: int = 0
    device_op_undone: int = 0
    ops: int = 0
    last_ops: dict[str, int] = field(default_factory=dict)
    notes: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    def add(self, o: Outcome) -> None:
        self.lost_blocks += o.lost_blocks
        self.torn_blocks += o.torn_blocks
        self.device_op_undone += o.device_op_undone
        self.ops += o.nr_ops
        key = o.last_op or "(none)"
        self.last_ops[key] = self.last_ops.get(key, 0) + 1
        for n in o.notes:
            k = n.split(":")[0]
            self.notes[k] = self.notes.get(k, 0) + 1

    def summary(self) -> str:
        lo = ", ".join(f"{k} {v}" for k, v in sorted(self.last_ops.items()))
        nt = ", ".join(f"{k} {v}" for k, v in sorted(self.notes.items())) or "none"
        return (f"{self.kills} kills ({self.early} during open, {self.targeted} at chosen calls, "
                f"{self.in_place} verified in place) in {self.seconds:.1f} s; {self.ops} ops; "
                f"unflushed blocks lost "
                f"{self.lost_blocks}, torn {self.torn_blocks}; in-flight device changes "
                f"undone {self.device_op_undone}\n  op in flight at the kill: {lo}\n"
                f"  notes: {nt}")


class CrashRunner:
    """One pool, killed again and again; each kill verified, then the same pool goes on."""

    def __init__(self, workdir: str, seed: int, *, min_sleep: float = 0.05,
                 max_sleep: float = 0.6, early_fraction: float = 0.1,
                 in_place_fraction: float = 0.5, metadata_snap: bool = False,
                 via_server: bool = False, strict_ro_registry: bool = False,
                 stats: KillStats | None = None,
                 echo: Callable[[str], None] | None = None) -> None:
        self.workdir = workdir
        self.seed = seed
        self.pool_dir = os.path.join(workdir, "pool")
        self.log_path = os.path.join(workdir, "log.jsonl")
        self.rng = random.Random(f"kills:{seed}")
        self.min_sleep, self.max_sleep = min_sleep, max_sleep
        self.early_fraction = early_fraction
        self.in_place_fraction = in_place_fraction
        self.metadata_snap = metadata_snap
        self.via_server = via_server
        self.sockdir = tempfile.mkdtemp(prefix="tpk", dir="/tmp") if via_server else ""
        self.strict_ro_registry = strict_ro_registry
        self.stats = stats or KillStats()
        self.echo = echo
        self.model = Model()
        self.run = 0
        os.makedirs(workdir, exist_ok=True)
        create_pool(self.pool_dir)

    def close(self) -> None:
        """Remove what the runner made outside its work directory."""
        if self.sockdir:
            shutil.rmtree(self.sockdir, ignore_errors=True)

    def _spawn(self, kill_at: str | None) -> subprocess.Popen:
        env = dict(os.environ, THINPOOL_CRASH_RUN=str(self.run),
                   THINPOOL_CRASH_METADATA_SNAP="1" if self.metadata_snap else "0",
                   THINPOOL_CRASH_VIA_SERVER="1" if self.via_server else "0",
                   THINPOOL_CRASH_SOCKDIR=self.sockdir)
        env.pop("THINPOOL_CRASH_AT", None)
        if kill_at:
            env["THINPOOL_CRASH_AT"] = kill_at
        return subprocess.Popen(
            [sys.executable, str(WORKLOAD), self.pool_dir, self.log_path, str(self.seed)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)

    @staticmethod
    def _wait_line(proc: subprocess.Popen, word: bytes, timeout: float,
                   allow_sigkill: bool = False) -> bool:
        """Wait for a line from the workload; False if it SIGKILLed itself first."""
        deadline = time.monotonic() + timeout
        buf = b""
        while word not in buf.split(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0:
                raise CrashCheckError(f"workload did not print {word!r} within {timeout} s")
            r, _, _ = select.select([proc.stdout], [], [], left)
            if r:
                chunk = os.read(proc.stdout.fileno(), 4096)
                if not chunk:
                    proc.wait()
                    if allow_sigkill and proc.returncode == -signal.SIGKILL:
                        return False
                    raise CrashCheckError(f"workload exited ({proc.returncode}) before "
                                          f"{word!r}:\n{proc.stderr.read().decode()[-4000:]}")
                buf += chunk
        return True

    def _died_by_itself(self, proc: subprocess.Popen, kill_index: int) -> CrashCheckError:
        return CrashCheckError(
            f"seed {self.seed} kill {kill_index}: workload died by itself (exit "
            f"{proc.returncode}):\n{proc.stderr.read().decode()[-4000:]}")

    def kill_once(self, kill_index: int, kill_at: str | None = None,
                  kill_at_timeout: float = 10.0) -> Outcome:
        """Run the workload on the pool, kill it, verify.

        Without ``kill_at`` the kill comes after a random sleep (or, for an
        ``early_fraction`` of kills, right inside the pool open).  With
        ``kill_at`` (see crash_workload.py) the workload kills itself at that
        function call; if it does not get there within ``kill_at_timeout``
        seconds it is killed anyway.
        """
        t0 = time.monotonic()
        early = self.rng.random() < self.early_fraction and not kill_at
        in_place = self.rng.random() < self.in_place_fraction
        proc = self._spawn(kill_at)
        try:
            if kill_at:
                if self._wait_line(proc, b"ready", 60, allow_sigkill=True):
                    try:
                        proc.wait(kill_at_timeout)
                    except subprocess.TimeoutExpired:
                        pass
                if proc.poll() is not None and proc.returncode != -signal.SIGKILL:
                    raise self._died_by_itself(proc, kill_index)
            elif early:  # inside Pool() open: lock, metadata, registry roll-forward
                self._wait_line(proc, b"opening", 60)
                time.sleep(self.rng.uniform(0, 0.02))
            else:
                self._wait_line(proc, b"ready", 60)
                time.sleep(self.rng.uniform(self.min_sleep, self.max_sleep))
            if proc.poll() is not None and proc.returncode != -signal.SIGKILL:
                raise self._died_by_itself(proc, kill_index)
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
            proc.wait()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.stdout.close()
            proc.stderr.close()
        self.run += 1
        ctx = (f"seed {self.seed} kill {kill_index}{' (during open)' if early else ''}"
               f"{' at ' + kill_at if kill_at else ''}")
        if not lock_is_free(self.pool_dir):
            raise CrashCheckError(f"[{ctx}] the pool lock is still held after the kill")
        if in_place:
            target = self.pool_dir
        else:  # verify a copy, so the next run does its own recovery on the original
            target = os.path.join(self.workdir, "verify")
            shutil.rmtree(target, ignore_errors=True)
            copy_pool(self.pool_dir, target)
        try:
            outcome = verify(target, self.log_path, self.model, self.seed, context=ctx,
                             strict_ro_registry=self.strict_ro_registry)
        except CrashCheckError as e:
            raise CrashCheckError(f"{e}\n  (pool kept in {target}, log {self.log_path})") from None
        if not in_place:
            shutil.rmtree(target)
        log = Log(self.log_path)
        log(ev="checked", kill=kill_index, kill_at=kill_at,
            sizes={str(k): v for k, v in outcome.recovered.sizes().items()})
        log.close()
        self.model = outcome.recovered
        st = self.stats
        st.kills += 1
        st.early += early
        st.targeted += bool(kill_at)
        st.in_place += in_place
        st.add(outcome)
        st.seconds += time.monotonic() - t0
        if self.echo:
            self.echo(f"{ctx}: last op {outcome.last_op}, {outcome.nr_ops} ops, lost "
                      f"{outcome.lost_blocks} torn {outcome.torn_blocks}"
                      f"{' ' + '; '.join(outcome.notes) if outcome.notes else ''}")
        return outcome
