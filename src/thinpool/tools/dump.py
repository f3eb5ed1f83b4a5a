"""thin_dump: committed metadata (or its held snapshot) as thin_dump 0.9.0 XML."""

from __future__ import annotations

import os
from collections.abc import Iterator, Set
from typing import TextIO

import numpy as np

from ..errors import MetadataError
from ..thin.ir import DeviceInfo, MappingChunk, SuperblockInfo
from ..thin.reader import MetadataReader
from ..thin.xml import CHUNK_SIZE, XmlWriter


def dump(metadata_path: str | os.PathLike[str], out: TextIO, snapshot: bool = False,
         dev_id: int | None = None) -> None:
    """Write the XML of every device (or only ``dev_id``) to ``out``.

    With ``snapshot`` the held metadata snapshot is dumped; its superblock copy
    has zeroed space-map roots, so ``nr_data_blocks`` is 0 exactly as with
    thin_dump 0.9.0.  A device missing from either the details tree or the
    mapping tree raises ``MetadataError`` before anything is written.
    """
    with MetadataReader(metadata_path, snapshot=snapshot) as reader:
        sb = reader.sb
        details = reader.details()
        roots = reader.mapping_roots()
        _check_same_devices(details.keys(), roots.keys())
        writer = XmlWriter(out)
        writer.begin_superblock(SuperblockInfo(
            uuid="", time=sb.time, transaction=sb.trans_id, flags=sb.flags,
            version=sb.version, data_block_size=sb.data_block_size,
            nr_data_blocks=sb.data_sm.nr_blocks))
        for dev in sorted(roots):
            if dev_id is not None and dev != dev_id:
                continue
            d = details[dev]
            writer.begin_device(DeviceInfo(
                dev_id=dev, mapped_blocks=d.mapped_blocks, transaction=d.transaction_id,
                creation_time=d.creation_time, snap_time=d.snapshotted_time))
            for chunk in _device_chunks(reader, dev, roots[dev]):
                writer.mappings(chunk)
            writer.end_device()
        writer.end_superblock()


def _check_same_devices(details: Set[int], mappings: Set[int]) -> None:
    if details != mappings:
        only_d, only_m = sorted(details - mappings), sorted(mappings - details)
        problems = ([f"devices {only_d} have details but no mapping tree"] if only_d else []) \
            + ([f"devices {only_m} have a mapping tree but no details"] if only_m else [])
        raise MetadataError("inconsistent device trees: " + "; ".join(problems))


def _device_chunks(reader: MetadataReader, dev: int, root: int) -> Iterator[MappingChunk]:
    """A device's mappings, leaves batched into chunks of about CHUNK_SIZE.

    Batching keeps numpy's per-call overhead off the ~126-entry leaves; the
    batch is also where key order is verified, since a corrupt tree whose
    leaves are out of order would otherwise be dumped as nonsense.
    """
    parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    size = 0
    last = -1  # highest virtual block emitted so far
    for leaf in reader.mappings(root):
        if leaf[0].size:
            parts.append(leaf)
            size += leaf[0].size
        if size >= CHUNK_SIZE:
            chunk = _checked_chunk(parts, dev, last)
            last = int(chunk.vblocks[-1])
            yield chunk
            parts, size = [], 0
    if parts:
        yield _checked_chunk(parts, dev, last)


def _checked_chunk(parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]], dev: int,
                   last: int) -> MappingChunk:
    """Concatenated leaves, whose virtual blocks must increase strictly from ``last``."""
    v, d, t = (np.concatenate(col) for col in zip(*parts))
    if int(v[0]) <= last or np.any(v[1:] <= v[:-1]):
        raise MetadataError(f"mapping tree of device {dev} has virtual blocks out of order")
    return MappingChunk(v, d, t)
