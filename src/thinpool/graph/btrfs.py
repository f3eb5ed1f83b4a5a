"""The btrfs driver: each layer a btrfs subvolume, a snapshot of its parent's.

Layout (Docker's): ``<home>/subvolumes/<id>`` is the layer (a new subvolume
for a base layer, a writable snapshot of the parent's subvolume otherwise);
``<home>/quotas/<id>`` holds the byte limit of a layer created with the
``size`` storage option. The home must be on btrfs, else Init raises
``PrerequisitesMissing`` (so automatic selection skips the driver).

Subvolumes are made and destroyed with the kernel's ioctls
(SUBVOL_CREATE, SNAP_CREATE_V2, SNAP_DESTROY; nested subvolumes a container
created inside a layer are destroyed first). A snapshot records its
origin's UUID (``parent_uuid``, read with GET_SUBVOL_INFO): that is how
``remove`` finds a layer's children, also in a home Docker made.

* ``get`` returns the subvolume's directory (nothing is mounted); holds are
  counted in the process so that a held layer cannot be removed.
* Diffs are the naive ones; ``status()`` is Docker's ``[("Btrfs", "")]``.
* ``size=`` (``create`` and ``create_rw``) limits the layer's referenced bytes
  with a qgroup (quotas are enabled on the filesystem on first use);
  ``btrfs.min_space`` (daemon) is the smallest ``size`` accepted and
  enables quotas at start, as in Docker. Unlike Docker, Init does not
  bind-mount the home onto itself (a workaround for mount propagation into
  containers), so no mount outlives a command.
"""

from __future__ import annotations

import fcntl
import os
import stat
import struct

from .driver import (BadOption, CreateOpts, GraphError, LayerBusy, LayerExists, LayerNotFound,
                     PrerequisitesMissing, check_id)
from .fsutil import remove_tree, write_file
from ..linux.mounts import FS_MAGIC_BTRFS, fs_magic, fs_name
from .naive import DirectoryLayers
from .options import parse_size, split_option

_MAGIC = 0x94
_VOL_ARGS = 4096  # struct btrfs_ioctl_vol_args / _v2
_SUBVOL_INFO = 504  # struct btrfs_ioctl_get_subvol_info_args


def _iow(nr: int, size: int) -> int:
    return (1 << 30) | (size << 16) | (_MAGIC << 8) | nr


def _ior(nr: int, size: int) -> int:
    return (2 << 30) | (size << 16) | (_MAGIC << 8) | nr


def _iowr(nr: int, size: int) -> int:
    return (3 << 30) | (size << 16) | (_MAGIC << 8) | nr


IOC_SUBVOL_CREATE = _iow(14, _VOL_ARGS)
IOC_SNAP_DESTROY = _iow(15, _VOL_ARGS)
IOC_SNAP_CREATE_V2 = _iow(23, _VOL_ARGS)
IOC_QUOTA_CTL = _iowr(40, 16)
IOC_QGROUP_CREATE = _iow(42, 16)
IOC_QGROUP_LIMIT = _ior(43, 48)
IOC_GET_SUBVOL_INFO = _ior(60, _SUBVOL_INFO)
_QUOTA_CTL_ENABLE = 1
_QGROUP_LIMIT_MAX_RFER = 1
FIRST_FREE_OBJECTID = 256  # the inode number of every subvolume's root directory
_NAME_MAX_V1 = 4087
_NAME_OFFSET_V2 = 56


def _open_dir(path: str) -> int:
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)


def _name_args(name: str, offset: int, size: int = _VOL_ARGS) -> bytearray:
    raw = os.fsencode(name)
    buf = bytearray(size)
    buf[offset:offset + len(raw)] = raw
    return buf


def subvol_create(parent_dir: str, name: str) -> None:
    fd = _open_dir(parent_dir)
    try:
        fcntl.ioctl(fd, IOC_SUBVOL_CREATE, _name_args(name, 8))
    finally:
        os.close(fd)


def subvol_snapshot(src: str, parent_dir: str, name: str) -> None:
    sfd = _open_dir(src)
    try:
        dfd = _open_dir(parent_dir)
        try:
            args = _name_args(name, _NAME_OFFSET_V2)
            struct.pack_into("<q", args, 0, sfd)
            fcntl.ioctl(dfd, IOC_SNAP_CREATE_V2, args)
        finally:
            os.close(dfd)
    finally:
        os.close(sfd)


def subvol_info(path: str) -> tuple[int, bytes, bytes]:
    """(tree id, uuid, parent uuid) of the subvolume whose root is ``path``."""
    fd = _open_dir(path)
    try:
        buf = bytearray(_SUBVOL_INFO)
        fcntl.ioctl(fd, IOC_GET_SUBVOL_INFO, buf)
    finally:
        os.close(fd)
    treeid = struct.unpack_from("<Q", buf, 0)[0]
    return treeid, bytes(buf[296:312]), bytes(buf[312:328])


def is_subvolume(path: str) -> bool:
    st = os.lstat(path)
    return stat.S_ISDIR(st.st_mode) and st.st_ino == FIRST_FREE_OBJECTID


def subvol_delete(parent_dir: str, name: str) -> None:
    """Destroy subvolume ``parent_dir/name`` after every subvolume nested in it."""
    top = os.path.join(parent_dir, name)
    for dirpath, dirnames, _ in os.walk(top, topdown=False):
        for sub in dirnames:
            path = os.path.join(dirpath, sub)
            if not os.path.islink(path) and is_subvolume(path):
                subvol_delete(dirpath, sub)
    fd = _open_dir(parent_dir)
    try:
        fcntl.ioctl(fd, IOC_SNAP_DESTROY, _name_args(name, 8))
    finally:
        os.close(fd)


def _human(size: int) -> str:
    """Docker's units.HumanSize (decimal units, 4 significant digits)."""
    value = float(size)
    for unit in ("B", "kB", "MB", "GB", "TB", "PB"):
        if value < 1000 or unit == "PB":
            return f"{value:.4g}{unit}"
        value /= 1000
    raise AssertionError("unreachable")


class BtrfsDriver(DirectoryLayers):
    name = "btrfs"

    def __init__(self, home: str, options: list[str]) -> None:
        super().__init__(home, options)
        self.min_space = 0
        quota = False
        for option in options:
            key, value = split_option(option)
            if key == "btrfs.min_space":
                self.min_space = parse_size(value)
                quota = True
            else:
                raise BadOption(f"Unknown option {key}")
        testdir = home
        while not os.path.isdir(testdir) and os.path.dirname(testdir) != testdir:
            testdir = os.path.dirname(testdir)
        if fs_magic(testdir) != FS_MAGIC_BTRFS:
            raise PrerequisitesMissing(f"{testdir} is on {fs_name(testdir)}, not btrfs")
        self.subvolumes = os.path.join(home, "subvolumes")
        self.quotas = os.path.join(home, "quotas")
        os.makedirs(home, mode=0o710, exist_ok=True)
        os.makedirs(self.subvolumes, mode=0o710, exist_ok=True)
        if quota:
            self._enable_quota()

    def dir(self, id: str) -> str:
        return os.path.join(self.subvolumes, id)

    def _enable_quota(self) -> None:
        fd = _open_dir(self.home)
        try:
            fcntl.ioctl(fd, IOC_QUOTA_CTL, struct.pack("<QQ", _QUOTA_CTL_ENABLE, 0))
        except OSError as e:
            raise GraphError(f"Failed to enable btrfs quota for {self.home}: {e.strerror}") from None
        finally:
            os.close(fd)

    def _limit(self, path: str, size: int) -> None:
        fd = _open_dir(path)
        try:
            fcntl.ioctl(fd, IOC_QGROUP_LIMIT, struct.pack("<QQQQQQ", 0, _QGROUP_LIMIT_MAX_RFER, size, 0, 0, 0))
        except OSError as e:
            raise GraphError(f"Failed to limit qgroup for {path}: {e.strerror}") from None
        finally:
            os.close(fd)

    # -- create / remove ---------------------------------------------------------------------------
    def create(self, id: str, parent: str | None, opts: CreateOpts | None = None) -> None:
        size = 0
        for key, value in (opts.storage_opt if opts else {}).items():
            if key.lower() != "size":
                raise BadOption(f"Unknown option {key.lower()}")
            size = parse_size(value)
            if size == 0:
                raise BadOption(f"btrfs: invalid storage size: {_human(size)}")
            if self.min_space and size < self.min_space:
                raise BadOption(f"btrfs: storage size cannot be less than {_human(self.min_space)}")
        check_id(id)
        if parent is not None:
            check_id(parent)
        with self._locks.hold(id, *([parent] if parent else [])):
            path = self.dir(id)
            if os.path.lexists(path):
                raise LayerExists(f"layer {id} already exists")
            try:
                if parent is None:
                    subvol_create(self.subvolumes, id)
                else:
                    if not os.path.isdir(self.dir(parent)):
                        raise LayerNotFound(f"parent layer {parent} does not exist")
                    subvol_snapshot(self.dir(parent), self.subvolumes, id)
            except OSError as e:
                raise GraphError(f"Failed to create btrfs {'snapshot' if parent else 'subvolume'} "
                                 f"{id}: {e.strerror}") from None
            if size:
                try:
                    self._enable_quota()
                    self._limit(path, size)
                    os.makedirs(self.quotas, mode=0o700, exist_ok=True)
                    write_file(os.path.join(self.quotas, id), str(size).encode(), 0o644)
                except BaseException:
                    self._destroy(id)
                    raise

    def create_rw(self, id: str, parent: str | None, opts: CreateOpts | None = None) -> None:
        self.create(id, parent, opts)

    def children(self, id: str) -> list[str]:
        """Layers whose subvolume is a snapshot of ``id``'s (by the subvolumes' parent UUIDs)."""
        try:
            uuid = subvol_info(self.dir(id))[1]
        except OSError:
            return []
        out = []
        for name in sorted(os.listdir(self.subvolumes)):
            if name == id:
                continue
            try:
                if subvol_info(self.dir(name))[2] == uuid:
                    out.append(name)
            except OSError:
                continue  # not a subvolume (or gone meanwhile)
        return out

    def _destroy(self, id: str) -> None:
        path = self.dir(id)
        try:
            os.unlink(os.path.join(self.quotas, id))
        except FileNotFoundError:
            pass
        treeid = None
        try:
            if is_subvolume(path):
                treeid = subvol_info(path)[0]
                subvol_delete(self.subvolumes, id)
        except OSError as e:
            raise GraphError(f"Failed to destroy btrfs snapshot {path}: {e.strerror}") from None
        if treeid is not None:
            fd = _open_dir(self.home)
            try:  # drop the layer's qgroup 0/<tree id> (fails harmlessly when quotas are off)
                fcntl.ioctl(fd, IOC_QGROUP_CREATE, struct.pack("<QQ", 0, treeid))
            except OSError:
                pass
            finally:
                os.close(fd)
        remove_tree(path)  # whatever is left: a plain directory in place of a subvolume

    def remove(self, id: str) -> None:
        check_id(id)
        with self._locks.hold(id):
            path = self.dir(id)
            if not os.path.lexists(path):
                try:
                    os.unlink(os.path.join(self.quotas, id))
                except FileNotFoundError:
                    pass
                return
            if self._holds.count(path):
                raise LayerBusy(f"layer {id} is in use (get without put)")
            children = self.children(id)
            if children:
                raise LayerBusy(f"layer {id} has child layers: {', '.join(children)}")
            self._destroy(id)

    # -- information -------------------------------------------------------------------------------
    def status(self) -> list[tuple[str, str]]:
        return [("Btrfs", "")]

    def get_metadata(self, id: str) -> dict[str, str]:
        if not self.exists(id):
            raise LayerNotFound(f"layer {id} does not exist")
        return {}  # Docker's btrfs has no per-layer metadata

    def cleanup(self) -> None:
        """Nothing is mounted by this driver; nothing to release."""
