"""Pool metadata: thin devices, their mappings, snapshots and commits.

The equivalent of the kernel's dm-thin-metadata: a superblock, a device
details tree (id -> DeviceDetails) and a two-level mapping tree
(id -> bottom tree root; virtual block -> data block and time), all in the
kernel's on-disk format, changed copy-on-write inside a transaction and made
durable by ``commit``.

Sharing rule: each mapping carries the pool ``time`` at which it was made;
``create_snap`` shares the origin's whole tree and bumps ``time``, so a
mapping older than its device's ``snapshotted_time`` may be shared and must be
copied before it is written (``Mapping.shared``).

Reference counts follow the kernel: a data block counts once per distinct
bottom-level leaf that maps it; a metadata block once per reference.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Any, NamedTuple, Sequence
import numpy as np

from ..errors import DeviceError, MetadataError, ThinpoolError
from ..ondisk.checksum import Salt
from ..ondisk.node import DEVICE_DETAILS, INDEX_ENTRY, U32, U64
from ..ondisk.superblock import NEEDS_CHECK, Superblock
from ..ondisk.values import MAX_DEVICE_ID, DeviceDetails, pack_block_time, unpack_block_time
from ..pdata.block_manager import BlockManager
from ..pdata.blockio import FileBlockIO
from ..pdata.btree import BTree, PlainValue
from ..pdata.space_map import DataSpaceMap, MetadataSpaceMap
from ..pdata.transaction import TransactionManager
from .reader import read_superblock


class Mapping(NamedTuple):
    data_block: int
    time: int
    shared: bool

    @classmethod
    def decode(cls, value: int, snapshotted_time: int) -> Mapping:
        """A bottom-level leaf value; shared when older than the device's last snapshot."""
        block, time = unpack_block_time(value)
        return cls(block, time, time < snapshotted_time)


class _DataBlockValue:
    """Bottom-level leaf values reference data blocks; ``freed``, when set, collects the data
    blocks whose last reference goes."""

    codec = U64

    def __init__(self, sm: DataSpaceMap) -> None:
        self.sm = sm
        self.freed: list[int] | None = None

    def inc(self, value: int) -> None:
        self.sm.inc(value >> 24)

    def inc_all(self, values: list[int]) -> None:
        if len(values) < 16:  # numpy's set-up costs more than a few increments
            for v in values:
                self.sm.inc(v >> 24)
        else:
            self.sm.inc_many(np.array(values, dtype=np.uint64) >> np.uint64(24))

    def dec(self, value: int) -> None:
        if self.sm.dec(value >> 24) == 0 and self.freed is not None:
            self.freed.append(value >> 24)


class _SubtreeValue:
    """Top-level leaf values reference a device's bottom-level tree."""

    codec = U64

    def __init__(self, tm: TransactionManager, bottom: BTree) -> None:
        self.tm = tm
        self.bottom = bottom

    def inc(self, value: int) -> None:
        self.tm.sm.inc(value)

    def inc_all(self, values: list[int]) -> None:
        for v in values:
            self.tm.sm.inc(v)

    def dec(self, value: int) -> None:
        self.bottom.release(value)


@dataclass
class _Device:
    details: DeviceDetails
    root: int
    changed: bool = False


def check_device_id(dev_id: Any) -> int:
    if not isinstance(dev_id, int) or not 0 <= dev_id <= MAX_DEVICE_ID:
        raise DeviceError("EINVAL", f"invalid device id {dev_id!r} (must be 0..{MAX_DEVICE_ID})")
    return dev_id


class PoolMetadata:
    """Open pool metadata; all changes form one transaction until ``commit``."""

    def __init__(self, path: str | os.PathLike[str], read_only: bool = False,
                 max_cached: int = 8192) -> None:
        self.path = os.fspath(path)
        self.read_only = read_only
        self.bm = BlockManager(FileBlockIO(path, writable=not read_only), max_cached=max_cached)
        try:
            self._load()
        except BaseException:
            self.bm.close()
            raise

    def _load(self) -> None:
        sb = read_superblock(self.bm, 0)
        if sb.incompat_flags:
            raise MetadataError(f"unsupported incompatible features {sb.incompat_flags:#x}")
        if sb.compat_ro_flags and not self.read_only:
            raise MetadataError(f"features {sb.compat_ro_flags:#x} allow read-only use only")
        self.sb = sb
        self.tm = tm = TransactionManager(self.bm)
        tm.sm = MetadataSpaceMap(tm, sb.metadata_sm, BTree(tm, PlainValue(U32), "metadata overflow"))
        self.data_sm = DataSpaceMap(tm, sb.data_sm, BTree(tm, PlainValue(INDEX_ENTRY), "data index"),
                                    BTree(tm, PlainValue(U32), "data overflow"))
        self._data_values = _DataBlockValue(self.data_sm)
        self.bottom = BTree(tm, self._data_values, "mapping tree")
        self.top = BTree(tm, _SubtreeValue(tm, self.bottom), "top-level mapping tree")
        self.details_tree = BTree(tm, PlainValue(DEVICE_DETAILS), "device details tree")
        self.time = sb.time
        self.trans_id = sb.trans_id
        self.held_root = sb.held_root
        self.flags = sb.flags
        self.mapping_root = sb.data_mapping_root
        self.details_root = sb.device_details_root
        self._devices: dict[int, _Device] = {}
        self._top_shadowed: set[int] = set()  # devices whose top-level path is ours this txn
        self.dirty = False

    def close(self) -> None:
        self.bm.close()

    def __enter__(self) -> PoolMetadata:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- properties -----------------------------------------------------------------
    @property
    def data_block_size(self) -> int:
        return self.sb.data_block_size

    @property
    def nr_data_blocks(self) -> int:
        return self.data_sm.nr_blocks

    @property
    def needs_check(self) -> bool:
        return bool(self.flags & NEEDS_CHECK)

    def _writable(self) -> None:
        if self.read_only:
            raise ThinpoolError("metadata is open read-only")
        self.dirty = True

    # -- devices ----------------------------------------------------------------------
    def _device(self, dev_id: int) -> _Device | None:
        dev = self._devices.get(dev_id)
        if dev is None:
            details = self.details_tree.lookup(self.details_root, dev_id)
            if details is None:
                return None
            root = self.top.lookup(self.mapping_root, dev_id)
            if root is None:
                raise MetadataError(f"device {dev_id} has details but no mapping tree")
            dev = self._devices[dev_id] = _Device(DeviceDetails(*details), root)
        return dev

    def _require(self, dev_id: int) -> _Device:
        dev = self._device(check_device_id(dev_id))
        if dev is None:
            raise DeviceError("ENODATA", f"thin device {dev_id} does not exist")
        return dev

    def exists(self, dev_id: int) -> bool:
        return self._device(check_device_id(dev_id)) is not None

    def device_ids(self) -> list[int]:
        ids = {k for k, _ in self.details_tree.items(self.details_root)}
        return sorted(ids)

    def details(self, dev_id: int) -> DeviceDetails:
        return self._require(dev_id).details

    def create_thin(self, dev_id: int) -> None:
        self._writable()
        if self._device(check_device_id(dev_id)) is not None:
            raise DeviceError("EEXIST", f"thin device {dev_id} already exists")
        root = self.bottom.create()
        self.mapping_root, _ = self.top.insert(self.mapping_root, dev_id, root)
        self._devices[dev_id] = _Device(DeviceDetails(0, self.trans_id, self.time, self.time),
                                        root, changed=True)

    def create_snap(self, dev_id: int, origin_id: int) -> None:
        self._writable()
        if self._device(check_device_id(dev_id)) is not None:
            raise DeviceError("EEXIST", f"thin device {dev_id} already exists")
        origin = self._device(check_device_id(origin_id))
        if origin is None:
            raise DeviceError("ENODATA", f"origin thin device {origin_id} does not exist")
        self.tm.sm.inc(origin.root)
        self.mapping_root, _ = self.top.insert(self.mapping_root, dev_id, origin.root)
        self.time += 1
        origin.details = origin.details._replace(snapshotted_time=self.time)
        origin.changed = True
        self._devices[dev_id] = _Device(
            DeviceDetails(origin.details.mapped_blocks, self.trans_id, self.time, self.time),
            origin.root, changed=True)

    def delete(self, dev_id: int) -> list[int]:
        """Delete a thin device; the data blocks only it referenced (now free), in the order
        they were freed.  Shared mapping subtrees are not walked."""
        self._writable()
        self._require(dev_id)
        freed: list[int] = []
        self._data_values.freed = freed
        try:
            self.mapping_root, _ = self.top.remove(self.mapping_root, dev_id)
        finally:
            self._data_values.freed = None
        self.details_root, _ = self.details_tree.remove(self.details_root, dev_id)
        del self._devices[dev_id]
        return freed

    def set_transaction_id(self, old: int, new: int) -> None:
        self._writable()
        if old != self.trans_id:
            raise DeviceError("EINVAL", f"transaction id mismatch: current is {self.trans_id}, "
                                        f"not {old}")
        if not 0 <= new < 2 ** 64:
            raise DeviceError("EINVAL", f"transaction id {new} out of range")
        self.trans_id = new

    # -- metadata snapshot ------------------------------------------------------------
    def reserve_metadata_snap(self) -> int:
        """Commit, then hold a read-only copy of the committed metadata."""
        self._writable()
        if self.held_root:
            raise DeviceError("EBUSY", f"a metadata snapshot is already held (block {self.held_root})")
        self.commit()
        self.dirty = True
        copy_at = self.tm.new_block()
        self.bm.write(copy_at, self.sb.snapshot_copy(copy_at).pack(), Salt.SUPERBLOCK)
        self.tm.sm.inc(self.sb.data_mapping_root)
        self.tm.sm.inc(self.sb.device_details_root)
        self.held_root = copy_at
        return copy_at

    def release_metadata_snap(self) -> None:
        self._writable()
        if not self.held_root:
            raise DeviceError("EINVAL", "no metadata snapshot is held")
        copy = read_superblock(self.bm, self.held_root)
        self.top.release(copy.data_mapping_root)
        self.details_tree.release(copy.device_details_root)
        self.tm.sm.dec(self.held_root)
        self.held_root = 0

    # -- mappings ---------------------------------------------------------------------
    def lookup(self, dev_id: int, vblock: int) -> Mapping | None:
        dev = self._require(dev_id)
        value = self.bottom.lookup(dev.root, vblock)
        if value is None:
            return None
        return Mapping.decode(value, dev.details.snapshotted_time)

    def insert(self, dev_id: int, vblock: int, data_block: int) -> None:
        """Map ``vblock`` to ``data_block`` (whose reference the mapping takes over)."""
        self.insert_many(dev_id, ((vblock, data_block),))

    def insert_many(self, dev_id: int, pairs: Sequence[tuple[int, int]]) -> None:
        """Map each (vblock, data block) of sorted, distinct vblocks, as ``insert`` does."""
        self._writable()
        dev = self._own_top_path(dev_id)
        t = self.time
        root, new = self.bottom.insert_many(dev.root, [(v, pack_block_time(d, t)) for v, d in pairs])
        self._set_root(dev_id, dev, root)
        if new:
            dev.details = dev.details._replace(mapped_blocks=dev.details.mapped_blocks + new)
            dev.changed = True

    def remove(self, dev_id: int, vblock: int) -> bool:
        """Unmap ``vblock``; True if it was mapped."""
        self._writable()
        dev = self._own_top_path(dev_id)
        root, old = self.bottom.remove(dev.root, vblock)
        if old is None:
            return False
        self._set_root(dev_id, dev, root)
        dev.details = dev.details._replace(mapped_blocks=dev.details.mapped_blocks - 1)
        dev.changed = True
        return True

    def _own_top_path(self, dev_id: int) -> _Device:
        """Shadow the top-level path to a device before changing its mapping tree.

        If the top-level tree is shared (a held metadata snapshot), shadowing it
        gives the device's subtree root its second reference, so the subtree
        itself is then shadowed, not changed in place under the snapshot.
        """
        dev = self._require(dev_id)
        if dev_id not in self._top_shadowed:
            self.mapping_root = self.top.update(self.mapping_root, dev_id, dev.root)
            self._top_shadowed.add(dev_id)
        return dev

    def _set_root(self, dev_id: int, dev: _Device, root: int) -> None:
        if root != dev.root:
            dev.root = root
            self.mapping_root = self.top.update(self.mapping_root, dev_id, root)

    def mappings(self, dev_id: int, lo: int = 0, hi: int | None = None):
        """(virtual block, Mapping) pairs in [lo, hi), in order."""
        dev = self._require(dev_id)
        stime = dev.details.snapshotted_time
        for k, v in self.bottom.items(dev.root, lo, hi):
            yield k, Mapping.decode(v, stime)

    def lookup_range(self, dev_id: int, lo: int, hi: int) -> dict[int, Mapping]:
        """virtual block -> Mapping for the mapped blocks in [lo, hi) (one tree walk)."""
        dev = self._require(dev_id)
        stime = dev.details.snapshotted_time
        keys, values = self.bottom.range_u64(dev.root, lo, hi)
        return {k: Mapping.decode(v, stime) for k, v in zip(keys, values)}

    def data_blocks(self, dev_id: int, lo: int, hi: int) -> dict[int, int]:
        """virtual block -> data block for the mapped blocks in [lo, hi) (fast read path)."""
        keys, values = self.bottom.range_u64(self._require(dev_id).root, lo, hi)
        return {k: v >> 24 for k, v in zip(keys, values)}

    def highest_mapped(self, dev_id: int) -> int | None:
        return self.bottom.last_key(self._require(dev_id).root)

    def alloc_data_block(self) -> int:
        self._writable()
        return self.data_sm.new_block()

    def data_block_count(self, block: int) -> int:
        return self.data_sm.get(block)

    # -- space --------------------------------------------------------------------------
    def resize_data(self, nr_blocks: int) -> None:
        self._writable()
        self.data_sm.extend(nr_blocks)

    def resize_metadata(self, nr_blocks: int) -> None:
        """Use a grown metadata device (the file must already be that large)."""
        self._writable()
        self.bm.io.refresh_size()
        if nr_blocks > self.bm.io.nr_blocks:
            raise MetadataError(f"metadata device holds only {self.bm.io.nr_blocks} blocks")
        self.tm.sm.extend(nr_blocks)

    # -- transactions -------------------------------------------------------------------
    def commit(self) -> None:
        """Make every change durable atomically (superblock written last)."""
        if self.read_only:
            return
        for dev_id, dev in self._devices.items():
            if dev.changed:
                self.details_root, _ = self.details_tree.insert(self.details_root, dev_id,
                                                                tuple(dev.details))
                dev.changed = False
        self.data_sm.persist()
        self.tm.sm.persist()
        self.tm.flush_nodes()
        sb = Superblock(
            flags=self.flags, uuid=self.sb.uuid, version=self.sb.version, time=self.time,
            trans_id=self.trans_id, held_root=self.held_root, data_sm=self.data_sm.root(),
            metadata_sm=self.tm.sm.root(), data_mapping_root=self.mapping_root,
            device_details_root=self.details_root, data_block_size=self.sb.data_block_size,
            metadata_block_size=self.sb.metadata_block_size,
            metadata_nr_blocks=self.sb.metadata_nr_blocks, compat_flags=self.sb.compat_flags,
            compat_ro_flags=self.sb.compat_ro_flags, incompat_flags=self.sb.incompat_flags)
        self.bm.flush()
        self.bm.write_superblock(sb.pack())
        self.sb = sb
        self.data_sm.committed()
        self.tm.sm.committed()
        self.tm.begin()
        self._top_shadowed.clear()
        self.dirty = False

    def abort(self) -> None:
        """Forget everything since the last commit."""
        self.tm.abort()
        self._load()

    def set_needs_check(self) -> None:
        """Abort the open transaction and flag the committed metadata for repair."""
        self.abort()
        self.flags |= NEEDS_CHECK
        self.sb = replace(self.sb, flags=self.flags)
        self.bm.write_superblock(self.sb.pack())

