"""The snapshotter: containerd's snapshot semantics over the records and a backend.

``Snapshotter`` implements containerd's ``snapshots.Snapshotter`` contract
(the 1.6 ``storage`` package's rules and errors) independent of gRPC:

* ``prepare``/``view`` make an active/view snapshot on a committed parent
  (``AlreadyExists`` for a used key, ``NotFound`` for a missing parent,
  ``InvalidArgument`` for a parent that is not committed) and return its mounts;
* ``mounts`` of an active or view snapshot (``FailedPrecondition`` for a
  committed one, as containerd 1.6);
* ``commit`` turns an active snapshot into a committed one under a new name
  (labels replaced, usage recorded - or counted and recorded by the first
  ``usage`` when the backend defers it; ``FailedPrecondition`` for a view);
* ``remove`` (``FailedPrecondition``, "cannot remove ...", while it has
  children or is mounted): the record goes and the key is free when it
  returns; the storage is removed in the background (see below);
* ``stat``, ``update`` (labels only), ``list`` (containerd's filters),
  ``usage`` and ``cleanup`` (storage no record names).

Order of every change, for the crash story (``store`` explains the states):
a creation writes its ``creating`` row, makes the storage, then marks the
row ready together with the backend's new transaction id; a removal deletes
its row and queues its id in one transaction, and a background thread
removes the storage, then drops the queue entry with the new transaction
id.  The thread runs once no call has come for ``REMOVAL_QUIET`` seconds
(at the latest ``REMOVAL_LATEST`` seconds after the removal), so the work
stays out of the way of the next container's start; a failure is logged and
retried every ``REMOVAL_RETRY`` seconds and at the next start.  Changes that
touch the backend's transaction id run one at a time, so at a crash the
backend is at most one change ahead of the records.  ``recover`` (run by
``open``) rolls ``creating`` rows back and finishes queued removals (and
``removing`` rows of earlier versions); ``close`` finishes queued removals.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass

from .backend import Backend, Mount, Usage
from .errors import AlreadyExists, FailedPrecondition, NotFound, ResourceExhausted
from .filters import parse_all
from .store import ACTIVE, COMMITTED, KIND_NAMES, VIEW, Record, Store, check_key

log = logging.getLogger("thinpool.snapshotter")

DATABASE = "snapshots.db"
REMOVAL_QUIET = 0.1  # seconds without a call before queued removals run
REMOVAL_LATEST = 2.0  # ... or this long after the removal, whatever the calls
REMOVAL_RETRY = 30.0  # seconds between retries of removals that failed


@dataclass(frozen=True)
class Info:
    """containerd's ``snapshots.Info``."""

    name: str
    parent: str
    kind: int
    created: int  # ns since the epoch, UTC
    updated: int
    labels: dict[str, str]


def _info(rec: Record) -> Info:
    return Info(rec.key, rec.parent_key, rec.kind, rec.created, rec.updated, dict(rec.labels))


class Snapshotter:
    """containerd's snapshotter contract on ``backend`` (see the module docstring)."""

    def __init__(self, root: str, backend: Backend) -> None:
        self.root = root
        self.backend = backend
        self.store = Store(os.path.join(root, DATABASE))
        self._changes = threading.Lock()  # one backend change at a time (transaction ids)
        self._closed = False
        self._stop = threading.Event()
        self._wake = threading.Event()  # a removal was queued
        self._last_call = time.monotonic()
        try:
            recorded = self.store.transaction()
            current = backend.open(recorded)
            self._recover(current)
        except BaseException:
            backend.close()
            self.store.close()
            raise
        self._remover = threading.Thread(target=self._removal_worker, daemon=True,
                                         name="snapshot-removals")
        self._remover.start()

    # -- crash recovery -------------------------------------------------------------------------
    def _recover(self, current: int | None) -> None:
        """Finish what a crash interrupted (see the module docstring)."""
        for rec in self.store.all(state=None):
            if rec.state == "creating":
                log.info("rolling back the interrupted creation of snapshot %s", rec.key)
                self.backend.remove(rec.id)
                self.store.delete(rec.id, self.backend.transaction)
            elif rec.state == "removing":
                log.info("finishing the interrupted removal of snapshot %s", rec.key)
                self.backend.remove(rec.id)
                self.store.delete(rec.id, self.backend.transaction)
        for sid in self.store.removals():
            log.info("finishing the queued removal of snapshot #%s", sid)
            self.backend.remove(sid)
            self.store.finish_removal(sid, self.backend.transaction)
        if current is not None and self.backend.transaction is not None:
            self.store.set_transaction(self.backend.transaction)

    # -- queued removals ------------------------------------------------------------------------
    def finish_removals(self) -> list[int]:
        """Remove the storage of every queued removal now; the ids still queued (a failure
        is logged, and retried later)."""
        for sid in self.store.removals():
            with self._changes:
                try:
                    self.backend.remove(sid)
                    self.store.finish_removal(sid, self.backend.transaction)
                except Exception as e:  # noqa: BLE001 - kept queued: retried, and at a start
                    log.warning("removing the storage of snapshot #%s: %s", sid, e)
        return self.store.removals()

    def _removal_worker(self) -> None:
        while not self._stop.is_set():
            woken = self._wake.wait(REMOVAL_RETRY)
            self._wake.clear()
            if woken:
                latest = time.monotonic() + REMOVAL_LATEST
                while not self._stop.is_set():
                    wait = min(self._last_call + REMOVAL_QUIET, latest) - time.monotonic()
                    if wait <= 0:
                        break
                    self._stop.wait(wait)
            if self._stop.is_set():
                return
            self.finish_removals()

    def close(self) -> None:
        if self._closed:
            return
        self._stop.set()
        self._wake.set()
        self._remover.join()
        self.finish_removals()
        self._closed = True
        with self._changes:
            self.backend.close()
            self.store.close()

    # -- the contract -----------------------------------------------------------------------------
    def prepare(self, key: str, parent: str, labels: dict[str, str]) -> list[Mount]:
        return self._create(key, parent, labels, ACTIVE)

    def view(self, key: str, parent: str, labels: dict[str, str]) -> list[Mount]:
        return self._create(key, parent, labels, VIEW)

    def _create(self, key: str, parent: str, labels: dict[str, str], kind: int) -> list[Mount]:
        """A new snapshot; short of space, queued removals are finished first and it is
        tried once more."""
        self._last_call = time.monotonic()
        try:
            return self._create_once(key, parent, labels, kind)
        except ResourceExhausted:
            if not self.store.removals():
                raise
        self.finish_removals()
        return self._create_once(key, parent, labels, kind)

    def _create_once(self, key: str, parent: str, labels: dict[str, str], kind: int
                     ) -> list[Mount]:
        with self._changes:
            rec = self.store.begin_create(key, parent, kind, labels)
            parents = self.store.chain(rec)
            try:
                self.backend.create(rec, parents)
            except BaseException:
                try:
                    self.backend.remove(rec.id)
                    self.store.delete(rec.id, self.backend.transaction)
                except Exception as e:  # noqa: BLE001 - the restart finishes the rollback
                    log.warning("undoing the failed creation of %s: %s", key, e)
                raise
            self.store.finish_create(rec.id, self.backend.transaction)
        rec.state = "ready"
        return self.backend.mounts(rec, parents)

    def mounts(self, key: str) -> list[Mount]:
        self._last_call = time.monotonic()
        rec = self.store.get(key)
        if rec.kind == COMMITTED:
            raise FailedPrecondition(f"requested snapshot {key} not active or view")
        return self.backend.mounts(rec, self.store.chain(rec))

    def commit(self, name: str, key: str, labels: dict[str, str]) -> None:
        self._last_call = time.monotonic()
        check_key(name, "name")
        rec = self.store.get(key)
        if rec.kind != ACTIVE:
            raise FailedPrecondition(f"snapshot {key} is not active (a {KIND_NAMES[rec.kind]} "
                                     "snapshot cannot be committed)")
        try:
            self.store.get(name)
            existing = True
        except NotFound:
            existing = False
        if existing:
            raise AlreadyExists(f"committed snapshot {name} already exists")
        usage = self.backend.commit(rec, self.store.chain(rec))
        self.store.commit(key, name, labels, usage.size if usage else -1,
                          usage.inodes if usage else -1)

    def remove(self, key: str) -> None:
        """The record goes (durably) and the storage is queued for the background removal."""
        self._last_call = time.monotonic()
        rec = self.store.get(key)
        self.store.check_childless(rec)
        self.backend.check_idle(rec)
        self.store.queue_remove(key)
        self._wake.set()

    def stat(self, key: str) -> Info:
        return _info(self.store.get(key))

    def update(self, info: Info, paths: list[str]) -> Info:
        return _info(self.store.update_labels(info.name, info.labels, paths))

    def list_snapshots(self, filters: list[str]) -> list[Info]:
        flt = parse_all(filters)
        out = []
        for rec in self.store.all():
            def fields(path: list[str], rec: Record = rec) -> tuple[str, bool]:
                head = path[0] if path else ""
                if head == "kind":
                    return KIND_NAMES[rec.kind], True
                if head == "name":
                    return rec.key, True
                if head == "parent":
                    return rec.parent_key, True
                if head == "labels":
                    if not rec.labels:
                        return "", False
                    name = ".".join(path[1:])
                    return rec.labels.get(name, ""), name in rec.labels
                return "", False
            if flt.match(fields):
                out.append(_info(rec))
        return out

    def usage(self, key: str) -> Usage:
        rec = self.store.get(key)
        if rec.kind == ACTIVE:
            return self.backend.usage(rec, self.store.chain(rec))
        if rec.kind == COMMITTED and rec.size < 0:  # deferred by the backend's commit
            usage = self.backend.usage(rec, self.store.chain(rec))
            self.store.set_usage(rec.id, usage.size, usage.inodes)
            return usage
        return Usage(rec.size, rec.inodes)

    def cleanup(self) -> list[str]:
        """Remove storage that no record names; what was done."""
        done = []
        with self._changes:
            self.backend.release_idle({r.id for r in self.store.all() if r.kind == COMMITTED})
            for sid in sorted(self.backend.stored() - self.store.ids()):
                self.backend.remove(sid)
                if self.backend.transaction is not None:
                    self.store.set_transaction(self.backend.transaction)
                done.append(f"removed orphaned snapshot storage #{sid}")
                log.info("cleanup: removed orphaned snapshot storage #%s", sid)
        return done
