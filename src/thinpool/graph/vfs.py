"""The vfs driver: every layer a plain directory holding a full copy of its parent.

Layout (Docker's): ``<home>/dir/<id>/`` is the layer's tree. thinpool adds
``<home>/parent/<id>`` (the parent's id, absent for a base layer) so that a
layer with children can be refused removal; Docker's vfs keeps no such
record, so in a Docker-made home every layer counts as childless.

* ``create``/``create_rw`` build the layer under a hidden staging name
  (``dir/.tmp-<pid>-<id>``), copy the parent into it (``fsutil.copy_tree``:
  owners, modes, times, xattrs, hard links, special files) and rename it into
  place: a crash or failure leaves no layer.
* ``get`` returns the directory (nothing is mounted); ``get``/``put`` are
  counted in the process so that a held layer cannot be removed.
* diffs are the naive ones.
* Options: ``size`` (also spelled ``vfs.size``) daemon-wide and ``size`` per
  writable layer set an XFS/ext4 project quota, which needs the home on a
  filesystem with project quotas enabled (xfs ``-o pquota``); otherwise
  ``BadOption``. Per-layer options on ``create`` (read-only layers) are
  refused, as in Docker.
"""

from __future__ import annotations

import os

from .driver import BadOption, CreateOpts, GraphError, LayerBusy, LayerExists, LayerNotFound, check_id
from .fsutil import clean_stale_staging, copy_tree, remove_tree, staging_dir, sync_dir, write_file
from .naive import DirectoryLayers
from .options import parse_size, split_option
from .quota import ProjectQuota, QuotaNotSupported


class VfsDriver(DirectoryLayers):
    name = "vfs"

    def __init__(self, home: str, options: list[str]) -> None:
        super().__init__(home, options)
        size = 0
        for option in options:
            key, value = split_option(option)
            if key in ("size", "vfs.size"):
                size = parse_size(value)
            else:
                raise BadOption(f"unknown option {key} for vfs")
        self.dirs = os.path.join(home, "dir")
        self.parents = os.path.join(home, "parent")
        for path in (home, self.dirs, self.parents):
            os.makedirs(path, mode=0o710, exist_ok=True)
        self._quota: ProjectQuota | None = None
        try:
            self._quota = ProjectQuota(home, self.dirs)
        except QuotaNotSupported:
            if size:
                raise BadOption(f"vfs: size needs project quotas on {home}: "
                                f"{QuotaNotSupported.MESSAGE}") from None
        self.default_size = size
        clean_stale_staging(self.dirs)

    def dir(self, id: str) -> str:
        return os.path.join(self.dirs, id)

    # -- create / remove ---------------------------------------------------------------------
    def create(self, id: str, parent: str | None, opts: CreateOpts | None = None) -> None:
        if opts is not None and opts.storage_opt:
            raise BadOption("--storage-opt is not supported for vfs on read-only layers")
        self._create(id, parent, 0)

    def create_rw(self, id: str, parent: str | None, opts: CreateOpts | None = None) -> None:
        size = self.default_size
        for key, value in (opts.storage_opt if opts else {}).items():
            if key.lower() != "size":
                raise BadOption(f"Storage opt {key} not supported")
            if self._quota is None:
                raise BadOption(f"vfs: --storage-opt size needs project quotas on {self.home}: "
                                f"{QuotaNotSupported.MESSAGE}")
            size = parse_size(value)
        self._create(id, parent, size)

    def _create(self, id: str, parent: str | None, size: int) -> None:
        check_id(id)
        if parent is not None:
            check_id(parent)
        with self._locks.hold(id):
            if os.path.lexists(self.dir(id)):
                raise LayerExists(f"layer {id} already exists")
            stage = staging_dir(self.dirs, id)
            record = os.path.join(self.parents, id)
            os.mkdir(stage, 0o755)
            try:
                os.chmod(stage, 0o755)
                if parent is not None:
                    src = self.get(parent)
                    try:
                        copy_tree(src, stage)
                    except OSError as e:
                        raise GraphError(f"cannot copy layer {parent} into {id}: {e.strerror or e}") from None
                    finally:
                        self.put(parent)
                if size and self._quota is not None:
                    self._quota.set_quota(stage, size)
                if parent is not None:
                    write_file(record, parent.encode(), 0o600)
                else:
                    _unlink(record)
                os.rename(stage, self.dir(id))
                sync_dir(self.dirs)
            except BaseException:
                remove_tree(stage)
                if not os.path.lexists(self.dir(id)):
                    _unlink(record)
                raise

    def remove(self, id: str) -> None:
        check_id(id)
        with self._locks.hold(id):
            path = self.dir(id)
            if not os.path.lexists(path):
                _unlink(os.path.join(self.parents, id))
                return
            if self._holds.count(path):
                raise LayerBusy(f"layer {id} is in use (get without put)")
            children = self.children(id)
            if children:
                raise LayerBusy(f"layer {id} has child layers: {', '.join(children)}")
            stage = staging_dir(self.dirs, id)
            os.rename(path, stage)  # the layer disappears at once; its files go next
            _unlink(os.path.join(self.parents, id))
            remove_tree(stage)

    def children(self, id: str) -> list[str]:
        """Layers created on top of ``id`` (from the parent records)."""
        out = []
        for name in sorted(os.listdir(self.parents)):
            try:
                with open(os.path.join(self.parents, name), "rb") as f:
                    if f.read() == id.encode() and os.path.lexists(self.dir(name)):
                        out.append(name)
            except FileNotFoundError:
                continue
        return out

    # -- information -----------------------------------------------------------------------------
    def status(self) -> list[tuple[str, str]]:
        return []  # Docker's vfs reports nothing

    def get_metadata(self, id: str) -> dict[str, str]:
        if not self.exists(id):
            raise LayerNotFound(f"layer {id} does not exist")
        return {}  # Docker's vfs has no per-layer metadata

    def cleanup(self) -> None:
        """Nothing is mounted; nothing to release."""


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
