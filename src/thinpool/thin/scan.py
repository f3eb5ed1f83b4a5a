"""Find thin tree roots by scanning every metadata block (repair without usable roots).

When the superblock, or a root it names, cannot be read, the trees are still
on disk: every btree node carries its own checksum and block number, so one
pass over the device finds them all.  Each valid node is classified by the
tree it can belong to:

* a device-details tree: 24-byte leaf values;
* a top-level mapping tree: a non-empty leaf of 8-byte values that are all
  metadata block numbers, none of them a details or top-level node and at
  least one of them a bottom-level tree (the others may be unreadable);
* a device's (bottom-level) mapping tree: any other 8-byte-value leaf;
* an empty 8-byte-value leaf is either an empty top-level tree (a pool with
  no devices) or an empty device tree;
* an internal node takes the kind of its valid children (mixed: invalid).

Roots are the nodes of a kind that no valid node references.  Every node
also gets an age, the highest time stamp below it (mapping times, or the
details' creation and snapshot times): copy-on-write leaves older versions of
the trees behind, and the age tells the newest ones apart.  Bottom-level
nodes also get the number of mappings below them, which a details tree of
the same transaction records as each device's ``mapped_blocks``.

Cost: one sequential read of the device; only blocks whose header names
their own location are checksummed.
"""

from __future__ import annotations

import enum
import os

import numpy as np

from ..ondisk import checksum
from ..ondisk.checksum import BLOCK_SIZE, Salt
from ..ondisk.node import HEADER_SIZE, INTERNAL, LEAF, values_offset
from ..ondisk.superblock import MAX_METADATA_BLOCKS
from ..ondisk.values import DETAILS_DTYPE, TIME_MASK
from .reader import TreeReader

_HEADER = np.dtype([("csum", "<u4"), ("flags", "<u4"), ("blocknr", "<u8"), ("nr", "<u4"),
                    ("max", "<u4"), ("value_size", "<u4"), ("pad", "<u4")])
_CHUNK = 1024  # blocks read at once


class Kind(enum.IntEnum):
    NONE = 0  # not a usable thin btree node
    DETAILS = 1
    TOP = 2
    BOTTOM = 3
    EMPTY = 4  # empty leaf of 8-byte values: an empty top-level or device tree
    UNDECIDED_LEAF = 5  # leaf whose values could all be block numbers (resolved to TOP or BOTTOM)
    UNDECIDED_INTERNAL = 6  # internal node (resolved to the kind of its children, or NONE)


_BOTTOMISH = (Kind.BOTTOM, Kind.EMPTY)


class RootScan:
    """Kinds, ages and candidate roots of every btree node in the metadata."""

    def __init__(self, reader: TreeReader) -> None:
        self.nr_blocks = min(reader.nr_blocks, MAX_METADATA_BLOCKS)
        self.kind = np.zeros(self.nr_blocks, dtype=np.uint8)
        self.age = np.zeros(self.nr_blocks, dtype=np.uint32)
        self.count = np.zeros(self.nr_blocks, dtype=np.uint64)  # mappings below (bottom level)
        self.children: dict[int, list[int]] = {}  # internal nodes and UNDECIDED_LEAF leaves
        self._scan(reader.io.fd)
        for b in list(self.children):
            self._resolve(b)
        self._find_roots()

    # -- pass 1: read and classify leaves --------------------------------------------------
    def _scan(self, fd: int) -> None:
        for start in range(0, self.nr_blocks, _CHUNK):
            n = min(_CHUNK, self.nr_blocks - start)
            buf = os.pread(fd, n * BLOCK_SIZE, start * BLOCK_SIZE)
            n = len(buf) // BLOCK_SIZE
            if n == 0:
                break
            blocks = np.frombuffer(buf, dtype=np.uint8, count=n * BLOCK_SIZE).reshape(n, BLOCK_SIZE)
            hdr = np.ascontiguousarray(blocks[:, :HEADER_SIZE]).view(_HEADER).ravel()
            vs = hdr["value_size"].astype(np.int64)
            mx = hdr["max"].astype(np.int64)
            plausible = ((hdr["blocknr"] == np.arange(start, start + n, dtype=np.uint64))
                         & (hdr["nr"] <= hdr["max"])
                         & (HEADER_SIZE + (8 + vs) * mx <= BLOCK_SIZE)
                         & (((hdr["flags"] == INTERNAL) & (vs == 8))
                            | ((hdr["flags"] == LEAF) & ((vs == 8) | (vs == 24)))))
            view = memoryview(buf)
            for i in np.flatnonzero(plausible).tolist():
                raw = view[i * BLOCK_SIZE:(i + 1) * BLOCK_SIZE]
                if checksum.compute(raw, Salt.NODE) != checksum.stored(raw):
                    continue
                self._classify(start + i, raw, int(hdr["flags"][i]), int(hdr["nr"][i]),
                               int(mx[i]), int(vs[i]))

    def _classify(self, b: int, raw: memoryview, flags: int, nr: int, mx: int, vs: int) -> None:
        off = values_offset(mx)
        if vs == 24:
            details = np.frombuffer(raw, dtype=DETAILS_DTYPE, count=nr, offset=off)
            self.kind[b] = Kind.DETAILS
            if nr:
                self.age[b] = max(int(details["ctime"].max()), int(details["stime"].max()))
            return
        values = np.frombuffer(raw, dtype="<u8", count=nr, offset=off)
        if flags == INTERNAL:
            self.kind[b] = Kind.UNDECIDED_INTERNAL
            self.children[b] = values.tolist()
        elif nr == 0:
            self.kind[b] = Kind.EMPTY
        else:
            self.age[b] = int((values & np.uint64(TIME_MASK)).max())  # as a bottom-level leaf
            self.count[b] = nr
            if int(values.max()) < self.nr_blocks:
                self.kind[b] = Kind.UNDECIDED_LEAF
                self.children[b] = values.tolist()
            else:
                self.kind[b] = Kind.BOTTOM

    # -- pass 2: kinds of internal nodes and possible top-level leaves --------------------
    def _child_kinds(self, b: int) -> list[tuple[int, Kind]]:
        """(child, kind) of the children that are usable nodes."""
        out: list[tuple[int, Kind]] = []
        for c in self.children[b]:
            if c < self.nr_blocks:
                k = Kind(self.kind[c])
                if k not in (Kind.NONE, Kind.UNDECIDED_LEAF, Kind.UNDECIDED_INTERNAL):  # loop
                    out.append((c, k))
        return out

    def _resolve(self, root: int) -> None:
        """Settle the kind of ``root`` and of the unresolved nodes below it (post-order)."""
        unresolved = (Kind.UNDECIDED_LEAF, Kind.UNDECIDED_INTERNAL)
        stack = [(root, False)]
        on_path: set[int] = set()
        while stack:
            b, expanded = stack.pop()
            if self.kind[b] not in unresolved:
                continue
            if not expanded:
                if b in on_path:
                    continue
                on_path.add(b)
                stack.append((b, True))
                stack.extend((c, False) for c in self.children[b]
                             if c < self.nr_blocks and self.kind[c] in unresolved
                             and c not in on_path)
                continue
            on_path.discard(b)
            kids = self._child_kinds(b)
            kinds = {k for _c, k in kids}
            if self.kind[b] == Kind.UNDECIDED_LEAF:
                bottoms = [c for c, k in kids if k in _BOTTOMISH]
                if bottoms and not kinds - set(_BOTTOMISH):
                    self.kind[b] = Kind.TOP
                    self.age[b] = int(self.age[bottoms].max())
                    self.count[b] = 0
                else:  # a bottom-level leaf mapping low data blocks
                    self.kind[b] = Kind.BOTTOM
                    del self.children[b]
                continue
            if kinds and kinds <= set(_BOTTOMISH):
                self.kind[b] = Kind.BOTTOM
            elif len(kinds) == 1 and kinds <= {Kind.DETAILS, Kind.TOP}:
                self.kind[b] = kinds.pop()
            else:
                self.kind[b] = Kind.NONE
                del self.children[b]
                continue
            valid = [c for c, _k in kids]
            self.age[b] = int(self.age[valid].max())
            if self.kind[b] == Kind.BOTTOM:
                self.count[b] = int(self.count[valid].sum())

    def _find_roots(self) -> None:
        referenced = np.zeros(self.nr_blocks, dtype=bool)
        for kids in self.children.values():
            for c in kids:
                if c < self.nr_blocks:
                    referenced[c] = True
        free = ~referenced
        self.details_roots: list[int] = np.flatnonzero(free & (self.kind == Kind.DETAILS)).tolist()
        empty = self.kind == Kind.EMPTY
        self.top_roots: list[int] = np.flatnonzero(
            free & ((self.kind == Kind.TOP) | empty)).tolist()
        # non-empty device trees that no top-level tree references (orphans)
        self.bottom_roots: list[int] = np.flatnonzero(free & (self.kind == Kind.BOTTOM)).tolist()
