"""Real Docker devicemapper data roots, offline and read-only: list, export, mount, migrate.

``DockerRoot(path)`` opens a copy of ``/var/lib/docker`` (or the root
itself, with the daemon stopped) that used the devicemapper driver, without
device-mapper in the kernel and without a Docker daemon.  It finds the
driver's files under either name:

* Docker's own: ``<root>/devicemapper/{devicemapper/{data,metadata},metadata/,mnt/}``
  with ``<root>/image/devicemapper/``;
* a graphdriver plugin's (``thinpool docker-plugin`` named NAME):
  ``<root>/NAME/devicemapper/...`` with ``<root>/image/NAME/``.

Device records are read from ``metadata/<hash>`` (``base`` for the base
device) and from the pre-0.12 single ``devicemapper/json``
(``{"Devices": {hash: record}}``; a per-device file wins).  The pool's
metadata is read with ``thin.reader`` (opened read-only, every block
checksum-verified) with damage-tolerant walks, so a corrupt pool still
shows every device whose mapping tree is whole; a device with a damaged
tree is reported and refused for export, never guessed at.  Nothing under
the root is ever opened for writing.

A thin device is a ``ThinVolume``: reads go straight to the pool's data
file through the device's block mapping.  ``export`` and ``migrate`` (its
layers) read an ext2/3/4 device in userspace from those blocks
(``exttree.ExtTree`` over ``extfs``: no FUSE, loop device or mount).  A
filesystem that reader does not handle (xfs, a journal that needs
replaying, a feature it does not implement) takes the kernel path, which
is also what ``mount`` and ``migrate``'s containers use: the volume as a
read-only file on a private FUSE mount, attached to a read-only loop
device and mounted ``ro`` without journal replay (ext4 ``noload``; xfs
``norecovery,nouuid``).  Both paths write the same tars.
Docker's device holds the layer under ``rootfs/``.  ``mounted_device``
tears everything down on exit, also on failure.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np

from ..archive import changes as changes_dirs
from ..archive import export_changes, export_tree
from ..errors import DataPathError, ThinpoolError
from ..extfs import CorruptFilesystem, UnsupportedFilesystem
from ..fuse import FuseMount
from ..linux import loop
from ..graph.driver import GraphDriver
from ..linux.mounts import is_mountpoint, mount_entry
from ..thin.reader import MetadataReader, SalvageLog
from .digest import chain_ids
from .errors import ImageError, NotFound
from .exttree import ExtTree
from .imagedb import Image, ImageStore
from .containers import Container, ContainerStore, setup_init_layer
from .layers import Layer, LayerDB, atomic_write, verified_tar
from .progress import NO_PROGRESS, Progress
from .store import ImageRoot, IterReader, tar_size
from . import tarsplit

SPECIAL = ("deviceset-metadata", "transaction-metadata")
READERS = ("auto", "userspace", "kernel")
SECTOR = 512


@dataclass
class Device:
    """One thin device: Docker's record and what the pool metadata says of it."""

    hash: str
    device_id: int
    size: int
    transaction_id: int = 0
    initialized: bool = False
    deleted: bool = False
    mapped_blocks: int | None = None   # None: the pool does not know the device
    problem: str = ""                  # why it cannot be read whole ("" when it can)

    @property
    def intact(self) -> bool:
        return not self.problem and not self.deleted and self.mapped_blocks is not None


@dataclass
class Layout:
    name: str          # the driver name under image/ (devicemapper, or the plugin's)
    home: str          # the driver's home (holds metadata/ and devicemapper/)
    image_dir: str     # <root>/image/<name>


def find_layouts(root: str) -> list[Layout]:
    """Every devicemapper driver home under a Docker data root (Docker's or a plugin's naming)."""
    out = []
    image = os.path.join(root, "image")
    try:
        names = sorted(os.listdir(image))
    except FileNotFoundError:
        return []
    for name in names:
        for home in (os.path.join(root, name), os.path.join(root, name, "devicemapper")):
            pool = os.path.join(home, "devicemapper")
            if os.path.isdir(os.path.join(home, "metadata")) and (
                    os.path.exists(os.path.join(pool, "metadata")) or os.path.exists(os.path.join(pool, "json"))):
                out.append(Layout(name, home, os.path.join(image, name)))
                break
    return out


class ThinVolume:
    """A thin device of a pool, read-only, as a FUSE ``Export``.

    ``mapping[v]`` is the data block of virtual block ``v`` (-1: unmapped,
    reads as zeros).  Reads go to the data file with ``os.pread``; every
    write is refused with EROFS.
    """

    read_only = True

    def __init__(self, data_fd: int, block_bytes: int, size: int, mapping: np.ndarray) -> None:
        self.fd = data_fd
        self.block = block_bytes
        self.size = size
        self.mapping = mapping

    def readinto(self, offset: int, buf: memoryview) -> None:
        total, pos, nmap = len(buf), 0, len(self.mapping)
        while pos < total:
            v, within = divmod(offset + pos, self.block)
            n = min(total - pos, self.block - within)
            d = int(self.mapping[v]) if v < nmap else -1
            k = 1
            while d >= 0 and pos + n < total and v + k < nmap and int(self.mapping[v + k]) == d + k:
                n = min(total - pos, n + self.block)  # the next block follows on the data device
                k += 1
            out = buf[pos:pos + n]
            if d < 0:
                out[:] = bytes(n)
            else:
                got = os.preadv(self.fd, [out], d * self.block + within)
                if got < n:
                    out[got:] = bytes(n - got)  # past the end of a sparse data file: zeros
            pos += n

    def write(self, offset: int, data: memoryview, fua: bool) -> None:
        raise DataPathError(errno.EROFS, "read-only Docker device")

    def flush(self) -> None:
        pass

    def write_zeroes(self, offset: int, length: int, may_trim: bool, fast_only: bool, fua: bool) -> None:
        raise DataPathError(errno.EROFS, "read-only Docker device")

    def close(self) -> None:
        pass


def filesystem_of(volume: ThinVolume) -> str:
    """``ext4`` or ``xfs`` from the superblock magic, "" if neither."""
    head = bytearray(2048)
    volume.readinto(0, memoryview(head))
    if head[:4] == b"XFSB":
        return "xfs"
    if head[1080:1082] == b"\x53\xef":
        return "ext4"
    return ""


def _named(dev: Device) -> str:
    """A device as messages name it."""
    return f"device {dev.device_id} ({dev.hash or 'base'})"


def _check_reader(reader: str) -> None:
    if reader not in READERS:
        raise ImageError(f"unknown reader {reader!r} (one of {', '.join(READERS)})")


def _userspace_tree(volume: ThinVolume, what: str, reader: str) -> ExtTree | None:
    """The volume's ext2/3/4 read in userspace, or None when the kernel is to read it: ``reader``
    is ``kernel``, or ``auto`` and the filesystem is one ``ExtTree`` does not handle (with
    ``userspace`` that is an ImageError).  Damage is an ImageError naming ``what``."""
    if reader == "kernel":
        return None
    try:
        return ExtTree(volume)
    except UnsupportedFilesystem as e:
        if reader == "userspace":
            raise ImageError(f"{what}: {e}: read it with the kernel reader") from None
        return None
    except CorruptFilesystem as e:
        raise ImageError(f"{what}: {e}") from None


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True)


@contextlib.contextmanager
def mounted_device(volume: ThinVolume, what: str) -> Iterator[str]:
    """The volume's filesystem mounted read-only at a private directory; everything undone on exit."""
    fstype = filesystem_of(volume)
    if not fstype:
        raise ImageError(f"{what}: the device holds no ext4 or xfs filesystem")
    options = "ro,noload" if fstype == "ext4" else "ro,norecovery,nouuid"
    work = tempfile.mkdtemp(prefix="thinpool-docker-")
    fuse_dir, mnt = os.path.join(work, "fuse"), os.path.join(work, "mnt")
    os.mkdir(fuse_dir, 0o700)
    os.mkdir(mnt, 0o700)
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, work, True)
        fuse = FuseMount(fuse_dir, threads=8)
        fuse.start()
        stack.callback(fuse.stop)
        fuse.add_file("device", volume)
        device = loop.attach(fuse.path("device"), read_only=True)
        stack.callback(lambda: fuse.remove_file("device", wait=10.0))
        stack.callback(loop.detach, device)
        r = _run("mount", "-t", fstype, "-o", options, device, mnt)
        if r.returncode != 0:
            raise ImageError(f"{what}: mount -t {fstype} -o {options}: {r.stderr.strip()}")
        stack.callback(_umount, mnt)
        yield mnt


def _read_ahead(tree: str, stop: threading.Event) -> None:
    """Ask for every regular file under ``tree`` to be read ahead, until ``stop``."""
    for dirpath, _dirs, files in os.walk(tree):
        for name in files:
            if stop.is_set():
                return
            try:
                fd = os.open(os.path.join(dirpath, name), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK
                             | os.O_CLOEXEC)
            except OSError:
                continue  # not a regular file, or gone: nothing to read ahead
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
            except OSError:
                pass
            finally:
                os.close(fd)


def _umount(path: str) -> None:
    r = _run("umount", path)
    if r.returncode != 0:
        _run("umount", "-l", path)


@dataclass
class RootReport:
    """What ``thinpool docker ls`` shows."""

    root: str
    driver_name: str
    block_size: int
    transaction_id: int | None
    images: list[dict[str, Any]] = field(default_factory=list)
    layers: list[dict[str, Any]] = field(default_factory=list)
    containers: list[dict[str, Any]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"Root": self.root, "Driver": self.driver_name, "BlockSize": self.block_size,
                "TransactionId": self.transaction_id, "Images": self.images, "Layers": self.layers,
                "Containers": self.containers, "Problems": self.problems}


class DockerRoot:
    """A Docker devicemapper data root, read-only (see the module docstring)."""

    def __init__(self, root: str, driver_name: str | None = None, data: str | None = None,
                 metadata: str | None = None) -> None:
        self.root = os.path.abspath(root)
        if not os.path.isdir(self.root):
            raise ImageError(f"{root}: not a directory")
        layouts = find_layouts(self.root)
        if driver_name is not None:
            layouts = [lay for lay in layouts if lay.name == driver_name]
        if not layouts:
            raise ImageError(f"{root}: no devicemapper storage found (neither devicemapper/ nor a "
                             "plugin's NAME/devicemapper/ beside image/NAME/)")
        if len(layouts) > 1:
            raise ImageError(f"{root}: several devicemapper stores ({', '.join(x.name for x in layouts)}): "
                             "choose one with --driver-name")
        self.layout = layouts[0]
        self.problems: list[str] = []
        self.layerdb = LayerDB(os.path.join(self.layout.image_dir, "layerdb"))
        self.images = ImageStore(self.root, self.layout.name, create=False)
        self.containers = ContainerStore(self.root, create=False)
        pool = os.path.join(self.layout.home, "devicemapper")
        self.data_path = data or os.path.join(pool, "data")
        self.metadata_path = metadata or os.path.join(pool, "metadata")
        self.devices = self._records()
        self.block_bytes = 0
        self.transaction_id: int | None = None
        self._roots: dict[int, int] = {}
        self._read_pool()

    # -- Docker's records ------------------------------------------------------------------------
    def _records(self) -> dict[str, Device]:
        out: dict[str, Device] = {}
        old = os.path.join(self.layout.home, "devicemapper", "json")
        if os.path.exists(old):
            try:
                with open(old, encoding="utf-8") as f:
                    for hash, raw in (json.load(f).get("Devices") or {}).items():
                        out[hash] = self._device(hash, raw)
            except (OSError, ValueError, AttributeError, KeyError, TypeError) as e:
                self.problems.append(f"devicemapper/json is unreadable: {e}")
        meta = os.path.join(self.layout.home, "metadata")
        for name in sorted(os.listdir(meta)):
            if name.startswith(".") or name.endswith(".migrated") or name in SPECIAL:
                continue
            hash = "" if name == "base" else name
            try:
                with open(os.path.join(meta, name), encoding="utf-8") as f:
                    out[hash] = self._device(hash, json.load(f))
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
                self.problems.append(f"device record metadata/{name} is unreadable: {e}")
        try:
            with open(os.path.join(meta, "transaction-metadata"), encoding="utf-8") as f:
                txn = json.load(f)
            self._open_txn = int(txn.get("open_transaction_id", 0))
            self._txn_device = int(txn.get("device_id", -1))
        except (OSError, ValueError, TypeError, AttributeError):
            self._open_txn, self._txn_device = 0, -1
        return out

    @staticmethod
    def _device(hash: str, raw: dict[str, Any]) -> Device:
        return Device(hash, int(raw["device_id"]), int(raw["size"]), int(raw.get("transaction_id", 0)),
                      bool(raw.get("initialized", False)), bool(raw.get("deleted", False)))

    def _read_pool(self) -> None:
        try:
            reader = MetadataReader(self.metadata_path)
        except (ThinpoolError, OSError) as e:
            self.problems.append(f"pool metadata {self.metadata_path} is unreadable: {e}")
            for d in self.devices.values():
                d.problem = "the pool metadata is unreadable"
            return
        with reader:
            sb = reader.sb
            self.block_bytes = sb.data_block_size * SECTOR
            self.transaction_id = sb.trans_id
            log = SalvageLog()
            details = reader.salvage_details(sb.device_details_root, log)
            roots = reader.salvage_mapping_roots(sb.data_mapping_root, log)
            if not log.complete:
                self.problems.append(f"pool metadata is damaged: {len(log.bad_nodes)} unreadable "
                                     f"nodes in the device trees ({log.bad_nodes[0][1] if log.bad_nodes else ''})")
            self._roots = roots
            for d in self.devices.values():
                if d.device_id not in roots:
                    d.problem = f"thin device {d.device_id} is not in the pool"
                    continue
                if d.device_id in details:
                    d.mapped_blocks = details[d.device_id].mapped_blocks
                else:
                    d.mapped_blocks = 0
        if self._open_txn and self.transaction_id is not None and self._open_txn > self.transaction_id:
            self.problems.append(f"an interrupted device change (device {self._txn_device}, transaction "
                                 f"{self._open_txn}) was never committed; Docker would roll it back")

    def mapping(self, dev: Device) -> np.ndarray:
        """Virtual block -> data block (-1 unmapped) of a device; ImageError if it is damaged."""
        if not dev.intact:
            raise ImageError(f"{_named(dev)} cannot be read: "
                             f"{dev.problem or ('marked deleted' if dev.deleted else 'unknown')}")
        nblocks = -(-dev.size // self.block_bytes)
        out = np.full(nblocks, -1, dtype=np.int64)
        log = SalvageLog()
        with MetadataReader(self.metadata_path) as reader:
            for v, d, _ in reader.salvage_mappings(self._roots[dev.device_id], log):
                keep = v < nblocks
                out[v[keep].astype(np.int64)] = d[keep].astype(np.int64)
        if not log.complete:
            dev.problem = (f"its block mapping is damaged ({len(log.bad_nodes)} unreadable nodes, "
                           f"{log.dropped} entries dropped)")
            raise ImageError(f"{_named(dev)} cannot be read whole: "
                             f"{dev.problem}")
        return out

    def verify(self, dev: Device) -> bool:
        """Walk the device's whole mapping tree; False (and ``dev.problem`` set) when it is damaged."""
        if not dev.intact:
            return False
        try:
            self.mapping(dev)
        except ImageError:
            return False
        return True

    def device(self, hash: str) -> Device:
        dev = self.devices.get(hash)
        if dev is None:
            raise NotFound(f"no devicemapper device for layer {hash}")
        return dev

    @contextlib.contextmanager
    def mounted(self, hash: str, prefetch: bool = False) -> Iterator[str]:
        """The layer's tree (``rootfs/`` of its device) mounted read-only.

        ``prefetch``: for whoever reads the whole tree - a thread asks the
        kernel to read every file ahead (``POSIX_FADV_WILLNEED``), so the
        FUSE side serves many reads at once instead of one file at a time.
        """
        with self._volume(hash) as volume:
            with self._mounted_volume(volume, hash, prefetch) as tree:
                yield tree

    @contextlib.contextmanager
    def _volume(self, hash: str) -> Iterator[ThinVolume]:
        """The layer's thin device, read-only, over the pool's data file (open while in use)."""
        dev = self.device(hash)
        mapping = self.mapping(dev)
        fd = os.open(self.data_path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            yield ThinVolume(fd, self.block_bytes, dev.size, mapping)
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def _mounted_volume(self, volume: ThinVolume, hash: str, prefetch: bool) -> Iterator[str]:
        with mounted_device(volume, _named(self.device(hash))) as mnt:
            rootfs = os.path.join(mnt, "rootfs")
            tree = rootfs if os.path.isdir(rootfs) else mnt
            if not prefetch:
                yield tree
                return
            stop = threading.Event()
            reader = threading.Thread(target=_read_ahead, args=(tree, stop), daemon=True,
                                      name="thinpool-read-ahead")
            reader.start()
            try:
                yield tree
            finally:
                stop.set()
                reader.join()

    # -- what is there ---------------------------------------------------------------------------
    def _problem(self, line: str, into: list[str] | None = None) -> None:
        problems = self.problems if into is None else into
        if line not in problems:
            problems.append(line)

    def image_list(self, problems: list[str] | None = None) -> list[tuple[Image, list[str]]]:
        """Every readable image with its tags; what is unreadable (configs, tags) is noted in
        ``problems`` (default: the root's)."""
        tags: dict[str, list[str]] = {}
        try:
            tag_map = self.images.tags()
        except ImageError as e:
            self._problem(f"{e} (images are listed without tags)", problems)
            tag_map = {}
        for ref, image_id in sorted(tag_map.items()):
            tags.setdefault(image_id, []).append(ref)
        out = []
        for image_id in self.images.ids():
            try:
                out.append((self.images.get(image_id), tags.get(image_id, [])))
            except ImageError as e:
                self._problem(str(e), problems)
        return out

    def resolve(self, ref: str) -> tuple[str, Container | Image]:
        """("container", c) or ("image", i) for a container name/id or an image reference."""
        try:
            return "container", self.containers.resolve(ref, self.problems)
        except NotFound:
            pass
        try:
            return "image", self.images.get(self.images.resolve(ref))
        except NotFound:
            raise NotFound(f"no container or image {ref!r} in {self.root}") from None

    def report(self) -> RootReport:
        """Everything listed, every device in use verified (its mapping tree walked whole)."""
        rep = RootReport(self.root, self.layout.name, self.block_bytes, self.transaction_id)
        layers = self.layerdb.all(self.problems)
        for layer in layers.values():
            if layer.cache_id in self.devices:
                self.verify(self.devices[layer.cache_id])
        for m in self.layerdb.mounts(self.problems).values():
            for hash in (m.mount_id, m.init_id):
                if hash in self.devices:
                    self.verify(self.devices[hash])
        used: dict[str, Device] = {}
        for image, tags in self.image_list():
            size, missing, damaged = 0, False, False
            for chain in chain_ids(image.diff_ids):
                found = layers.get(chain)
                if found is None:
                    missing = True
                    continue
                size += found.size
                dev = self.devices.get(found.cache_id)
                damaged = damaged or dev is None or not dev.intact
            status = "missing layers" if missing else "damaged" if damaged else "ok"
            rep.images.append({"Id": image.id, "RepoTags": tags, "Layers": len(image.diff_ids),
                               "Size": size, "Status": status})
        for layer in layers.values():
            rep.layers.append(self._layer_info(layer))
            if layer.cache_id in self.devices:
                used[layer.cache_id] = self.devices[layer.cache_id]
        for c in self.containers.all(self.problems):
            info: dict[str, Any] = {"Id": c.id, "Name": c.name, "Image": c.image_ref, "ImageID": c.image}
            try:
                m = self.layerdb.get_mount(c.id)
                info["MountID"] = m.mount_id
                for key, hash in (("Device", m.mount_id), ("InitDevice", m.init_id)):
                    dev = self.devices.get(hash)
                    info[key] = self._device_info(dev) if dev is not None else None
                    if dev is not None:
                        used[hash] = dev
            except ImageError as e:
                info["MountID"] = None
                self._problem(str(e) if not isinstance(e, NotFound)
                              else f"container {c.id[:12]} has no layer record")
            rep.containers.append(info)
        rep.problems = list(self.problems)
        for d in self.devices.values():
            if d.problem and d.hash in used:
                rep.problems.append(f"device {d.device_id} ({d.hash or 'base'}): {d.problem}")
        return rep

    def _device_info(self, d: Device) -> dict[str, Any]:
        return {"DeviceId": d.device_id, "Size": d.size,
                "Mapped": None if d.mapped_blocks is None else d.mapped_blocks * self.block_bytes,
                "Status": "ok" if d.intact else ("deleted" if d.deleted else d.problem)}

    def _layer_info(self, layer: Layer) -> dict[str, Any]:
        dev = self.devices.get(layer.cache_id)
        return {"ChainID": layer.chain_id, "DiffID": layer.diff_id, "CacheID": layer.cache_id,
                "Size": layer.size, "Device": self._device_info(dev) if dev is not None else None}

    # -- export ----------------------------------------------------------------------------------
    def export(self, ref: str, reader: str = "auto") -> Iterator[bytes]:
        """The whole filesystem of a container (its read-write device) or an image (its top layer).

        ``reader``: ``userspace`` reads the device's ext2/3/4 from its blocks
        (``ExtTree``; a filesystem it does not handle is an ImageError),
        ``kernel`` through a read-only kernel mount, ``auto`` (default) the
        first when it can, else the second.  Both write the same tar.
        """
        _check_reader(reader)
        kind, obj = self.resolve(ref)
        if kind == "container":
            hash = self.layerdb.get_mount(obj.id).mount_id
        else:
            assert isinstance(obj, Image)
            chains = chain_ids(obj.diff_ids)
            if not chains:
                raise ImageError(f"image {ref} has no layers")
            hash = self.layerdb.get(chains[-1]).cache_id
        self.mapping(self.device(hash))  # a damaged device fails here, before any output
        return self._export(hash, reader)

    def _export(self, hash: str, reader: str) -> Iterator[bytes]:
        with self._files(hash, reader) as tree:
            yield from tree.export() if isinstance(tree, ExtTree) else export_tree(tree)

    @contextlib.contextmanager
    def _files(self, hash: str, reader: str) -> Iterator[ExtTree | str]:
        """The layer's files as ``reader`` chooses: an ``ExtTree`` read in userspace, or the
        path of its tree on a read-only kernel mount (read ahead).  Damage the userspace
        reader meets while in use is an ImageError naming the device."""
        what = _named(self.device(hash))
        with self._volume(hash) as volume:
            ext = _userspace_tree(volume, what, reader)
            if ext is None:
                with self._mounted_volume(volume, hash, prefetch=True) as tree:
                    yield tree
                return
            try:
                yield ext
            except CorruptFilesystem as e:
                raise ImageError(f"{what}: {e}") from None

    # -- migration -------------------------------------------------------------------------------
    def layer_tar(self, layer: Layer, reader: str = "auto",
                  split: list[tarsplit.Entry] | None = None) -> Iterator[bytes]:
        """A layer's original tar (tar-split + its device's files), verified against its diff id.

        The files are read as ``export`` reads them (``reader``): in
        userspace (``ExtTree``) or from a read-only kernel mount.  ``split``:
        the layer's parsed tar-split when the caller has it.
        """
        _check_reader(reader)
        with self._files(layer.cache_id, reader) as tree:
            if isinstance(tree, ExtTree):
                yield from verified_tar(self.layerdb, layer, tree, split)
            else:
                with tarsplit.DirSource(tree) as files:
                    yield from verified_tar(self.layerdb, layer, files, split)

    def migrate(self, dest: str, make_driver: Callable[[], GraphDriver], progress: Progress = NO_PROGRESS,
                log: Callable[[str], None] = lambda line: None, reader: str = "auto") -> dict[str, int]:
        """Copy every image and container into a new data root on ``driver``; counts of what was made.

        Layers keep their diff ids and chain ids (each tar is rebuilt from
        tar-split, verified, and applied with the driver's ``apply_diff``);
        their files are read as ``export`` reads them (``reader``, see
        ``layer_tar``).  Images keep their configs (so their ids) and tags;
        containers keep their ids, names and records, get a fresh ``-init``
        layer and their changes (against their init device) applied on the
        new read-write layer; those changes are always found on kernel
        mounts of both devices, whatever ``reader`` says.  Everything is
        checked readable before the destination is touched (``make_driver``
        makes the new root's driver only then; with ``userspace``, every
        layer's filesystem is checked to be one it reads).  A failure later
        says the new root is incomplete.
        """
        _check_reader(reader)
        unreadable: list[str] = []
        images = self.image_list(unreadable)
        self.layerdb.all(unreadable)
        self.layerdb.mounts(unreadable)
        self.containers.all(unreadable)
        if unreadable:  # a copy without them would lose data silently
            raise ImageError(f"{self.root}: refusing to migrate, Docker's records are damaged: "
                             f"{'; '.join(unreadable)}")
        plan: list[Layer] = []
        total = 0
        seen: set[str] = set()
        for image, _ in images:
            for chain in chain_ids(image.diff_ids):
                if chain in seen:
                    continue
                seen.add(chain)
                layer = self.layerdb.get(chain)
                split = self.layerdb.tar_split(chain)
                if split is None:
                    raise ImageError(f"layer {chain} has no tar-split record: its diff id cannot be kept")
                total += tar_size(split)
                if reader == "userspace":
                    with self._volume(layer.cache_id) as volume:  # its mapping read whole, too
                        _userspace_tree(volume, _named(self.device(layer.cache_id)), reader)
                else:
                    self.mapping(self.device(layer.cache_id))
                plan.append(layer)
        containers = []
        for c in self.containers.all():
            m = self.layerdb.get_mount(c.id)
            self.mapping(self.device(m.mount_id))
            self.mapping(self.device(m.init_id))
            containers.append((c, m))
        try:
            return self._copy(dest, make_driver(), plan, images, containers, total, progress, log, reader)
        except ThinpoolError as e:
            raise ImageError(f"{e} (the new root {dest} is incomplete: remove it before trying "
                             "again)") from None

    def _copy(self, dest: str, driver: GraphDriver, plan: list[Layer], images: list[tuple[Image, list[str]]],
              containers: list[tuple[Container, Any]], total: int, progress: Progress,
              log: Callable[[str], None], reader: str) -> dict[str, int]:
        counts = {"layers": 0, "images": 0, "containers": 0}
        with ImageRoot(dest, driver) as target:
            task = progress.task("migrating layers", total)
            for layer in plan:
                split = self.layerdb.tar_split(layer.chain_id)
                stream = IterReader(self.layer_tar(layer, reader, split))
                try:
                    target.layers.register(stream, layer.parent, layer.diff_id,  # type: ignore[arg-type]
                                           task.advance, split=split)
                finally:
                    stream.close()
                counts["layers"] += 1
                log(f"layer {layer.diff_id}")
            task.finish()
            for image, tags in images:
                target.images.put(image.raw, self.images.parent(image.id))
                for tag in tags:
                    target.images.tag(tag, image.id)
                counts["images"] += 1
                log(f"image {image.id} {' '.join(tags)}")
            for c, m in containers:
                self._migrate_container(c, m.parent, target)
                counts["containers"] += 1
                log(f"container {c.id[:12]} {c.name}")
        return counts

    def _migrate_container(self, c: Container, parent: str | None, target: ImageRoot) -> None:
        rw = target.layers.create_rw(c.id, parent, {}, setup_init_layer)
        m = self.layerdb.get_mount(c.id)
        with self.mounted(m.mount_id) as new, self.mounted(m.init_id) as old:
            changes = changes_dirs(new, old)
            reader = IterReader(export_changes(new, changes))
            try:
                target.driver.apply_diff(rw.mount_id, rw.init_id, reader)  # type: ignore[arg-type]
            finally:
                reader.close()
        src = os.path.join(self.containers.dir, c.id)
        dst = os.path.join(target.containers.dir, c.id)
        os.makedirs(dst, mode=0o700, exist_ok=True)
        for name in sorted(os.listdir(src)):
            path = os.path.join(src, name)
            if not os.path.isfile(path) or os.path.islink(path):
                continue
            with open(path, "rb") as f:
                data = f.read()
            if name == "config.v2.json":
                raw = json.loads(data)
                raw["Driver"] = target.driver.name
                data = json.dumps(raw).encode()
            atomic_write(os.path.join(dst, name), data, 0o600 if name.endswith(".json") else 0o644)


def serve_mount(root: DockerRoot, ref: str, mountpoint: str, ready: Callable[[str], None],
                poll: float = 0.5) -> None:
    """Mount a container's (or image's) tree read-only at ``mountpoint`` and stay until it is unmounted.

    Calls ``ready(path)`` once the mount is in place, then watches the mount
    point; when somebody unmounts it (``umount MOUNTPOINT``) or SIGTERM
    arrives, the private mount, loop device and FUSE mount are undone.
    """
    mountpoint = os.path.realpath(mountpoint)
    if not os.path.isdir(mountpoint):
        raise ImageError(f"mount point {mountpoint} is not a directory")
    if is_mountpoint(mountpoint):
        raise ImageError(f"{mountpoint} is already a mount point")
    kind, obj = root.resolve(ref)
    if kind == "container":
        hash = root.layerdb.get_mount(obj.id).mount_id
    else:
        assert isinstance(obj, Image)
        hash = root.layerdb.get(chain_ids(obj.diff_ids)[-1]).cache_id
    with root.mounted(hash) as tree:
        r = _run("mount", "--bind", "-o", "ro", tree, mountpoint)
        if r.returncode != 0:
            raise ImageError(f"bind mount at {mountpoint}: {r.stderr.strip()}")
        try:
            ready(mountpoint)
            while is_mountpoint(mountpoint):
                time.sleep(poll)
        finally:
            if is_mountpoint(mountpoint):
                _umount(mountpoint)




def unmount_served(mountpoint: str, timeout: float = 30.0) -> None:
    """Undo ``serve_mount``: unmount ``mountpoint`` and wait until its server has detached everything."""
    entry = mount_entry(mountpoint)
    if entry is None:
        raise ImageError(f"{mountpoint} is not mounted")
    backing = loop.backing_file(entry.source) if entry.source.startswith("/dev/loop") else None
    if backing is None or "/thinpool-docker-" not in backing:
        raise ImageError(f"{mountpoint} is not a mount made by 'thinpool docker mount'")
    _umount(mountpoint)
    deadline = time.monotonic() + timeout
    while loop.backing_file(entry.source) == backing:
        if time.monotonic() > deadline:
            raise ImageError(f"{mountpoint} is unmounted but its server has not released "
                             f"{entry.source} within {timeout:g} s")
        time.sleep(0.05)


__all__ = ["Device", "DockerRoot", "READERS", "RootReport", "ThinVolume", "find_layouts", "mounted_device",
           "serve_mount", "unmount_served"]
