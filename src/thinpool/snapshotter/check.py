"""``thinpool snapshotter check``: a stopped snapshotter's records against its storage.

What a restart or ``Cleanup`` would have to fix, found without changing
anything (the records are read, the pool through its server when one runs,
else read-only from its files):

* rows a crash left ``creating`` or ``removing``, and removals queued but not
  done (a start rolls them back or forward);
* ``devicemapper``: the records' transaction id against the pool's (equal,
  or the pool one ahead with a change in flight); snapshots whose thin
  device is missing; thin devices no record names (``Cleanup`` removes
  them); a missing or half-made base device; the pool's metadata itself
  (``thin_check``'s checks);
* ``overlay2``/``vfs``: snapshots whose directory is missing; directories no
  record names, and removals left half done (``.rm-N``).

``check(root, repair=True)`` opens the snapshotter (which finishes what a
crash interrupted), runs ``Cleanup`` and closes it, then checks again: what
is gone was repaired.  A missing snapshot's storage cannot be repaired.
The root must not be served meanwhile (its lock is taken).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from ..errors import ThinpoolError
from ..pool.engine import Pool
from ..server import commands, control
from ..server.daemon import control_path
from ..tools.check import check as check_metadata
from .core import DATABASE
from .daemon import DRIVERS, MARKER, lock_root, open_snapshotter
from .devmapper import BASE, POOL, STATE
from .dirs import REMOVING, SNAPSHOTS
from .errors import FailedPrecondition
from .store import Store


@dataclass
class Finding:
    problem: str
    repaired: bool = False


def _driver(root: str) -> str:
    try:
        with open(os.path.join(root, MARKER), encoding="utf-8") as f:
            driver = f.read().strip()
    except FileNotFoundError:
        driver = ""
    if driver not in DRIVERS or not os.path.isfile(os.path.join(root, DATABASE)):
        raise FailedPrecondition(f"{root} is not a thinpool snapshotter root (no {MARKER} "
                                 f"naming a driver, or no {DATABASE})")
    return driver


def _pool_facts(pool_dir: str) -> tuple[set[int], int, list[str]]:
    """Thin device ids, transaction id and metadata problems of the pool: from its server when
    one runs, else from its files (read-only)."""
    try:
        volumes = control.request(control_path(pool_dir), "list", {})["volumes"]
        status = control.request(control_path(pool_dir), "status", {})["status"]
        report = control.request(control_path(pool_dir), "check", {})
        return ({int(v["dev_id"]) for v in volumes}, int(status["transaction_id"]),
                list(report["errors"]) + list(report["leaks"]))
    except (ConnectionRefusedError, FileNotFoundError):
        pass
    with Pool(pool_dir, read_only=True) as pool:
        volumes = commands.run(pool, "list", {}, [])["volumes"]
        status = commands.run(pool, "status", {}, [])["status"]
        metadata = check_metadata(pool.meta_path)
    return ({int(v["dev_id"]) for v in volumes}, int(status["transaction_id"]),
            metadata.errors + metadata.leaks)


def _devicemapper(root: str, ids: set[int], known: set[int], recorded: int | None,
                  in_flight: bool) -> list[Finding]:
    """Findings of a devicemapper root: ``ids`` of ready snapshots, ``known`` ids of every
    row (a row in flight may or may not have its device)."""
    pool_dir = os.path.join(root, POOL)
    if not os.path.isfile(os.path.join(pool_dir, "pool.json")):
        return [Finding(f"the pool {pool_dir} is missing or half-made")] if ids else []
    devices, txn, problems = _pool_facts(pool_dir)
    out = [Finding(f"pool metadata: {p}") for p in problems]
    if recorded is None:
        if txn != 0 or devices - {BASE}:
            out.append(Finding(f"the pool is at transaction {txn} with devices "
                               f"{sorted(devices - {BASE})} but the records know none"))
    elif not (txn == recorded or (txn == recorded + 1 and in_flight)):
        out.append(Finding(f"the records are at pool transaction {recorded}, the pool at {txn}"
                           + (" (one ahead: a change a crash cut short)" if
                              txn == recorded + 1 else ": they do not belong together")))
    try:
        with open(os.path.join(root, STATE), encoding="utf-8") as f:
            base_ready = bool(json.load(f).get("base_ready"))
    except (OSError, ValueError, AttributeError):
        base_ready = False
    if not base_ready or BASE not in devices:
        out.append(Finding("the base device is missing or half-made (the next start makes it "
                           "again)"))
    out += [Finding(f"snapshot #{sid}: thin device {sid} is not in the pool")
            for sid in sorted(ids - devices)]
    out += [Finding(f"thin device {dev} belongs to no snapshot (Cleanup removes it)")
            for dev in sorted(devices - known - {BASE})]
    return out


def _directories(root: str, ids: set[int], known: set[int]) -> list[Finding]:
    """Findings of a directory backend's root (``ids``, ``known`` as for ``_devicemapper``)."""
    top = os.path.join(root, SNAPSHOTS)
    names = os.listdir(top) if os.path.isdir(top) else []
    stored = {int(n) for n in names if n.isascii() and n.isdigit()}
    out = [Finding(f"snapshot #{sid}: its directory {SNAPSHOTS}/{sid} is missing")
           for sid in sorted(ids - stored)]
    out += [Finding(f"{SNAPSHOTS}/{sid} belongs to no snapshot (Cleanup removes it)")
            for sid in sorted(stored - known)]
    out += [Finding(f"{SNAPSHOTS}/{n}: a removal left half done (Cleanup finishes it)")
            for n in sorted(names) if n.startswith(REMOVING)]
    return out


def _check(root: str) -> list[Finding]:
    driver = _driver(root)
    store = Store(os.path.join(root, DATABASE))
    try:
        recs = store.all(state=None)
        queued = store.removals()
        recorded = store.transaction()
    finally:
        store.close()
    out = [Finding(f"snapshot {r.key} (#{r.id}): an interrupted "
                   + ("creation (the next start rolls it back)" if r.state == "creating" else
                      "removal (the next start finishes it)"))
           for r in recs if r.state != "ready"]
    out += [Finding(f"snapshot #{sid}: a removal not yet done (the next start finishes it)")
            for sid in queued]
    ready = {r.id for r in recs if r.state == "ready"}
    known = {r.id for r in recs} | set(queued)
    if driver == "devicemapper":
        out += _devicemapper(root, ready, known, recorded, ready != known)
    else:
        out += _directories(root, ready, known)
    return out


def check(root: str, repair: bool = False) -> list[Finding]:
    """What is wrong with the snapshotter root ``root`` (see the module docstring); with
    ``repair``, what was found and whether it was repaired."""
    root = os.path.abspath(root)
    driver = _driver(root)
    lock = lock_root(root)
    try:
        found = _check(root)
    finally:
        os.close(lock)
    if not repair or not found:
        return found
    try:
        snapshotter, lock = open_snapshotter(root, driver, {})
    except ThinpoolError as e:  # e.g. records and pool that do not belong together
        return found + [Finding(f"cannot repair: {e}")]
    try:
        snapshotter.cleanup()
    finally:
        try:
            snapshotter.close()
        finally:
            os.close(lock)
    lock = lock_root(root)
    try:
        left = {f.problem for f in _check(root)}
    finally:
        os.close(lock)
    for f in found:
        f.repaired = f.problem not in left
    return found

