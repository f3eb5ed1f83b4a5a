"""Intermediate representation shared by dump, restore and the XML codec.

A metadata walk produces: one ``SuperblockInfo``, then per device one
``DeviceInfo`` followed by its mappings as ``MappingChunk``s (numpy arrays
in increasing virtual-block order).  XML writers and metadata builders are
sinks of these events; the XML reader and the metadata walker are sources.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, slots=True)
class SuperblockInfo:
    uuid: str
    time: int
    transaction: int
    flags: int | None
    version: int | None
    data_block_size: int
    nr_data_blocks: int


@dataclass(frozen=True, slots=True)
class DeviceInfo:
    dev_id: int
    mapped_blocks: int
    transaction: int
    creation_time: int
    snap_time: int


@dataclass(frozen=True, slots=True)
class MappingChunk:
    """Consecutive mappings of one device: virtual block -> (data block, time).

    All three arrays have dtype uint64 and equal length; ``vblocks`` is
    strictly increasing within a chunk and across a device's chunks.
    """

    vblocks: np.ndarray
    data_blocks: np.ndarray
    times: np.ndarray

    def __len__(self) -> int:
        return int(self.vblocks.size)
