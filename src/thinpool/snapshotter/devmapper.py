"""The ``devicemapper`` backend: every snapshot a thin device of a thinpool pool.

Like containerd's own devmapper snapshotter, but on a pool that needs no
device-mapper: ``ROOT/pool`` is a thinpool pool (sparse ``data`` and
``metadata`` files, created on first start) owned by a pool server
(``thinpool serve``, started in the background in its own session when none
runs), which the backend drives over the pool's control socket as the
kernel's dm-thin is driven with ``dmsetup``:

* thin device 0 is the base: ``dm.basesize`` (default 10G) of ext4
  (``mkfs.ext4 -E nodiscard,assume_storage_prezeroed=1``: a thin device
  reads zeros where nothing was written, so nothing is zeroed), or xfs with
  ``dm.fs=xfs``; its ``lost+found`` is removed so a fresh snapshot is an
  empty directory.  ``ROOT/devicemapper.json`` records it once it is whole;
  a base left half-made by a crash is deleted and made again;
* snapshot ``N`` is thin device ``N``: ``create_snap N <parent's device>``
  (the base for a parentless one), O(1) whatever the parent holds;
* an active or view snapshot is attached as a block device (a FUSE file on
  a loop device, see ``server.kernel``) and returned as an ``ext4`` (or
  ``xfs``, with ``nouuid``: snapshots share the base's UUID) mount of it,
  ``ro`` for a view, plus ``dm.mountopt``.  containerd mounts it;
* a commit detaches the device; committed devices stay detached.  containerd
  may commit a snapshot it still has mounted: its filesystem is then flushed
  (frozen and thawed) and the device detached later (``release_idle``, run
  by ``Cleanup``) or by a removal, once nothing has it mounted;
* ``Usage`` counts the blocks a device maps that its parent does not map to
  the same data block (``layer-usage``, read from the pool's committed
  mappings like thin_delta), times the pool's block size; the inode count is
  not known without mounting and is reported as 0.  A committed snapshot's
  usage is counted when first asked for, not by the commit (see ``commit``).

The pool's transaction id moves by one with every device created or deleted
for a snapshot, in the same pool commit as the change; the records
store it when they settle (``core``), so at a crash the pool is at most one
change ahead of the records, and any other difference means the two do not
belong together: the backend refuses to start.  A pool with less than
``dm.min_free_space`` (default 10%) of its data or metadata blocks free
refuses new snapshots (``ResourceExhausted``), as Docker's driver does.

On close the pool server is stopped unless something still has a snapshot
mounted (a running container); then it keeps serving and the next start
uses it again.  A server that died leaves loop devices on a dead FUSE mount:
they are cleaned up on start when nothing has them mounted; otherwise the
backend refuses to start and says how to clean up (``thinpool stop --force``).

Options (``--storage-opt``): ``dm.basesize``, ``dm.fs`` (ext4|xfs),
``dm.loopdatasize`` (100G), ``dm.loopmetadatasize`` (2G), ``dm.blocksize``
(64K), ``dm.min_free_space`` (10%), ``dm.mountopt``, ``dm.mkfsarg`` (extra
mkfs arguments, space separated).  Sizes only matter when the pool and base
are first made.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

from ..errors import ThinpoolError
from ..linux import mounts as sysmount
from ..pool.config import PoolConfig, parse_size
from ..pool.engine import Pool
from ..pool.registry import write_json_atomic
from ..server import control
from ..server.daemon import control_path, read_state
from ..server.kernel import FIFREEZE, FITHAW, clean_up_leftovers, leftovers
from ..unixsock import connect
from .backend import Backend, Mount, Usage
from .errors import FailedPrecondition, InvalidArgument, ResourceExhausted, Unavailable
from .store import VIEW, Record

log = logging.getLogger("thinpool.snapshotter")

POOL = "pool"
STATE = "devicemapper.json"
BASE = 0
SERVER_START = 60.0  # seconds for a pool server to come up
SERVER_STOP = 60.0
OPTIONS = ("dm.basesize", "dm.fs", "dm.loopdatasize", "dm.loopmetadatasize", "dm.blocksize",
           "dm.min_free_space", "dm.mountopt", "dm.mkfsarg")


def _flush_filesystem(mountpoint: str) -> None:
    """Everything written to the filesystem at ``mountpoint`` reaches its device (freeze, thaw)."""
    fd = os.open(mountpoint, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, FIFREEZE, 0)
        fcntl.ioctl(fd, FITHAW, 0)
    finally:
        os.close(fd)


def _size(key: str, value: str) -> int:
    try:
        return parse_size(value)
    except ThinpoolError as e:
        raise InvalidArgument(f"{key}: {e}") from None


class DevmapperBackend(Backend):
    """Thin devices of a thinpool pool (see the module docstring).  Thread-safe."""

    name = "devicemapper"

    def __init__(self, root: str, options: dict[str, str]) -> None:
        unknown = sorted(set(options) - set(OPTIONS))
        if unknown:
            raise InvalidArgument(f"unknown devicemapper option(s) {', '.join(unknown)} (known: "
                                  f"{', '.join(OPTIONS)})")
        self.root = root
        self.pool_dir = os.path.join(root, POOL)
        self.ctl = control_path(self.pool_dir)
        self.base_size = _size("dm.basesize", options.get("dm.basesize", "10G"))
        self.fs = options.get("dm.fs", "ext4")
        if self.fs not in ("ext4", "xfs"):
            raise InvalidArgument(f"dm.fs must be ext4 or xfs, not {self.fs!r}")
        self.data_size = _size("dm.loopdatasize", options.get("dm.loopdatasize", "100G"))
        self.meta_size = _size("dm.loopmetadatasize", options.get("dm.loopmetadatasize", "2G"))
        block = _size("dm.blocksize", options.get("dm.blocksize", "64K"))
        if block % (64 << 10) or not (64 << 10) <= block <= (1 << 30):
            raise InvalidArgument(f"dm.blocksize {block} must be a multiple of 64K between 64K "
                                  "and 1G")
        self.block_sectors = block // 512
        free = options.get("dm.min_free_space", "10%")
        if not free.endswith("%") or not free[:-1].isdigit() or int(free[:-1]) > 99:
            raise InvalidArgument(f"dm.min_free_space must be a percentage 0%..99%, not {free!r}")
        self.min_free = int(free[:-1])
        self.mount_options = tuple(o for o in options.get("dm.mountopt", "").split(",") if o)
        self.mkfs_args = tuple(options.get("dm.mkfsarg", "").split())
        self._txn: int | None = None
        self._attached: dict[int, str] = {}
        self._lock = threading.RLock()  # attach/detach and the transaction id
        self._server: subprocess.Popen[bytes] | None = None

    # -- the pool and its server --------------------------------------------------------------
    def _ensure_pool(self) -> None:
        if os.path.isfile(os.path.join(self.pool_dir, "pool.json")):
            return
        if os.path.isdir(self.pool_dir):
            # pool.json is written last: a directory without it is a creation a crash cut short
            log.warning("removing the half-made pool %s", self.pool_dir)
            shutil.rmtree(self.pool_dir)
        Pool.create(self.pool_dir, self.data_size, self.meta_size,
                    PoolConfig(data_block_sectors=self.block_sectors))

    def _alive(self) -> bool:
        try:
            connect(self.ctl).close()
            return True
        except OSError:
            return False

    def _ensure_server(self) -> None:
        if self._alive():
            return
        left = leftovers(self.pool_dir, read_state(self.pool_dir))
        if left["mounts"]:
            raise Unavailable(f"the pool server of {self.pool_dir} died and snapshots are still "
                              f"mounted from it ({', '.join(left['mounts'])}); unmount them, or "
                              f"run 'thinpool stop --force {self.pool_dir}', and start again")
        for line in clean_up_leftovers(self.pool_dir, read_state(self.pool_dir)):
            log.warning("after a dead pool server: %s", line)
        log_path = os.path.join(self.pool_dir, "server.log")
        with open(log_path, "ab") as log_file:
            proc = subprocess.Popen([sys.executable, "-m", "thinpool.cli", "serve",
                                     self.pool_dir], stdin=subprocess.DEVNULL, stdout=log_file,
                                    stderr=log_file, start_new_session=True, close_fds=True)
        self._server = proc
        deadline = time.monotonic() + SERVER_START
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise Unavailable(f"the pool server for {self.pool_dir} did not start (see "
                                  f"{log_path})")
            if self._alive():
                return
            time.sleep(0.02)
        raise Unavailable(f"the pool server for {self.pool_dir} did not come up within "
                          f"{SERVER_START:g} s (see {log_path})")

    def _call(self, command: str, **args: Any) -> dict[str, Any]:
        """One control request; a dead server is started again once."""
        try:
            return self._request(command, args)
        except ConnectionError:
            self._ensure_server()
            self._attached.clear()  # a new server has nothing attached
            return self._request(command, args)

    def _request(self, command: str, args: dict[str, Any]) -> dict[str, Any]:
        try:
            return control.request(self.ctl, command, args)
        except control.RemoteError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT) or "ENOSPC" in str(e) or \
                    "no free" in str(e) or "out of" in str(e).lower():
                raise ResourceExhausted(f"pool {self.pool_dir}: {e}") from None
            raise

    # -- start and stop -----------------------------------------------------------------------
    def open(self, transaction: int | None) -> int | None:
        self._ensure_pool()
        self._ensure_server()
        status = self._call("status")["status"]
        pool_txn = int(status["transaction_id"])
        devices = {v["dev_id"] for v in self._call("list")["volumes"]}
        if transaction is None:
            if pool_txn != 0 or devices - {BASE}:
                raise FailedPrecondition(f"{self.pool_dir} holds thin devices (transaction "
                                         f"{pool_txn}) that no snapshot record knows: the "
                                         "records were lost or replaced; refusing to use it")
        elif pool_txn not in (transaction, transaction + 1):
            raise FailedPrecondition(f"the snapshot records are at pool transaction "
                                     f"{transaction} but {self.pool_dir} is at {pool_txn}: they "
                                     "do not belong together; refusing to use them")
        self._txn = pool_txn
        attached = self._call("server-info").get("attached", {})
        self._attached = {int(k): v for k, v in attached.items()}
        self._ensure_base(devices)
        return pool_txn

    def close(self) -> None:
        """Stop the pool server unless snapshots are still mounted from it."""
        try:
            pid = self._request("stop", {})["pid"]
        except ConnectionError:
            return
        except ThinpoolError as e:
            log.warning("leaving the pool server of %s running: %s", self.pool_dir, e)
            return
        deadline = time.monotonic() + SERVER_STOP
        while time.monotonic() < deadline:
            if self._server is not None and self._server.pid == pid:
                if self._server.poll() is not None:
                    return
            else:
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    return
            time.sleep(0.02)
        log.warning("the pool server (pid %d) did not stop within %g s", pid, SERVER_STOP)

    # -- the base device --------------------------------------------------------------------------
    def _state(self) -> dict[str, Any]:
        try:
            with open(os.path.join(self.root, STATE), encoding="utf-8") as f:
                state = json.load(f)
            return state if isinstance(state, dict) else {}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            raise FailedPrecondition(f"{os.path.join(self.root, STATE)} is unreadable: {e}") \
                from None

    def _ensure_base(self, devices: set[int]) -> None:
        state = self._state()
        if state.get("base_ready") and BASE in devices:
            self.fs = str(state.get("fs", self.fs))
            return
        if BASE in devices:  # a base a crash cut short
            log.warning("remaking the half-made base device of %s", self.pool_dir)
            if BASE in self._attached:
                self._detach(BASE)
            self._call("delete", id=BASE)
        self._call("create-thin", id=BASE, size=self.base_size, name="base")
        device = self._attach(BASE)
        try:
            self._mkfs(device)
            mp = tempfile.mkdtemp(prefix=".base-", dir=self.root)
            try:
                sysmount.mount(device, mp, self.fs, 0, "nouuid" if self.fs == "xfs" else "")
                try:
                    lost = os.path.join(mp, "lost+found")
                    if os.path.isdir(lost):
                        os.rmdir(lost)
                    os.chmod(mp, 0o755)
                finally:
                    sysmount.unmount(mp)
            finally:
                os.rmdir(mp)
        finally:
            self._detach(BASE)
        write_json_atomic(os.path.join(self.root, STATE), {
            "base_ready": True, "fs": self.fs, "base_size": self.base_size})

    def _mkfs(self, device: str) -> None:
        if self.fs == "ext4":
            cmd = ["mkfs.ext4", "-F", "-q", "-E", "nodiscard,assume_storage_prezeroed=1",
                   *self.mkfs_args, device]
        else:
            cmd = ["mkfs.xfs", "-f", "-q", "-K", *self.mkfs_args, device]
        if shutil.which(cmd[0]) is None:
            raise FailedPrecondition(f"{cmd[0]} is not installed")
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0 and self.fs == "ext4" and "assume_storage_prezeroed" in r.stderr:
            cmd[4] = "nodiscard,lazy_itable_init=0,lazy_journal_init=0"  # e2fsprogs < 1.47
            r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise FailedPrecondition(f"{' '.join(cmd)}: {(r.stderr or r.stdout).strip()}")

    # -- devices ------------------------------------------------------------------------------
    def _attach(self, dev: int) -> str:
        with self._lock:
            device = self._attached.get(dev)
            if device is None:
                device = str(self._call("attach", id=dev)["device"])
                self._attached[dev] = device
            return device

    def _detach(self, dev: int) -> None:
        with self._lock:
            device = self._attached.get(dev)
            if device is None:
                return
            self._call("detach", target=str(dev))
            del self._attached[dev]

    @property
    def transaction(self) -> int | None:
        return self._txn

    # -- the backend contract -----------------------------------------------------------------------
    def create(self, rec: Record, parents: list[Record]) -> None:
        """One pool request: the free-space check (``dm.min_free_space``), ``create_snap``
        with the transaction id swapped in its commit, and the attach ``mounts`` needs."""
        origin = parents[0].id if parents else BASE
        with self._lock:
            assert self._txn is not None
            try:
                r = self._call("create-snap", id=rec.id, origin_id=origin,
                               transaction=[self._txn, self._txn + 1],
                               min_free_percent=self.min_free, attach=True)
            except ResourceExhausted as e:
                raise ResourceExhausted(f"{e}; a new snapshot needs dm.min_free_space="
                                        f"{self.min_free}% free: remove snapshots or grow the "
                                        "pool ('thinpool pool resize')") from None
            except control.RemoteError:
                # the snapshot may have been made before its attach failed: follow the pool
                # (the core removes it again)
                if int(self._call("status")["status"]["transaction_id"]) == self._txn + 1:
                    self._txn += 1
                raise
            self._txn += 1
            self._attached[rec.id] = str(r["device"])

    def mounts(self, rec: Record, parents: list[Record]) -> list[Mount]:
        device = self._attach(rec.id)
        opts = list(self.mount_options)
        if rec.kind == VIEW:
            opts.insert(0, "ro")
        if self.fs == "xfs":
            opts.append("nouuid")
        return [Mount(self.fs, device, tuple(opts))]

    def check_idle(self, rec: Record) -> None:
        device = self._attached.get(rec.id)
        where = sysmount.mounts_of_device(device) if device else []
        if where:
            raise FailedPrecondition(f"snapshot {rec.key} ({device}) is mounted at "
                                     f"{', '.join(where)}; unmount it first")

    def commit(self, rec: Record, parents: list[Record]) -> Usage | None:
        """Detach the device; one still mounted (containerd allows a commit before the unmount)
        has its filesystem flushed and stays attached until ``release_idle`` finds it unmounted.
        The usage is counted when first asked for (it needs a pool commit and a walk of two
        mapping trees, and containerd seldom asks)."""
        with self._lock:
            device = self._attached.get(rec.id)
            where = sysmount.mounts_of_device(device) if device else []
            if where:
                for mp in where:
                    _flush_filesystem(mp)
            else:
                self._detach(rec.id)
        return None

    def release_idle(self, committed: set[int]) -> None:
        """Detach the devices of ``committed`` snapshots that nothing has mounted any more."""
        with self._lock:
            for sid in sorted(committed & set(self._attached)):
                if not sysmount.mounts_of_device(self._attached[sid]):
                    self._detach(sid)

    def usage(self, rec: Record, parents: list[Record]) -> Usage:
        parent = parents[0].id if parents else BASE
        r = self._call("layer-usage", layers=[[rec.id, parent]])
        return Usage(int(r["blocks"][0]) * int(r["block_size"]), 0)

    def remove(self, sid: int) -> None:
        with self._lock:
            if sid in self._attached:
                device = self._attached[sid]
                where = sysmount.mounts_of_device(device)
                if where:
                    raise FailedPrecondition(f"snapshot #{sid} ({device}) is mounted at "
                                             f"{', '.join(where)}; unmount it first")
                self._detach(sid)
            assert self._txn is not None
            try:
                self._call("delete", id=sid, transaction=[self._txn, self._txn + 1])
            except control.RemoteError as e:
                if "ENODATA" in str(e):
                    return  # never made, or already deleted
                if "EBUSY" in str(e):
                    raise FailedPrecondition(f"cannot remove snapshot #{sid}: its device is "
                                             f"busy ({e})") from None
                raise
            self._txn += 1

    def stored(self) -> set[int]:
        return {int(v["dev_id"]) for v in self._call("list")["volumes"]} - {BASE}
