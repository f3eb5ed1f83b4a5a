"""The overlay2 driver: each layer a kernel overlayfs upper directory over its ancestors'.

Layout (Docker's), under ``<home>`` (``<root>/overlay2``):

* ``<id>/diff/``: the layer's own files (overlay whiteouts: a 0:0 character
  device for a deleted path, xattr ``trusted.overlay.opaque=y`` on an opaque
  directory);
* ``<id>/link``: a 26-character random id, and ``l/<link>`` a symlink to
  ``../<id>/diff`` (short names keep the mount options within a page);
* ``<id>/lower``: ``l/<link>`` of every ancestor, nearest first, ``:``
  separated (at most 128), only for layers with a parent;
* ``<id>/work/`` (layers with a parent) and ``<id>/merged/`` (while mounted);
* ``<id>/committed``: empty, written on a layer when a child is created on it.

``get`` of a layer without ``lower`` returns its ``diff``; otherwise it mounts
overlayfs on ``merged`` when the count goes 0 -> 1: a committed layer
read-only (``lowerdir=diff:lowers``, no upper), any other with
``lowerdir=lowers,upperdir=diff,workdir=work``; the data starts with
``index=off,`` when the kernel knows the option and ``userxattr,`` in a user
namespace. Data longer than a page is given with paths relative to the
home, mounting from there. ``put`` detaches the mount (``MNT_DETACH``) when
the count goes 1 -> 0 and removes ``merged``. The count is re-seeded from
the filesystem type of ``merged`` (overlayfs there means mounted), as
Docker does.

Native ``diff`` / ``apply_diff`` / ``diff_size`` work on ``diff/`` directly
(``export_overlay``, ``apply_layer(whiteouts="overlay")``, the directory's
size) when the parent asked for is the layer's direct parent and the kernel
passes Docker's native-diff check (no opaque flag copied up, no redirect_dir)
and metacopy is off; otherwise the naive ones. ``changes`` is always naive.
``apply_diff`` returns the tar's size sum in both cases (Docker's native
path returns the size of ``diff/``, which is the same for a fresh layer
except for entries the tar overwrote).

Init refuses a home on overlayfs, aufs, ecryptfs, nfs or zfs
(``IncompatibleFS``), and a filesystem where an overlay mount with two
lower directories fails or readdir has no d_type (``NotSupported``), before
creating anything. Options: ``overlay2.size`` (daemon) and ``size``
(``create_rw``) need xfs with project quotas; per-layer ``size`` on
``create`` is refused, as in Docker.
"""

from __future__ import annotations

import base64
import errno
import os
import shutil
import subprocess
import tempfile
import threading
from collections import Counter
from typing import BinaryIO, Iterator

from ..archive import Change, apply_layer, export_overlay
from ..linux import mounts
from . import naive
from .driver import (BadOption, CreateOpts, GraphDriver, GraphError, IncompatibleFS, InvalidLayerId, LayerBusy,
                     LayerExists, LayerNotFound, NotSupported, check_id)
from .fsutil import (clean_stale_staging, dir_size, remove_tree, staging_dir, supports_d_type, sync_dir,
                     write_file)
from .naive import LayerStream
from .options import parse_size, split_option
from .quota import BACKING_DEV, ProjectQuota, QuotaNotSupported
from .refcount import KeyedLock, RefCounter

LINK_DIR = "l"
MAX_DEPTH = 128
LINK_LENGTH = 26
_INCOMPATIBLE = {"aufs", "ecryptfs", "nfs", "overlayfs", "zfs"}
_RESERVED = {LINK_DIR, BACKING_DEV}
_PAGE = os.sysconf("SC_PAGESIZE")
_D_TYPE_HINTS = {
    "xfs": " Reformat the filesystem with ftype=1 to enable d_type support.",
    "extfs": " Reformat the filesystem (or use tune2fs) with -O filetype flag to enable d_type support.",
}


def _in_user_namespace() -> bool:
    try:
        with open("/proc/self/uid_map") as f:
            return f.read().split() != ["0", "0", "4294967295"]
    except OSError:
        return False


def _kernel_flag(name: str) -> bool:
    try:
        with open(f"/sys/module/overlay/parameters/{name}") as f:
            return f.read().strip() in ("Y", "y", "1")
    except OSError:
        return False


def check_overlay(testdir: str, prefix: str = "check-overlayfs-support") -> None:
    """Mount an overlay with two lower directories in a scratch directory ``testdir/prefix*``
    (removed afterwards); NotSupported if the kernel refuses it."""
    scratch = tempfile.mkdtemp(prefix=prefix, dir=testdir)
    try:
        for sub in ("lower1", "lower2", "upper", "work", "merged"):
            os.mkdir(os.path.join(scratch, sub))
        merged = os.path.join(scratch, "merged")
        try:
            mounts.mount("overlay", merged, "overlay", 0,
                         f"lowerdir={scratch}/lower2:{scratch}/lower1,upperdir={scratch}/upper,"
                         f"workdir={scratch}/work")
        except OSError as e:
            raise NotSupported(f"failed to mount overlay: {e.strerror}") from None
        mounts.unmount(merged, mounts.MNT_DETACH)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _native_diff_problem(home: str) -> str | None:
    """Docker's doesSupportNativeDiff: why native diff would be wrong here, or None."""
    if _in_user_namespace():
        return "running in a user namespace"
    if _kernel_flag("metacopy"):
        return "metacopy is on (upper files may hold metadata only)"
    scratch = tempfile.mkdtemp(prefix="opaque-bug-check", dir=home)
    try:
        for sub in ("l1/d", "l1/d1", "l2/d", "l3", "work", "merged"):
            os.makedirs(os.path.join(scratch, sub))
        os.setxattr(os.path.join(scratch, "l2/d"), "trusted.overlay.opaque", b"y")
        merged = os.path.join(scratch, "merged")
        mounts.mount("overlay", merged, "overlay", 0,
                     f"lowerdir={scratch}/l2:{scratch}/l1,upperdir={scratch}/l3,workdir={scratch}/work")
        try:
            open(os.path.join(merged, "d/f"), "wb").close()  # copies up the opaque directory d
            try:
                if os.getxattr(os.path.join(scratch, "l3/d"), "trusted.overlay.opaque") == b"y":
                    return "opaque flag erroneously copied up, consider update to kernel 4.8 or later to fix"
            except OSError as e:
                if e.errno != errno.ENODATA:
                    raise
            try:
                os.rename(os.path.join(merged, "d1"), os.path.join(merged, "d2"))
            except OSError as e:
                if e.errno == errno.EXDEV:
                    return None  # no redirect_dir: directory renames are refused, as native diff needs
                raise
            try:
                if os.getxattr(os.path.join(scratch, "l3/d2"), "trusted.overlay.redirect") == b"d1":
                    return "kernel has CONFIG_OVERLAY_FS_REDIRECT_DIR enabled"
            except OSError as e:
                if e.errno != errno.ENODATA:
                    raise
            return None
        finally:
            mounts.unmount(merged, mounts.MNT_DETACH)
    except OSError as e:
        return f"native diff check failed: {e.strerror or e}"
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _is_overlay_mount(path: str) -> bool:
    try:
        return mounts.fs_magic(path) == mounts.FS_MAGIC_OVERLAY
    except OSError:
        return False


class Overlay2Driver(GraphDriver):
    name = "overlay2"

    def __init__(self, home: str, options: list[str]) -> None:
        super().__init__(home, options)
        size = 0
        for option in options:
            key, value = split_option(option)
            if key == "overlay2.size":
                size = parse_size(value)
            else:
                raise BadOption(f"overlay2: unknown option {key}")
        testdir = home  # the checks run where the layers will live: the nearest existing ancestor
        while not os.path.isdir(testdir) and os.path.dirname(testdir) != testdir:
            testdir = os.path.dirname(testdir)
        self.backing_fs = mounts.fs_name(testdir)
        if self.backing_fs in _INCOMPATIBLE:
            raise IncompatibleFS(f"'overlay2' is not supported over {self.backing_fs}")
        check_overlay(testdir)
        if not supports_d_type(testdir):
            raise NotSupported(
                f"overlay2: the backing {self.backing_fs} filesystem is formatted without d_type support, which "
                "leads to incorrect behavior." + _D_TYPE_HINTS.get(self.backing_fs, "")
                + " Backing filesystems without d_type support are not supported.")
        self.using_metacopy = _kernel_flag("metacopy")
        self.index_off = "index=off," if os.path.exists("/sys/module/overlay/parameters/index") else ""
        self.userxattr = "userxattr," if _in_user_namespace() else ""
        os.makedirs(home, mode=0o710, exist_ok=True)
        os.makedirs(os.path.join(home, LINK_DIR), mode=0o700, exist_ok=True)
        self._quota: ProjectQuota | None = None
        if self.backing_fs == "xfs":
            try:
                self._quota = ProjectQuota(home, home)
            except QuotaNotSupported as e:
                if size:
                    raise BadOption("Storage option overlay2.size not supported. Filesystem does not support "
                                    f"Project Quota: {e}") from None
        elif size:
            raise BadOption(f"Storage Option overlay2.size only supported for backingFS XFS. Found {self.backing_fs}")
        self.default_size = size
        clean_stale_staging(home)
        self._locks = KeyedLock()
        self._ctr = RefCounter(_is_overlay_mount)
        self._pins: Counter[str] = Counter()  # layers read by a native diff in progress
        self._pin_lock = threading.Lock()
        self._native: str | None | bool = False  # False: not checked yet; None: fine; str: why not

    # -- paths and records ---------------------------------------------------------------------
    def dir(self, id: str) -> str:
        return os.path.join(self.home, id)

    def _check(self, id: str) -> str:
        check_id(id)
        if id in _RESERVED:
            raise InvalidLayerId(f"invalid layer id {id!r}: the name is used by overlay2 itself")
        return id

    def _read(self, id: str, name: str) -> str | None:
        try:
            with open(os.path.join(self.dir(id), name), encoding="ascii", errors="surrogateescape") as f:
                return f.read()
        except FileNotFoundError:
            return None

    def _require(self, id: str) -> None:
        if not os.path.isdir(self.dir(self._check(id))):
            raise LayerNotFound(f"layer {id} does not exist")

    def lower_dirs(self, id: str) -> list[str]:
        """The ancestors' diff directories, nearest first (resolved through ``l/``)."""
        lower = self._read(id, "lower")
        if not lower:
            return []
        out = []
        for entry in lower.split(":"):
            try:
                target = os.readlink(os.path.join(self.home, entry))
            except OSError as e:
                raise GraphError(f"layer {id}: broken lower entry {entry}: {e.strerror}") from None
            out.append(os.path.normpath(os.path.join(self.home, LINK_DIR, target)))
        return out

    def _new_link(self) -> str:
        while True:
            link = base64.b32encode(os.urandom(20)).decode()[:LINK_LENGTH]
            if not os.path.lexists(os.path.join(self.home, LINK_DIR, link)):
                return link

    # -- create / remove ---------------------------------------------------------------------------
    def create(self, id: str, parent: str | None, opts: CreateOpts | None = None) -> None:
        for key in (opts.storage_opt if opts else {}):
            if key.lower() == "size":
                raise BadOption("--storage-opt size is only supported for ReadWrite Layers")
            raise BadOption(f"Unknown option {key.lower()}")
        self._create(id, parent, 0)

    def create_rw(self, id: str, parent: str | None, opts: CreateOpts | None = None) -> None:
        size = self.default_size
        for key, value in (opts.storage_opt if opts else {}).items():
            if key.lower() != "size":
                raise BadOption(f"Unknown option {key.lower()}")
            if self._quota is None:
                raise BadOption("--storage-opt is supported only for overlay over xfs with 'pquota' mount option")
            size = parse_size(value)
        self._create(id, parent, size)

    def _create(self, id: str, parent: str | None, size: int) -> None:
        self._check(id)
        keys = [id] if parent is None else [id, self._check(parent)]
        with self._locks.hold(*keys):
            if os.path.lexists(self.dir(id)):
                raise LayerExists(f"layer {id} already exists")
            lower = ""
            if parent is not None:
                plink = self._read(parent, "link") if os.path.isdir(self.dir(parent)) else None
                if plink is None:
                    raise LayerNotFound(f"parent layer {parent} does not exist")
                lowers = [f"{LINK_DIR}/{plink}"] + (self._read(parent, "lower") or "").split(":")
                lowers = [x for x in lowers if x]
                if len(lowers) > MAX_DEPTH:
                    raise GraphError(f"cannot create layer {id}: max depth exceeded ({MAX_DEPTH} lower layers)")
                lower = ":".join(lowers)
            stage = staging_dir(self.home, id)
            link = self._new_link()
            link_path = os.path.join(self.home, LINK_DIR, link)
            committed = os.path.join(self.dir(parent), "committed") if parent is not None else None
            made_committed = False
            os.mkdir(stage, 0o710)
            try:
                if size and self._quota is not None:
                    self._quota.set_quota(stage, size)
                os.mkdir(os.path.join(stage, "diff"), 0o755)
                os.chmod(os.path.join(stage, "diff"), 0o755)
                os.symlink(f"../{id}/diff", link_path)
                write_file(os.path.join(stage, "link"), link.encode(), 0o644)
                if parent is not None:
                    assert committed is not None
                    os.mkdir(os.path.join(stage, "work"), 0o700)
                    write_file(os.path.join(stage, "lower"), lower.encode(), 0o644)
                    if not os.path.exists(committed):
                        write_file(committed, b"", 0o600)
                        made_committed = True
                os.rename(stage, self.dir(id))
                sync_dir(self.home)
            except BaseException:
                remove_tree(stage)
                for path in [link_path] + ([committed] if made_committed and committed else []):
                    try:
                        os.unlink(path)
                    except FileNotFoundError:
                        pass
                raise

    def children(self, id: str) -> list[str]:
        """Layers whose nearest lower is ``id``'s diff."""
        link = self._read(id, "link")
        if not link:
            return []
        first = f"{LINK_DIR}/{link}"
        out = []
        for name in sorted(os.listdir(self.home)):
            if name in _RESERVED or name.startswith("."):
                continue
            lower = self._read(name, "lower") if os.path.isdir(self.dir(name)) else None
            if lower and lower.split(":", 1)[0] == first:
                out.append(name)
        return out

    def _mount_path(self, id: str) -> str:
        """Where ``get`` puts the layer: ``merged`` for layers with a parent, else ``diff``."""
        return os.path.join(self.dir(id), "merged" if self._read(id, "lower") is not None else "diff")

    def remove(self, id: str) -> None:
        self._check(id)
        with self._locks.hold(id):
            path = self.dir(id)
            if not os.path.lexists(path):
                return
            with self._pin_lock:
                pinned = self._pins[id]
            if pinned or self._ctr.count(self._mount_path(id)):
                raise LayerBusy(f"layer {id} is in use (mounted, or being read)")
            children = self.children(id)
            if children:
                raise LayerBusy(f"layer {id} has child layers: {', '.join(children)}")
            link = self._read(id, "link")
            stage = staging_dir(self.home, id)
            os.rename(path, stage)
            if link and "/" not in link and link not in (".", ".."):
                try:
                    os.unlink(os.path.join(self.home, LINK_DIR, link))
                except FileNotFoundError:
                    pass
            remove_tree(stage)

    # -- get / put -------------------------------------------------------------------------------
    def get(self, id: str, mount_label: str = "") -> str:
        self._check(id)
        with self._locks.hold(id):
            self._require(id)
            path = self.dir(id)
            diff = os.path.join(path, "diff")
            lower = self._read(id, "lower")
            if lower is None:
                self._ctr.increment(diff)
                return diff
            merged = os.path.join(path, "merged")
            if self._ctr.increment(merged) > 1:
                return merged
            try:
                self._mount(id, lower, merged)
            except BaseException:
                self._ctr.decrement(merged)
                try:
                    os.rmdir(merged)
                except OSError:
                    pass
                raise
            return merged

    def _mount(self, id: str, lower: str, merged: str) -> None:
        path = self.dir(id)
        lowers = lower.split(":")
        readonly = os.path.exists(os.path.join(path, "committed"))
        prefix = self.index_off + self.userxattr

        def data(diff: str, work: str, lower_dirs: list[str]) -> str:
            if readonly:
                return f"{prefix}lowerdir={diff}:{':'.join(lower_dirs)}"
            return f"{prefix}lowerdir={':'.join(lower_dirs)},upperdir={diff},workdir={work}"

        try:
            os.mkdir(merged, 0o700)
        except FileExistsError:
            pass
        opts = data(os.path.join(path, "diff"), os.path.join(path, "work"),
                    [os.path.join(self.home, x) for x in lowers])
        if len(opts) <= _PAGE - 1:
            try:
                mounts.mount("overlay", merged, "overlay", 0, opts)
            except OSError as e:
                raise GraphError(f"error creating overlay mount to {merged}: {e.strerror}") from None
            return
        opts = data(f"{id}/diff", f"{id}/work", lowers)  # relative to the home, mounted from there
        if len(opts) > _PAGE - 1:
            raise GraphError(f"cannot mount layer, mount label too large {len(opts)}")
        r = subprocess.run(["mount", "-t", "overlay", "-o", opts, "overlay", f"{id}/merged"], cwd=self.home,
                           capture_output=True, text=True)
        if r.returncode:
            raise GraphError(f"error creating overlay mount to {merged}: "
                             f"{(r.stderr.strip().splitlines() or ['mount failed'])[-1]}")

    def put(self, id: str) -> None:
        self._check(id)
        with self._locks.hold(id):
            self._require(id)
            if self._read(id, "lower") is None:
                self._ctr.decrement(os.path.join(self.dir(id), "diff"))
                return
            merged = os.path.join(self.dir(id), "merged")
            if self._ctr.decrement(merged) > 0:
                return
            try:
                mounts.unmount(merged, mounts.MNT_DETACH)
            except OSError as e:
                if e.errno not in (errno.EINVAL, errno.ENOENT):
                    raise GraphError(f"cannot unmount {merged}: {e.strerror}") from None
            try:
                os.rmdir(merged)
            except OSError:
                pass  # Docker ignores this too (the mount may live on in another namespace)

    def exists(self, id: str) -> bool:
        try:
            self._check(id)
        except GraphError:
            return False
        return os.path.isdir(self.dir(id))

    # -- information -------------------------------------------------------------------------------
    def native_diff_problem(self) -> str | None:
        """Why native diff is not used here (None: it is); checked once per driver object."""
        if self._native is False:
            self._native = _native_diff_problem(self.home)
        return self._native if isinstance(self._native, str) else None

    def status(self) -> list[tuple[str, str]]:
        return [
            ("Backing Filesystem", self.backing_fs),
            ("Supports d_type", "true"),
            ("Using metacopy", str(self.using_metacopy).lower()),
            ("Native Overlay Diff", str(self.native_diff_problem() is None).lower()),
            ("userxattr", str(bool(self.userxattr)).lower()),
        ]

    def get_metadata(self, id: str) -> dict[str, str]:
        self._require(id)
        path = self.dir(id)
        meta = {"WorkDir": os.path.join(path, "work"), "MergedDir": os.path.join(path, "merged"),
                "UpperDir": os.path.join(path, "diff")}
        lowers = self.lower_dirs(id)
        if lowers:
            meta["LowerDir"] = ":".join(lowers)
        return meta

    def cleanup(self) -> None:
        """Unmount every layer mounted under the home (Docker's RecursiveUnmount) and forget the counts."""
        try:
            mounts.unmount_all_below(self.home)
        except OSError as e:
            raise GraphError(f"cannot unmount the layers under {self.home}: {e.strerror}") from None
        self._ctr = RefCounter(_is_overlay_mount)

    # -- diffs -------------------------------------------------------------------------------------
    def _native_for(self, id: str, parent: str | None) -> bool:
        """Whether ``parent`` is ``id``'s direct parent (None: ``id`` has none) and native diff is sound."""
        self._require(id)
        if self.native_diff_problem() is not None:
            return False
        lowers = self.lower_dirs(id)
        if parent is None:
            return not lowers
        self._check(parent)
        return bool(lowers) and os.path.dirname(lowers[0]) == self.dir(parent)

    def _pin(self, id: str) -> None:
        with self._pin_lock:
            self._pins[id] += 1

    def _unpin(self, id: str) -> None:
        with self._pin_lock:
            self._pins[id] -= 1
            if self._pins[id] <= 0:
                del self._pins[id]

    def diff(self, id: str, parent: str | None) -> Iterator[bytes]:
        if not self._native_for(id, parent):
            return naive.diff(self, id, parent)
        self._pin(id)
        try:
            chunks = export_overlay(os.path.join(self.dir(id), "diff"))
        except BaseException:
            self._unpin(id)
            raise
        return LayerStream(chunks, lambda: self._unpin(id))

    def changes(self, id: str, parent: str | None) -> list[Change]:
        return naive.changes(self, id, parent)

    def apply_diff(self, id: str, parent: str | None, stream: BinaryIO) -> int:
        if not self._native_for(id, parent):
            return naive.apply_diff(self, id, stream)

        def apply() -> int:
            self._pin(id)
            try:
                return apply_layer(os.path.join(self.dir(id), "diff"), stream, whiteouts="overlay")
            finally:
                self._unpin(id)
        return naive.apply_or_discard(self, id, apply)

    def diff_size(self, id: str, parent: str | None) -> int:
        if not self._native_for(id, parent):
            return naive.diff_size(self, id, parent)
        return dir_size(os.path.join(self.dir(id), "diff"))
