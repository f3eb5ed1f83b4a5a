"""Volume registry: what dm-thin does not store (virtual size, name, origin).

The registry commits together with the pool transaction, using the pool's
transaction id as the commit point (as Docker's devmapper driver does).  It is
a base file plus an append-only journal, so a device change costs one short
appended line whatever the number of volumes:

* ``volumes.json``: ``{"transaction_id": T, "volumes": {id: record}}``, the
  state at transaction T, replaced atomically when the journal is compacted;
* ``volumes.log``: one JSON line per device change,
  ``{"tid": N, "set": {id: record}, "del": [id]}``.

Protocol for a device change: append and sync the line stamped with the new
transaction id N (``prepare``); commit the metadata with transaction id N;
apply the line in memory (``finish``).  Consecutive lines always carry
different ids, so on open the committed prefix of the journal ends at the last
line stamped with the metadata's transaction id; later lines belong to a
metadata commit that never happened and are cut off.  Replaying the prefix on
the base is idempotent (lines only set or delete records), which makes a crash
during compaction harmless too.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass

from ..errors import ThinpoolError

log = logging.getLogger("thinpool.registry")

BASE = "volumes.json"
JOURNAL = "volumes.log"
COMPACT_AFTER = 1024  # journal lines


@dataclass
class VolumeRecord:
    size: int
    name: str | None = None
    origin: str | None = None  # external origin file (read-only)
    created: float = 0.0


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: str, payload: object) -> None:
    """Write, sync, rename over ``path``, sync the directory."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(json.dumps(payload, separators=(",", ":"), sort_keys=True))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(path) or ".")


def _record(raw: dict) -> VolumeRecord:
    return VolumeRecord(int(raw["size"]), raw.get("name"), raw.get("origin"),
                        float(raw.get("created", 0.0)))


class RegistryError(ThinpoolError):
    pass


class Registry:
    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.base_path = os.path.join(directory, BASE)
        self.journal_path = os.path.join(directory, JOURNAL)
        self.volumes: dict[int, VolumeRecord] = {}
        self.transaction_id = 0
        self._lines = 0
        self._journal_size = 0
        self._pending: tuple[int, dict[int, VolumeRecord], list[int]] | None = None

    # -- loading --------------------------------------------------------------------------
    def load(self, metadata_transaction: int, writable: bool) -> None:
        """Base plus the committed prefix of the journal; cut the rest if writable."""
        raw: dict = {"transaction_id": 0}
        if os.path.exists(self.base_path):
            try:
                with open(self.base_path, encoding="utf-8") as f:
                    raw = json.load(f)
                self.volumes = {int(k): _record(v) for k, v in raw["volumes"].items()}
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise RegistryError(f"volume registry {self.base_path} is unreadable: {e}") from None
        else:
            self.volumes = {}
        base_tid = raw["transaction_id"] if self.volumes or os.path.exists(self.base_path) else 0
        entries, ends = self._read_journal()
        keep = 0
        for i, entry in enumerate(entries):
            if entry["tid"] == metadata_transaction:
                keep = i + 1
        if keep == 0 and entries and base_tid != metadata_transaction:
            # The transaction id was changed behind our back (another tool): no line is the
            # commit point, so keep every record rather than lose volume sizes.
            log.warning("registry of %s does not match metadata transaction %d; keeping all "
                        "%d journal entries", self.directory, metadata_transaction, len(entries))
            keep = len(entries)
        for entry in entries[:keep]:
            self._apply(entry)
        self._lines = keep
        self._journal_size = ends[keep - 1] if keep else 0
        if writable and os.path.exists(self.journal_path) and \
                os.path.getsize(self.journal_path) != self._journal_size:
            os.truncate(self.journal_path, self._journal_size)
            _fsync_dir(self.directory)
        self.transaction_id = metadata_transaction

    def _read_journal(self) -> tuple[list[dict], list[int]]:
        """Parsed journal lines and the byte offset where each ends (a torn tail is dropped)."""
        if not os.path.exists(self.journal_path):
            return [], []
        with open(self.journal_path, "rb") as f:
            data = f.read()
        entries, ends, pos = [], [], 0
        for line in data.split(b"\n")[:-1]:
            pos += len(line) + 1
            try:
                entry = json.loads(line)
                int(entry["tid"])
            except (ValueError, KeyError, TypeError):
                break  # a torn or foreign line: nothing after it can be committed
            entries.append(entry)
            ends.append(pos)
        return entries, ends

    def _apply(self, entry: dict) -> None:
        for k, v in entry.get("set", {}).items():
            self.volumes[int(k)] = _record(v)
        for k in entry.get("del", []):
            self.volumes.pop(int(k), None)

    # -- a device change ------------------------------------------------------------------
    def prepare(self, transaction_id: int, sets: dict[int, VolumeRecord],
                deletes: list[int]) -> None:
        """Step 1: append and sync the journal line for ``transaction_id``."""
        entry = {"tid": transaction_id, "set": {str(k): asdict(v) for k, v in sets.items()},
                 "del": deletes}
        line = (json.dumps(entry, separators=(",", ":")) + "\n").encode()
        fd = os.open(self.journal_path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            os.pwrite(fd, line, self._journal_size)
            os.fdatasync(fd)
        finally:
            os.close(fd)
        if self._journal_size == 0:
            _fsync_dir(self.directory)
        self._pending = (transaction_id, sets, deletes)
        self._pending_end = self._journal_size + len(line)

    def rollback(self) -> None:
        """The metadata commit failed: forget the prepared line."""
        if self._pending is not None:
            os.truncate(self.journal_path, self._journal_size)
            self._pending = None

    def finish(self) -> None:
        """Step 3 (after the metadata commit): the change is in effect."""
        assert self._pending is not None
        tid, sets, deletes = self._pending
        self.volumes.update(sets)
        for k in deletes:
            self.volumes.pop(k, None)
        self.transaction_id = tid
        self._journal_size = self._pending_end
        self._lines += 1
        self._pending = None
        if self._lines >= COMPACT_AFTER:
            self.compact()

    def compact(self) -> None:
        """Fold the journal into the base file (crash-safe at every step)."""
        write_json_atomic(self.base_path, {
            "transaction_id": self.transaction_id,
            "volumes": {str(k): asdict(v) for k, v in sorted(self.volumes.items())}})
        if os.path.exists(self.journal_path):
            os.truncate(self.journal_path, 0)
        self._journal_size = 0
        self._lines = 0
