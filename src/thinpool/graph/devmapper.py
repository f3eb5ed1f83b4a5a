"""Docker's devicemapper graph driver, on a thinpool pool instead of the kernel's dm-thin.

Everything Docker keeps is where Docker keeps it, under the driver's home
(e.g. ``/var/lib/docker/devicemapper``):

* ``devicemapper/`` is the pool: sparse ``data`` and ``metadata`` files (plus
  thinpool's ``pool.json``, registry and server sockets), or another pool
  directory given as ``dm.thinpooldev``;
* ``metadata/<hash>`` and ``metadata/base``: one JSON record per thin device
  (``device_id``, ``size``, ``transaction_id``, ``initialized``, ``deleted``);
  ``metadata/deviceset-metadata`` (``next_device_id``, base UUID and
  filesystem) and ``metadata/transaction-metadata`` (the open transaction);
  the pre-0.12 single ``devicemapper/json`` file is migrated on start;
* ``mnt/<id>/``: mount points, the layer in ``rootfs/`` and its id in ``id``.

The pool is owned by a thinpool pool server (started in the background if
none runs), which activates devices (a FUSE file on a loop device) and
mounts them; the driver talks to it over its control socket, so layers stay
mounted between driver processes until ``put``.  Pool changes follow
Docker's protocol: write ``transaction-metadata`` (open id = pool id + 1),
send the pool message (``create_thin``, ``create_snap``, ``delete``), then
``set_transaction_id old new``; an interrupted create is rolled back at the
next start.  Device ids are 24-bit, allocated from a bitmap rebuilt from the
records, with EEXIST retry.  The base device is formatted ext4 (or xfs) with
Docker's mkfs flags and its UUID recorded and checked on every start; each
layer is a ``create_snap`` of its parent; a container's ``size`` storage
option grows its filesystem.  Diffs are naive (mount both layers, compare).

Removal (``dm.use_deferred_deletion``, on by default): ``remove`` only moves
the layer's record aside, durably, as a pending deletion - ``metadata/
deleted:<device id>`` with ``deleted: true``, a name no layer id can take -
and returns; the layer id is free at once (a new layer of that id gets a new
device).  A background worker deletes pending devices (a delete transaction
each, with ``dm.blkdiscard``'s discard of what only that device held in the
same pool commit) after the driver has had no call for ``DELETION_QUIET``
seconds (at the latest ``DELETION_LATEST`` seconds after the removal).  A
crash before it finishes leaves the pending record, and the next start
deletes the device (as Docker's start deletes devices marked deleted); a
failed deletion is logged and retried every ``DELETION_RETRY`` seconds and at
the next start.  Records Docker itself marked deleted under their own id
(busy devices) are retried the same way.  With deferred deletion off,
``remove`` deletes before it returns.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, replace
from typing import Any

from ..errors import ThinpoolError
from ..pool.config import PoolConfig
from ..server import control
from ..server.control import control_path
from ..unixsock import connect
from .driver import (BadOption, CreateOpts, Finding, GraphError, InvalidLayerId, LayerBusy,
                     LayerExists, LayerNotFound, NotSupported, check_id)
from ..linux.mounts import is_mountpoint
from .naive import NaiveDiff
from .options import human_size, parse_size, split_option
from .refcount import KeyedLock, RefCounter

log = logging.getLogger("thinpool.graph.devicemapper")

MAX_DEVICE_ID = 0xFFFFFF
DELETION_RETRY = 30.0  # seconds between deferred-deletion attempts (Docker's worker)
DELETION_QUIET = 0.1  # seconds without a driver call before pending deletions run
DELETION_LATEST = 2.0  # ... or this long after a removal, whatever the calls
PENDING = "deleted:"  # record name prefix of a pending deletion (never a valid layer id)
SPECIAL = ("deviceset-metadata", "transaction-metadata")


@dataclass
class DevInfo:
    """One thin device as Docker records it (``metadata/<hash>``)."""

    device_id: int
    size: int
    transaction_id: int
    initialized: bool = False
    deleted: bool = False


@dataclass
class Options:
    basesize: int = 10 << 30
    loopdatasize: int = 100 << 30
    loopmetadatasize: int = 2 << 30
    fs: str = ""
    mkfsargs: tuple[str, ...] = ()
    mountopt: str = ""
    blocksize: int = 64 << 10
    blkdiscard: bool = True
    min_free_space: int = 10
    deferred_removal: bool = True
    deferred_deletion: bool = True
    datadev: str = ""
    metadatadev: str = ""
    thinpooldev: str = ""
    xfs_nospace_retries: str = ""


def _bool(key: str, value: str) -> bool:
    if value.lower() in ("1", "t", "true"):
        return True
    if value.lower() in ("0", "f", "false"):
        return False
    raise BadOption(f"devmapper: invalid boolean for {key}: {value!r}")


def parse_options(options: list[str]) -> Options:
    """Docker's ``dm.*`` options, with its defaults and errors (an unknown key is fatal)."""
    o = Options()
    blkdiscard_set = False
    for opt in options:
        key, value = split_option(opt)
        if key == "dm.basesize":
            o.basesize = parse_size(value)
        elif key == "dm.loopdatasize":
            o.loopdatasize = parse_size(value)
        elif key == "dm.loopmetadatasize":
            o.loopmetadatasize = parse_size(value)
        elif key == "dm.fs":
            if value not in ("ext4", "xfs"):
                raise BadOption(f"devmapper: Unsupported filesystem {value}")
            o.fs = value
        elif key == "dm.mkfsarg":
            o.mkfsargs += (value,)
        elif key == "dm.mountopt":
            o.mountopt = ",".join(x for x in (o.mountopt, value) if x)
        elif key == "dm.blocksize":
            size = parse_size(value)
            if size % (64 << 10) or not (64 << 10) <= size <= (1 << 30):
                raise BadOption(f"devmapper: invalid block size {value}: a multiple of 64K "
                                "between 64K and 1G")
            o.blocksize = size
        elif key == "dm.blkdiscard":
            o.blkdiscard, blkdiscard_set = _bool(key, value), True
        elif key == "dm.min_free_space":
            if not value.endswith("%") or not value[:-1].isdigit() or int(value[:-1]) >= 100:
                raise BadOption(f"devmapper: Invalid value {value} for option {key}: must end "
                                "in % and be between 0 and 99")
            o.min_free_space = int(value[:-1])
        elif key == "dm.use_deferred_removal":
            o.deferred_removal = _bool(key, value)
        elif key == "dm.use_deferred_deletion":
            o.deferred_deletion = _bool(key, value)
        elif key == "dm.datadev":
            o.datadev = value
        elif key == "dm.metadatadev":
            o.metadatadev = value
        elif key == "dm.thinpooldev":
            o.thinpooldev = value.removeprefix("/dev/mapper/")
        elif key == "dm.xfs_nospace_max_retries":
            if not value.isdigit():
                raise BadOption(f"devmapper: invalid dm.xfs_nospace_max_retries {value!r}")
            o.xfs_nospace_retries = value
        elif key == "dm.override_udev_sync_check":
            _bool(key, value)  # thinpool needs no udev
        elif key == "dm.libdm_log_level":
            if not value.isdigit() or not 2 <= int(value) <= 7:
                raise BadOption(f"devmapper: invalid dm.libdm_log_level {value!r} (2-7)")
        elif key in ("dm.directlvm_device", "dm.directlvm_device_force", "dm.thinp_percent",
                     "dm.thinp_metapercent", "dm.thinp_autoextend_percent",
                     "dm.thinp_autoextend_threshold"):
            raise BadOption(f"devmapper: {key}: direct-lvm needs the kernel's device-mapper and "
                            "LVM; give thinpool a pool directory with dm.thinpooldev instead")
        else:
            raise BadOption(f"devmapper: Unknown option {key}")
    if o.deferred_deletion and not o.deferred_removal:
        raise BadOption("devmapper: Deferred deletion can not be enabled as deferred removal "
                        "is not enabled")
    if (o.datadev or o.metadatadev) and not (o.datadev and o.metadatadev):
        raise BadOption("devmapper: dm.datadev and dm.metadatadev must be given together")
    if (o.datadev or o.thinpooldev) and not blkdiscard_set:
        o.blkdiscard = False
    if not o.fs:
        o.fs = "xfs" if shutil.which("mkfs.xfs") and _kernel_has("xfs") else "ext4"
    return o


def _kernel_has(fs: str) -> bool:
    try:
        with open("/proc/filesystems", encoding="ascii") as f:
            return any(line.split()[-1] == fs for line in f if line.strip())
    except OSError:
        return False


def _write_json(path: str, payload: object) -> None:
    """Docker's atomic write: a temporary file in the same directory, fsync, rename."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dfd = os.open(os.path.dirname(path), os.O_RDONLY | os.O_DIRECTORY)  # Docker skips this
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


class DevmapperDriver(NaiveDiff):
    """The devicemapper driver (see the module docstring).  Thread-safe."""

    name = "devicemapper"

    def __init__(self, home: str, options: list[str]) -> None:
        super().__init__(home, options)
        self.opts = parse_options(options)
        for tool in ("blkid", f"mkfs.{self.opts.fs}"):
            if shutil.which(tool) is None:
                raise NotSupported(f"{tool} is not installed")
        if os.geteuid() != 0 or not os.path.exists("/dev/fuse") or \
                not os.path.exists("/dev/loop-control"):
            raise NotSupported("devicemapper on thinpool needs root, /dev/fuse and loop devices "
                               "(FUSE files on loop devices stand in for device-mapper)")
        os.makedirs(home, mode=0o700, exist_ok=True)
        self.meta_dir = os.path.join(home, "metadata")
        self.mnt_dir = os.path.join(home, "mnt")
        os.makedirs(self.meta_dir, mode=0o700, exist_ok=True)
        os.makedirs(self.mnt_dir, mode=0o755, exist_ok=True)
        st = os.stat(home)
        self.prefix = f"docker-{os.major(st.st_dev)}:{os.minor(st.st_dev)}-{st.st_ino}"
        self.pool_dir = self.opts.thinpooldev or os.path.join(home, "devicemapper")
        self.own_pool = not self.opts.thinpooldev
        self.ctl = control_path(self.pool_dir)
        self._lock = threading.RLock()  # Docker's DeviceSet mutex
        self._layers = KeyedLock()
        self._mounts = RefCounter(is_mountpoint)
        self.devices: dict[str, DevInfo] = {}
        self.next_device_id = 0
        self.base_uuid = ""
        self.base_fs = ""
        self._used_ids: set[int] = set()
        self._stop = threading.Event()
        self._wake = threading.Event()  # a removal queued a pending deletion
        self._last_call = time.monotonic()  # of a layer call, for the deletion worker's quiet
        self._worker: threading.Thread | None = None
        self._server_proc: subprocess.Popen[bytes] | None = None
        self._closed = False
        self._ensure_pool()
        self._ensure_server()
        try:
            self._load()
            self._setup_base()
            self._delete_marked()
        except BaseException:
            if self._server_proc is not None:  # started for this driver: nobody else uses it
                self._stop_server()
            raise
        if self.opts.deferred_deletion:
            self._worker = threading.Thread(target=self._deletion_worker, daemon=True,
                                            name="devmapper-deletion")
            self._worker.start()

    # -- the pool and its server ---------------------------------------------------------------
    def _ensure_pool(self) -> None:
        if os.path.isfile(os.path.join(self.pool_dir, "pool.json")):
            return
        if self.opts.thinpooldev:
            raise GraphError(f"devmapper: dm.thinpooldev {self.pool_dir} is not a thinpool "
                             "pool directory")
        os.makedirs(self.pool_dir, mode=0o700, exist_ok=True)
        # Docker's table says skip_block_zeroing; this pool zeroes instead.  Without zeroing a
        # block given out again keeps an old layer's bytes around a partial write, and ext4
        # (Debian 12's mke2fs defaults) then failed to mount layers with "Structure needs
        # cleaning" in 4 of 6 load/run/rmi cycles through dockerd.  Zeroing here is a punched
        # hole in the data file: one fallocate per newly provisioned, partly written block.
        from ..pool.engine import Pool  # only here: opening a driver on an existing pool needs no engine

        config = PoolConfig(data_block_sectors=self.opts.blocksize // 512,
                            low_water_mark=32768, skip_block_zeroing=False)
        Pool.create(self.pool_dir, self.opts.loopdatasize, self.opts.loopmetadatasize, config,
                    data_dev=self.opts.datadev or None, metadata_dev=self.opts.metadatadev or None)

    def _ensure_server(self) -> None:
        try:
            connect(self.ctl).close()
            return
        except OSError:
            pass
        import sys

        log_path = os.path.join(self.pool_dir, "server.log")
        with open(log_path, "ab") as log_file:
            proc = subprocess.Popen([sys.executable, "-m", "thinpool.cli", "serve", self.pool_dir],
                                    stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file,
                                    start_new_session=True, close_fds=True)
        self._server_proc = proc  # ours to reap when it stops
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise GraphError(f"devmapper: the pool server for {self.pool_dir} did not start "
                                 f"(see {log_path})")
            try:
                connect(self.ctl).close()
                return
            except OSError:
                time.sleep(0.01)  # it comes up in ~0.5 s: do not add 50 ms to that
        raise GraphError(f"devmapper: the pool server for {self.pool_dir} did not come up")

    def _call(self, command: str, **args: Any) -> dict[str, Any]:
        try:
            return control.request(self.ctl, command, args)
        except ConnectionError:
            self._ensure_server()  # it was stopped (or died): start it again, once
            return control.request(self.ctl, command, args)

    def _pool_status(self) -> dict[str, Any]:
        return self._call("status")["status"]

    # -- records -------------------------------------------------------------------------------
    def _record_path(self, hash: str) -> str:
        return os.path.join(self.meta_dir, hash or "base")

    def _save(self, hash: str) -> None:
        _write_json(self._record_path(hash), asdict(self.devices[hash]))

    def _save_deviceset(self) -> None:
        _write_json(os.path.join(self.meta_dir, "deviceset-metadata"), {
            "next_device_id": self.next_device_id, "BaseDeviceUUID": self.base_uuid,
            "BaseDeviceFilesystem": self.base_fs})

    def _load(self) -> None:
        self._migrate_old_json()
        for name in os.listdir(self.meta_dir):
            if name.startswith(".") or name.endswith(".migrated") or name in SPECIAL:
                continue
            try:
                with open(os.path.join(self.meta_dir, name), encoding="utf-8") as f:
                    raw = json.load(f)
                info = DevInfo(int(raw["device_id"]), int(raw["size"]),
                               int(raw.get("transaction_id", 0)),
                               bool(raw.get("initialized", False)), bool(raw.get("deleted", False)))
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise GraphError(f"devmapper: device record {name} is unreadable: {e}") from None
            if info.device_id > MAX_DEVICE_ID:
                continue
            self.devices["" if name == "base" else name] = info
            self._used_ids.add(info.device_id)
        self._drop_removed_records()
        try:
            with open(os.path.join(self.meta_dir, "deviceset-metadata"), encoding="utf-8") as f:
                raw = json.load(f)
            self.next_device_id = int(raw.get("next_device_id", 0))
            self.base_uuid = raw.get("BaseDeviceUUID", "")
            self.base_fs = raw.get("BaseDeviceFilesystem", "")
        except FileNotFoundError:
            pass
        except (OSError, ValueError, TypeError) as e:
            raise GraphError(f"devmapper: deviceset-metadata is unreadable: {e}") from None
        self.transaction_id = int(self._pool_status()["transaction_id"])
        self._process_pending_transaction()

    def _drop_removed_records(self) -> None:
        """A layer record naming the device of a pending deletion is one whose removal a crash
        interrupted after the pending record was made durable: finish the removal."""
        pending = {i.device_id for h, i in self.devices.items() if h.startswith(PENDING)}
        for hash in [h for h, i in self.devices.items()
                     if i.device_id in pending and not h.startswith(PENDING)]:
            log.warning("devmapper: finishing the interrupted removal of layer %s", hash or "base")
            del self.devices[hash]
            os.unlink(self._record_path(hash))

    def _migrate_old_json(self) -> None:
        """Pre-0.12 Docker kept every device in ``devicemapper/json``."""
        old = os.path.join(self.home, "devicemapper", "json")
        if not os.path.exists(old):
            return
        with open(old, encoding="utf-8") as f:
            devices = json.load(f).get("Devices", {})
        for hash, raw in devices.items():
            _write_json(self._record_path(hash), {
                "device_id": raw["device_id"], "size": raw["size"],
                "transaction_id": raw.get("transaction_id", 0),
                "initialized": raw.get("initialized", False), "deleted": False})
        os.rename(old, old + ".migrated")

    # -- transactions (Docker's protocol) ------------------------------------------------------
    def _open_transaction(self, hash: str, dev_id: int) -> None:
        self.open_transaction_id = self.transaction_id + 1
        _write_json(os.path.join(self.meta_dir, "transaction-metadata"), {
            "open_transaction_id": self.open_transaction_id, "device_hash": hash,
            "device_id": dev_id})

    def _close_transaction(self) -> None:
        self._call("message", text=f"set_transaction_id {self.transaction_id} "
                                   f"{self.open_transaction_id}")
        self.transaction_id = self.open_transaction_id

    def _process_pending_transaction(self) -> None:
        """Roll back a create that a crash interrupted (Docker's processPendingTransaction)."""
        try:
            with open(os.path.join(self.meta_dir, "transaction-metadata"), encoding="utf-8") as f:
                raw = json.load(f)
        except (FileNotFoundError, ValueError):
            return
        open_id = int(raw.get("open_transaction_id", self.transaction_id))
        if open_id == self.transaction_id:
            return
        if open_id < self.transaction_id:
            log.error("devmapper: open transaction %d is older than the pool's %d", open_id,
                      self.transaction_id)
            return
        dev_id, hash = int(raw["device_id"]), raw.get("device_hash", "")
        log.warning("devmapper: rolling back the interrupted creation of device %d (%s)", dev_id,
                    hash or "base")
        try:
            self._call("message", text=f"delete {dev_id}")
        except ThinpoolError:
            pass
        info = self.devices.get(hash)
        if info is not None and info.device_id == dev_id:
            del self.devices[hash]
            os.unlink(self._record_path(hash))
        self._used_ids.discard(dev_id)
        os.unlink(os.path.join(self.meta_dir, "transaction-metadata"))

    def _next_free_id(self) -> int:
        for _ in range(MAX_DEVICE_ID + 1):
            self.next_device_id = (self.next_device_id + 1) & MAX_DEVICE_ID
            if self.next_device_id not in self._used_ids:
                self._used_ids.add(self.next_device_id)
                return self.next_device_id
        raise GraphError("devmapper: no free device id left (all 2^24 are in use)")

    def _create_device(self, hash: str, size: int, origin: DevInfo | None) -> DevInfo:
        """A new thin device (a snapshot of ``origin``, or empty), registered, in one transaction.

        Docker's records and transaction ids, in an order with one pool commit for a
        snapshot: the open transaction, then the device's record, then ``create_snap``
        with the transaction id swapped in the same commit. A crash before that commit
        leaves the pool's transaction id behind the open one, and the next start rolls
        the creation back (the record too); after it, everything is in place.
        """
        dev_id = self._next_free_id()
        self._open_transaction(hash, dev_id)
        try:
            while True:
                info = DevInfo(dev_id, size, self.open_transaction_id)
                self.devices[hash] = info
                self._save(hash)
                try:
                    if origin is None:
                        self._call("create-thin", id=dev_id, size=size)
                        self._close_transaction()
                    else:
                        # dm.min_free_space is checked by the pool server in the same request
                        self._call("create-snap", id=dev_id, origin_id=origin.device_id,
                                   transaction=[self.transaction_id, self.open_transaction_id],
                                   min_free_percent=self.opts.min_free_space)
                        self.transaction_id = self.open_transaction_id
                    break
                except ThinpoolError as e:
                    if "ENOSPC" in str(e) and "minimum required" in str(e):
                        # refused before any change: nothing is left open
                        self.open_transaction_id = self.transaction_id
                        _write_json(os.path.join(self.meta_dir, "transaction-metadata"), {
                            "open_transaction_id": self.transaction_id, "device_hash": hash,
                            "device_id": dev_id})
                        raise GraphError(f"devmapper: {e}. Create more free space in thin pool "
                                         "or use dm.min_free_space option to change behavior") \
                            from None
                    if "EEXIST" not in str(e):
                        raise
                    log.error("devmapper: Device ID %d exists in pool but it is supposed to be "
                              "unused", dev_id)
                    dev_id = self._next_free_id()
                    self._open_transaction(hash, dev_id)
        except BaseException:
            self._used_ids.discard(dev_id)
            self.devices.pop(hash, None)
            if os.path.exists(self._record_path(hash)):
                os.unlink(self._record_path(hash))
            raise
        if origin is not None and size > origin.size:
            self._call("resize-volume", id=dev_id, size=size)
        return info

    # -- the base device -----------------------------------------------------------------------
    def _setup_base(self) -> None:
        base = self.devices.get("")
        if base is not None and base.initialized and not base.deleted:
            uuid = self._device_uuid(base)
            if not self.base_uuid:
                self.base_uuid = uuid
                self._save_deviceset()
            elif uuid != self.base_uuid:
                raise GraphError(f"devmapper: Current Base Device UUID:{uuid} does not match with "
                                 f"stored UUID:{self.base_uuid}. Possibly using a different thin "
                                 "pool than last invocation")
            if self.opts.basesize > base.size:
                self._grow(base, "", self.opts.basesize)
            elif self.opts.basesize < base.size and self._basesize_given():
                raise GraphError(f"devmapper: Base device size cannot be smaller than "
                                 f"{human_size(base.size)}")
            return
        if base is not None:  # a base that never got its filesystem: start over
            self._delete_device("", sync=True)
        if not self.own_pool:
            st = self._pool_status()
            if st["used_data"] or st["transaction_id"]:
                raise GraphError(f"devmapper: Unable to take ownership of thin-pool "
                                 f"({self.pool_dir}) that already has used data blocks or a "
                                 "non-zero transaction ID")
        with self._lock:
            base = self._create_device("", self.opts.basesize, None)
            device = self._call("attach", id=base.device_id)["device"]
            try:
                self._mkfs(device)
                self.base_uuid = self._uuid_of(device)
            finally:
                self._call("detach", target=str(base.device_id))
            self.base_fs = self.opts.fs
            base.initialized = True
            self._save("")
            self._save_deviceset()

    def _basesize_given(self) -> bool:
        return any(split_option(o)[0] == "dm.basesize" for o in self.options)

    def _mkfs(self, device: str) -> None:
        if self.opts.fs == "ext4":
            args = ["mkfs.ext4", "-q", "-E", "nodiscard,lazy_itable_init=0,lazy_journal_init=0"]
        else:
            args = ["mkfs.xfs", "-q", "-f"]
        r = subprocess.run([*args, *self.opts.mkfsargs, device], capture_output=True, text=True)
        if r.returncode != 0 and self.opts.fs == "ext4":  # Docker retries without lazy_journal
            args[3] = "nodiscard,lazy_itable_init=0"
            r = subprocess.run([*args, *self.opts.mkfsargs, device], capture_output=True,
                               text=True)
        if r.returncode != 0:
            why = "; ".join(line.strip() for line in r.stderr.splitlines() if line.strip()) or "failed"
            raise GraphError(f"devmapper: mkfs.{self.opts.fs} {device}: {why}")  # one line
        if self.opts.fs == "ext4":
            subprocess.run(["tune2fs", "-c", "-1", "-i", "0", device], capture_output=True)

    @staticmethod
    def _uuid_of(device: str) -> str:
        r = subprocess.run(["blkid", "-c", "/dev/null", "-s", "UUID", "-o", "value", device], capture_output=True,
                           text=True)
        return r.stdout.strip()

    def _device_uuid(self, info: DevInfo) -> str:
        device = self._call("attach", id=info.device_id)["device"]
        try:
            return self._uuid_of(device)
        finally:
            self._call("detach", target=str(info.device_id))

    def _grow(self, info: DevInfo, hash: str, size: int) -> None:
        """A bigger virtual size and a filesystem grown to it.

        ext4 is grown offline (``e2fsck -f`` then ``resize2fs`` on the
        unmounted device: online growth is refused by some kernels); xfs can
        only grow mounted (``xfs_growfs`` on a private mount, with nouuid).
        """
        self._call("resize-volume", id=info.device_id, size=size)
        info.size = size
        self._save(hash)
        if self.base_fs == "xfs" or (not self.base_fs and self.opts.fs == "xfs"):
            mp = tempfile.mkdtemp(prefix="thinpool-grow-")
            try:
                self._call("mount", id=info.device_id, mountpoint=mp)
                try:
                    self._run_fs_tool(["xfs_growfs", mp])
                finally:
                    self._call("umount", mountpoint=mp)
            finally:
                os.rmdir(mp)
            return
        device = self._call("attach", id=info.device_id)["device"]
        try:
            r = subprocess.run(["e2fsck", "-f", "-y", device], capture_output=True, text=True)
            if r.returncode > 1:  # 1: errors corrected
                raise GraphError(f"devmapper: e2fsck {device} before growing it: "
                                 f"{(r.stdout + r.stderr).strip()[-400:]}")
            self._run_fs_tool(["resize2fs", device])
        finally:
            self._call("detach", target=str(info.device_id))

    @staticmethod
    def _run_fs_tool(cmd: list[str]) -> None:
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise GraphError(f"devmapper: growing the filesystem ({cmd[0]}): "
                             f"{(r.stderr or r.stdout).strip()}")

    # -- ProtoDriver -----------------------------------------------------------------------------
    def exists(self, id: str) -> bool:
        try:
            check_id(id)
        except InvalidLayerId:
            return False
        with self._lock:
            return id in self.devices

    def create(self, id: str, parent: str | None, opts: CreateOpts | None = None) -> None:
        self._add(id, parent, opts)

    def create_rw(self, id: str, parent: str | None, opts: CreateOpts | None = None) -> None:
        self._add(id, parent, opts)

    def _add(self, id: str, parent: str | None, opts: CreateOpts | None) -> None:
        check_id(id)
        if parent:
            check_id(parent)
        if id == "base" or id in SPECIAL:
            raise InvalidLayerId(f"devmapper: {id!r} names one of the driver's own records")
        self._last_call = time.monotonic()
        size_opt = None
        for key, value in (opts.storage_opt if opts else {}).items():
            if key.lower() != "size":
                raise BadOption(f"Unknown option {key}")
            size_opt = parse_size(value)
        with self._layers.hold(parent or "", id), self._lock:
            base = self.devices.get(parent or "")
            if base is None:
                raise LayerNotFound(f"devmapper: Unknown device {parent}")
            if base.deleted:
                raise GraphError(f"devmapper: Base device {parent} has been marked for deferred "
                                 "deletion")
            if id in self.devices:
                raise LayerExists(f"devmapper: device {id} already exists")
            size = base.size if size_opt is None else size_opt
            if size < base.size:
                raise GraphError(f"devmapper: Container size cannot be smaller than "
                                 f"{human_size(base.size)}")
            info = self._create_device(id, base.size, base)
            if size > base.size:
                try:
                    self._grow(info, id, size)
                except BaseException:
                    self._delete_device(id, sync=True)
                    raise

    def remove(self, id: str) -> None:
        """Remove a layer: with deferred deletion its device is deleted in the background
        (see the module docstring), else before this returns."""
        check_id(id)
        self._last_call = time.monotonic()
        with self._layers.hold(id):
            mp = os.path.join(self.mnt_dir, id)
            with self._lock:
                if id not in self.devices:
                    return
                if self._mounts.count(mp) or is_mountpoint(mp):
                    raise LayerBusy(f"devmapper: Error running DeleteDevice: device {id} is "
                                    "in use (mounted: put it first)")
                children = self._children(self.devices[id].device_id)
                if children:
                    raise LayerBusy(f"devmapper: layer {id} has child layers "
                                    f"({', '.join(children)}): remove them first")
                if self.opts.deferred_deletion:
                    self._queue_deletion(id)
                else:
                    self._delete_device(id, sync=False)
            try:
                os.rmdir(mp)
            except OSError:
                pass

    def _children(self, dev_id: int) -> list[str]:
        """Layers snapshotted from device ``dev_id`` (the pool records each snapshot's origin);
        devices whose deletion is pending do not count."""
        by_id = {i.device_id: h for h, i in self.devices.items() if not h.startswith(PENDING)}
        return sorted(by_id[v["dev_id"]] for v in self._call("list")["volumes"]
                      if v["snapshot_of"] == dev_id and v["dev_id"] in by_id)

    def _queue_deletion(self, hash: str) -> None:
        """Move layer ``hash``'s record aside as a pending deletion and wake the worker (lock
        held).  The pending record is durable before the layer's record goes; the unlink
        is not synced on its own (a start drops a record whose device a pending deletion
        names, and any later record write syncs the directory)."""
        info = self.devices[hash]
        pending = f"{PENDING}{info.device_id}"
        self.devices[pending] = replace(info, deleted=True)
        try:
            self._save(pending)
        except BaseException:
            del self.devices[pending]
            raise
        del self.devices[hash]
        os.unlink(self._record_path(hash))
        self._wake.set()

    def _delete_device(self, hash: str, sync: bool) -> None:
        """Docker's DeleteDevice: a delete transaction; a busy device is marked deleted.

        One pool commit: the record goes first, then ``delete`` with the transaction id
        swapped in the same commit. A crash between the two leaves the pool's transaction
        id behind the open one, and the next start finishes the deletion (Docker's
        rollback deletes the device). A failed delete puts the record back and closes the
        transaction, as Docker always does.
        """
        info = self.devices[hash]
        if info.deleted and not os.path.exists(self._record_path(hash)):
            del self.devices[hash]  # another driver object on this home deleted it
            self._used_ids.discard(info.device_id)
            return
        self._open_transaction(hash, info.device_id)
        os.unlink(self._record_path(hash))
        try:
            # dm.blkdiscard (Docker's issueDiscard before the delete): what only this device
            # held is discarded in the delete's own commit, so it goes back to the data file
            self._call("delete", id=info.device_id,
                       transaction=[self.transaction_id, self.open_transaction_id],
                       discard=self.opts.blkdiscard)
            self.transaction_id = self.open_transaction_id
        except ThinpoolError as e:
            if "ENODATA" not in str(e):
                self._save(hash)
                self._close_transaction()
                if "EBUSY" in str(e) and self.opts.deferred_deletion and not sync:
                    if not info.deleted:
                        info.deleted = True
                        self._save(hash)
                    return
                raise GraphError(f"devmapper: Error deleting device {hash or 'base'}: {e}") \
                    from None
            self._close_transaction()
        del self.devices[hash]
        self._used_ids.discard(info.device_id)

    def _delete_marked(self, pending_only: bool = False) -> None:
        """Delete the devices marked deleted (only the pending deletions with
        ``pending_only``); failures are logged, the marks stay for the next try."""
        with self._lock:
            marked = [h for h, i in self.devices.items()
                      if i.deleted and (h.startswith(PENDING) or not pending_only)]
        for hash in marked:
            with self._lock:  # one at a time: layer calls go on in between
                if hash not in self.devices:
                    continue
                try:
                    self._delete_device(hash, sync=False)
                except (ThinpoolError, OSError) as e:
                    log.warning("devmapper: deferred deletion of %s: %s", hash or "base", e)

    def finish_deletions(self) -> None:
        """Delete the devices of removed layers now rather than in the background (a device
        that cannot be deleted yet stays pending; the failure is logged)."""
        self._delete_marked(pending_only=True)

    def _deletion_worker(self) -> None:
        """Pending deletions once the driver is quiet; every marked device each
        ``DELETION_RETRY`` seconds."""
        while not self._stop.is_set():
            woken = self._wake.wait(DELETION_RETRY)
            if self._stop.is_set():
                return
            if woken:
                self._wake.clear()
                latest = time.monotonic() + DELETION_LATEST
                while not self._stop.is_set():
                    now = time.monotonic()
                    wait = min(self._last_call + DELETION_QUIET, latest) - now
                    if wait <= 0:
                        break
                    self._stop.wait(wait)
            try:
                self._delete_marked(pending_only=woken)
            except (ThinpoolError, OSError) as e:  # the pool server is gone: a start retries
                log.warning("devmapper: deferred deletion: %s", e)

    def get(self, id: str, mount_label: str = "") -> str:
        mp = os.path.join(self.mnt_dir, check_id(id))
        self._last_call = time.monotonic()
        rootfs = os.path.join(mp, "rootfs")
        with self._layers.hold(id):
            with self._lock:
                info = self.devices.get(id)
                if info is None:
                    raise LayerNotFound(f"devmapper: Unknown device {id}")
                if info.deleted:
                    raise GraphError(f"devmapper: Device {id} is marked for deferred deletion")
            if self._mounts.increment(mp) > 1:
                return rootfs
            try:
                os.makedirs(mp, mode=0o755, exist_ok=True)
                opts = ",".join(x for x in (self.opts.mountopt,
                                            f"context=\"{mount_label}\"" if mount_label else "")
                                if x)
                self._call("mount", id=info.device_id, mountpoint=mp, options=opts or None)
                os.makedirs(rootfs, mode=0o755, exist_ok=True)
                id_file = os.path.join(mp, "id")
                if not os.path.exists(id_file):
                    with open(id_file, "w", encoding="ascii") as f:
                        f.write(id)
                    os.chmod(id_file, 0o600)
                self._xfs_retries(info)
            except BaseException:
                if self._mounts.decrement(mp) == 0 and is_mountpoint(mp):
                    self._call("umount", mountpoint=mp)
                raise
            return rootfs

    def _xfs_retries(self, info: DevInfo) -> None:
        if not self.opts.xfs_nospace_retries:
            return
        device = self._call("server-info").get("attached", {}).get(str(info.device_id), "")
        path = f"/sys/fs/xfs/{os.path.basename(device)}/error/metadata/ENOSPC/max_retries"
        if os.path.exists(path):
            with open(path, "w", encoding="ascii") as f:
                f.write(self.opts.xfs_nospace_retries)

    def put(self, id: str) -> None:
        mp = os.path.join(self.mnt_dir, check_id(id))
        self._last_call = time.monotonic()
        with self._layers.hold(id):
            if id not in self.devices:
                raise LayerNotFound(f"devmapper: Unknown device {id}")
            if self._mounts.decrement(mp) > 0:
                return
            if is_mountpoint(mp):
                self._call("umount", mountpoint=mp)
            try:
                os.rmdir(mp)
            except OSError:
                pass

    # -- information ------------------------------------------------------------------------------
    def status(self) -> list[tuple[str, str]]:
        st = self._pool_status()
        bs = self.opts.blocksize
        with self._lock:
            base = self.devices.get("")
            deleted = sum(i.deleted for i in self.devices.values())
        data_used, data_total = st["used_data"] * bs, st["total_data"] * bs
        meta_used, meta_total = st["used_metadata"] * 4096, st["total_metadata"] * 4096
        out = [("Pool Name", self.opts.thinpooldev or f"{self.prefix}-pool"),
               ("Pool Blocksize", human_size(bs)),
               ("Base Device Size", human_size(base.size if base else self.opts.basesize)),
               ("Backing Filesystem", self.base_fs or self.opts.fs),
               ("Udev Sync Supported", "true")]
        if self.own_pool:
            data = self.opts.datadev or os.path.join(self.pool_dir, "data")
            meta = self.opts.metadatadev or os.path.join(self.pool_dir, "metadata")
            out += [("Data file", data), ("Metadata file", meta)]
            if not self.opts.datadev:
                out += [("Data loop file", data), ("Metadata loop file", meta)]
        out += [("Data Space Used", human_size(data_used)),
                ("Data Space Total", human_size(data_total)),
                ("Data Space Available", human_size(data_total - data_used)),
                ("Metadata Space Used", human_size(meta_used)),
                ("Metadata Space Total", human_size(meta_total)),
                ("Metadata Space Available", human_size(meta_total - meta_used)),
                ("Thin Pool Minimum Free Space",
                 human_size(st["total_data"] * self.opts.min_free_space // 100 * bs)),
                ("Deferred Removal Enabled", str(self.opts.deferred_removal).lower()),
                ("Deferred Deletion Enabled", str(self.opts.deferred_deletion).lower()),
                ("Deferred Deleted Device Count", str(deleted)),
                ("Library Version", "thinpool (userspace dm-thin)")]
        return out

    def get_metadata(self, id: str) -> dict[str, str]:
        check_id(id)
        with self._lock:
            info = self.devices.get(id)
        if info is None:
            raise LayerNotFound(f"devmapper: Unknown device {id}")
        return {"DeviceId": str(info.device_id), "DeviceSize": str(info.size),
                "DeviceName": f"{self.prefix}-{id}"}

    def layer_usage(self) -> dict[str, dict[str, int]]:
        """Layer id -> mapped, exclusive and shared bytes, from the pool's mappings (thin_ls)."""
        with self._lock:
            by_dev = {i.device_id: h for h, i in self.devices.items()
                      if not h.startswith(PENDING)}
        out: dict[str, dict[str, int]] = {}
        stack = list(self._call("list", tree=True)["tree"])
        while stack:
            node = stack.pop()
            stack.extend(node["snapshots"])
            hash = by_dev.get(node["id"])
            if hash is not None:
                out[hash or "base"] = {k: node[f"{k}_bytes"]
                                       for k in ("mapped", "exclusive", "shared")}
        return out

    def check(self, repair: bool = False) -> list[Finding]:
        """Reconcile the records with the pool (the fsck Docker never had).

        Finds: a half-finished transaction; records whose device is not in the
        pool; pool devices no record names (ids leaked by an interrupted
        delete, or a create whose record was lost); two records naming one
        device; devices marked for deferred deletion; mount points of layers
        that do not exist; problems in the pool's metadata itself.  With
        ``repair``: the transaction is rolled back, dangling records and
        orphan devices removed, marked devices deleted if they are not busy,
        stale mount points removed.  Two records on one device are only
        reported (which layer owns the data cannot be known).  A removed layer's
        device still waiting for its deletion counts as marked for deferred deletion.
        """
        findings: list[Finding] = []
        with self._lock:
            report = self._call("check")
            for line in report["errors"]:
                findings.append(Finding(f"pool metadata: {line}"))
            try:
                with open(os.path.join(self.meta_dir, "transaction-metadata"),
                          encoding="utf-8") as f:
                    open_id = int(json.load(f).get("open_transaction_id", 0))
            except (FileNotFoundError, ValueError):
                open_id = self.transaction_id
            pool_tid = int(self._pool_status()["transaction_id"])
            if open_id > pool_tid:
                f_ = Finding(f"transaction {open_id} was opened but never closed (the pool is at "
                             f"{pool_tid}): an interrupted create or delete")
                if repair:
                    self.transaction_id = pool_tid
                    self._process_pending_transaction()
                    f_.repaired = True
                findings.append(f_)
            in_pool = {v["dev_id"] for v in self._call("list")["volumes"]}
            owners: dict[int, list[str]] = {}
            for hash, info in sorted(self.devices.items()):
                owners.setdefault(info.device_id, []).append(hash or "base")
            for dev_id, hashes in sorted(owners.items()):
                if len(hashes) > 1:
                    findings.append(Finding(f"layers {', '.join(hashes)} all name device {dev_id}"))
            for hash, info in sorted(self.devices.items()):
                name = hash or "base"
                if info.device_id not in in_pool:
                    f_ = Finding(f"layer {name}: device {info.device_id} is not in the pool")
                    if repair and hash:
                        del self.devices[hash]
                        os.unlink(self._record_path(hash))
                        self._used_ids.discard(info.device_id)
                        f_.repaired = True
                    findings.append(f_)
            for dev_id in sorted(in_pool - set(owners)):
                f_ = Finding(f"device {dev_id} is in the pool but no layer records it (a leaked "
                             "id)")
                if repair:
                    try:
                        self._call("message", text=f"delete {dev_id}")
                        f_.repaired = True
                    except ThinpoolError as e:
                        f_.problem += f"; not deleted: {e}"
                findings.append(f_)
            for hash in [h for h, i in self.devices.items() if i.deleted]:
                what = f"device {self.devices[hash].device_id} of a removed layer" \
                    if hash.startswith(PENDING) else f"layer {hash}"
                f_ = Finding(f"{what} is marked for deferred deletion")
                if repair:
                    try:
                        self._delete_device(hash, sync=True)
                        f_.repaired = True
                    except GraphError as e:
                        f_.problem += f"; still busy: {e}"
                findings.append(f_)
        for name in sorted(os.listdir(self.mnt_dir)):
            if name in self.devices:
                continue
            mp = os.path.join(self.mnt_dir, name)
            f_ = Finding(f"mount point mnt/{name} belongs to no layer"
                         + (" and is mounted" if is_mountpoint(mp) else ""))
            if repair:
                try:
                    if is_mountpoint(mp):
                        self._call("umount", mountpoint=mp)
                    shutil.rmtree(mp)
                    f_.repaired = True
                except (OSError, ThinpoolError) as e:
                    f_.problem += f"; not removed: {e}"
            findings.append(f_)
        return findings

    def device_ids(self) -> dict[str, int]:
        """Layer id -> thin device id (``""`` is the base), for tools above the driver."""
        with self._lock:
            return {h: i.device_id for h, i in self.devices.items() if not h.startswith(PENDING)}

    def cleanup(self) -> None:
        """Daemon shutdown: save, unmount every layer, stop the pool server.  Idempotent."""
        if self._closed:
            return
        self._closed = True
        self.finish_deletions()  # leave no removed layer's device behind
        self._stop.set()
        self._wake.set()
        if self._worker is not None:
            self._worker.join()
        with self._lock:
            self._save_deviceset()
        for name in os.listdir(self.mnt_dir):
            mp = os.path.join(self.mnt_dir, name)
            if is_mountpoint(mp):
                try:
                    self._call("umount", mountpoint=mp)
                except ThinpoolError as e:
                    log.warning("devmapper: %s", e)
            self._mounts.forget(mp)
        self._stop_server()

    def _stop_server(self) -> None:
        """Stop the pool server (never starting one) and wait up to 60 s until it is gone."""
        try:
            pid = control.request(self.ctl, "stop", {})["pid"]
        except (ThinpoolError, OSError) as e:
            log.warning("devmapper: stopping the pool server: %s", e)
            return
        if self._server_proc is not None and self._server_proc.pid == pid:
            try:
                self._server_proc.wait(60)
            except subprocess.TimeoutExpired:
                log.warning("devmapper: the pool server (pid %d) did not stop within 60 s", pid)
            return
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if os.waitpid(pid, os.WNOHANG)[0] == pid:  # a child of this process (another
                    return                                # driver object started it): reaped
            except ChildProcessError:
                pass
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)
        log.warning("devmapper: the pool server (pid %d) did not stop within 60 s", pid)
