"""thin_ls: per-device mapped / exclusive / shared usage, formatted like thin_ls 0.9.0.

A data block is *exclusive* to a device when exactly one mapping in the whole
pool refers to it; a block mapped twice (by two devices, or twice by the same
device) is *shared* by every mapping that refers to it.  Like thin_ls, every
device listed in the details tree is counted and ``MAPPED_BLOCKS`` is the
details tree's ``mapped_blocks``, so ``shared = mapped - exclusive`` (modulo
2**64, as the C++ tool computes it with unsigned integers).

Counting walks every mapping tree twice (first to count block uses, then to
count each device's exclusive mappings) with numpy batches and saturating
per-chunk counters, so memory stays bounded by the data blocks in use.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from ..errors import MetadataError, ThinpoolError
from ..thin.reader import MetadataReader

FIELDS = (
    "DEV", "MAPPED_BLOCKS", "EXCLUSIVE_BLOCKS", "SHARED_BLOCKS",
    "MAPPED_SECTORS", "EXCLUSIVE_SECTORS", "SHARED_SECTORS",
    "MAPPED_BYTES", "EXCLUSIVE_BYTES", "SHARED_BYTES",
    "MAPPED", "EXCLUSIVE", "SHARED",
    "TRANSACTION", "CREATE_TIME", "SNAP_TIME",
)
"""Every field thin_ls 0.9.0 accepts, in its help order."""

DEFAULT_FIELDS = ("DEV", "MAPPED", "CREATE_TIME", "SNAP_TIME")
"""What thin_ls prints without ``-o``."""

U64 = (1 << 64) - 1
SECTOR_BYTES = 512
BATCH = 1 << 16        # mappings gathered before one numpy pass
CHUNK_BITS = 16        # data blocks per lazily allocated counter chunk: 2**16
_UNITS = ("", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB")


@dataclass(frozen=True, slots=True)
class DeviceUsage:
    """One thin_ls row; block counts are in data blocks of ``data_block_size`` sectors."""

    dev_id: int
    mapped_blocks: int
    exclusive_blocks: int
    shared_blocks: int
    transaction: int
    creation_time: int
    snap_time: int
    data_block_size: int


def list_devices(metadata_path: str | os.PathLike[str],
                 snapshot: bool = False) -> list[DeviceUsage]:
    """Usage of every device in the details tree, in device-id order.

    ``snapshot`` reads the held metadata snapshot (``thin_ls -m``).  Damaged
    metadata, or a device with details but no mapping tree, raises
    ``MetadataError``.
    """
    with MetadataReader(metadata_path, snapshot=snapshot) as reader:
        details = reader.details()
        roots = reader.mapping_roots()
        missing = sorted(set(details) - set(roots))
        if missing:
            raise MetadataError(f"couldn't find mapping tree root for devices {missing}")
        devs = sorted(details)
        counter = _UseCounter()
        for dev in devs:
            for blocks in _data_block_batches(reader, dev, roots[dev]):
                counter.add(blocks)
        rows = []
        for dev in devs:
            exclusive = sum(counter.exclusive(blocks)
                            for blocks in _data_block_batches(reader, dev, roots[dev]))
            d = details[dev]
            rows.append(DeviceUsage(
                dev_id=dev, mapped_blocks=d.mapped_blocks, exclusive_blocks=exclusive,
                shared_blocks=(d.mapped_blocks - exclusive) & U64,
                transaction=d.transaction_id, creation_time=d.creation_time,
                snap_time=d.snapshotted_time, data_block_size=reader.sb.data_block_size))
        return rows


def parse_fields(spec: str) -> list[str]:
    """Split a ``-o`` argument the way thin_ls does.

    Tokens are separated by commas; one trailing comma is ignored (C++
    ``getline`` semantics) but an empty token elsewhere, or an unknown or
    lower-case name, is an error.  An empty spec gives no fields at all.
    """
    tokens = spec.split(",")
    if tokens[-1] == "":
        tokens.pop()
    _check_fields(tokens)
    return tokens


def _check_fields(fields: list[str] | tuple[str, ...]) -> None:
    for f in fields:
        if f not in FIELDS:
            raise ThinpoolError(f"unknown field {f!r} (valid: {', '.join(FIELDS)})")


def format_ls(rows: list[DeviceUsage], fields: list[str] | tuple[str, ...] = DEFAULT_FIELDS,
              headers: bool = True, data_block_size: int | None = None) -> str:
    """Render rows byte-identically to thin_ls 0.9.0.

    Every cell is right-aligned to its column's widest cell (header included)
    and followed by one space, so lines end with a space.  With no fields, or
    no rows and no headers, the output is empty.  ``data_block_size``
    (sectors) overrides the rows' own value for the sector, byte and
    human-readable columns.
    """
    _check_fields(fields)
    if not fields or not (rows or headers):
        return ""
    grid = [list(fields)] if headers else []
    for row in rows:
        dbs = row.data_block_size if data_block_size is None else data_block_size
        grid.append([_cell(row, f, dbs) for f in fields])
    widths = [max(len(r[i]) for r in grid) for i in range(len(fields))]
    return "".join("".join(c.rjust(w) + " " for c, w in zip(r, widths)) + "\n" for r in grid)


def _cell(row: DeviceUsage, field: str, dbs: int) -> str:
    if field == "DEV":
        return str(row.dev_id)
    if field == "TRANSACTION":
        return str(row.transaction)
    if field == "CREATE_TIME":
        return str(row.creation_time)
    if field == "SNAP_TIME":
        return str(row.snap_time)
    kind, _, unit = field.partition("_")
    blocks = {"MAPPED": row.mapped_blocks, "EXCLUSIVE": row.exclusive_blocks,
              "SHARED": row.shared_blocks}[kind]
    sectors = (blocks * dbs) & U64
    if unit == "BLOCKS":
        return str(blocks)
    if unit == "SECTORS":
        return str(sectors)
    if unit == "BYTES":
        return str((sectors * SECTOR_BYTES) & U64)
    return format_disk_unit((sectors * SECTOR_BYTES) & U64)


def format_disk_unit(nbytes: int) -> str:
    """thin_ls's human-readable size: e.g. ``4096``, ``64KiB``, ``1024MiB``.

    Divide by 1024 (truncating) while above 1 MiB units, then once more with
    rounding (half up) if still above 8192; so values keep 4-7 significant
    digits rather than switching unit at 1024.
    """
    i = 0
    while nbytes > 1024 * 1024:
        nbytes //= 1024
        i += 1
    if nbytes > 8 * 1024:
        nbytes = (nbytes + 512) // 1024
        i += 1
    return f"{nbytes}{_UNITS[i]}"


def _data_block_batches(reader: MetadataReader, dev: int, root: int) -> Iterator[np.ndarray]:
    """A device's data blocks in batches of about BATCH, keys checked in order.

    thin_ls refuses a mapping tree whose keys are out of order, so we do too.
    """
    parts: list[np.ndarray] = []
    size = 0
    last = np.array([], dtype=np.uint64)  # previous batch's last virtual block
    for vblocks, data, _times in reader.mappings(root):
        if not vblocks.size:
            continue
        keys = np.concatenate((last, vblocks))
        if np.any(keys[1:] <= keys[:-1]):
            raise MetadataError(f"mapping tree of device {dev} has keys out of order")
        last = vblocks[-1:]
        parts.append(data)
        size += data.size
        if size >= BATCH:
            yield np.concatenate(parts)
            parts, size = [], 0
    if parts:
        yield np.concatenate(parts)


class _UseCounter:
    """How many mappings use each data block, saturated at 2 (0 / exclusive / shared).

    Counters are uint8 arrays of 2**CHUNK_BITS blocks, allocated only for the
    block ranges that are actually mapped.
    """

    def __init__(self) -> None:
        self.chunks: dict[int, np.ndarray] = {}

    def add(self, blocks: np.ndarray) -> None:
        uniq, counts = np.unique(blocks, return_counts=True)
        for cid, sel in _by_chunk(uniq):
            chunk = self.chunks.get(cid)
            if chunk is None:
                chunk = self.chunks[cid] = np.zeros(1 << CHUNK_BITS, dtype=np.uint8)
            off = _offsets(uniq[sel])
            chunk[off] = np.minimum(chunk[off] + counts[sel], 2)

    def exclusive(self, blocks: np.ndarray) -> int:
        """Number of entries of ``blocks`` (all previously added) used exactly once."""
        blocks = np.sort(blocks)
        return sum(int(np.count_nonzero(self.chunks[cid][_offsets(blocks[sel])] == 1))
                   for cid, sel in _by_chunk(blocks))


def _by_chunk(sorted_blocks: np.ndarray) -> Iterator[tuple[int, slice]]:
    """(chunk id, slice) for each run of ``sorted_blocks`` in one counter chunk."""
    cids = sorted_blocks >> np.uint64(CHUNK_BITS)
    if not cids.size:
        return
    edges = [0, *(np.flatnonzero(cids[1:] != cids[:-1]) + 1).tolist(), cids.size]
    for lo, hi in zip(edges, edges[1:]):
        yield int(cids[lo]), slice(lo, hi)


def _offsets(blocks: np.ndarray) -> np.ndarray:
    return (blocks & np.uint64((1 << CHUNK_BITS) - 1)).astype(np.intp)
