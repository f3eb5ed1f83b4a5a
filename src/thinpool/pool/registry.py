"""Volume registry: what dm-thin does not store about a volume.

A record holds a volume's virtual size (dm-thin keeps sizes in the thin
target's table, not in the pool), its name, its external origin file and the
volume it was snapshotted from (the kernel does not record that either).

Files in the pool directory:

* ``volumes.json``: ``{"format": 2, "volumes": {id: record}}``, the state at
  the last compaction, replaced atomically (write, sync, rename, sync dir);
* ``volumes.log``: an append-only journal, one JSON line per change,
  ``{"op": "create"|"delete"|"update", "id": N, "record": {...}}``.

Commit point.  The pool's transaction id belongs to its user (Docker keeps
its own counter there), so it cannot mark registry commits.  Instead a device
change (create_thin, create_snap, delete) appends and syncs its line
(``prepare``), then the metadata commit makes the change, then the change
takes effect in memory (``finish``).  The metadata itself tells whether a
line was committed: a created device exists, a deleted one does not.  Device
changes are serialized and every line is resolved (committed, or rolled back
and cut) before the next is appended, so only the *last* line can be
uncommitted; a read-write open cuts it, saying so.  ``update`` lines (name or
size changes that touch no metadata) are committed once synced.

Damage.  A line that cannot be parsed is skipped, never the lines after it:
the open names every skipped line, keeps a copy of the journal beside it
(``volumes.log.damaged-<time>``) and, when read-write, folds the readable
records into the base file.  A torn last line (no newline: the process died
while appending) is an uncommitted change and is cut.

Replaying the journal on the base is idempotent (lines only set or delete
records), which makes a crash during compaction harmless.

Thread safety: none of its own; the pool serializes device changes.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from typing import Any, Collection

from ..errors import ThinpoolError

log = logging.getLogger("thinpool.registry")

BASE = "volumes.json"
JOURNAL = "volumes.log"
FORMAT = 2
COMPACT_AFTER = 1024  # journal lines


@dataclass
class VolumeRecord:
    size: int
    name: str | None = None
    origin: str | None = None  # external origin file (read-only)
    created: float = 0.0
    snapshot_of: int | None = None  # the volume this one was snapshotted from

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> VolumeRecord:
        snap = raw.get("snapshot_of")
        return cls(int(raw["size"]), raw.get("name"), raw.get("origin"),
                   float(raw.get("created", 0.0)), None if snap is None else int(snap))


@dataclass(frozen=True)
class _Op:
    kind: str  # create | delete | update
    dev_id: int
    record: VolumeRecord | None

    def committed(self, devices: Collection[int]) -> bool:
        """Whether the metadata shows this change (updates need no metadata commit)."""
        if self.kind == "create":
            return self.dev_id in devices
        if self.kind == "delete":
            return self.dev_id not in devices
        return True


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: str, payload: object, durable: bool = True) -> None:
    """Write, sync, rename over ``path``, sync the directory.  Without ``durable`` nothing is
    synced: a process that dies leaves the old or the new file, but a machine that crashes
    may lose either (for state that does not outlive the running system anyway)."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(json.dumps(payload, separators=(",", ":"), sort_keys=True))
        f.flush()
        if durable:
            os.fsync(f.fileno())
    os.replace(tmp, path)
    if durable:
        _fsync_dir(os.path.dirname(path) or ".")


def _parse_line(line: bytes) -> list[_Op]:
    """The changes of one journal line (also reads the transaction-stamped lines of format 1)."""
    entry = json.loads(line)
    if "op" in entry:
        kind = entry["op"]
        if kind not in ("create", "delete", "update"):
            raise ValueError(f"unknown op {kind!r}")
        rec = entry.get("record")
        return [_Op(kind, int(entry["id"]), None if rec is None else VolumeRecord.from_json(rec))]
    int(entry["tid"])
    return ([_Op("create", int(k), VolumeRecord.from_json(v)) for k, v in entry["set"].items()]
            + [_Op("delete", int(k), None) for k in entry["del"]])


class RegistryError(ThinpoolError):
    pass


class Registry:
    """Records of the pool's volumes, loaded against the metadata's device set."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.base_path = os.path.join(directory, BASE)
        self.journal_path = os.path.join(directory, JOURNAL)
        self.volumes: dict[int, VolumeRecord] = {}
        self.problems: list[str] = []  # what the last load skipped or cut, one line each
        self._lines = 0
        self._journal_size = 0
        self._pending: _Op | None = None
        self._pending_end = 0

    # -- loading --------------------------------------------------------------------------
    def load(self, devices: Collection[int], writable: bool) -> None:
        """Base plus every committed journal line; ``devices`` are the metadata's devices.

        A read-write open cuts an uncommitted last line and folds a damaged
        journal into the base (after copying it aside); a read-only open
        changes no file.  Records of devices the metadata does not have (its
        devices were changed by another tool) are left out of ``volumes``.
        """
        volumes = self._read_base()
        data = self._read_journal_bytes()
        parsed: list[tuple[int, int, list[_Op]]] = []  # (start, end, ops) of readable lines
        damaged: list[str] = []
        start = 0
        lines = data.split(b"\n")
        for number, line in enumerate(lines[:-1], start=1):
            end = start + len(line) + 1
            try:
                parsed.append((start, end, _parse_line(line)))
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                damaged.append(f"line {number} ({len(line)} bytes, {_preview(line)}): {e}")
            start = end
        committed_end = start
        cut: list[str] = []
        if lines[-1]:  # bytes after the last newline: an append the process never finished
            cut.append(f"torn last line ({len(lines[-1])} bytes, {_preview(lines[-1])})")
        if parsed and parsed[-1][1] == committed_end and \
                not all(op.committed(devices) for op in parsed[-1][2]):
            committed_end, _, ops = parsed.pop()
            cut.append("uncommitted last line (" + ", ".join(f"{o.kind} {o.dev_id}" for o in ops)
                       + "): the process stopped before its metadata commit")
        ops_by_line = parsed
        for _, _, ops in ops_by_line:
            for op in ops:
                if op.kind == "delete":
                    volumes.pop(op.dev_id, None)
                elif op.record is not None:
                    volumes[op.dev_id] = op.record
        self.problems = [f"volumes.log {d}: skipped" for d in damaged]
        self.problems += [f"volumes.log {c}: " + ("cut" if writable else "ignored") for c in cut]
        self.volumes = {k: v for k, v in volumes.items() if k in devices}
        self._lines = len(ops_by_line)
        self._journal_size = committed_end
        if not writable:
            for p in self.problems:
                log.warning("%s: %s", self.directory, p)
            return
        if damaged:
            copy = f"{self.journal_path}.damaged-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"
            with open(copy, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            self.problems.append(f"a copy of the damaged journal is kept at {copy}")
            self.compact()
        elif len(data) != committed_end:
            os.truncate(self.journal_path, committed_end)
            _fsync_dir(self.directory)
        for p in self.problems:
            log.warning("%s: %s", self.directory, p)

    def _read_base(self) -> dict[int, VolumeRecord]:
        try:
            with open(self.base_path, encoding="utf-8") as f:
                raw = json.load(f)
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            raise RegistryError(f"volume registry {self.base_path} is unreadable: {e}") from None
        try:
            return {int(k): VolumeRecord.from_json(v) for k, v in raw["volumes"].items()}
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise RegistryError(f"volume registry {self.base_path} is malformed: {e!r}") from None

    def _read_journal_bytes(self) -> bytes:
        try:
            with open(self.journal_path, "rb") as f:
                return f.read()
        except FileNotFoundError:
            return b""

    # -- changes ----------------------------------------------------------------------------
    def prepare(self, kind: str, dev_id: int, record: VolumeRecord | None = None) -> None:
        """Step 1 of a device change: append and sync its journal line.

        The caller commits the metadata next, then calls ``finish`` (or
        ``rollback`` if the metadata commit failed).
        """
        op = _Op(kind, dev_id, record)
        entry: dict[str, Any] = {"op": kind, "id": dev_id}
        if record is not None:
            entry["record"] = asdict(record)
        line = (json.dumps(entry, separators=(",", ":")) + "\n").encode()
        fd = os.open(self.journal_path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            os.pwrite(fd, line, self._journal_size)
            os.fdatasync(fd)
        finally:
            os.close(fd)
        if self._journal_size == 0:
            _fsync_dir(self.directory)
        self._pending = op
        self._pending_end = self._journal_size + len(line)

    def rollback(self) -> None:
        """The metadata commit failed: cut the prepared line."""
        if self._pending is not None:
            os.truncate(self.journal_path, self._journal_size)
            self._pending = None

    def finish(self) -> None:
        """Step 3 (after the metadata commit): the change is in effect."""
        op = self._pending
        assert op is not None
        if op.kind == "delete":
            self.volumes.pop(op.dev_id, None)
        elif op.record is not None:
            self.volumes[op.dev_id] = op.record
        self._journal_size = self._pending_end
        self._lines += 1
        self._pending = None
        if self._lines >= COMPACT_AFTER:
            self.compact()

    def update(self, dev_id: int, record: VolumeRecord) -> None:
        """A registry-only change (name, size): durable when this returns."""
        self.prepare("update", dev_id, record)
        self.finish()

    def compact(self) -> None:
        """Fold the journal into the base file (crash-safe at every step)."""
        write_json_atomic(self.base_path, {
            "format": FORMAT,
            "volumes": {str(k): asdict(v) for k, v in sorted(self.volumes.items())}})
        if os.path.exists(self.journal_path):
            os.truncate(self.journal_path, 0)
        self._journal_size = 0
        self._lines = 0


def _preview(line: bytes) -> str:
    text = line[:40].decode("utf-8", "replace")
    return repr(text + ("..." if len(line) > 40 else ""))
