"""Docker's layer store (``layer/``) over any graph driver: ``ROOT/image/<driver>/layerdb``.

Layout, as Docker writes it (files hold the value with no newline)::

    layerdb/sha256/<chain hex>/cache-id          driver layer id (random 64 hex)
                               diff              sha256:<diff id>
                               size              bytes the layer's tar applied
                               parent            sha256:<parent chain id> (not for a base layer)
                               tar-split.json.gz the tar minus its file contents
    layerdb/mounts/<container id>/mount-id       the container's read-write layer
                                  init-id        <mount-id>-init
                                  parent         sha256:<chain id of the image's top layer>
    layerdb/tmp/                                 work in progress (below)

**Commit and crash story.**  Before a driver layer is created, its cache id
is recorded in ``tmp/pending-<cache id>``; the layer's files are written in
``tmp/write-set-*`` and renamed to ``sha256/<chain hex>`` (or
``mounts/<id>``) in one step, and only then is the pending record removed.
A layer being deleted is first renamed to ``tmp/delete-*`` (invisible from
then on), then removed from the driver, then from disk.  ``recover()``
(run by every ``LayerStore``) finishes what a killed process left: a
pending cache id that no committed layer uses is removed from the driver,
write sets are deleted, deletions are completed.  So after a crash a layer
either exists whole (driver layer, files, tar-split) or not at all.

``register`` streams a layer tar through sha256 and a tar-split recorder
into ``driver.create(cache, parent) + driver.apply_diff``: the layer is
applied onto a snapshot of its parent; when the digest is not the diff id
expected, the driver layer is removed and ``DigestMismatch`` raised.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
from dataclasses import dataclass
from typing import Any, BinaryIO, Callable, Iterator

from ..archive import ArchiveError, open_layer_stream
from ..errors import ThinpoolError
from ..graph.driver import CreateOpts, GraphDriver
from ..graph.fsutil import sync_dir, write_file
from . import tarsplit
from .digest import HashingReader, chain_id, check_digest, hex_of
from .errors import DigestMismatch, ImageError, NotFound, note_or_raise

MAX_DEPTH = 125  # Docker's maxLayerDepth


@dataclass(frozen=True)
class Layer:
    """One committed image layer."""

    chain_id: str
    diff_id: str
    cache_id: str
    size: int
    parent: str | None


@dataclass(frozen=True)
class RWLayer:
    """A container's layers: ``init_id`` on the image's top layer, ``mount_id`` on it."""

    container_id: str
    mount_id: str
    init_id: str
    parent: str | None


def atomic_write(path: str, data: bytes, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data`` so that a crash leaves the old or the new file."""
    tmp = os.path.join(os.path.dirname(path), f".tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        write_file(tmp, data, mode)
        os.replace(tmp, path)
    except BaseException:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        raise
    sync_dir(os.path.dirname(path))


def _read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read().strip()


def _listdir(path: str) -> list[str]:
    try:
        return [n for n in os.listdir(path) if not n.startswith(".")]
    except FileNotFoundError:
        return []


def new_id() -> str:
    """A random 64-hex id (Docker's stringid.GenerateRandomID)."""
    while True:
        value = secrets.token_hex(32)
        if not value[:12].isdigit():  # Docker avoids ids whose short form is all digits
            return value


class LayerDB:
    """Read-only access to a ``layerdb`` directory (never writes; missing parts read as empty)."""

    def __init__(self, path: str) -> None:
        self.dir = path
        self.sha_dir = os.path.join(self.dir, "sha256")
        self.mounts_dir = os.path.join(self.dir, "mounts")
        self.tmp_dir = os.path.join(self.dir, "tmp")

    def get(self, chain: str) -> Layer:
        """The committed layer ``chain`` (``NotFound`` when there is none, ``ImageError`` when
        its record is incomplete or unreadable)."""
        path = os.path.join(self.sha_dir, hex_of(check_digest(chain, "chain id")))
        if not os.path.isdir(path):
            raise NotFound(f"layer {chain} does not exist")
        try:
            parent_file = os.path.join(path, "parent")
            layer = Layer(chain, _read(os.path.join(path, "diff")), _read(os.path.join(path, "cache-id")),
                          int(_read(os.path.join(path, "size")) or 0),
                          _read(parent_file) if os.path.exists(parent_file) else None)
        except FileNotFoundError as e:
            raise ImageError(f"layer {chain}: incomplete record (no {os.path.basename(e.filename)})") \
                from None
        except (OSError, ValueError) as e:
            raise ImageError(f"layer {chain}: unreadable record: {e}") from None
        try:
            computed = chain_id(None if layer.parent is None else check_digest(layer.parent, "parent"),
                                check_digest(layer.diff_id, "diff id"))
        except ImageError as e:
            raise ImageError(f"layer {chain}: {e}") from None
        if computed != chain:
            raise ImageError(f"layer {chain}: its record (diff id {layer.diff_id} on "
                             f"{layer.parent or 'no parent'}) has chain id {computed}")
        return layer

    def exists(self, chain: str) -> bool:
        return os.path.isdir(os.path.join(self.sha_dir, hex_of(chain)))

    def all(self, problems: list[str] | None = None) -> dict[str, Layer]:
        """Every layer by chain id.  An unreadable record is an ``ImageError``, or, with
        ``problems``, noted there (one line) and left out."""
        out = {}
        for name in sorted(_listdir(self.sha_dir)):
            try:
                layer = self.get("sha256:" + name)
            except ImageError as e:
                note_or_raise(e, problems)
                continue
            out[layer.chain_id] = layer
        return out

    def stack(self, chain: str) -> list[Layer]:
        """The layer and every layer under it, bottom first."""
        out: list[Layer] = []
        current: str | None = chain
        while current is not None:
            layer = self.get(current)
            out.append(layer)
            current = layer.parent
            if len(out) > MAX_DEPTH + 1:
                raise ImageError(f"layer {chain}: parent chain loops or exceeds {MAX_DEPTH} layers")
        return out[::-1]

    def tar_split(self, chain: str) -> list[tarsplit.Entry] | None:
        path = os.path.join(self.sha_dir, hex_of(chain), "tar-split.json.gz")
        try:
            with open(path, "rb") as f:
                return tarsplit.parse(f.read())
        except FileNotFoundError:
            return None

    def mounts(self, problems: list[str] | None = None) -> dict[str, RWLayer]:
        """Every container's layers by container id (``problems``: as for ``all``)."""
        out = {}
        for cid in sorted(_listdir(self.mounts_dir)):
            try:
                out[cid] = self.get_mount(cid)
            except ImageError as e:
                note_or_raise(e, problems)
        return out

    def get_mount(self, container_id: str) -> RWLayer:
        """A container's layers (``NotFound`` when it has none, ``ImageError`` when the
        record is incomplete or unreadable)."""
        path = os.path.join(self.mounts_dir, container_id)
        if not os.path.isdir(path):
            raise NotFound(f"no read-write layer for container {container_id}")
        try:
            parent_file = os.path.join(path, "parent")
            mount_id = _read(os.path.join(path, "mount-id"))
            init_file = os.path.join(path, "init-id")
            return RWLayer(container_id, mount_id,
                           _read(init_file) if os.path.exists(init_file) else "",
                           _read(parent_file) if os.path.exists(parent_file) else None)
        except FileNotFoundError:
            raise ImageError(f"container {container_id}: incomplete layer record (no mount-id)") from None
        except (OSError, ValueError) as e:
            raise ImageError(f"container {container_id}: unreadable layer record: {e}") from None



class LayerStore(LayerDB):
    """The layer database of one data root and driver (see the module docstring)."""

    def __init__(self, root: str, driver: GraphDriver) -> None:
        super().__init__(os.path.join(root, "image", driver.name, "layerdb"))
        self.driver = driver
        for d in (self.sha_dir, self.mounts_dir, self.tmp_dir):
            os.makedirs(d, mode=0o700, exist_ok=True)

    # -- writing -------------------------------------------------------------------------------
    def _pending(self, cache_id: str) -> str:
        path = os.path.join(self.tmp_dir, f"pending-{cache_id}")
        write_file(path, cache_id.encode(), 0o600)
        sync_dir(self.tmp_dir)
        return path

    def _commit(self, files: dict[str, bytes], dest: str) -> None:
        ws = os.path.join(self.tmp_dir, f"write-set-{secrets.token_hex(8)}")
        os.mkdir(ws, 0o700)
        try:
            for name, data in files.items():
                write_file(os.path.join(ws, name), data, 0o644)
            sync_dir(ws)
            os.rename(ws, dest)
        except BaseException:
            shutil.rmtree(ws, ignore_errors=True)
            raise
        sync_dir(os.path.dirname(dest))

    def register(self, stream: BinaryIO, parent: str | None, expected: str | None = None,
                 progress: Callable[[int], None] | None = None,
                 split: list[tarsplit.Entry] | None = None) -> tuple[Layer, bool]:
        """Apply the layer tar in ``stream`` on ``parent``; (the layer, whether it is new).

        ``stream`` may be compressed (gzip, zstd, ...).  With ``expected`` (a
        diff id) an existing layer of the same chain is reused without
        reading the stream, and a stream of another digest is refused
        (``DigestMismatch``) leaving nothing behind.  ``progress`` is called
        with the number of uncompressed bytes as they pass.  ``split`` is a
        tar-split known for this tar (migration): kept instead of recording.
        """
        if expected is not None:
            check_digest(expected, "diff id")
            existing = chain_id(parent, expected)
            if self.exists(existing):
                return self.get(existing), False
        parent_layer = self.get(parent) if parent is not None else None
        if parent is not None and len(self.stack(parent)) >= MAX_DEPTH:
            raise ImageError(f"max depth exceeded: an image has at most {MAX_DEPTH} layers")
        try:
            plain = open_layer_stream(stream)
        except ArchiveError as e:
            raise ImageError(f"layer is not a tar: {e}") from None
        counted = _Counting(plain, progress)
        hashing = HashingReader(counted)
        recorder = tarsplit.Recorder(hashing)
        cache_id = new_id()
        pending = self._pending(cache_id)
        parent_cache = parent_layer.cache_id if parent_layer else None
        try:
            self.driver.create(cache_id, parent_cache, CreateOpts())
            try:
                size = self.driver.apply_diff(cache_id, parent_cache, recorder)  # type: ignore[arg-type]
                recorder.drain()
            except ArchiveError as e:
                raise ImageError(f"layer tar is invalid: {e}") from None
            recorder.finish()
            diff_id = hashing.digest
            if expected is not None and diff_id != expected:
                raise DigestMismatch(f"layer digest mismatch: the tar's sha256 is {diff_id}, "
                                     f"the image says {expected}")
            chain = chain_id(parent, diff_id)
            if self.exists(chain):  # same content already there (no expected id was given)
                self.driver.remove(cache_id)
                os.unlink(pending)
                return self.get(chain), False
            if split is None and not recorder.valid:
                raise ImageError("layer tar could not be recorded")
            files = {"cache-id": cache_id.encode(), "diff": diff_id.encode(), "size": str(size).encode(),
                     "tar-split.json.gz": tarsplit.serialize(split) if split is not None
                     else recorder.serialize()}
            if parent is not None:
                files["parent"] = parent.encode()
            self._commit(files, os.path.join(self.sha_dir, hex_of(chain)))
        except BaseException:
            try:
                self.driver.remove(cache_id)  # idempotent: also when create or apply removed it
            except ThinpoolError:
                pass  # recover() retries: the pending record stays
            else:
                os.unlink(pending)
            raise
        os.unlink(pending)
        return Layer(chain, diff_id, cache_id, size, parent), True

    def delete(self, chain: str) -> None:
        """Remove the layer: its record first (invisible), then the driver layer, then the files."""
        src = os.path.join(self.sha_dir, hex_of(chain))
        dest = os.path.join(self.tmp_dir, f"delete-{hex_of(chain)}")
        os.rename(src, dest)
        sync_dir(self.sha_dir)
        self._finish_delete(dest)

    def _finish_delete(self, path: str) -> None:
        for name in ("mount-id", "init-id", "cache-id"):
            try:
                layer_id = _read(os.path.join(path, name))
            except FileNotFoundError:
                continue
            if layer_id:
                self.driver.remove(layer_id)
        shutil.rmtree(path)

    def create_rw(self, container_id: str, parent: str | None, storage_opt: dict[str, str],
                  init: Callable[[str], None]) -> RWLayer:
        """A container's init layer (filled by ``init(path)``) and read-write layer on ``parent``."""
        parent_cache = self.get(parent).cache_id if parent is not None else None
        mount_id = new_id()
        init_id = mount_id + "-init"
        pendings = [self._pending(init_id), self._pending(mount_id)]
        made: list[str] = []
        opts = CreateOpts(storage_opt=dict(storage_opt))
        try:
            self.driver.create_rw(init_id, parent_cache, opts)
            made.append(init_id)
            path = self.driver.get(init_id)
            try:
                init(path)
            finally:
                self.driver.put(init_id)
            self.driver.create_rw(mount_id, init_id, opts)
            made.append(mount_id)
            files = {"mount-id": mount_id.encode(), "init-id": init_id.encode()}
            if parent is not None:
                files["parent"] = parent.encode()
            self._commit(files, os.path.join(self.mounts_dir, container_id))
        except BaseException:
            for layer_id, pending in zip(reversed(made), reversed(pendings[:len(made)])):
                self.driver.remove(layer_id)
                os.unlink(pending)
            for pending in pendings[len(made):]:
                os.unlink(pending)
            raise
        for pending in pendings:
            os.unlink(pending)
        return RWLayer(container_id, mount_id, init_id, parent)

    def delete_rw(self, container_id: str) -> None:
        src = os.path.join(self.mounts_dir, container_id)
        dest = os.path.join(self.tmp_dir, f"delete-mount-{container_id}")
        os.rename(src, dest)
        sync_dir(self.mounts_dir)
        self._finish_delete(dest)

    # -- crash recovery ------------------------------------------------------------------------
    def recover(self) -> list[str]:
        """Finish or undo what an interrupted process left in ``tmp/``; what was done, one line each."""
        done = []
        used: set[str] | None = None
        for name in sorted(os.listdir(self.tmp_dir)):
            path = os.path.join(self.tmp_dir, name)
            if name.startswith("write-set-") or name.startswith(".tmp-"):
                shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else os.unlink(path)
                done.append(f"removed unfinished record {name}")
            elif name.startswith("delete-"):
                self._finish_delete(path)
                done.append(f"finished deleting {name[len('delete-'):]}")
            elif name.startswith("pending-"):
                layer_id = name[len("pending-"):]
                if used is None:
                    used = self._used_ids()
                if layer_id not in used:
                    self.driver.remove(layer_id)
                    done.append(f"removed half-made layer {layer_id}")
                os.unlink(path)
        return done

    def _used_ids(self) -> set[str]:
        ids = {layer.cache_id for layer in self.all().values()}
        for m in self.mounts().values():
            ids |= {m.mount_id, m.init_id}
        return ids


class _Counting:
    """``read(n)`` pass-through that reports byte counts."""

    def __init__(self, source: Any, progress: Callable[[int], None] | None) -> None:
        self.source = source
        self.progress = progress

    def read(self, n: int = -1) -> bytes:
        try:
            data = self.source.read(n)
        except ArchiveError as e:
            raise ArchiveError(str(e)) from None
        if data and self.progress is not None:
            self.progress(len(data))
        return bytes(data)


def layer_tar(store: LayerStore, layer: Layer) -> Iterator[bytes]:
    """``verified_tar`` of a layer of ``store``'s driver (taken with ``get`` when reading starts)."""
    path = store.driver.get(layer.cache_id)
    try:
        with tarsplit.DirSource(path) as files:
            yield from verified_tar(store, layer, files)
    finally:
        store.driver.put(layer.cache_id)


def verified_tar(db: LayerDB, layer: Layer, files: tarsplit.FileSource,
                 split: list[tarsplit.Entry] | None = None) -> Iterator[bytes]:
    """The layer's original tar, rebuilt from its tar-split (``split`` when the caller has parsed
    it, else read from ``db``) and the layer's tree (``files``), verified.

    The whole stream is checked against the diff id at its end
    (``DigestMismatch``): a caller writes it somewhere it can discard.
    """
    if split is None:
        split = db.tar_split(layer.chain_id)
    if split is None:
        raise ImageError(f"layer {layer.chain_id} has no tar-split record: its tar cannot be "
                         "rebuilt byte for byte")
    h = hashlib.sha256()
    for chunk in tarsplit.assemble(split, files):
        h.update(chunk)
        yield chunk
    if "sha256:" + h.hexdigest() != layer.diff_id:
        raise DigestMismatch(f"layer {layer.diff_id} rebuilt with digest sha256:{h.hexdigest()} "
                             "(its files changed since it was applied)")


__all__ = ["Layer", "LayerDB", "LayerStore", "RWLayer", "atomic_write", "layer_tar", "new_id"]
