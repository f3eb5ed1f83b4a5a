"""Pool configuration: sizes, features, and the kernel's thin-pool table syntax.

``<start> <length> thin-pool <metadata dev> <data dev> <block size> <low water mark>
[<#features> <feature>...]`` with the kernel's validation (format section 5.1).
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, fields

from ..errors import ThinpoolError

SECTOR = 512
MIN_BLOCK_SECTORS = 128
MAX_BLOCK_SECTORS = 2_097_152
FEATURES = ("skip_block_zeroing", "ignore_discard", "no_discard_passdown", "read_only",
            "error_if_no_space")
MAX_DATA_BLOCKS = 1 << 40  # a mapping stores its data block in 40 bits
MAX_VOLUME_SIZE = (1 << 63) - SECTOR  # byte offsets must fit a signed 64-bit off_t
_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}
_SIZE = re.compile(r"^\s*([0-9]+)\s*([KMGTP]?)(?:I?B)?\s*$", re.IGNORECASE | re.ASCII)
_DECIMAL = re.compile(r"^[0-9]+$", re.ASCII)


class ConfigError(ThinpoolError):
    """A bad size, table line or feature."""


def parse_size(text: str | int) -> int:
    """Bytes from '100G', '64K', '512' (binary units; suffixes K/M/G/T/P, optional iB/B)."""
    if isinstance(text, int):
        if text < 0:
            raise ConfigError(f"size must not be negative: {text}")
        return text
    m = _SIZE.match(text)
    if not m:
        raise ConfigError(f"invalid size {text!r} (examples: 4096, 64K, 100G)")
    return int(m.group(1)) * _UNITS[m.group(2).upper()]


def parse_decimal(text: str, what: str) -> int:
    """A non-negative integer written in ASCII digits (``int`` also takes '５' and '²')."""
    if not _DECIMAL.match(text):
        raise ConfigError(f"invalid {what} {text!r}: expected a decimal number")
    return int(text)


def check_data_blocks(nr_blocks: int, block_size: int) -> int:
    """Refuse a data device that dm-thin cannot address (data blocks are 40-bit numbers)."""
    if nr_blocks > MAX_DATA_BLOCKS:
        raise ConfigError(f"data size {nr_blocks * block_size} bytes is beyond what dm-thin can "
                          f"address with {block_size // 1024} KiB blocks (at most {MAX_DATA_BLOCKS} "
                          f"blocks = {MAX_DATA_BLOCKS * block_size >> 50} PiB)")
    return nr_blocks


def check_volume_size(size: int) -> int:
    """A thin volume's virtual size: a positive multiple of 512 bytes that fits an off_t."""
    if size <= 0 or size % SECTOR:
        raise ConfigError(f"volume size {size} must be a positive multiple of 512 bytes")
    if size > MAX_VOLUME_SIZE:
        raise ConfigError(f"volume size {size} bytes is too large (at most {MAX_VOLUME_SIZE} "
                          "bytes, 8 EiB)")
    return size


def validate_block_sectors(sectors: int) -> int:
    if not (MIN_BLOCK_SECTORS <= sectors <= MAX_BLOCK_SECTORS) or sectors % MIN_BLOCK_SECTORS:
        raise ConfigError(f"Invalid block size: {sectors} sectors ({sectors * SECTOR} bytes); "
                          "it must be a multiple of 64 KiB between 64 KiB and 1 GiB")
    return sectors


@dataclass
class PoolConfig:
    """What the thin-pool table line says, plus thinpool's own policy knobs."""

    data_block_sectors: int = 128
    low_water_mark: int = 0
    skip_block_zeroing: bool = False
    ignore_discard: bool = False
    no_discard_passdown: bool = False
    read_only: bool = False
    error_if_no_space: bool = False
    no_space_timeout: float = 60.0
    low_water_hook: str | None = None

    @property
    def block_size(self) -> int:
        return self.data_block_sectors * SECTOR

    def feature_args(self) -> list[str]:
        return [f for f in FEATURES if getattr(self, f)]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> PoolConfig:
        raw = json.loads(text)
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in known})


@dataclass(frozen=True)
class Table:
    length_sectors: int
    metadata_dev: str
    data_dev: str
    config: PoolConfig


def parse_table(line: str) -> Table:
    """Parse and validate a thin-pool table line like the kernel's pool_ctr."""
    words = line.split()
    if len(words) < 7:
        raise ConfigError("thin-pool table needs: <start> <length> thin-pool <metadata dev> "
                          "<data dev> <data block size> <low water mark> [<#features> ...]")
    start, length, target, meta, data, block, lwm, *rest = words
    if target != "thin-pool":
        raise ConfigError(f"unknown target type {target!r} (expected thin-pool)")
    start_i, length_i, block_i, lwm_i = (parse_decimal(w, name) for w, name in (
        (start, "start sector"), (length, "length"), (block, "data block size"),
        (lwm, "low water mark")))
    if start_i != 0:
        raise ConfigError("a thin-pool must be the only target in its table (start 0)")
    if meta == data:
        raise ConfigError("Error setting metadata or data device: they must differ")
    if lwm_i < 0:
        raise ConfigError("Invalid low water mark")
    config = PoolConfig(data_block_sectors=validate_block_sectors(block_i), low_water_mark=lwm_i)
    if rest:
        if not _DECIMAL.match(rest[0]):
            raise ConfigError(f"Invalid number of pool feature arguments: {rest[0]!r}")
        count = int(rest[0])
        args = rest[1:]
        if count != len(args) or count > len(FEATURES):
            raise ConfigError(f"feature count {count} does not match {len(args)} feature arguments")
        for arg in args:
            name = arg.lower()
            if name not in FEATURES:
                raise ConfigError(f"Unrecognised pool feature requested: {arg}")
            setattr(config, name, True)
    if length_i < block_i:
        raise ConfigError("pool length is smaller than one data block")
    check_data_blocks(length_i // block_i, block_i * SECTOR)
    return Table(length_i, meta, data, config)
