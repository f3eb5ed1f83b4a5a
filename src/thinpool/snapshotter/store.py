"""The snapshotter's records: an embedded, transactional sqlite3 database.

``ROOT/snapshots.db`` holds one row per snapshot: its integer id (never
reused: it names the snapshot's directory or thin device), its key (the
active or view key, or the committed name), kind, parent, creation and
update times (nanoseconds, UTC), usage recorded at commit, labels, and a
``state``:

* ``creating`` - the row is written and committed *before* the backend
  makes the snapshot's storage; it becomes ``ready`` after;
* ``ready`` - the snapshot exists, as far as any client was told;
* ``removing`` - written by earlier versions before the backend removed the
  storage (the row went after); a restart still finishes such a removal.

A removal deletes the row (and its labels) and, in the same transaction,
queues the id in the ``removals`` table: the key is free at once, and the
storage is removed afterwards (``core``), the queue entry going with the
backend's new transaction id.  So a crash at any point leaves rows that
say what might be half done: a restart rolls ``creating`` back (storage
removed if it got made, row deleted: no client was told it exists) and
finishes queued removals.  The ``meta`` table keeps the backend's
transaction id (the pool's, for devicemapper) as of the last change, and
the schema version.

The database runs in WAL mode with ``synchronous=FULL``: a transaction is
durable when its COMMIT returns.  One connection serves every thread, behind
a lock; each public method is one transaction.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

from .errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound

SCHEMA_VERSION = 1
VIEW, ACTIVE, COMMITTED = 1, 2, 3
KIND_NAMES = {VIEW: "view", ACTIVE: "active", COMMITTED: "committed"}
MAX_LABEL = 4096  # containerd's limit on a label's key plus value, in bytes

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS snapshots (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    key TEXT NOT NULL UNIQUE,
    kind INTEGER NOT NULL CHECK (kind IN (1, 2, 3)),
    parent INTEGER REFERENCES snapshots(id),
    state TEXT NOT NULL CHECK (state IN ('creating', 'ready', 'removing')),
    created INTEGER NOT NULL,
    updated INTEGER NOT NULL,
    size INTEGER NOT NULL DEFAULT 0,
    inodes INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS snapshots_parent ON snapshots(parent);
CREATE TABLE IF NOT EXISTS removals (id INTEGER PRIMARY KEY);
CREATE TABLE IF NOT EXISTS labels (
    snapshot INTEGER NOT NULL REFERENCES snapshots(id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY (snapshot, name)
);
"""


@dataclass
class Record:
    """One snapshot row (``parent_key`` resolved for convenience)."""

    id: int
    key: str
    kind: int
    parent: int | None
    parent_key: str
    state: str
    created: int
    updated: int
    size: int = 0
    inodes: int = 0
    labels: dict[str, str] = field(default_factory=dict)


def now_ns() -> int:
    return time.time_ns()


def check_labels(labels: dict[str, str]) -> dict[str, str]:
    """containerd's ``labels.Validate`` (key plus value at most 4096 bytes); the labels to
    store (containerd stores no label with an empty value)."""
    for k, v in labels.items():
        if len(k.encode()) + len(v.encode()) > MAX_LABEL:
            raise InvalidArgument(f"label key and value greater than maximum size ({MAX_LABEL} "
                                  f"bytes), key: {k[:64]}")
    return {k: v for k, v in labels.items() if v != ""}


def check_key(key: str, what: str = "key") -> None:
    if not key:
        raise InvalidArgument(f"snapshot {what} must not be empty")
    if "\0" in key:
        raise InvalidArgument(f"snapshot {what} must not contain a NUL character")


class Store:
    """The records (see the module docstring).  Thread-safe."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.RLock()
        os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))  # born private
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False,
                                   timeout=30)
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.executescript(_SCHEMA)
            version = self.get_meta("schema_version")
            if version is None:
                self.set_meta("schema_version", str(SCHEMA_VERSION))
            elif version != str(SCHEMA_VERSION):
                raise FailedPrecondition(f"snapshot database {path} has schema version {version}; "
                                         f"this thinpool knows {SCHEMA_VERSION}")
        except sqlite3.DatabaseError as e:
            self._db.close()
            raise FailedPrecondition(f"snapshot database {path} is unusable: {e}") from None
        except BaseException:
            self._db.close()
            raise

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (BEGIN IMMEDIATE ... COMMIT, ROLLBACK on any error)."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    # -- meta ---------------------------------------------------------------------------------
    def get_meta(self, name: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE name = ?", (name,)).fetchone()
        return None if row is None else str(row[0])

    def set_meta(self, name: str, value: str) -> None:
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO meta (name, value) VALUES (?, ?)", (name, value))

    # -- reads ----------------------------------------------------------------------------------
    _SELECT = ("SELECT s.id, s.key, s.kind, s.parent, COALESCE(p.key, ''), s.state, s.created, "
               "s.updated, s.size, s.inodes FROM snapshots s LEFT JOIN snapshots p "
               "ON p.id = s.parent")

    def _records(self, where: str, args: tuple[object, ...]) -> list[Record]:
        rows = self._db.execute(f"{self._SELECT} {where}", args).fetchall()
        recs = [Record(*row) for row in rows]
        if recs:
            by_id = {r.id: r for r in recs}
            if len(recs) == 1:
                labels = self._db.execute("SELECT snapshot, name, value FROM labels WHERE "
                                          "snapshot = ?", (recs[0].id,)).fetchall()
            else:
                labels = self._db.execute("SELECT snapshot, name, value FROM labels").fetchall()
            for sid, name, value in labels:
                if sid in by_id:
                    by_id[sid].labels[name] = value
        return recs

    def get(self, key: str) -> Record:
        """The ready snapshot ``key``, or ``NotFound``."""
        with self._lock:
            recs = self._records("WHERE s.key = ? AND s.state = 'ready'", (key,))
        if not recs:
            raise NotFound(f"snapshot {key} does not exist")
        return recs[0]

    def by_id(self, sid: int) -> Record:
        with self._lock:
            recs = self._records("WHERE s.id = ?", (sid,))
        if not recs:
            raise NotFound(f"snapshot #{sid} does not exist")
        return recs[0]

    def chain(self, rec: Record) -> list[Record]:
        """``rec``'s ancestors, nearest first."""
        out = []
        with self._lock:
            parent = rec.parent
            while parent is not None:
                p = self._records("WHERE s.id = ?", (parent,))[0]
                out.append(p)
                parent = p.parent
        return out

    def all(self, state: str | None = "ready") -> list[Record]:
        with self._lock:
            if state is None:
                return self._records("ORDER BY s.id", ())
            return self._records("WHERE s.state = ? ORDER BY s.id", (state,))

    def ids(self) -> set[int]:
        """Every row's id, whatever its state, and every queued removal's."""
        with self._lock:
            return {int(r[0]) for r in self._db.execute(
                "SELECT id FROM snapshots UNION SELECT id FROM removals")}

    def removals(self) -> list[int]:
        """Ids whose storage is still to be removed, oldest first."""
        with self._lock:
            return [int(r[0]) for r in self._db.execute("SELECT id FROM removals ORDER BY id")]

    # -- changes --------------------------------------------------------------------------------
    def begin_create(self, key: str, parent_key: str, kind: int, labels: dict[str, str]) -> Record:
        """Write a ``creating`` row for a new active or view snapshot; its record."""
        check_key(key)
        labels = check_labels(labels)
        t = now_ns()
        with self._tx() as db:
            if db.execute("SELECT 1 FROM snapshots WHERE key = ?", (key,)).fetchone():
                raise AlreadyExists(f"snapshot {key} already exists")
            parent = None
            if parent_key:
                row = db.execute("SELECT id, kind, state FROM snapshots WHERE key = ?",
                                 (parent_key,)).fetchone()
                if row is None or row[2] != "ready":
                    raise NotFound(f"parent snapshot {parent_key} does not exist")
                if row[1] != COMMITTED:
                    raise InvalidArgument(f"parent {parent_key} is not a committed snapshot")
                parent = int(row[0])
            cur = db.execute("INSERT INTO snapshots (key, kind, parent, state, created, updated) "
                             "VALUES (?, ?, ?, 'creating', ?, ?)", (key, kind, parent, t, t))
            sid = int(cur.lastrowid or 0)
            db.executemany("INSERT INTO labels (snapshot, name, value) VALUES (?, ?, ?)",
                           [(sid, k, v) for k, v in labels.items()])
        return Record(sid, key, kind, parent, parent_key, "creating", t, t, labels=dict(labels))

    def finish_create(self, sid: int, transaction: int | None) -> None:
        with self._tx() as db:
            db.execute("UPDATE snapshots SET state = 'ready' WHERE id = ?", (sid,))
            self._set_transaction(db, transaction)

    def check_childless(self, rec: Record) -> None:
        """``FailedPrecondition`` (containerd's "cannot remove ... with child") if ``rec`` has
        children."""
        with self._lock:
            children = [r[0] for r in self._db.execute(
                "SELECT key FROM snapshots WHERE parent = ? ORDER BY id", (rec.id,))]
        if children:
            shown = ", ".join(children[:3]) + (", ..." if len(children) > 3 else "")
            raise FailedPrecondition(f"cannot remove snapshot {rec.key}: it has {len(children)} "
                                     f"child snapshot(s) ({shown}); remove them first")

    def queue_remove(self, key: str) -> Record:
        """Drop ready snapshot ``key`` and queue its storage for removal, in one transaction;
        ``FailedPrecondition`` if it has children.  Its record as it was."""
        with self._tx() as db:
            recs = self._records("WHERE s.key = ? AND s.state = 'ready'", (key,))
            if not recs:
                raise NotFound(f"snapshot {key} does not exist")
            rec = recs[0]
            self.check_childless(rec)
            db.execute("INSERT INTO removals (id) VALUES (?)", (rec.id,))
            db.execute("DELETE FROM snapshots WHERE id = ?", (rec.id,))
        return rec

    def finish_removal(self, sid: int, transaction: int | None) -> None:
        """The storage of queued removal ``sid`` is gone (at backend ``transaction``)."""
        with self._tx() as db:
            db.execute("DELETE FROM removals WHERE id = ?", (sid,))
            self._set_transaction(db, transaction)

    def delete(self, sid: int, transaction: int | None) -> None:
        """Drop a row (a finished removal, or a rolled-back creation)."""
        with self._tx() as db:
            db.execute("DELETE FROM snapshots WHERE id = ?", (sid,))
            self._set_transaction(db, transaction)

    def commit(self, key: str, name: str, labels: dict[str, str], size: int,
               inodes: int) -> None:
        """Active ``key`` becomes committed ``name`` (labels replaced, times reset, usage kept;
        ``size`` -1 means not counted yet, see ``set_usage``)."""
        check_key(name, "name")
        labels = check_labels(labels)
        t = now_ns()
        with self._tx() as db:
            if db.execute("SELECT 1 FROM snapshots WHERE key = ?", (name,)).fetchone():
                raise AlreadyExists(f"committed snapshot {name} already exists")
            row = db.execute("SELECT id, kind, state FROM snapshots WHERE key = ?",
                             (key,)).fetchone()
            if row is None or row[2] != "ready":
                raise NotFound(f"active snapshot {key} does not exist")
            if row[1] != ACTIVE:
                raise FailedPrecondition(f"snapshot {key} is not active (a "
                                         f"{KIND_NAMES[row[1]]} snapshot cannot be committed)")
            sid = int(row[0])
            db.execute("UPDATE snapshots SET key = ?, kind = ?, created = ?, updated = ?, "
                       "size = ?, inodes = ? WHERE id = ?",
                       (name, COMMITTED, t, t, size, inodes, sid))
            db.execute("DELETE FROM labels WHERE snapshot = ?", (sid,))
            db.executemany("INSERT INTO labels (snapshot, name, value) VALUES (?, ?, ?)",
                           [(sid, k, v) for k, v in labels.items()])

    def set_usage(self, sid: int, size: int, inodes: int) -> None:
        """Record the usage of committed snapshot ``sid`` counted after its commit."""
        with self._tx() as db:
            db.execute("UPDATE snapshots SET size = ?, inodes = ? WHERE id = ?",
                       (size, inodes, sid))

    def update_labels(self, key: str, labels: dict[str, str], paths: list[str]) -> Record:
        """containerd's ``UpdateInfo``: only labels change (all, or ``labels.KEY`` ones)."""
        for path in paths:
            if path != "labels" and not path.startswith("labels."):
                raise InvalidArgument(f"cannot update {path!r} field on snapshot {key!r}")
        with self._tx() as db:
            recs = self._records("WHERE s.key = ? AND s.state = 'ready'", (key,))
            if not recs:
                raise NotFound(f"snapshot {key} does not exist")
            rec = recs[0]
            new = dict(rec.labels)
            if not paths or "labels" in paths:
                new = dict(labels)
            for path in paths:
                if path.startswith("labels."):
                    name = path[len("labels."):]
                    new[name] = labels.get(name, "")
            new = check_labels(new)
            rec.updated = now_ns()
            rec.labels = new
            db.execute("UPDATE snapshots SET updated = ? WHERE id = ?", (rec.updated, rec.id))
            db.execute("DELETE FROM labels WHERE snapshot = ?", (rec.id,))
            db.executemany("INSERT INTO labels (snapshot, name, value) VALUES (?, ?, ?)",
                           [(rec.id, k, v) for k, v in new.items()])
        return rec

    @staticmethod
    def _set_transaction(db: sqlite3.Connection, transaction: int | None) -> None:
        if transaction is not None:
            db.execute("INSERT OR REPLACE INTO meta (name, value) VALUES ('transaction', ?)",
                       (str(transaction),))

    def transaction(self) -> int | None:
        value = self.get_meta("transaction")
        return None if value is None else int(value)

    def set_transaction(self, transaction: int) -> None:
        with self._tx() as db:
            self._set_transaction(db, transaction)
