"""Docker's NaiveDiffDriver: diff, changes, apply_diff and diff_size through get/put + the archive layer.

For drivers without a native diff (vfs, btrfs, devicemapper) and as the
fallback of those with one (overlay2 when the parent asked for is not the
layer's direct parent):

* ``diff(id, parent)``: ``get`` both layers; a whole-tree tar when
  ``parent`` is None, else Docker's ChangesDirs exported with
  ``.wh.<name>`` entries for deletions (never opaque markers). The layers are
  held until the returned stream is exhausted or closed (or garbage
  collected). Docker also sleeps to the next whole second on close (for
  mtime precision); this one does not.
* ``changes(id, parent)``: ChangesDirs of the two mounted trees (every path
  an Add when ``parent`` is None).
* ``apply_diff(id, parent, stream)``: ``get`` the layer and apply the tar
  (plain or compressed) with whiteouts applied as deletions; returns the sum
  of the tar headers' sizes.
* ``diff_size(id, parent)``: ChangesSize of those changes.

``apply_or_discard`` is the failure rule every driver's ``apply_diff``
follows: a layer whose apply failed (a bad or truncated tar, a full disk,
anything but an interruption) is removed - what Docker's layer store does
right after a failed ApplyDiff - so no half-applied layer survives; if it
cannot be removed (it has children or is held by another ``get``), the
error says so and the layer stays as it is.
"""

from __future__ import annotations

import os
from typing import BinaryIO, Callable, Iterator

from ..archive import Change, apply_layer, changes_size, export_changes, export_tree
from ..archive import changes as changes_dirs
from ..errors import ThinpoolError
from .driver import GraphDriver, GraphError, LayerNotFound, check_id
from .refcount import KeyedLock, RefCounter


class LayerStream(Iterator[bytes]):
    """Chunks of a tar produced from held layers; releases them once, when done or closed."""

    def __init__(self, chunks: Iterator[bytes], release: Callable[[], None]) -> None:
        self._chunks = chunks
        self._release: Callable[[], None] | None = release

    def __iter__(self) -> LayerStream:
        return self

    def __next__(self) -> bytes:
        try:
            return next(self._chunks)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Stop reading and release the layers (idempotent)."""
        release, self._release = self._release, None
        if release is not None:
            try:
                close = getattr(self._chunks, "close", None)
                if close is not None:
                    close()
            finally:
                release()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # pragma: no cover - nothing to report to at collection time
            pass


def _held(driver: GraphDriver, ids: list[str]) -> list[str]:
    """``get`` each id in order; on a failure the ones already taken are put back."""
    paths: list[str] = []
    try:
        for id in ids:
            paths.append(driver.get(id))
    except BaseException:
        for id in reversed(ids[:len(paths)]):
            driver.put(id)
        raise
    return paths


def _put_all(driver: GraphDriver, ids: list[str]) -> Callable[[], None]:
    def release() -> None:
        for id in reversed(ids):
            driver.put(id)
    return release


def diff(driver: GraphDriver, id: str, parent: str | None) -> LayerStream:
    ids = [id] if parent is None else [id, parent]
    paths = _held(driver, ids)
    release = _put_all(driver, ids)
    try:
        if parent is None:
            chunks = export_tree(paths[0])
        else:
            chunks = export_changes(paths[0], changes_dirs(paths[0], paths[1]))
    except BaseException:
        release()
        raise
    return LayerStream(chunks, release)


def changes(driver: GraphDriver, id: str, parent: str | None) -> list[Change]:
    ids = [id] if parent is None else [id, parent]
    paths = _held(driver, ids)
    try:
        return changes_dirs(paths[0], paths[1] if parent is not None else None)
    finally:
        _put_all(driver, ids)()


def diff_size(driver: GraphDriver, id: str, parent: str | None) -> int:
    ids = [id] if parent is None else [id, parent]
    paths = _held(driver, ids)
    try:
        return changes_size(paths[0], changes_dirs(paths[0], paths[1] if parent is not None else None))
    finally:
        _put_all(driver, ids)()


def apply_or_discard(driver: GraphDriver, id: str, apply: Callable[[], int]) -> int:
    """Run ``apply``; if it fails, remove layer ``id`` and re-raise (see the module docstring)."""
    try:
        return apply()
    except Exception as e:
        try:
            driver.remove(id)
        except ThinpoolError as why:
            if isinstance(e, ThinpoolError):
                raise _annotated(e, f"layer {id} is left half-applied: {why}") from None
            raise
        if isinstance(e, ThinpoolError):
            raise _annotated(e, f"layer {id} removed") from None
        raise


def _annotated(error: ThinpoolError, note: str) -> ThinpoolError:
    """``error`` with `` (note)`` added to its one-line message, keeping its type when possible."""
    if len(error.args) == 1 and type(error).__str__ is BaseException.__str__:
        error.args = (f"{error} ({note})",)
        return error
    return GraphError(f"{error} ({note})")


def apply_diff(driver: GraphDriver, id: str, stream: BinaryIO) -> int:
    path = driver.get(id)  # a missing layer is LayerNotFound, with nothing to discard

    def apply() -> int:
        try:
            return apply_layer(path, stream)
        finally:
            driver.put(id)
    return apply_or_discard(driver, id, apply)


class NaiveDiff(GraphDriver):
    """A driver whose diff methods are the naive ones (Docker's NewNaiveDiffDriver wrapper, as a base class)."""

    def diff(self, id: str, parent: str | None) -> Iterator[bytes]:
        return diff(self, id, parent)

    def changes(self, id: str, parent: str | None) -> list[Change]:
        return changes(self, id, parent)

    def apply_diff(self, id: str, parent: str | None, stream: BinaryIO) -> int:
        return apply_diff(self, id, stream)

    def diff_size(self, id: str, parent: str | None) -> int:
        return diff_size(self, id, parent)


class DirectoryLayers(NaiveDiff):
    """A naive-diff driver whose layers are plain directories (vfs, btrfs subvolumes).

    ``get`` hands out the layer's directory itself and ``get``/``put`` only
    count holds (nothing is mounted); subclasses say where a layer lives
    (``dir``). Thread safe: one lock per layer id.
    """

    def __init__(self, home: str, options: list[str]) -> None:
        super().__init__(home, options)
        self._locks = KeyedLock()
        self._holds = RefCounter(lambda path: False)

    def dir(self, id: str) -> str:
        raise NotImplementedError

    def get(self, id: str, mount_label: str = "") -> str:
        check_id(id)
        with self._locks.hold(id):
            path = self.dir(id)
            if not os.path.isdir(path):
                raise LayerNotFound(f"layer {id} does not exist")
            self._holds.increment(path)
            return path

    def put(self, id: str) -> None:
        check_id(id)
        with self._locks.hold(id):
            path = self.dir(id)
            if not os.path.isdir(path):
                raise LayerNotFound(f"layer {id} does not exist")
            self._holds.decrement(path)

    def exists(self, id: str) -> bool:
        try:
            check_id(id)
        except GraphError:
            return False
        return os.path.isdir(self.dir(id))


__all__ = ["DirectoryLayers", "GraphError", "LayerStream", "NaiveDiff", "apply_diff", "apply_or_discard", "changes", "diff",
           "diff_size"]
