"""Crash safety by SIGKILL: a workload process is killed at random points and at
chosen function calls; after every kill the pool must pass thin_check and
``thinpool check``, open read-write, keep its registry in step with the
metadata, and show exactly an acceptable state (see ``crash_check``): what the
last flush acknowledged, plus, block by block, any later state the log allows.
The same pool goes on after each kill, so kills also land in recovering pools.

THINPOOL_CRASH_KILLS (default 200) sets the number of random kills, spread over
``len(SEEDS)`` pools; THINPOOL_CRASH_SEED shifts the seeds for exploration.

Note: SIGKILL keeps the page cache, so these tests cover the commit protocol
against process death (atomicity and ordering of in-process steps, recovery),
not the fsync ordering against power loss.
"""

from __future__ import annotations

import os
import random
import shutil

import pytest

from conftest import require_tool
from crash_check import (BS, KILL_POINTS, CrashCheckError, CrashRunner, KillStats, Log, Model,
                         pattern, verify)

KILLS = int(os.environ.get("THINPOOL_CRASH_KILLS", "200"))
BASE_SEED = int(os.environ.get("THINPOOL_CRASH_SEED", "1000"))
SEEDS = [BASE_SEED + i for i in range(8)]
STATS = KillStats()


def _kills_for(index: int) -> int:
    share, extra = divmod(KILLS, len(SEEDS))
    return share + (index < extra)


@pytest.fixture(autouse=True, scope="module")
def _tools():
    require_tool("thin_check")
    yield
    if STATS.kills:
        print("\n" + STATS.summary())


@pytest.mark.parametrize("index", range(len(SEEDS)), ids=[f"seed{s}" for s in SEEDS])
def test_random_kills(tmp_path, index):
    seed = SEEDS[index]
    runner = CrashRunner(str(tmp_path / f"pool{seed}"), seed, stats=STATS)
    for k in range(_kills_for(index)):
        runner.kill_once(k)
    shutil.rmtree(tmp_path / f"pool{seed}")


def test_kills_at_chosen_calls(tmp_path):
    """Die at each step of the commit protocol, including between the journal line and the
    metadata commit (the uncommitted line must be ignored and cut off)."""
    rolled = STATS.notes.get("registry journal line not committed", 0)
    runner = CrashRunner(str(tmp_path / "pool"), BASE_SEED + 77, stats=STATS)
    rng = random.Random(BASE_SEED)
    k = 0
    for point in KILL_POINTS:
        name, *after = point.split(":")
        for n in (1, rng.randint(2, 9)):
            runner.kill_once(k, kill_at=f"{name}:{n}" + (":after" if after else ""),
                             kill_at_timeout=3.0)
            k += 1
    assert STATS.notes.get("registry journal line not committed", 0) > rolled, STATS.summary()


def test_read_only_open_after_kill_in_registry_window(tmp_path):
    """A read-only open resolves a committed-but-unrenamed registry in memory."""
    runner = CrashRunner(str(tmp_path / "pool"), BASE_SEED + 88, strict_ro_registry=True)
    runner.kill_once(0, kill_at="thinpool.pool.registry.Registry.finish:1")


def test_random_kills_with_metadata_snapshots(tmp_path):
    """Kills while metadata snapshots are reserved and released (shared top-level tree)."""
    runner = CrashRunner(str(tmp_path / "pool"), BASE_SEED + 99, metadata_snap=True)
    for k in range(12):
        runner.kill_once(k)


# -- the checker itself must catch what it is meant to catch -----------------------------------

@pytest.fixture
def crashed(tmp_path):
    """A pool after two verified kills, with data in several volumes."""
    runner = CrashRunner(str(tmp_path / "pool"), BASE_SEED + 5, early_fraction=0.0,
                         min_sleep=0.4, max_sleep=0.6)
    for k in range(2):
        runner.kill_once(k)
    assert runner.model.vols
    return runner


def _append(runner: CrashRunner, *events: dict) -> None:
    log = Log(runner.log_path)
    for ev in events:
        log(**ev)
    log.close()


def _start(runner: CrashRunner) -> dict:
    return {"ev": "start", "run": 999, "seed": runner.seed,
            "devices": {str(k): v for k, v in runner.model.sizes().items()}}


def test_checker_accepts_the_verified_state(crashed):
    out = verify(crashed.pool_dir, crashed.log_path, crashed.model, crashed.seed)
    assert out.nr_ops == 0 and out.lost_blocks == 0


def test_checker_rejects_a_lost_acknowledged_write(crashed):
    v = min(crashed.model.vols)
    _append(crashed, _start(crashed),
            {"ev": "op", "i": 1, "op": "write", "vol": v, "off": 1000, "len": 3 * BS},
            {"ev": "flushed", "i": 1})
    with pytest.raises(CrashCheckError, match=rf"volume {v} block 0 .*expected \[seed"):
        verify(crashed.pool_dir, crashed.log_path, crashed.model, crashed.seed)


def test_checker_accepts_a_lost_unflushed_write(crashed):
    v = min(crashed.model.vols)
    _append(crashed, _start(crashed),
            {"ev": "op", "i": 1, "op": "write", "vol": v, "off": 1000, "len": 3 * BS})
    out = verify(crashed.pool_dir, crashed.log_path, crashed.model, crashed.seed)
    assert out.lost_blocks == 4


def test_checker_rejects_foreign_data(crashed):
    from thinpool.thin.metadata import PoolMetadata

    with PoolMetadata(os.path.join(crashed.pool_dir, "metadata"), read_only=True) as md:
        found = [(v, b, m.data_block) for v in sorted(crashed.model.vols)
                 for b, m in md.mappings(v)]
    assert found, "no mapped block to corrupt"
    v, b, d = found[len(found) // 2]
    other = max(crashed.model.vols) + 1
    fd = os.open(os.path.join(crashed.pool_dir, "data"), os.O_WRONLY)
    try:  # one 16-byte record of another volume, in the middle of the block
        os.pwrite(fd, pattern(crashed.seed, 3, 4, other, b * BS + 4096, 16), d * BS + 4096)
    finally:
        os.close(fd)
    with pytest.raises(CrashCheckError, match=rf"volume {v} block {b} .*vol {other}"):
        verify(crashed.pool_dir, crashed.log_path, crashed.model, crashed.seed)


def test_checker_rejects_a_missing_device(crashed):
    v = min(crashed.model.vols)
    _append(crashed, _start(crashed),
            {"ev": "op", "i": 1, "op": "create_thin", "vol": 900, "size": 4 * BS},
            {"ev": "flushed", "i": 1},
            {"ev": "op", "i": 2, "op": "write", "vol": v, "off": 0, "len": 10})
    with pytest.raises(CrashCheckError, match="metadata devices"):
        verify(crashed.pool_dir, crashed.log_path, crashed.model, crashed.seed)


def test_torn_last_write_is_accepted_page_wise_only():
    """The in-flight write may be torn at 4 KiB pages, never inside a page."""
    from crash_check import _block_verdict, replay

    base = Model({1: bytearray(4 * BS)})
    events = [{"ev": "start", "run": 1, "seed": 7, "devices": {"1": 4 * BS}},
              {"ev": "op", "i": 1, "op": "write", "vol": 1, "off": 100, "len": BS}]
    rp = replay(events, base, 7)
    new = bytes(rp.model.vols[1][:BS])
    torn = new[:8192] + bytes(BS - 8192)
    assert _block_verdict(rp, 1, 0, torn, False) == "torn"
    assert _block_verdict(rp, 1, 0, new[:8000] + bytes(BS - 8000), False) == "bad"
    events.append({"ev": "op", "i": 2, "op": "flush", "vol": 1})
    rp = replay(events, base, 7)  # op 1 completed: no tearing any more
    assert _block_verdict(rp, 1, 0, torn, False) == "bad"
    assert _block_verdict(rp, 1, 0, bytes(BS), False) == "lost"


def test_log_fragment_of_a_killed_writer_does_not_glue_to_the_next_event(tmp_path):
    """SIGKILL can stop ``write`` at a page boundary, mid-line (seen on CI): the next appender
    cuts the fragment, or finishes a last line that parses, before adding its own line."""
    from crash_check import read_events

    path = tmp_path / "log.jsonl"
    path.write_bytes(b'{"ev":"op","i":1}\n{"ev":"op","i":2,"len')
    Log(path).close()
    assert path.read_bytes() == b'{"ev":"op","i":1}\n'
    log = Log(path)
    log(ev="op", i=3)
    log.close()
    assert [e["i"] for e in read_events(path)] == [1, 3]

    path.write_bytes(b'{"ev":"op","i":4}')  # complete, only the newline is missing
    log = Log(path)
    log(ev="checked")
    log(ev="op", i=5)
    log.close()
    assert path.read_bytes().count(b"\n") == 3
    assert read_events(path) == [{"ev": "op", "i": 5}]

    path.write_bytes(b'{"ev":"op"')  # the fragment is the whole file
    Log(path).close()
    assert path.read_bytes() == b""


@pytest.mark.parametrize("index", range(2), ids=["server-a", "server-b"])
def test_random_kills_of_the_pool_server(tmp_path, index):
    """The same workload through a pool server (NBD connections, control socket): every kill
    is a server kill; what clients saw flushed survives."""
    seed = BASE_SEED + 500 + index
    runner = CrashRunner(str(tmp_path / "pool"), seed, stats=STATS, via_server=True,
                         early_fraction=0.0)
    try:
        for k in range(max(4, KILLS // 16)):
            runner.kill_once(k)
    finally:
        runner.close()
