"""B-tree node codec (dm-thin-format.md 2.1).

A node is 4096 bytes: a 32-byte header, ``max_entries`` u64 keys, then
``max_entries`` values of ``value_size`` bytes.  Values are decoded by a
``ValueCodec`` chosen by the tree the node belongs to; internal nodes always
hold u64 child block numbers.

``Node`` is the mutable, decoded form used when a tree is changed; read paths
use ``NodeView`` (a memoryview over the raw block) to avoid decoding whole
nodes.
"""

from __future__ import annotations

import struct
import sys
from array import array
from bisect import bisect_right
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

from . import checksum
from .checksum import BLOCK_SIZE, Salt
from ..errors import BadBlockError

if TYPE_CHECKING:
    import numpy as np

assert sys.byteorder == "little", "thinpool's codecs assume a little-endian host"

INTERNAL = 1
LEAF = 2
HEADER = struct.Struct("<IIQIIII")
HEADER_SIZE = HEADER.size


def max_entries_for(value_size: int) -> int:
    """Largest multiple of 3 entries that fits in a block (the kernel's rule)."""
    return ((BLOCK_SIZE - HEADER_SIZE) // (8 + value_size)) // 3 * 3


@dataclass(frozen=True, slots=True)
class ValueCodec:
    """How a tree's leaf values are laid out: a struct of fixed size."""

    name: str
    fmt: str  # struct format without byte order, e.g. "Q" or "QQII"
    size: int = field(init=False)
    max_entries: int = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "size", struct.calcsize("<" + self.fmt))
        object.__setattr__(self, "max_entries", max_entries_for(self.size))

    def unpack_many(self, raw: memoryview) -> list[Any]:
        if self.fmt == "Q":
            return raw.cast("Q").tolist()
        if self.fmt == "I":
            return raw.cast("I").tolist()
        return list(struct.Struct("<" + self.fmt).iter_unpack(raw))

    def pack_many(self, values: Sequence[Any]) -> bytes:
        if self.fmt == "Q":
            return array("Q", values).tobytes()
        if self.fmt == "I":
            return array("I", values).tobytes()
        s = struct.Struct("<" + self.fmt)
        return b"".join(s.pack(*v) for v in values)

    def unpack_one(self, raw: bytes | memoryview, offset: int) -> Any:
        out = struct.unpack_from("<" + self.fmt, raw, offset)
        return out[0] if len(out) == 1 else out


U64 = ValueCodec("u64", "Q")
U32 = ValueCodec("u32", "I")
INDEX_ENTRY = ValueCodec("index entry", "QII")
DEVICE_DETAILS = ValueCodec("device details", "QQII")


def values_offset(max_entries: int) -> int:
    return HEADER_SIZE + 8 * max_entries


class NodeView:
    """Read-only access to a validated node without decoding it whole."""

    __slots__ = ("raw", "flags", "nr_entries", "max_entries", "value_size")

    def __init__(self, raw: bytes) -> None:
        self.raw = raw
        _c, self.flags, _b, self.nr_entries, self.max_entries, self.value_size, _p = \
            HEADER.unpack_from(raw, 0)

    @property
    def is_leaf(self) -> bool:
        return self.flags == LEAF

    def keys(self) -> memoryview:
        return memoryview(self.raw)[HEADER_SIZE:HEADER_SIZE + 8 * self.nr_entries].cast("Q")

    def values_raw(self) -> memoryview:
        off = values_offset(self.max_entries)
        return memoryview(self.raw)[off:off + self.value_size * self.nr_entries]

    def child_index(self, key: int) -> int:
        """Largest i with keys[i] <= key, or -1."""
        return bisect_right(self.keys(), key) - 1

    def u64_at(self, i: int) -> int:
        return int.from_bytes(self.raw[values_offset(self.max_entries) + 8 * i:
                                       values_offset(self.max_entries) + 8 * i + 8], "little")


def check_header(raw: bytes | bytearray, location: int, value_size: int | None) -> None:
    """Structural checks the kernel applies when reading a node.

    ``value_size`` is the expected leaf value size (None: accept any).
    """
    _c, flags, blocknr, nr, mx, vs, _p = HEADER.unpack_from(raw, 0)
    if blocknr != location:
        raise BadBlockError(location, "btree node", f"bad block nr {blocknr}")
    if flags not in (INTERNAL, LEAF):
        raise BadBlockError(location, "btree node", f"bad flags {flags}")
    if HEADER_SIZE + (8 + vs) * mx > BLOCK_SIZE:
        raise BadBlockError(location, "btree node", f"max_entries {mx} too large for value size {vs}")
    if nr > mx:
        raise BadBlockError(location, "btree node", f"nr_entries {nr} > max_entries {mx}")
    expected = 8 if flags == INTERNAL else value_size
    if expected is not None and vs != expected:
        raise BadBlockError(location, "btree node", f"value size {vs}, expected {expected}")


class Node:
    """A decoded node, mutable; ``encode`` produces the on-disk block."""

    __slots__ = ("blocknr", "leaf", "keys", "values", "codec")

    def __init__(self, blocknr: int, leaf: bool, keys: list[int], values: list[Any],
                 codec: ValueCodec) -> None:
        self.blocknr = blocknr
        self.leaf = leaf
        self.keys = keys
        self.values = values
        self.codec = codec  # codec of the values actually held (U64 for internal nodes)

    @property
    def max_entries(self) -> int:
        return self.codec.max_entries

    @classmethod
    def decode(cls, raw: bytes | bytearray, blocknr: int, leaf_codec: ValueCodec) -> Node:
        view = NodeView(bytes(raw) if isinstance(raw, bytearray) else raw)
        leaf = view.is_leaf
        codec = leaf_codec if leaf else U64
        keys = view.keys().tolist()
        values = codec.unpack_many(view.values_raw())
        return cls(blocknr, leaf, keys, values, codec)

    def encode(self) -> bytearray:
        n = len(self.keys)
        mx = self.codec.max_entries
        buf = bytearray(BLOCK_SIZE)
        HEADER.pack_into(buf, 0, 0, LEAF if self.leaf else INTERNAL, self.blocknr, n, mx,
                         self.codec.size, 0)
        if n:
            buf[HEADER_SIZE:HEADER_SIZE + 8 * n] = array("Q", self.keys).tobytes()
            off = values_offset(mx)
            packed = self.codec.pack_many(self.values)
            buf[off:off + len(packed)] = packed
        checksum.stamp(buf, Salt.NODE)
        return buf


def encode_arrays(blocknr: int, leaf: bool, keys: "np.ndarray", values: bytes, value_size: int) -> bytearray:
    """A node block from packed arrays (bulk builders): keys uint64, values raw bytes."""
    n = int(keys.size)
    mx = max_entries_for(value_size)
    buf = bytearray(BLOCK_SIZE)
    HEADER.pack_into(buf, 0, 0, LEAF if leaf else INTERNAL, blocknr, n, mx, value_size, 0)
    if n:
        buf[HEADER_SIZE:HEADER_SIZE + 8 * n] = keys.astype("<u8", copy=False).tobytes()
        off = values_offset(mx)
        buf[off:off + len(values)] = values
    checksum.stamp(buf, Salt.NODE)
    return buf
