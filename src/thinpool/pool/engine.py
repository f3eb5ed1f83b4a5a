"""The pool: a directory holding a data device, a metadata device and a volume registry.

``Pool`` opens the metadata (``PoolMetadata``) and the data device, hands
both to the data path (``block.DataPath``, which does volume I/O, allocation
and commits), and adds what lives above it:

* every message (create_thin, create_snap, delete, set_transaction_id,
  reserve/release_metadata_snap) is followed by a commit, like the kernel;
  device changes and their registry lines commit together (registry.py);
* a background thread commits at least once a second while dirty;
* status lines, resizing, the pool lock (one read-write opener per pool).

Thread safety: every method may be called from any thread.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shlex
import shutil
import stat
import subprocess
import threading
import time
from dataclasses import dataclass
from typing import Callable

from ..block.core import DataPath, DataPolicy
from ..block.device import ThinDevice
from ..errors import DeviceError, MetadataError, NoMetadataSpaceError, ThinpoolError
from ..ondisk.checksum import BLOCK_SIZE
from ..ondisk.superblock import MAX_METADATA_BLOCKS
from ..ondisk.values import MAX_DEVICE_ID
from ..outputs import same_path
from ..pdata.blockio import device_size
from ..thin.builder import format_metadata
from ..thin.metadata import PoolMetadata, check_device_id
from ..thin.reader import probe_superblock
from .config import SECTOR, PoolConfig, check_data_blocks, check_volume_size, parse_size
from .locks import PoolLock
from .registry import BASE, JOURNAL, Registry, VolumeRecord, write_json_atomic

log = logging.getLogger("thinpool.pool")

CONFIG = "pool.json"
DATA = "data"
METADATA = "metadata"
COMMIT_PERIOD = 1.0


class PoolError(ThinpoolError):
    pass


@dataclass(frozen=True)
class PoolStatus:
    transaction_id: int
    used_metadata: int
    total_metadata: int
    used_data: int
    total_data: int
    held_root: int
    mode: str  # rw | ro | out_of_data_space
    discard: str
    no_space: str
    needs_check: bool
    metadata_low_watermark: int

    def line(self) -> str:
        return (f"{self.transaction_id} {self.used_metadata}/{self.total_metadata} "
                f"{self.used_data}/{self.total_data} {self.held_root or '-'} {self.mode} "
                f"{self.discard} {self.no_space} {'needs_check' if self.needs_check else '-'} "
                f"{self.metadata_low_watermark}")


@dataclass(frozen=True)
class ThinStatus:
    mapped_sectors: int
    highest_mapped_sector: int | None

    def line(self) -> str:
        high = "-" if self.highest_mapped_sector is None else str(self.highest_mapped_sector)
        return f"{self.mapped_sectors} {high}"


@dataclass(frozen=True)
class VolumeInfo:
    dev_id: int
    size: int
    name: str | None
    origin: str | None
    mapped_blocks: int
    creation_time: int
    snapshotted_time: int
    transaction_id: int
    snapshot_of: int | None  # the volume it was snapshotted from (None: not recorded)


def _is_pool_dir(directory: str) -> bool:
    return os.path.isfile(os.path.join(directory, CONFIG))


class Pool:
    """An open pool.  Use as a context manager; ``close`` commits."""

    # -- creation ---------------------------------------------------------------------
    @classmethod
    def create(cls, directory: str, data_size: int | str = "100G",
               metadata_size: int | str = "2G", config: PoolConfig | None = None,
               data_dev: str | None = None, metadata_dev: str | None = None,
               create_devices: bool = False, format: bool = False) -> str:
        """Make DIRECTORY a pool; returns one line saying what was done.

        Without ``data_dev``/``metadata_dev`` the pool gets sparse DIR/data and
        DIR/metadata of the given sizes.  Given devices or files must exist,
        unless ``create_devices`` (a ``--table`` line) asks to create missing
        ones as sparse files of the given sizes.  Like the kernel, metadata is
        formatted only when its superblock block is all zeros; valid dm-thin
        metadata is used as it is (its devices and mappings stay), and any
        other content is refused.  ``format`` formats over whatever is there.

        Everything is validated before anything is created; if the command
        fails, the files and directory it created are removed again.
        """
        config = config or PoolConfig()
        bs = config.block_size
        if _is_pool_dir(directory):
            raise PoolError(f"{directory} already holds a pool")
        data_path = os.path.abspath(data_dev) if data_dev else os.path.join(directory, DATA)
        meta_path = os.path.abspath(metadata_dev) if metadata_dev else os.path.join(directory, METADATA)
        if same_path(data_path, meta_path):
            raise PoolError("Error setting metadata or data device: they must differ")
        new_files: dict[str, int] = {}
        for path, size, given in ((data_path, data_size, data_dev), (meta_path, metadata_size,
                                                                     metadata_dev)):
            if given is None or (create_devices and not os.path.lexists(path)):
                new_files[path] = parse_size(size)
            elif not os.path.exists(path):
                raise PoolError(f"{path}: no such file or device")
        if data_path in new_files:
            nr = new_files[data_path] // bs
            if nr < 1:
                raise PoolError(f"data size {new_files[data_path]} is smaller than one {bs}-byte "
                                "block")
            check_data_blocks(nr, bs)
        if meta_path in new_files:
            _check_metadata_size(new_files[meta_path])
        created: list[str] = []
        made_dir = not os.path.isdir(directory)
        try:
            os.makedirs(directory, exist_ok=True)
            for path, size in new_files.items():
                with open(path, "xb") as f:
                    created.append(path)
                    f.truncate(size)
            what = _prepare_metadata(meta_path, data_path, config, format)
            write_json_atomic(os.path.join(directory, CONFIG), {
                "data": data_path if data_dev else DATA,
                "metadata": meta_path if metadata_dev else METADATA,
                "config": json.loads(config.to_json())})
        except BaseException:
            for path in created:
                os.unlink(path)
            if made_dir:
                shutil.rmtree(directory, ignore_errors=True)
            raise
        return what

    # -- opening ------------------------------------------------------------------------
    def __init__(self, directory: str, read_only: bool = False) -> None:
        self.directory = os.path.abspath(directory)
        if not _is_pool_dir(self.directory):
            raise PoolError(f"{directory} is not a thinpool pool directory (no {CONFIG})")
        try:
            with open(os.path.join(self.directory, CONFIG), encoding="utf-8") as f:
                raw = json.load(f)
            self.config = PoolConfig.from_json(json.dumps(raw["config"]))
            self.data_path = os.path.join(self.directory, raw["data"])
            self.meta_path = os.path.join(self.directory, raw["metadata"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise PoolError(f"pool configuration {CONFIG} in {directory} is unreadable: {e}") from None
        self.read_only = read_only or self.config.read_only
        self._lock_file = None if self.read_only else PoolLock(self.directory)
        self._closed = False
        data_fd = -1
        try:
            self.md = PoolMetadata(self.meta_path, read_only=self.read_only)
            if self.md.data_block_size != self.config.data_block_sectors:
                raise PoolError("changing the data block size is not supported "
                                f"({self.md.data_block_size} != {self.config.data_block_sectors})")
            data_fd = os.open(self.data_path, (os.O_RDONLY if self.read_only else os.O_RDWR)
                              | os.O_CLOEXEC)
            self.registry = Registry(self.directory)
            self.registry.load(set(self.md.device_ids()), writable=not self.read_only)
        except BaseException:
            if data_fd >= 0:
                os.close(data_fd)
            if hasattr(self, "md"):
                self.md.close()
            self._release_lock()
            raise
        self.block_size = self.config.block_size
        c = self.config
        self.dp = DataPath(
            self.md, data_fd, stat.S_ISREG(os.fstat(data_fd).st_mode),
            DataPolicy(block_size=c.block_size, skip_block_zeroing=c.skip_block_zeroing,
                       ignore_discard=c.ignore_discard,
                       discard_passdown=not c.no_discard_passdown,
                       error_if_no_space=c.error_if_no_space, no_space_timeout=c.no_space_timeout,
                       low_water_mark=c.low_water_mark),
            read_only=self.read_only, on_low_water=self._low_water)
        if self.config.read_only:
            self.dp.mode = "ro"
        if self.md.needs_check and not self.read_only:
            log.warning("pool %s needs_check is set: opened read-only", directory)
        self._stop = threading.Event()
        self._committer: threading.Thread | None = None
        if not self.read_only:
            self._committer = threading.Thread(target=self._commit_loop, daemon=True,
                                               name="thinpool-commit")
            self._committer.start()

    @property
    def data_fd(self) -> int:
        return self.dp.data_fd

    @property
    def mode(self) -> str:
        return self.dp.mode

    @property
    def space_waits(self) -> int:
        return self.dp.space_waits

    def _release_lock(self) -> None:
        if self._lock_file is not None:
            self._lock_file.release()
            self._lock_file = None

    def __enter__(self) -> Pool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Commit and release everything; volumes still open are closed with the pool."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        if self._committer is not None:
            self._committer.join()
        try:
            if not self.read_only:
                self.commit()
        finally:
            os.close(self.dp.data_fd)
            self.md.close()
            self._release_lock()

    # -- commits -------------------------------------------------------------------------
    def _commit_loop(self) -> None:
        while not self._stop.wait(COMMIT_PERIOD):
            if self.md.dirty:
                try:
                    self.commit()
                except ThinpoolError as e:  # the pool is read-only now; keep serving reads
                    log.error("periodic commit failed: %s", e)

    def commit(self) -> None:
        """Make everything written so far durable (FLUSH semantics)."""
        self.dp.commit()

    # -- registry-tracked device changes ----------------------------------------------------
    def _device_change(self, change: Callable[[], None], kind: str, dev_id: int,
                       record: VolumeRecord | None = None, quiesce: int | None = None,
                       transaction: tuple[int, int] | None = None) -> None:
        """Apply a metadata change and its registry line as one commit.

        Earlier writes commit first; then, with nothing changing mappings
        (and no I/O on ``quiesce``, a snapshot's origin), the change is made,
        its registry line synced, and the metadata committed: the commit
        point of both (registry.py).  The transaction id is left alone unless
        ``transaction`` (old, new) asks to swap it in the same commit (what a
        ``set_transaction_id`` message right after would do, in one commit).
        """
        self._require_writable()
        dp = self.dp
        with dp.quiesced(quiesce):
            dp.commit_gated()
            with dp.md_lock:
                if transaction is not None:
                    old, new = transaction
                    if old != self.md.trans_id:
                        raise DeviceError("EINVAL", f"transaction id mismatch: current is "
                                                    f"{self.md.trans_id}, not {old}")

                    def change_and_swap(change: Callable[[], None] = change) -> None:
                        change()
                        self.md.set_transaction_id(old, new)
                    change = change_and_swap
                self._change_metadata(change)
            self.registry.prepare(kind, dev_id, record)
            try:
                dp.commit_gated()
            except BaseException:
                self.registry.rollback()
                raise
            self.registry.finish()

    def _change_metadata(self, change: Callable[[], None]) -> None:
        """Run a metadata change (md_lock held); on failure the transaction is rolled back."""
        try:
            change()
        except NoMetadataSpaceError:
            raise self.dp.metadata_exhausted() from None
        except MetadataError as e:
            raise self.dp.metadata_failed(e) from None
        except BaseException:
            self.dp.abort()
            raise

    def _require_writable(self) -> None:
        if self.read_only:
            raise PoolError(f"pool {self.directory} is open read-only")
        if self.dp.mode == "ro":
            raise DeviceError("EOPNOTSUPP", "pool is in read-only mode"
                              + (" (needs_check is set)" if self.md.needs_check else ""))

    def _default_size(self) -> int:
        return self.md.nr_data_blocks * self.block_size

    def _check_name(self, name: str | None) -> None:
        if name is None:
            return
        if not name or name.isdigit() or len(name) > 255 or "/" in name or \
                not name.isprintable() or name != name.strip():
            raise PoolError(f"invalid volume name {name!r}: 1-255 printable characters, no "
                            "'/', no leading or trailing spaces, not all digits (ids are)")
        for dev_id, rec in self.registry.volumes.items():
            if rec.name == name:
                raise PoolError(f"volume name {name!r} is already used by volume {dev_id}")

    def create_thin(self, dev_id: int, size: int | None = None, name: str | None = None,
                    origin: str | None = None) -> None:
        check_device_id(dev_id)
        if size is not None:
            check_volume_size(size)
        self._check_name(name)
        if origin is not None:
            origin = os.path.abspath(origin)
            try:
                origin_size = _size_of(origin)
            except OSError as e:
                raise PoolError(f"external origin {origin}: {e.strerror}") from None
            size = size or check_volume_size(origin_size + (-origin_size % SECTOR))
        record = VolumeRecord(size or self._default_size(), name, origin, time.time())
        self._device_change(lambda: self.md.create_thin(dev_id), "create", dev_id, record)

    def create_snap(self, dev_id: int, origin_id: int, name: str | None = None,
                    transaction: tuple[int, int] | None = None) -> None:
        """Snapshot ``origin_id`` as ``dev_id``; the registry records which volume it came from.

        Writes in flight on the origin finish first and new ones wait (the
        kernel's "suspend the origin"), so the snapshot holds every write
        acknowledged before it.  ``transaction`` (old, new) swaps the pool's
        transaction id in the same commit.
        """
        check_device_id(dev_id)
        check_device_id(origin_id)
        self._check_name(name)
        parent = self.registry.volumes.get(origin_id) or VolumeRecord(self._default_size())
        record = VolumeRecord(parent.size, name, parent.origin, time.time(), origin_id)
        self._device_change(lambda: self.md.create_snap(dev_id, origin_id), "create", dev_id,
                            record, quiesce=origin_id, transaction=transaction)

    def delete(self, dev_id: int, transaction: tuple[int, int] | None = None,
               discard: bool = False) -> None:
        """Delete thin device ``dev_id``; ``transaction`` (old, new) swaps the pool's
        transaction id in the same commit.

        With ``discard`` the data blocks the deletion frees are discarded too (punched once
        the deletion is committed, unless the pool has ``no_discard_passdown`` or
        ``ignore_discard``): what discarding the whole device before deleting it does
        (Docker's ``dm.blkdiscard``), at the cost of the blocks only this device held
        rather than of every block it maps.
        """
        check_device_id(dev_id)
        if self.dp.is_open(dev_id):
            raise DeviceError("EBUSY", f"thin device {dev_id} is open")
        passdown = discard and not self.dp.policy.ignore_discard

        def change() -> None:
            freed = self.md.delete(dev_id)
            if passdown:
                self.dp.note_unmapped(freed)
        self._device_change(change, "delete", dev_id, transaction=transaction)

    def resize_volume(self, dev_id: int, size: int) -> None:
        """Grow a volume's virtual size (dm-thin keeps sizes in the thin table; the registry
        here); never shrinks.  Durable when this returns."""
        self._require_writable()
        check_volume_size(size)
        record = self.volume_record(dev_id)
        if size < record.size:
            raise PoolError(f"volume {dev_id} is {record.size} bytes; it cannot shrink to {size}")
        if size == record.size:
            return
        with self.dp.quiesced():  # registry lines are written one change at a time
            self.registry.update(dev_id, dataclasses.replace(record, size=size))
            self.dp.set_device_size(dev_id, size)

    def set_transaction_id(self, old: int, new: int) -> None:
        """Compare-and-swap of the pool's transaction id (the kernel's message), committed."""
        self._require_writable()
        dp = self.dp
        with dp.quiesced():
            dp.commit_gated()
            with dp.md_lock:
                if old != self.md.trans_id:
                    raise DeviceError("EINVAL", f"transaction id mismatch: current is "
                                                f"{self.md.trans_id}, not {old}")
                self._change_metadata(lambda: self.md.set_transaction_id(old, new))
            dp.commit_gated()

    def reserve_metadata_snap(self) -> int:
        self._require_writable()
        dp = self.dp
        with dp.quiesced():
            dp.commit_gated()
            with dp.md_lock:
                held: list[int] = []
                self._change_metadata(lambda: held.append(self.md.reserve_metadata_snap()))
            dp.commit_gated()
            return held[0]

    def release_metadata_snap(self) -> None:
        self._require_writable()
        dp = self.dp
        with dp.quiesced():
            with dp.md_lock:
                self._change_metadata(self.md.release_metadata_snap)
            dp.commit_gated()

    def message(self, text: str) -> None:
        """Execute a kernel pool message (``dmsetup message <pool> 0 <text>``)."""
        words = text.split()
        if not words:
            raise DeviceError("EINVAL", "empty pool message")
        verb, args = words[0], words[1:]
        arity = {"create_thin": 1, "create_snap": 2, "delete": 1, "set_transaction_id": 2,
                 "reserve_metadata_snap": 0, "release_metadata_snap": 0}
        if verb not in arity:
            raise DeviceError("EINVAL", f"Unrecognised thin pool target message received: {verb}")
        if len(args) != arity[verb]:
            raise DeviceError("EINVAL", f"{verb} takes {arity[verb]} argument(s), got {len(args)}")
        if verb in ("create_thin", "create_snap", "delete"):
            ids = [_parse_dev_id(a) for a in args]
            if verb == "create_thin":
                self.create_thin(ids[0])
            elif verb == "create_snap":
                self.create_snap(ids[0], ids[1])
            else:
                self.delete(ids[0])
        elif verb == "set_transaction_id":
            old, new = (_parse_u64(a) for a in args)
            self.set_transaction_id(old, new)
        elif verb == "reserve_metadata_snap":
            self.reserve_metadata_snap()
        else:
            self.release_metadata_snap()

    # -- information ------------------------------------------------------------------------
    def volume_record(self, dev_id: int) -> VolumeRecord:
        check_device_id(dev_id)
        with self.dp.md_lock:
            if not self.md.exists(dev_id):
                raise DeviceError("ENODATA", f"thin device {dev_id} does not exist")
        return self.registry.volumes.get(dev_id) or VolumeRecord(self._default_size())

    def files(self) -> list[str]:
        """Every file this pool keeps or reads; a command's output must not be one of them."""
        own = [self.data_path, self.meta_path] + [os.path.join(self.directory, name) for name in
                                                  (CONFIG, "lock", BASE, JOURNAL)]
        return own + sorted({r.origin for r in self.registry.volumes.values() if r.origin})

    def list_volumes(self) -> list[VolumeInfo]:
        with self.dp.md_lock:
            out = []
            for dev_id in self.md.device_ids():
                d = self.md.details(dev_id)
                rec = self.registry.volumes.get(dev_id) or VolumeRecord(self._default_size())
                out.append(VolumeInfo(dev_id, rec.size, rec.name, rec.origin, d.mapped_blocks,
                                      d.creation_time, d.snapshotted_time, d.transaction_id,
                                      rec.snapshot_of))
            return out

    def status(self) -> PoolStatus:
        """The kernel's pool status (after a commit, as the kernel does by default)."""
        if not self.read_only:
            self.commit()
        dp = self.dp
        with dp.md_lock:
            msm = self.md.tm.sm
            if self.config.ignore_discard:
                discard = "ignore_discard"
            elif self.config.no_discard_passdown:
                discard = "no_discard_passdown"
            else:
                discard = "discard_passdown"
            return PoolStatus(
                self.md.trans_id, min(msm.nr_allocated + dp.meta_reserve, msm.nr_blocks),
                msm.nr_blocks, self.md.data_sm.nr_allocated, self.md.nr_data_blocks,
                self.md.held_root, dp.mode,
                discard, "error_if_no_space" if self.config.error_if_no_space else "queue_if_no_space",
                self.md.needs_check, min(1024, msm.nr_blocks // 4))

    def thin_status(self, dev_id: int) -> ThinStatus:
        with self.dp.md_lock:
            d = self.md.details(check_device_id(dev_id))
            highest = self.md.highest_mapped(dev_id)
        sectors = self.config.data_block_sectors
        return ThinStatus(d.mapped_blocks * sectors,
                          None if highest is None else (highest + 1) * sectors - 1)

    # -- growing -------------------------------------------------------------------------------
    def resize(self, data_size: int | str | None = None,
               metadata_size: int | str | None = None) -> None:
        """Grow the data and/or metadata device (never shrink); wakes waiting writers.

        Both sizes are validated before either device changes.
        """
        self._require_writable_for_resize()
        dp = self.dp
        nr_data = nr_meta = None
        if data_size is not None:
            data_bytes = parse_size(data_size)
            nr_data = check_data_blocks(data_bytes // self.block_size, self.block_size)
            if nr_data < self.md.nr_data_blocks:
                raise PoolError(f"cannot shrink the data device ({self.md.nr_data_blocks} -> "
                                f"{nr_data} blocks)")
            if not dp.data_is_file and _size_of(self.data_path) < data_bytes:
                raise PoolError("the data block device is smaller than the requested size")
        if metadata_size is not None:
            meta_bytes = parse_size(metadata_size)
            _check_metadata_size(meta_bytes)
            nr_meta = meta_bytes // BLOCK_SIZE
            if nr_meta < self.md.tm.sm.nr_blocks:
                raise PoolError("cannot shrink the metadata device")
        if nr_data is not None:
            if dp.data_is_file and _size_of(self.data_path) < data_bytes:
                os.truncate(self.data_path, data_bytes)
            with dp.md_lock:
                self._change_metadata(lambda: self.md.resize_data(nr_data))
                if dp.mode == "out_of_data_space":
                    dp.mode = "rw"
        if nr_meta is not None:
            if _size_of(self.meta_path) < meta_bytes:
                os.truncate(self.meta_path, meta_bytes)
            with dp.md_lock:
                self._change_metadata(lambda: self.md.resize_metadata(nr_meta))
                dp.meta_reserve = min(4096, nr_meta // 10)
                if dp.mode == "ro" and not self.md.needs_check:
                    dp.mode = "rw"
        dp.space_changed()
        self.commit()

    def _require_writable_for_resize(self) -> None:
        if self.read_only:
            raise PoolError(f"pool {self.directory} is open read-only")
        if self.md.needs_check:
            raise PoolError("cannot resize: needs_check is set (run thinpool check/repair)")

    def _low_water(self, free: int) -> None:
        if self.config.low_water_hook:
            env = dict(os.environ, THINPOOL_DIR=self.directory, THINPOOL_FREE_BLOCKS=str(free))
            subprocess.Popen(shlex.split(self.config.low_water_hook), env=env,
                             stdin=subprocess.DEVNULL)

    # -- volumes ---------------------------------------------------------------------------------
    def volume(self, dev_id: int) -> ThinDevice:
        """A handle on a volume for I/O (close it, or use it as a context manager)."""
        record = self.volume_record(dev_id)
        return self.dp.open_device(dev_id, record.size, record.origin)


def _check_metadata_size(size: int) -> None:
    if size < 64 * BLOCK_SIZE:
        raise PoolError(f"metadata size {size} is too small (at least 256 KiB)")
    if size > MAX_METADATA_BLOCKS * BLOCK_SIZE:
        raise PoolError(f"metadata size {size} is beyond dm-thin's limit of "
                        f"{MAX_METADATA_BLOCKS * BLOCK_SIZE} bytes ({MAX_METADATA_BLOCKS} blocks "
                        "of 4 KiB, about 15.9 GiB)")


def _prepare_metadata(meta_path: str, data_path: str, config: PoolConfig, format: bool) -> str:
    """Format blank (or, with ``format``, any) metadata; check and adopt valid metadata."""
    bs = config.block_size
    nr_data = check_data_blocks(_size_of(data_path) // bs, bs)
    if nr_data < 1:
        raise PoolError(f"data device {data_path} is smaller than one {bs}-byte block")
    meta_bytes = _size_of(meta_path)
    if meta_bytes < 64 * BLOCK_SIZE:
        raise PoolError(f"metadata device {meta_path} is too small (at least 256 KiB)")
    sb = None
    if not format:
        try:
            sb = probe_superblock(meta_path)
        except MetadataError as e:
            raise PoolError(f"metadata device {meta_path} holds something that is not valid "
                            f"dm-thin metadata ({e}); use --format to overwrite it") from None
    if sb is None:
        if config.read_only:
            raise PoolError("read_only cannot be used to create a pool on blank metadata")
        format_metadata(meta_path, config.data_block_sectors, nr_data)
        return "formatted new metadata"
    if sb.data_block_size != config.data_block_sectors:
        raise PoolError(f"the metadata on {meta_path} uses {sb.data_block_size}-sector data "
                        f"blocks, not {config.data_block_sectors} (changing the data block size "
                        "is not supported)")
    with PoolMetadata(meta_path, read_only=config.read_only) as md:
        if nr_data < md.nr_data_blocks:
            raise PoolError(f"data device {data_path} holds {nr_data} blocks, less than the "
                            f"{md.nr_data_blocks} that its metadata records")
        devices = len(md.device_ids())
        if nr_data > md.nr_data_blocks and not config.read_only:
            md.resize_data(nr_data)
            md.commit()
        return (f"using the existing dm-thin metadata on {meta_path}: {devices} thin devices, "
                f"transaction {md.trans_id}, {md.nr_data_blocks} data blocks "
                "(pass --format to start empty instead)")


def _size_of(path: str) -> int:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return device_size(fd)
    finally:
        os.close(fd)


def _parse_dev_id(text: str) -> int:
    if not (text.isascii() and text.isdigit()):
        raise DeviceError("EINVAL", f"Invalid device id: {text!r}")
    value = int(text)
    if value > MAX_DEVICE_ID:
        raise DeviceError("EINVAL", f"Invalid device id: {text} (must be 0..{MAX_DEVICE_ID})")
    return value


def _parse_u64(text: str) -> int:
    if not (text.isascii() and text.isdigit()) or int(text) >= 2 ** 64:
        raise DeviceError("EINVAL", f"Invalid transaction id: {text!r}")
    return int(text)
