"""Leaf values of the thin trees: block_time mappings and device details."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

TIME_BITS = 24
TIME_MASK = (1 << TIME_BITS) - 1
MAX_DATA_BLOCK = (1 << 40) - 1
MAX_DEVICE_ID = (1 << 24) - 1


def pack_block_time(data_block: int, time: int) -> int:
    return (data_block << TIME_BITS) | (time & TIME_MASK)


def unpack_block_time(value: int) -> tuple[int, int]:
    return value >> TIME_BITS, value & TIME_MASK


DETAILS_DTYPE = np.dtype([("mapped", "<u8"), ("trans", "<u8"), ("ctime", "<u4"), ("stime", "<u4")])
"""struct disk_device_details as a numpy record (bulk reads and writes of details leaves)."""


class DeviceDetails(NamedTuple):
    """struct disk_device_details (24 bytes)."""

    mapped_blocks: int
    transaction_id: int
    creation_time: int
    snapshotted_time: int
