"""thin_delta: the differences between two thin devices' mappings, as thin_delta 0.9.0 XML.

Output shape (indent 2 spaces per level)::

    <superblock uuid="" time="T" transaction="X" data_block_size="S"
                nr_data_blocks="N"[ metadata_snap="B"]>     (one line)
      <diff left="A" right="B">
        <same begin="V" length="L"/>                      (default)
        <different>                                       (--verbose)
          <range begin="V" left_data_begin="D1" right_data_begin="D2" length="L"/>
        </different>
      </diff>
    </superblock>

``nr_data_blocks`` comes from the superblock read, so it is 0 for the
metadata snapshot (whose copy has zeroed space-map roots); ``metadata_snap``
appears when the live superblock holds a snapshot.

Every mapped virtual block is classified as ``left_only``, ``right_only``,
``same`` (both map it to one data block) or ``different``.  thin_delta first
merges each device's mappings into runs (consecutive virtual *and* data
blocks, times ignored) and walks both run lists in parallel; a *fragment* is
a stretch cut at every run boundary of either side.  The default output joins
adjacent fragments of one class into one element; ``verbose`` prints every
fragment as a ``range`` and groups consecutive fragments of one class
(adjacent or not) under one element.

Both trees are read leaf by leaf in windows of about BATCH mappings, so
memory stays bounded however large the devices are.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TextIO

import numpy as np

from ..errors import MetadataError, ThinpoolError
from ..thin.reader import MetadataReader

BATCH = 1 << 16
LEFT_ONLY, RIGHT_ONLY, DIFFERENT, SAME = 0, 1, 2, 3
_TAGS = ("left_only", "right_only", "different", "same")
_ONE = np.uint64(1)


def delta(metadata_path: str | os.PathLike[str], snap1: int, snap2: int,
          snapshot: bool = False, verbose: bool = False) -> str:
    """The complete thin_delta output as a string (see ``write_delta``)."""
    out = io.StringIO()
    write_delta(metadata_path, snap1, snap2, out, snapshot=snapshot, verbose=verbose)
    return out.getvalue()


def write_delta(metadata_path: str | os.PathLike[str], snap1: int, snap2: int, out: TextIO,
                snapshot: bool = False, verbose: bool = False) -> None:
    """Stream the diff of devices ``snap1`` (left) and ``snap2`` (right) to ``out``.

    Devices are looked up in the top-level mapping tree, as thin_delta does; a
    missing one raises ``ThinpoolError`` before anything is written.  Damage
    found later in a mapping tree raises ``MetadataError`` after part of the
    output has been written.
    """
    with MetadataReader(metadata_path, snapshot=snapshot) as reader:
        roots = reader.mapping_roots()
        for name, dev in (("snap1", snap1), ("snap2", snap2)):
            if dev not in roots:
                raise ThinpoolError(f"Unable to find mapping tree for {name} ({dev})")
        sb = reader.sb
        held = f' metadata_snap="{sb.held_root}"' if sb.held_root else ""
        out.write(f'<superblock uuid="" time="{sb.time}" transaction="{sb.trans_id}"'
                  f' data_block_size="{sb.data_block_size}"'
                  f' nr_data_blocks="{sb.data_sm.nr_blocks}"{held}>\n'
                  f'  <diff left="{snap1}" right="{snap2}">\n')
        differ = _Differ(_Emitter(out, verbose), verbose)
        for left, right in _windows(_MappingStream(reader, snap1, roots[snap1]),
                                    _MappingStream(reader, snap2, roots[snap2])):
            differ.window(left, right)
        differ.finish()
        out.write("  </diff>\n</superblock>\n")


# -- reading both devices in step --------------------------------------------------------

class _MappingStream:
    """A device's (virtual, data) block arrays in key order, pulled leaf by leaf."""

    def __init__(self, reader: MetadataReader, dev: int, root: int) -> None:
        self.dev = dev
        self.leaves = reader.mappings(root)
        self.vs: list[np.ndarray] = []
        self.ds: list[np.ndarray] = []
        self.size = 0
        self.exhausted = False
        self.last_key: int | None = None

    def fill(self, n: int) -> None:
        """Buffer at least ``n`` mappings unless the tree runs out first."""
        while self.size < n and not self.exhausted:
            leaf = next(self.leaves, None)
            if leaf is None:
                self.exhausted = True
            elif leaf[0].size:
                vblocks, data, _times = leaf
                if np.any(vblocks[1:] <= vblocks[:-1]) or (
                        self.last_key is not None and int(vblocks[0]) <= self.last_key):
                    raise MetadataError(f"mapping tree of device {self.dev} has keys out of order")
                self.last_key = int(vblocks[-1])
                self.vs.append(vblocks)
                self.ds.append(data)
                self.size += vblocks.size

    def take(self, cut: int | None) -> tuple[np.ndarray, np.ndarray]:
        """Remove and return the buffered mappings with virtual block <= ``cut`` (all if None)."""
        v = np.concatenate(self.vs) if self.vs else np.empty(0, np.uint64)
        d = np.concatenate(self.ds) if self.ds else np.empty(0, np.uint64)
        n = v.size if cut is None else int(np.searchsorted(v, np.uint64(cut), side="right"))
        self.vs, self.ds = ([v[n:]], [d[n:]]) if n < v.size else ([], [])
        self.size = v.size - n
        return v[:n], d[:n]


def _windows(left: _MappingStream, right: _MappingStream
             ) -> Iterator[tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]]:
    """Pairs of (vblocks, data) slices covering the same virtual range, in order.

    A window ends at the smaller of the two buffers' last keys, so every
    virtual block in it is known to be mapped or not on both sides.
    """
    while True:
        left.fill(BATCH)
        right.fill(BATCH)
        if not left.size and not right.size:
            return
        open_keys = [s.last_key for s in (left, right)
                     if not s.exhausted and s.last_key is not None]
        cut = min(open_keys) if open_keys else None
        yield left.take(cut), right.take(cut)


# -- classification -----------------------------------------------------------------------

@dataclass(slots=True)
class _Segment:
    cls: int
    begin: int
    length: int
    left_data: int
    right_data: int


class _Differ:
    """Turns windows of both devices' mappings into segments for the emitter.

    Carries across windows what the next window's first block must be compared
    with: each side's previous mapping, the previous mapped virtual block with
    its class and sides, and the still-open segment.
    """

    def __init__(self, emitter: _Emitter, verbose: bool) -> None:
        self.emitter = emitter
        self.verbose = verbose
        self.prev_left: tuple[int, int] | None = None  # (v, d) of the last left mapping
        self.prev_right: tuple[int, int] | None = None
        self.prev_u: tuple[int, bool, bool, int] | None = None  # v, in_left, in_right, class
        self.pending: _Segment | None = None

    def window(self, left: tuple[np.ndarray, np.ndarray],
               right: tuple[np.ndarray, np.ndarray]) -> None:
        (lv, ld), (rv, rd) = left, right
        u = np.union1d(lv, rv)
        if not u.size:
            return
        in_l, li = _lookup(u, lv)
        in_r, ri = _lookup(u, rv)
        dl = np.where(in_l, ld[li], 0) if lv.size else np.zeros(u.size, np.uint64)
        dr = np.where(in_r, rd[ri], 0) if rv.size else np.zeros(u.size, np.uint64)
        cls = np.where(in_l & in_r, np.where(dl == dr, SAME, DIFFERENT),
                       np.where(in_l, LEFT_ONLY, RIGHT_ONLY))

        v0, l0, r0, c0 = self.prev_u or (0, False, False, 0)
        start = u != _shift(v0, u) + _ONE
        if self.verbose:  # cut wherever either side's run starts or stops
            l_run = in_l & _run_starts(lv, ld, self.prev_left)[li] if lv.size else in_l
            r_run = in_r & _run_starts(rv, rd, self.prev_right)[ri] if rv.size else in_r
            start |= (in_l != _shift(l0, in_l)) | (in_r != _shift(r0, in_r)) | l_run | r_run
        else:
            start |= cls != _shift(c0, cls)
        start[0] |= self.prev_u is None

        starts = np.flatnonzero(start)
        ends = np.append(starts[1:], u.size)
        if self.pending is not None:
            head = int(starts[0]) if starts.size else u.size
            self.pending.length += head
            if starts.size:
                self.emitter.segment(self.pending)
                self.pending = None
        segs = [_Segment(c, b, e - i, x, y) for c, b, i, e, x, y in zip(
            cls[starts].tolist(), u[starts].tolist(), starts.tolist(), ends.tolist(),
            dl[starts].tolist(), dr[starts].tolist())]
        if segs:
            for seg in segs[:-1]:
                self.emitter.segment(seg)
            self.pending = segs[-1]

        self.prev_u = (int(u[-1]), bool(in_l[-1]), bool(in_r[-1]), int(cls[-1]))
        if lv.size:
            self.prev_left = (int(lv[-1]), int(ld[-1]))
        if rv.size:
            self.prev_right = (int(rv[-1]), int(rd[-1]))

    def finish(self) -> None:
        if self.pending is not None:
            self.emitter.segment(self.pending)
        self.emitter.close()


def _shift(first: int | bool, a: np.ndarray) -> np.ndarray:
    """``a`` moved one place right, with ``first`` in front: each element's predecessor."""
    return np.concatenate((np.array([first], a.dtype), a[:-1]))


def _lookup(u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each of ``u``: is it a key of ``v``, and its index there (clipped when not)."""
    idx = np.minimum(np.searchsorted(v, u), max(v.size - 1, 0))
    hit = v[idx] == u if v.size else np.zeros(u.size, bool)
    return hit, idx


def _run_starts(v: np.ndarray, d: np.ndarray, prev: tuple[int, int] | None) -> np.ndarray:
    """Per mapping: does it start a new run (virtual or data block not following on)?"""
    pv, pd = prev or (0, 0)
    starts = (v != _shift(pv, v) + _ONE) | (d != _shift(pd, d) + _ONE)
    starts[0] |= prev is None
    return starts


# -- output --------------------------------------------------------------------------------

class _Emitter:
    """Writes segments: one element each, or ``range`` lines grouped by class (verbose)."""

    def __init__(self, out: TextIO, verbose: bool) -> None:
        self.out = out
        self.verbose = verbose
        self.open: int | None = None

    def segment(self, s: _Segment) -> None:
        tag = _TAGS[s.cls]
        if not self.verbose:
            self.out.write(f'    <{tag} begin="{s.begin}" length="{s.length}"/>\n')
            return
        if s.cls != self.open:
            self.close()
            self.out.write(f"    <{tag}>\n")
            self.open = s.cls
        if s.cls == DIFFERENT:
            data = f'left_data_begin="{s.left_data}" right_data_begin="{s.right_data}"'
        else:
            data = f'data_begin="{s.right_data if s.cls == RIGHT_ONLY else s.left_data}"'
        self.out.write(f'      <range begin="{s.begin}" {data} length="{s.length}"/>\n')

    def close(self) -> None:
        if self.open is not None:
            self.out.write(f"    </{_TAGS[self.open]}>\n")
            self.open = None


def own_blocks(metadata_path: str | os.PathLike[str],
               pairs: list[tuple[int, int | None]]) -> list[int]:
    """For each ``(dev, parent)``: how many blocks ``dev`` maps that ``parent`` does not map to
    the same data block (``right_only`` plus ``different`` of a delta from parent to dev).

    This is a layer's own space when ``dev`` was snapshotted from ``parent``;
    ``parent`` None counts every mapped block.  A missing device raises
    ``ThinpoolError``.
    """
    with MetadataReader(metadata_path) as reader:
        roots = reader.mapping_roots()

        def blocks(dev: int) -> tuple[np.ndarray, np.ndarray]:
            if dev not in roots:
                raise ThinpoolError(f"thin device {dev} does not exist")
            parts = list(reader.mappings(roots[dev]))
            if not parts:
                return np.empty(0, np.uint64), np.empty(0, np.uint64)
            return (np.concatenate([p[0] for p in parts]),
                    np.concatenate([p[1] for p in parts]))

        out = []
        for dev, parent in pairs:
            v, d = blocks(dev)
            if parent is None or not len(v):
                out.append(int(len(v)))
                continue
            pv, pd = blocks(parent)
            if not len(pv):
                out.append(int(len(v)))
                continue
            at = np.minimum(np.searchsorted(pv, v), len(pv) - 1)
            same = (pv[at] == v) & (pd[at] == d)
            out.append(int(len(v) - np.count_nonzero(same)))
        return out
