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
# with THINPOOL_CRASH_VIA_SERVER=1 every operation goes through a pool server in this process
SERVER_ENV = "THINPOOL_CRASH_VIA_SERVER"
SOCKDIR_ENV = "THINPOOL_CRASH_SOCKDIR"


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


class DirectTarget:
    """The workload's operations on a Pool opened in this process."""

    def __init__(self, pool_dir: str) -> None:
        from thinpool.pool.engine import Pool

        self.pool = Pool(pool_dir)
        self.handles: dict[int, object] = {}

    def sizes(self) -> dict[int, int]:
        return {v.dev_id: v.size for v in self.pool.list_volumes()}

    def trans_id(self) -> int:
        return self.pool.md.trans_id

    def held(self) -> bool:
        return bool(self.pool.md.held_root)

    def vol(self, v: int):  # type: ignore[no-untyped-def]
        h = self.handles.get(v)
        if h is None:
            h = self.handles[v] = self.pool.volume(v)
        return h

    def write(self, v: int, off: int, data: bytes) -> None:
        self.vol(v).write(off, data)

    def discard(self, v: int, off: int, n: int) -> None:
        self.vol(v).discard(off, n)

    def write_zeroes(self, v: int, off: int, n: int) -> None:
        self.vol(v).write_zeroes(off, n)

    def flush(self, v: int) -> None:
        self.vol(v).flush()

    def create_thin(self, new: int, size: int) -> None:
        self.pool.create_thin(new, size=size, name=f"thin{new}")

    def create_snap(self, new: int, origin: int, via_message: bool) -> None:
        if via_message:
            self.pool.message(f"create_snap {new} {origin}")
        else:
            self.pool.create_snap(new, origin, name=f"snap{new}-of-{origin}")

    def delete(self, v: int, via_message: bool) -> None:
        h = self.handles.pop(v, None)
        if h is not None:
            h.close()
        if via_message:
            self.pool.message(f"delete {v}")
        else:
            self.pool.delete(v)

    def message(self, text: str) -> None:
        self.pool.message(text)


class ServerTarget(DirectTarget):
    """The same operations through a pool server running in this process: data over NBD
    connections (one per volume), device changes and messages over the control socket.
    SIGKILL of this process is a server kill."""

    def __init__(self, pool_dir: str) -> None:
        from thinpool.server.daemon import PoolServer, ServerOptions, control_path

        sock = os.path.join(os.environ[SOCKDIR_ENV], "nbd")  # short: sun_path is 107 bytes
        self.server = PoolServer(pool_dir, ServerOptions(nbd_socket=sock))
        self.server.start()
        self.pool = self.server.pool
        self.ctl = control_path(pool_dir)
        self.handles = {}

    def vol(self, v: int):  # type: ignore[no-untyped-def]
        from nbdclient import NBDClient

        h = self.handles.get(v)
        if h is None:
            h = self.handles[v] = NBDClient(self.server.nbd_socket, str(v))
        return h

    def call(self, command: str, **args: object) -> dict:
        from thinpool.server.control import request

        return request(self.ctl, command, args)

    def discard(self, v: int, off: int, n: int) -> None:
        self.vol(v).trim(off, n)

    def create_thin(self, new: int, size: int) -> None:
        self.call("create-thin", id=new, size=size, name=f"thin{new}")

    def create_snap(self, new: int, origin: int, via_message: bool) -> None:
        if via_message:
            self.call("message", text=f"create_snap {new} {origin}")
        else:
            self.call("create-snap", id=new, origin_id=origin, name=f"snap{new}-of-{origin}")

    def delete(self, v: int, via_message: bool) -> None:
        import time

        h = self.handles.pop(v, None)
        if h is not None:
            h.close()
        for _ in range(500):  # the server closes the export when it sees the disconnect
            if not self.pool.dp.is_open(v):
                break
            time.sleep(0.01)
        if via_message:
            self.call("message", text=f"delete {v}")
        else:
            self.call("delete", id=v)

    def message(self, text: str) -> None:
        self.call("message", text=text)


def main(argv: list[str]) -> int:
    if len(argv) != 4:
        print(__doc__, file=sys.stderr)
        return 2
    pool_dir, log_path, seed = argv[1], argv[2], int(argv[3])
    run = run_number(log_path)
    rng = random.Random(f"workload:{seed}:{run}")
    log = Log(log_path)

    if os.environ.get("THINPOOL_CRASH_AT"):
        install_kill_point(os.environ["THINPOOL_CRASH_AT"])
    print("opening", flush=True)
    target = ServerTarget(pool_dir) if os.environ.get(SERVER_ENV) == "1" else \
        DirectTarget(pool_dir)
    sizes = target.sizes()
    held = target.held()
    log(ev="start", run=run, seed=seed, pid=os.getpid(), trans_id=target.trans_id(),
        held=held, devices={str(k): v for k, v in sorted(sizes.items())})
    print("ready", flush=True)

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
            if kind == "write":
                target.write(v, off, pattern(seed, run, step, v, off, n))
            elif kind == "discard":
                target.discard(v, off, n)
            else:
                target.write_zeroes(v, off, n)
            continue
        if kind == "flush":
            log(ev="op", i=step, op="flush", vol=v)
            target.flush(v)
        elif kind == "create_thin":
            new, size = free_id(), rng.choice(VOLUME_SIZES)
            log(ev="op", i=step, op=kind, vol=new, size=size)
            target.create_thin(new, size)
            sizes[new] = size
        elif kind == "create_snap":
            new = free_id()
            log(ev="op", i=step, op=kind, vol=new, origin=v, message=via_message)
            target.create_snap(new, v, via_message)
            sizes[new] = sizes[v]
        elif kind == "delete":
            log(ev="op", i=step, op=kind, vol=v, message=via_message)
            target.delete(v, via_message)
            del sizes[v]
        elif kind == "set_transaction_id":
            old = target.trans_id()
            log(ev="op", i=step, op=kind, old=old, new=old + 1)
            target.message(f"set_transaction_id {old} {old + 1}")
        else:
            kind = "release_metadata_snap" if held else "reserve_metadata_snap"
            log(ev="op", i=step, op=kind)
            target.message(kind)
            held = not held
        log(ev="flushed", i=step, after=kind)


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv))
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(3)
