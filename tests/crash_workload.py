"""A deterministic mixed workload on a pool, run until it is killed.

    python tests/crash_workload.py POOLDIR LOGFILE SEED

Opens the pool read-write and loops forever: writes of random sizes and
offsets (unaligned, block-sized, multi-block) with recognisable content
(``crash_check.pattern``: seed, run, step, volume, offset), discards,
write_zeroes, flushes, create_thin / create_snap / delete (API calls and pool
messages), set_transaction_id and metadata snapshots.  Every operation is
logged to LOGFILE (fdatasync-ed) *before* it is issued, and ``flushed`` after
each flush or committing message returns; see ``crash_check`` for the format
and what a crash may leave behind.

The run number (part of the content and of the random stream) is taken from
$THINPOOL_CRASH_RUN, else counted from the ``start`` events in LOGFILE.  The
sequence of operations depends on SEED, the run number and the pool's state
at open (its devices), so a run is reproducible from the state it started in.
Prints ``opening`` before ``Pool()`` and ``ready`` once the run is logged.

Deterministic kill points: with THINPOOL_CRASH_AT="module.Class.method:N[:after]"
the process SIGKILLs itself on the N-th call of that function (before it runs,
or after it returned with ``:after``), e.g.
``thinpool.pool.registry.Registry.finish:3`` dies between a device change's
metadata commit and the registry update.
"""

from __future__ import annotations

import os
import random
import sys
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from crash_check import BS, MAX_VOLUMES, VOLUME_SIZES, Log, pattern  # noqa: E402

WEIGHTS = {
    "write": 50, "discard": 6, "write_zeroes": 6, "flush": 8, "create_snap": 5,
    "create_thin": 3, "delete": 4, "set_transaction_id": 1, "metadata_snap": 1,
}
# reserve/release_metadata_snap only with THINPOOL_CRASH_METADATA_SNAP=1 (see test_crash.py)
METADATA_SNAP_ENV = "THINPOOL_CRASH_METADATA_SNAP"


def run_number(log_path: str) -> int:
    env = os.environ.get("THINPOOL_CRASH_RUN")
    if env is not None:
        return int(env)
    n = 0
    try:
        with open(log_path, "rb") as f:
            for line in f:
                n += b'"ev":"start"' in line
    except FileNotFoundError:
        pass
    return n


def pick_range(rng: random.Random, size: int) -> tuple[int, int]:
    r = rng.random()
    if r < 0.35:  # small, unaligned
        n = rng.randint(1, 9000)
    elif r < 0.6:  # whole blocks, aligned
        nb = rng.randint(1, 3)
        b0 = rng.randrange(size // BS - nb + 1)
        return b0 * BS, nb * BS
    else:  # several blocks, unaligned
        n = rng.randint(BS // 2, 4 * BS + 777)
    return rng.randint(0, size - n), n


def install_kill_point(spec: str) -> None:
    """Wrap a function so that its N-th call kills this process (SIGKILL)."""
    import importlib
    import signal

    target, count, *when = spec.split(":")
    parts = target.split(".")
    for cut in range(len(parts) - 1, 0, -1):  # longest importable module prefix
        try:
            owner = importlib.import_module(".".join(parts[:cut]))
            break
        except ImportError:
            continue
    else:
        raise ValueError(f"no module in {target!r}")
    for name in parts[cut:-1]:  # e.g. a class
        owner = getattr(owner, name)
    func_name = parts[-1]
    original = getattr(owner, func_name)
    calls = [0]
    after = when == ["after"]

    def wrapper(*args, **kwargs):
        calls[0] += 1
        if calls[0] == int(count) and not after:
            os.kill(os.getpid(), signal.SIGKILL)
        result = original(*args, **kwargs)
        if calls[0] == int(count) and after:
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    setattr(owner, func_name, wrapper)


def main(argv: list[str]) -> int:
    if len(argv) != 4:
        print(__doc__, file=sys.stderr)
        return 2
    pool_dir, log_path, seed = argv[1], argv[2], int(argv[3])
    run = run_number(log_path)
    rng = random.Random(f"workload:{seed}:{run}")
    log = Log(log_path)

    from thinpool.pool.engine import Pool

    if os.environ.get("THINPOOL_CRASH_AT"):
        install_kill_point(os.environ["THINPOOL_CRASH_AT"])
    print("opening", flush=True)
    pool = Pool(pool_dir)
    sizes = {v.dev_id: v.size for v in pool.list_volumes()}
    held = bool(pool.md.held_root)
    log(ev="start", run=run, seed=seed, pid=os.getpid(), trans_id=pool.md.trans_id,
        held=held, devices={str(k): v for k, v in sorted(sizes.items())})
    print("ready", flush=True)
    handles: dict[int, object] = {}

    def vol(v: int):
        h = handles.get(v)
        if h is None:
            h = handles[v] = pool.volume(v)
        return h

    def free_id() -> int:
        return next(i for i in range(1, 1000) if i not in sizes)

    weights_by_kind = dict(WEIGHTS)
    if os.environ.get(METADATA_SNAP_ENV, "0") != "1" and not held:
        weights_by_kind["metadata_snap"] = 0
    kinds, weights = list(weights_by_kind), list(weights_by_kind.values())
    step = 0
    while True:
        step += 1
        kind = rng.choices(kinds, weights)[0]
        if not sizes:
            kind = "create_thin"
        if kind in ("create_snap", "create_thin") and len(sizes) >= MAX_VOLUMES:
            kind = "delete"
        if kind == "delete" and len(sizes) <= 1:
            kind = "write"
        ids = sorted(sizes)
        v = rng.choice(ids) if ids else None
        via_message = rng.random() < 0.5
        if kind in ("write", "discard", "write_zeroes"):
            off, n = pick_range(rng, sizes[v])
            log(ev="op", i=step, op=kind, vol=v, off=off, len=n)
            h = vol(v)
            if kind == "write":
                h.write(off, pattern(seed, run, step, v, off, n))
            elif kind == "discard":
                h.discard(off, n)
            else:
                h.write_zeroes(off, n)
            continue
        if kind == "flush":
            log(ev="op", i=step, op="flush", vol=v)
            vol(v).flush()
        elif kind == "create_thin":
            new, size = free_id(), rng.choice(VOLUME_SIZES)
            log(ev="op", i=step, op=kind, vol=new, size=size)
            pool.create_thin(new, size=size, name=f"thin{new}")
            sizes[new] = size
        elif kind == "create_snap":
            new = free_id()
            log(ev="op", i=step, op=kind, vol=new, origin=v, message=via_message)
            if via_message:
                pool.message(f"create_snap {new} {v}")
            else:
                pool.create_snap(new, v, name=f"snap{new}-of-{v}")
            sizes[new] = sizes[v]
        elif kind == "delete":
            log(ev="op", i=step, op=kind, vol=v, message=via_message)
            h = handles.pop(v, None)
            if h is not None:
                h.close()
            if via_message:
                pool.message(f"delete {v}")
            else:
                pool.delete(v)
            del sizes[v]
        elif kind == "set_transaction_id":
            old = pool.md.trans_id
            log(ev="op", i=step, op=kind, old=old, new=old + 1)
            pool.message(f"set_transaction_id {old} {old + 1}")
        else:
            kind = "release_metadata_snap" if held else "reserve_metadata_snap"
            log(ev="op", i=step, op=kind)
            pool.message(kind)
            held = not held
        log(ev="flushed", i=step, after=kind)


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv))
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(3)
