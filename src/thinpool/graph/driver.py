"""Docker's graphdriver contract, in Python.

A driver stores layers under its home directory (``<root>/<name>``): image
layers made with ``create`` and filled with ``apply_diff``, container layers
made with ``create_rw``; ``get`` makes a layer's tree available as a
directory (mounting it if the driver mounts) and ``put`` releases it.  Ids
are Docker's: random 64-hex cache ids, ``<mount id>-init`` for init layers.

Contracts every driver keeps (checked by the shared contract tests):

* ``create``/``create_rw`` of an existing id raise ``LayerExists``; of a
  missing parent ``LayerNotFound``; a failed create leaves nothing behind.
* ``remove`` is idempotent (removing a missing layer succeeds, as dockerd
  needs after a failed load); removing a layer that is mounted raises
  ``LayerBusy``.
* ``get`` and ``put`` are reference counted per layer: the layer is mounted
  when the count goes 0 -> 1 and unmounted when it goes 1 -> 0; after a
  restart the count is re-seeded from what is mounted (a mounted layer
  counts 1).  ``put`` of a layer that is not held raises ``LayerNotFound``
  or is a no-op where Docker's driver is.
* ``diff(id, parent)`` is an uncompressed tar of the changes of ``id``
  relative to ``parent`` (a whole tree if ``parent`` is None);
  ``apply_diff`` returns the sum of the tar headers' sizes; ``changes`` and
  ``diff_size`` follow Docker's ChangesDirs / ChangesSize.
* (thinpool) An ``apply_diff`` that fails removes the layer, as Docker's
  layer store does right after a failed ApplyDiff, so no half-applied layer
  is left; a layer that cannot be removed then (held by a ``get``, or with
  children) stays, and the error says so. ``diff`` streams hold what they
  read until exhausted or closed.
* (thinpool) Layer ids are checked (``check_id``): one plain name, never a
  path; anything else is ``InvalidLayerId``.
* Errors are ``GraphError`` subclasses with one-line messages; Docker's
  selection errors are ``NotSupported``, ``PrerequisitesMissing``,
  ``IncompatibleFS`` (``driver not supported``, ``prerequisites for driver
  not satisfied (wrong filesystem?)``, ``backing file system is unsupported
  for this graph driver``).

Thread safety: a driver object may be used from several threads (the
plugin server); drivers serialize what needs it.
"""

from __future__ import annotations

import abc
import re
from dataclasses import dataclass, field
from typing import BinaryIO, Iterator

from ..archive import Change
from ..errors import ThinpoolError


class GraphError(ThinpoolError):
    """A graph driver operation failed."""


class LayerNotFound(GraphError):
    pass


class LayerExists(GraphError):
    pass


class LayerBusy(GraphError):
    pass


class NotSupported(GraphError):
    """Docker's ErrNotSupported: the driver cannot run here (skipped when auto-selecting)."""

    def __init__(self, detail: str = "") -> None:
        super().__init__("driver not supported" + (f": {detail}" if detail else ""))


class PrerequisitesMissing(NotSupported):
    def __init__(self, detail: str = "") -> None:
        GraphError.__init__(self, "prerequisites for driver not satisfied (wrong filesystem?)"
                            + (f": {detail}" if detail else ""))


class IncompatibleFS(NotSupported):
    def __init__(self, detail: str = "") -> None:
        GraphError.__init__(self, "backing file system is unsupported for this graph driver"
                            + (f": {detail}" if detail else ""))


class BadOption(GraphError):
    """An unknown or malformed ``--storage-opt`` (Docker fails on those too)."""


class InvalidLayerId(GraphError):
    """A layer id that cannot name a layer (addition: Docker trusts its callers)."""


_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,254}")


def check_id(id: str) -> str:
    """``id`` if it can name a layer, else ``InvalidLayerId``.

    Addition to Docker's contract: a layer id is 1-255 characters of
    ``[A-Za-z0-9_.-]`` starting with a letter or digit (Docker's random
    64-hex cache ids, ``<id>-init``, and names a person types), so it is
    always one plain path component, never ``.``/``..``, and never collides
    with a driver's own hidden staging names (which start with ``.``).
    """
    if not isinstance(id, str) or not _ID.fullmatch(id):
        raise InvalidLayerId(f"invalid layer id {id!r} (1-255 characters of A-Z a-z 0-9 _ . -, "
                             "starting with a letter or digit)")
    return id


@dataclass(frozen=True)
class CreateOpts:
    """Docker's CreateOpts: the SELinux mount label and per-layer storage options."""

    mount_label: str = ""
    storage_opt: dict[str, str] = field(default_factory=dict)


class GraphDriver(abc.ABC):
    """One driver instance on one home directory (``<root>/<name>``)."""

    name: str = ""

    def __init__(self, home: str, options: list[str]) -> None:
        self.home = home
        self.options = options

    # -- ProtoDriver --------------------------------------------------------------------
    @abc.abstractmethod
    def create(self, id: str, parent: str | None, opts: CreateOpts | None = None) -> None:
        """A new, empty image layer on top of ``parent``."""

    @abc.abstractmethod
    def create_rw(self, id: str, parent: str | None, opts: CreateOpts | None = None) -> None:
        """A new writable (container) layer on top of ``parent``."""

    @abc.abstractmethod
    def remove(self, id: str) -> None:
        """Delete a layer (idempotent)."""

    @abc.abstractmethod
    def get(self, id: str, mount_label: str = "") -> str:
        """Make the layer's root available; its absolute path."""

    @abc.abstractmethod
    def put(self, id: str) -> None:
        """Release what ``get`` acquired."""

    @abc.abstractmethod
    def exists(self, id: str) -> bool:
        ...

    @abc.abstractmethod
    def status(self) -> list[tuple[str, str]]:
        """Ordered key/value pairs (``docker info`` shows them)."""

    @abc.abstractmethod
    def get_metadata(self, id: str) -> dict[str, str]:
        """Per-layer information (``docker inspect`` .GraphDriver.Data)."""

    @abc.abstractmethod
    def cleanup(self) -> None:
        """Daemon shutdown: unmount everything this driver mounted, release resources."""

    # -- DiffDriver -----------------------------------------------------------------------
    @abc.abstractmethod
    def diff(self, id: str, parent: str | None) -> Iterator[bytes]:
        """Uncompressed tar of ``id``'s changes against ``parent`` (all of it if None)."""

    @abc.abstractmethod
    def changes(self, id: str, parent: str | None) -> list[Change]:
        ...

    @abc.abstractmethod
    def apply_diff(self, id: str, parent: str | None, stream: BinaryIO) -> int:
        """Unpack a layer tar into ``id``; the sum of its headers' sizes."""

    @abc.abstractmethod
    def diff_size(self, id: str, parent: str | None) -> int:
        ...

    def capabilities(self) -> dict[str, bool]:
        """``ReproducesExactDiffs``: whether ``diff`` gives back an applied tar byte for byte."""
        return {"ReproducesExactDiffs": False}

    def layer_usage(self) -> dict[str, dict[str, int]]:
        """Layer id -> ``mapped``, ``exclusive`` and ``shared`` bytes, where the driver knows
        what its layers share (devicemapper on a thin pool); else empty."""
        return {}

    def check(self, repair: bool = False) -> list[Finding]:
        """Reconcile the driver's records with its storage (``thinpool graph check``).

        Returns what is out of step, one finding each; with ``repair`` what
        can be fixed safely is fixed (``Finding.repaired``).  Drivers whose
        only record is the filesystem itself have nothing to reconcile.
        """
        return []


@dataclass
class Finding:
    """One thing ``check`` found: what, and whether ``repair`` fixed it."""

    problem: str
    repaired: bool = False
