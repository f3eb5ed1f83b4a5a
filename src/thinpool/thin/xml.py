"""thin_dump XML: a byte-exact writer and a strict streaming reader.

The format is the one thin-provisioning-tools 0.9.0 writes (dm-thin-format.md
6.1).  ``XmlWriter`` is an event sink (see ``ir``) whose output is identical
to ``thin_dump``'s; ``read_xml`` parses a document with expat and replays it as
the same events on any sink, expanding ``range_mapping`` elements with numpy
and delivering mappings in bounded chunks so huge devices never sit in memory.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import BinaryIO, Protocol, TextIO
from xml.parsers import expat
from xml.sax.saxutils import quoteattr

import numpy as np

from ..errors import ThinpoolError, XmlFormatError
from .ir import DeviceInfo, MappingChunk, SuperblockInfo

CHUNK_SIZE = 65536
"""Most mappings ``read_xml`` hands to a sink in one ``MappingChunk``."""

U32_LIMIT = 1 << 32
U64_LIMIT = 1 << 64
DEV_ID_LIMIT = 1 << 24
MAPPING_TIME_LIMIT = 1 << 24
DATA_BLOCK_LIMIT = 1 << 40
READ_SIZE = 1 << 20

_SINGLE = '    <single_mapping origin_block="%d" data_block="%d" time="%d"/>\n'
_RANGE = '    <range_mapping origin_begin="%d" data_begin="%d" length="%d" time="%d"/>\n'
_TEMPLATES = np.array([_SINGLE, _RANGE], dtype=object)
_ONE = np.uint64(1)


class MetadataSink(Protocol):
    """Receiver of a metadata walk: one superblock holding devices holding mappings."""

    def begin_superblock(self, sb: SuperblockInfo) -> None: ...
    def begin_device(self, dev: DeviceInfo) -> None: ...
    def mappings(self, chunk: MappingChunk) -> None: ...
    def end_device(self) -> None: ...
    def end_superblock(self) -> None: ...


# -- writer --------------------------------------------------------------------------------

class XmlWriter:
    """Writes events as thin_dump 0.9.0 XML.

    Mappings are merged into runs (consecutive virtual and data blocks, equal
    time) with numpy; the last run of a chunk is held back because the next
    chunk may extend it.
    """

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self._run: tuple[int, int, int, int] | None = None  # vblock, data block, time, length

    def begin_superblock(self, sb: SuperblockInfo) -> None:
        flags = 0 if sb.flags is None else sb.flags
        version = 1 if sb.version is None else sb.version
        self.out.write(
            f'<superblock uuid={quoteattr(sb.uuid)} time="{sb.time}" '
            f'transaction="{sb.transaction}" flags="{flags}" version="{version}" '
            f'data_block_size="{sb.data_block_size}" nr_data_blocks="{sb.nr_data_blocks}">\n')

    def begin_device(self, dev: DeviceInfo) -> None:
        self._run = None
        self.out.write(
            f'  <device dev_id="{dev.dev_id}" mapped_blocks="{dev.mapped_blocks}" '
            f'transaction="{dev.transaction}" creation_time="{dev.creation_time}" '
            f'snap_time="{dev.snap_time}">\n')

    def mappings(self, chunk: MappingChunk) -> None:
        n = len(chunk)
        if n == 0:
            return
        v, d, t = chunk.vblocks, chunk.data_blocks, chunk.times
        breaks = np.flatnonzero((v[1:] != v[:-1] + _ONE) | (d[1:] != d[:-1] + _ONE)
                                | (t[1:] != t[:-1])) + 1
        starts = np.concatenate(([0], breaks))
        lengths = np.diff(np.append(starts, n)).astype(np.uint64)
        rv, rd, rt = v[starts], d[starts], t[starts]
        if self._run is not None:
            pv, pd, pt, pl = self._run
            if int(v[0]) == pv + pl and int(d[0]) == pd + pl and int(t[0]) == pt:
                rv[0], rd[0], lengths[0] = pv, pd, int(lengths[0]) + pl
            else:
                self._write_run(*self._run)
        self._run = (int(rv[-1]), int(rd[-1]), int(rt[-1]), int(lengths[-1]))
        self._write_runs(rv[:-1], rd[:-1], rt[:-1], lengths[:-1])

    def end_device(self) -> None:
        if self._run is not None:
            self._write_run(*self._run)
            self._run = None
        self.out.write("  </device>\n")

    def end_superblock(self) -> None:
        self.out.write("</superblock>\n")

    def _write_run(self, v: int, d: int, t: int, length: int) -> None:
        self.out.write(_SINGLE % (v, d, t) if length == 1 else _RANGE % (v, d, length, t))

    def _write_runs(self, v: np.ndarray, d: np.ndarray, t: np.ndarray,
                    lengths: np.ndarray) -> None:
        """One formatting call for a batch of runs: a template per line, values in order."""
        if v.size == 0:
            return
        is_range = lengths != _ONE
        template = "".join(_TEMPLATES[is_range.view(np.uint8)].tolist())
        table = np.stack([v, d, lengths, t], axis=1)
        keep = np.ones(table.shape, dtype=bool)
        keep[:, 2] = is_range  # single_mapping has no length attribute
        self.out.write(template % tuple(table[keep].tolist()))


# -- reader --------------------------------------------------------------------------------

def read_xml(source: BinaryIO | str | os.PathLike[str], sink: MetadataSink) -> None:
    """Parse thin_dump XML from a binary file or a path and replay it on ``sink``.

    Raises ``XmlFormatError`` (one line, with the XML line number) for
    anything thin_restore could not turn into valid metadata.
    """
    if isinstance(source, (str, os.PathLike)):
        try:
            f = open(source, "rb")
        except OSError as e:
            raise ThinpoolError(f"cannot open {os.fspath(source)}: {e.strerror}") from None
        with f:
            _XmlReader(sink).parse(f)
    else:
        _XmlReader(sink).parse(source)


def _parse_int(name: str, text: str, limit: int) -> int:
    if not (text.isascii() and text.isdigit()):
        raise ValueError(f"attribute {name}={text!r} is not a decimal integer")
    value = int(text)
    if value >= limit:
        raise ValueError(f"attribute {name}={text} is out of range (must be < {limit})")
    return value


class _XmlReader:
    """Expat callbacks plus the validation state of one document.

    Mapping elements are the hot path (one per line of a big dump), so they
    are dispatched first and validated with a single combined test; the
    detailed diagnosis runs only once something is wrong.
    """

    def __init__(self, sink: MetadataSink) -> None:
        self.sink = sink
        self.p = expat.ParserCreate()
        self.p.ordered_attributes = True
        self.p.StartElementHandler = self._start
        self.p.EndElementHandler = self._end
        self.p.CharacterDataHandler = self._text
        self._starts: dict[str, Callable[[list[str]], None]] = {
            "device": self._device, "superblock": self._superblock,
            "def": self._rust_only, "ref": self._rust_only,
        }
        self._open: list[str] = []  # open superblock/device elements
        self._leaf: str | None = None  # open mapping element (it may not contain anything)
        self._nr_data_blocks = 0
        self._data_limit = 0  # data blocks must stay below this
        self._dev_ids: set[int] = set()
        self._next_vblock = U64_LIMIT  # lowest vblock the next mapping may use; 2^64: no device
        self._rv: list[int] = []  # pending runs: vblock, data block, length, time
        self._rd: list[int] = []
        self._rl: list[int] = []
        self._rt: list[int] = []
        self._pending = 0  # mappings in the pending runs

    def parse(self, f: BinaryIO) -> None:
        try:
            while block := f.read(READ_SIZE):
                self.p.Parse(block, False)
            self.p.Parse(b"", True)
        except expat.ExpatError as e:
            raise XmlFormatError(f"malformed XML at line {e.lineno}, column {e.offset + 1}: "
                                 f"{expat.ErrorString(e.code)}") from None

    def _error(self, element: str, problem: str) -> XmlFormatError:
        return XmlFormatError(f"XML line {self.p.CurrentLineNumber}: <{element}>: {problem}")

    # -- structure
    def _start(self, name: str, attrs: list[str]) -> None:
        if self._leaf is not None:
            raise self._error(name, f"unexpected element inside <{self._leaf}>")
        if name == "single_mapping":
            self._leaf = name
            self._single(attrs)
        elif name == "range_mapping":
            self._leaf = name
            self._range(attrs)
        else:
            handler = self._starts.get(name)
            if handler is None:
                raise self._error(name, "unknown element")
            self._open.append(name)
            handler(attrs)

    def _end(self, name: str) -> None:
        if self._leaf is not None:  # nothing can open inside a mapping: this closes it
            self._leaf = None
            return
        self._open.pop()
        if name == "device":
            self._flush()
            self._next_vblock = U64_LIMIT
            self.sink.end_device()
        elif name == "superblock":
            self.sink.end_superblock()

    def _text(self, data: str) -> None:
        if not data.isspace():
            where = f"<{self._leaf or self._open[-1]}>" if self._open else "the document"
            raise XmlFormatError(f"XML line {self.p.CurrentLineNumber}: unexpected text "
                                 f"{data.strip()[:40]!r} in {where}")

    def _attributes(self, element: str, attrs: list[str], limits: dict[str, int | None],
                    optional: tuple[str, ...] = ()) -> dict[str, int | str]:
        """Name -> value with strict checks; ``limits`` gives each integer's bound (None: text)."""
        given = dict(zip(attrs[::2], attrs[1::2]))
        for name in given:
            if name not in limits:
                raise self._error(element, f"unknown attribute {name!r}")
        values: dict[str, int | str] = {}
        for name, limit in limits.items():
            if name not in given:
                if name in optional:
                    continue
                raise self._error(element, f"missing attribute {name!r}")
            text = given[name]
            if limit is None:
                values[name] = text
                continue
            try:
                values[name] = _parse_int(name, text, limit)
            except ValueError as e:
                raise self._error(element, str(e)) from None
        return values

    def _superblock(self, attrs: list[str]) -> None:
        if len(self._open) > 1:
            raise self._error("superblock", "nested superblock")
        a = self._attributes("superblock", attrs, {
            "uuid": None, "time": U32_LIMIT, "transaction": U64_LIMIT, "flags": U32_LIMIT,
            "version": U32_LIMIT, "data_block_size": U32_LIMIT, "nr_data_blocks": U64_LIMIT,
            "metadata_snap": U64_LIMIT,
        }, optional=("flags", "version", "metadata_snap"))
        self._nr_data_blocks = int(a["nr_data_blocks"])
        self._data_limit = min(self._nr_data_blocks, DATA_BLOCK_LIMIT)
        flags, version = a.get("flags"), a.get("version")
        self.sink.begin_superblock(SuperblockInfo(
            uuid=str(a["uuid"]), time=int(a["time"]), transaction=int(a["transaction"]),
            flags=None if flags is None else int(flags),
            version=None if version is None else int(version),
            data_block_size=int(a["data_block_size"]), nr_data_blocks=self._nr_data_blocks))

    def _device(self, attrs: list[str]) -> None:
        if self._open[0] != "superblock":
            raise self._error("device", "device outside a superblock")
        if len(self._open) > 2:
            raise self._error("device", "nested device")
        a = self._attributes("device", attrs, {
            "dev_id": DEV_ID_LIMIT, "mapped_blocks": U64_LIMIT, "transaction": U64_LIMIT,
            "creation_time": U32_LIMIT, "snap_time": U32_LIMIT,
        })
        dev_id = int(a["dev_id"])
        if dev_id in self._dev_ids:
            raise self._error("device", f"duplicate dev_id {dev_id}")
        self._dev_ids.add(dev_id)
        self._next_vblock = 0
        self.sink.begin_device(DeviceInfo(
            dev_id=dev_id, mapped_blocks=int(a["mapped_blocks"]),
            transaction=int(a["transaction"]), creation_time=int(a["creation_time"]),
            snap_time=int(a["snap_time"])))

    def _rust_only(self, attrs: list[str]) -> None:
        raise self._error(self._open[-1], "shared-leaf <def>/<ref> elements (thin_dump 1.x) "
                                          "are not supported; use the 0.9.0 format")

    # -- mappings
    def _single(self, attrs: list[str]) -> None:
        if len(attrs) == 6 and attrs[0] == "origin_block" and attrs[2] == "data_block" \
                and attrs[4] == "time":  # thin_dump's own layout: skip the generic checks
            digits = attrs[1] + attrs[3] + attrs[5]
            if digits.isascii() and digits.isdigit():
                try:
                    v, d, t = int(attrs[1]), int(attrs[3]), int(attrs[5])
                except ValueError:  # an empty value; reported below
                    pass
                else:
                    self._add("single_mapping", v, d, 1, t)
                    return
        a = self._attributes("single_mapping", attrs, {
            "origin_block": U64_LIMIT, "data_block": U64_LIMIT, "time": U64_LIMIT})
        self._add("single_mapping", int(a["origin_block"]), int(a["data_block"]), 1,
                  int(a["time"]))

    def _range(self, attrs: list[str]) -> None:
        if len(attrs) == 8 and attrs[0] == "origin_begin" and attrs[2] == "data_begin" \
                and attrs[4] == "length" and attrs[6] == "time":
            digits = attrs[1] + attrs[3] + attrs[5] + attrs[7]
            if digits.isascii() and digits.isdigit():
                try:
                    v, d, n, t = int(attrs[1]), int(attrs[3]), int(attrs[5]), int(attrs[7])
                except ValueError:
                    pass
                else:
                    self._add("range_mapping", v, d, n, t)
                    return
        a = self._attributes("range_mapping", attrs, {
            "origin_begin": U64_LIMIT, "data_begin": U64_LIMIT, "length": U64_LIMIT,
            "time": U64_LIMIT})
        self._add("range_mapping", int(a["origin_begin"]), int(a["data_begin"]),
                  int(a["length"]), int(a["time"]))

    def _add(self, element: str, v: int, d: int, length: int, t: int) -> None:
        """Queue ``length`` mappings v+i -> d+i, flushing whenever a chunk fills up."""
        if (v < self._next_vblock or not length or t >= MAPPING_TIME_LIMIT
                or d + length > self._data_limit or v + length > U64_LIMIT):
            raise self._mapping_error(element, v, d, length, t)
        self._next_vblock = v + length
        if self._pending + length < CHUNK_SIZE:  # once per XML line: _queue inlined
            self._rv.append(v)
            self._rd.append(d)
            self._rl.append(length)
            self._rt.append(t)
            self._pending += length
            return
        while self._pending + length >= CHUNK_SIZE:
            room = CHUNK_SIZE - self._pending
            self._queue(v, d, room, t)
            self._flush()
            v, d, length = v + room, d + room, length - room
        if length:
            self._queue(v, d, length, t)

    def _mapping_error(self, element: str, v: int, d: int, length: int,
                       t: int) -> XmlFormatError:
        """Say which of the conditions ``_add`` tests at once is violated."""
        if not self._open or self._open[-1] != "device":
            return self._error(element, "mapping outside a device")
        if v < self._next_vblock:
            return self._error(element, f"virtual block {v} is out of order or overlaps the "
                                        f"previous mapping (which ends before {self._next_vblock})")
        if not length:
            return self._error(element, "length must be at least 1")
        if t >= MAPPING_TIME_LIMIT:
            return self._error(element, f"time {t} is out of range (must be < {MAPPING_TIME_LIMIT})")
        if d + length > self._nr_data_blocks:  # name the first block past the end, as 0.9.0 does
            return self._error(element, f"mapping beyond end of data device "
                                        f"({max(d, self._nr_data_blocks)} >= {self._nr_data_blocks})")
        if d + length > DATA_BLOCK_LIMIT:
            return self._error(element, f"data block {max(d, DATA_BLOCK_LIMIT)} does not fit "
                                        f"in 40 bits")
        return self._error(element, f"virtual block {v + length - 1} is out of range "
                                    f"(must be < {U64_LIMIT})")

    def _queue(self, v: int, d: int, length: int, t: int) -> None:
        self._rv.append(v)
        self._rd.append(d)
        self._rl.append(length)
        self._rt.append(t)
        self._pending += length

    def _flush(self) -> None:
        """Expand the pending runs into one chunk of at most CHUNK_SIZE mappings."""
        if not self._pending:
            return
        v = np.array(self._rv, dtype=np.uint64)
        d = np.array(self._rd, dtype=np.uint64)
        t = np.array(self._rt, dtype=np.uint64)
        if self._pending != len(self._rl):
            lengths = np.array(self._rl, dtype=np.int64)
            run_starts = (np.cumsum(lengths) - lengths).astype(np.uint64)
            within = np.arange(self._pending, dtype=np.uint64) - np.repeat(run_starts, lengths)
            v = np.repeat(v, lengths) + within
            d = np.repeat(d, lengths) + within
            t = np.repeat(t, lengths)
        self.sink.mappings(MappingChunk(v, d, t))
        self._rv, self._rd, self._rl, self._rt = [], [], [], []
        self._pending = 0
