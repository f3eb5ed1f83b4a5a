"""thin_dump XML codec: byte-exact writer, strict streaming reader."""

from __future__ import annotations

import gzip
import io
import os
import re
from pathlib import Path

import numpy as np
import pytest

from conftest import KERNEL_FIXTURES, run_tool
from thinpool.errors import ThinpoolError, XmlFormatError
from thinpool.thin.ir import DeviceInfo, MappingChunk, SuperblockInfo
from thinpool.thin.xml import CHUNK_SIZE, XmlWriter, read_xml

SB = ('<superblock uuid="" time="1" transaction="3" flags="0" version="2" '
      'data_block_size="128" nr_data_blocks="1024">')
DEV = '<device dev_id="0" mapped_blocks="5" transaction="0" creation_time="0" snap_time="1">'
SPEC_EXAMPLE = f"""{SB}
  {DEV}
    <range_mapping origin_begin="0" data_begin="0" length="4" time="0"/>
    <single_mapping origin_block="10" data_block="7" time="1"/>
  </device>
  <device dev_id="1" mapped_blocks="4" transaction="1" creation_time="1" snap_time="1">
    <range_mapping origin_begin="0" data_begin="0" length="3" time="0"/>
    <single_mapping origin_block="3" data_block="5" time="1"/>
  </device>
</superblock>
"""


class Recorder:
    """Sink keeping every event; mappings are kept per device as whole arrays."""

    def __init__(self) -> None:
        self.events: list[tuple] = []
        self.chunk_sizes: list[int] = []
        self._parts: list[MappingChunk] = []

    def begin_superblock(self, sb: SuperblockInfo) -> None:
        self.events.append(("superblock", sb))

    def begin_device(self, dev: DeviceInfo) -> None:
        self.events.append(("device", dev))

    def mappings(self, chunk: MappingChunk) -> None:
        assert chunk.vblocks.dtype == chunk.data_blocks.dtype == chunk.times.dtype == np.uint64
        self.chunk_sizes.append(len(chunk))
        self._parts.append(chunk)

    def end_device(self) -> None:
        parts = self._parts
        self.events.append(("mappings",
                            *(np.concatenate([getattr(c, f) for c in parts]) if parts
                              else np.zeros(0, np.uint64)
                              for f in ("vblocks", "data_blocks", "times"))))
        self.events.append(("end_device",))
        self._parts = []

    def end_superblock(self) -> None:
        self.events.append(("end_superblock",))


def parse(text: str) -> Recorder:
    rec = Recorder()
    read_xml(io.BytesIO(text.encode()), rec)
    return rec


def rewrite(text: str) -> str:
    out = io.StringIO()
    read_xml(io.BytesIO(text.encode()), XmlWriter(out))
    return out.getvalue()


def reference_xml(vblocks: list[int], data: list[int], times: list[int]) -> str:
    """Mapping lines as thin_dump prints them, merged one mapping at a time."""
    lines, i = [], 0
    while i < len(vblocks):
        j = i + 1
        while (j < len(vblocks) and vblocks[j] == vblocks[j - 1] + 1
               and data[j] == data[j - 1] + 1 and times[j] == times[i]):
            j += 1
        if j - i == 1:
            lines.append(f'    <single_mapping origin_block="{vblocks[i]}" '
                         f'data_block="{data[i]}" time="{times[i]}"/>\n')
        else:
            lines.append(f'    <range_mapping origin_begin="{vblocks[i]}" data_begin="{data[i]}" '
                         f'length="{j - i}" time="{times[i]}"/>\n')
        i = j
    return "".join(lines)


# -- writer --------------------------------------------------------------------------------

def random_mappings(rng: np.random.Generator, n: int) -> tuple[np.ndarray, ...]:
    """Mappings with runs of every kind: gaps in v or d, time changes, long runs."""
    run_lengths = rng.choice([1, 1, 2, 3, 50, 700], size=n)
    lengths = run_lengths[np.cumsum(run_lengths) <= n]
    starts = np.cumsum(lengths) - lengths
    v_gap = rng.choice([0, 0, 1, 5], size=lengths.size)
    d_gap = rng.choice([0, 0, 2, 9], size=lengths.size)
    total = int(lengths.sum())
    within = np.arange(total) - np.repeat(starts, lengths)
    v = np.repeat(starts + np.cumsum(v_gap), lengths) + within
    d = np.repeat(starts + np.cumsum(d_gap), lengths) + within
    t = np.repeat(rng.integers(0, 3, size=lengths.size), lengths)
    return v.astype(np.uint64), d.astype(np.uint64), t.astype(np.uint64)


@pytest.mark.parametrize("chunking", ["whole", "ones", "random"])
def test_writer_merges_runs_across_chunk_boundaries(chunking: str) -> None:
    rng = np.random.default_rng(7)
    v, d, t = random_mappings(rng, 20_000)
    if chunking == "whole":
        cuts = np.array([], dtype=int)
    elif chunking == "ones":
        cuts = np.arange(1, min(v.size, 3000))
    else:
        cuts = np.sort(rng.choice(np.arange(1, v.size), size=400, replace=False))
    out = io.StringIO()
    w = XmlWriter(out)
    sb = SuperblockInfo("", 5, 6, 0, 2, 128, 1 << 20)
    w.begin_superblock(sb)
    w.begin_device(DeviceInfo(3, v.size, 1, 2, 4))
    for part in zip(np.split(v, cuts), np.split(d, cuts), np.split(t, cuts)):
        w.mappings(MappingChunk(*part))
    w.mappings(MappingChunk(*(np.zeros(0, np.uint64),) * 3))
    w.end_device()
    w.begin_device(DeviceInfo(9, 0, 0, 0, 0))
    w.end_device()
    w.end_superblock()
    expected = (
        '<superblock uuid="" time="5" transaction="6" flags="0" version="2" '
        'data_block_size="128" nr_data_blocks="1048576">\n'
        '  <device dev_id="3" mapped_blocks="%d" transaction="1" creation_time="2" snap_time="4">\n'
        % v.size
        + reference_xml(v.tolist(), d.tolist(), t.tolist())
        + '  </device>\n'
        '  <device dev_id="9" mapped_blocks="0" transaction="0" creation_time="0" snap_time="0">\n'
        '  </device>\n'
        '</superblock>\n')
    assert out.getvalue() == expected


def test_writer_run_needs_equal_time_and_consecutive_data() -> None:
    v = np.array([0, 1, 2, 3, 4, 5, 7], np.uint64)
    d = np.array([10, 11, 12, 20, 21, 22, 23], np.uint64)
    t = np.array([0, 0, 1, 1, 1, 1, 1], np.uint64)
    out = io.StringIO()
    w = XmlWriter(out)
    w.begin_device(DeviceInfo(1, 7, 0, 0, 0))
    w.mappings(MappingChunk(v, d, t))
    w.end_device()
    assert out.getvalue().splitlines()[1:-1] == [
        '    <range_mapping origin_begin="0" data_begin="10" length="2" time="0"/>',
        '    <single_mapping origin_block="2" data_block="12" time="1"/>',
        '    <range_mapping origin_begin="3" data_begin="20" length="3" time="1"/>',
        '    <single_mapping origin_block="7" data_block="23" time="1"/>',
    ]


def test_writer_defaults_for_absent_flags_and_version() -> None:
    """Absent flags/version print as thin_restore 0.9.0 would store them (0 and 1)."""
    out = io.StringIO()
    XmlWriter(out).begin_superblock(SuperblockInfo("", 0, 0, None, None, 128, 0))
    assert out.getvalue() == ('<superblock uuid="" time="0" transaction="0" flags="0" version="1" '
                              'data_block_size="128" nr_data_blocks="0">\n')


# -- reader: round trips --------------------------------------------------------------------

def fixture_xmls() -> list[Path]:
    return sorted(KERNEL_FIXTURES.glob("*.thin_dump*.xml*"))


def read_text(path: Path) -> str:
    return (gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()).decode()


def unrestorable(text: str) -> bool:
    """thin_dump -m of 0.9.0 prints nr_data_blocks="0" even when the snapshot has mappings."""
    return 'nr_data_blocks="0"' in text and "_mapping " in text


@pytest.mark.parametrize("path", fixture_xmls(), ids=lambda p: p.name)
def test_thin_dump_output_round_trips(path: Path, tmp_path: Path) -> None:
    text = read_text(path)
    if not unrestorable(text):
        assert rewrite(text) == text
        return
    # thin_restore refuses these; so must we, with the same message
    with pytest.raises(XmlFormatError, match=r"mapping beyond end of data device \(\d+ >= 0\)"):
        rewrite(text)
    xml = tmp_path / "in.xml"
    xml.write_text(text)
    out = tmp_path / "meta"
    out.write_bytes(b"")
    os.truncate(out, 4 << 20)
    res = run_tool("thin_restore", "-i", xml, "-o", out)
    assert res.returncode != 0
    first = re.search(r'data_(?:begin|block)="(\d+)"', text)
    assert first is not None
    assert f"mapping beyond end of data device ({first.group(1)} >= 0)" in res.stdout + res.stderr


def test_fixture_xmls_exist() -> None:
    assert len(fixture_xmls()) >= 12


def test_spec_example_round_trips_and_expands_ranges() -> None:
    assert rewrite(SPEC_EXAMPLE) == SPEC_EXAMPLE
    rec = parse(SPEC_EXAMPLE)
    kinds = [e[0] for e in rec.events]
    assert kinds == ["superblock", "device", "mappings", "end_device",
                     "device", "mappings", "end_device", "end_superblock"]
    assert rec.events[0][1] == SuperblockInfo("", 1, 3, 0, 2, 128, 1024)
    assert rec.events[1][1] == DeviceInfo(0, 5, 0, 0, 1)
    _, v, d, t = rec.events[2]
    assert v.tolist() == [0, 1, 2, 3, 10]
    assert d.tolist() == [0, 1, 2, 3, 7]
    assert t.tolist() == [0, 0, 0, 0, 1]


def test_reader_accepts_path_and_file(tmp_path: Path) -> None:
    p = tmp_path / "x.xml"
    p.write_text(SPEC_EXAMPLE)
    for source in (p, str(p)):
        rec = Recorder()
        read_xml(source, rec)
        assert rec.events[0][1].nr_data_blocks == 1024
    with open(p, "rb") as f:
        out = io.StringIO()
        read_xml(f, XmlWriter(out))
    assert out.getvalue() == SPEC_EXAMPLE
    with pytest.raises(ThinpoolError, match="cannot open"):
        read_xml(tmp_path / "missing.xml", Recorder())


def test_optional_attributes_and_attribute_order() -> None:
    rec = parse('<superblock nr_data_blocks="9" data_block_size="128" transaction="2" time="1" '
                'uuid="abc" metadata_snap="5">'
                '<device snap_time="4" creation_time="3" transaction="2" mapped_blocks="1" dev_id="7">'
                '<single_mapping time="2" data_block="8" origin_block="1"/>'
                '<range_mapping time="1" length="2" data_begin="0" origin_begin="5"/>'
                '</device><device dev_id="2" mapped_blocks="0" transaction="0" creation_time="0" '
                'snap_time="0"/></superblock>')
    assert rec.events[0][1] == SuperblockInfo("abc", 1, 2, None, None, 128, 9)
    assert rec.events[1][1] == DeviceInfo(7, 1, 2, 3, 4)
    _, v, d, t = rec.events[2]
    assert (v.tolist(), d.tolist(), t.tolist()) == ([1, 5, 6], [8, 0, 1], [2, 1, 1])
    assert rec.events[4][1].dev_id == 2
    assert rec.events[5][1].size == 0  # empty device: no mappings delivered
    assert rec.chunk_sizes == [3]


def test_large_values_survive() -> None:
    big_v = (1 << 64) - 3
    text = (f'<superblock uuid="" time="{(1 << 32) - 1}" transaction="{(1 << 64) - 1}" '
            f'flags="{(1 << 32) - 1}" version="2" data_block_size="{(1 << 32) - 1}" '
            f'nr_data_blocks="{(1 << 64) - 1}">\n'
            f'  <device dev_id="{(1 << 24) - 1}" mapped_blocks="{(1 << 64) - 1}" '
            f'transaction="{(1 << 64) - 1}" creation_time="{(1 << 32) - 1}" '
            f'snap_time="{(1 << 32) - 1}">\n'
            f'    <range_mapping origin_begin="{big_v}" data_begin="{(1 << 40) - 3}" length="3" '
            f'time="{(1 << 24) - 1}"/>\n'
            '  </device>\n</superblock>\n')
    assert rewrite(text) == text


# -- reader: streaming ----------------------------------------------------------------------

def test_streaming_300k_mappings_in_bounded_chunks() -> None:
    singles = [f'<single_mapping origin_block="{2 * i}" data_block="{i}" time="{i % 5}"/>'
               for i in range(100_000)]
    text = (SB.replace('"1024"', '"1000000"')
            + '<device dev_id="1" mapped_blocks="300000" transaction="0" creation_time="0" '
              'snap_time="0">'
            + "\n".join(singles)
            + '<range_mapping origin_begin="300000" data_begin="500000" length="200000" time="3"/>'
            + "</device></superblock>")
    rec = parse(text)
    assert max(rec.chunk_sizes) <= CHUNK_SIZE
    assert sum(rec.chunk_sizes) == 300_000
    assert len(rec.chunk_sizes) >= 300_000 // CHUNK_SIZE
    _, v, d, t = rec.events[2]
    i = np.arange(100_000, dtype=np.uint64)
    assert np.array_equal(v[:100_000], 2 * i) and np.array_equal(d[:100_000], i)
    assert np.array_equal(t[:100_000], i % 5)
    assert np.array_equal(v[100_000:], np.arange(300_000, 500_000, dtype=np.uint64))
    assert np.array_equal(d[100_000:], np.arange(500_000, 700_000, dtype=np.uint64))
    assert (t[100_000:] == 3).all()


def test_huge_range_is_split_without_materialising() -> None:
    """One 10^8-block range arrives as many chunks, each bounded."""

    class Bounds:
        def __init__(self) -> None:
            self.n, self.biggest = 0, 0
            self.first: int | None = None
            self.last = -1
            self.ok = True

        def begin_superblock(self, sb: SuperblockInfo) -> None: ...
        def begin_device(self, dev: DeviceInfo) -> None: ...
        def end_device(self) -> None: ...
        def end_superblock(self) -> None: ...

        def mappings(self, chunk: MappingChunk) -> None:
            self.biggest = max(self.biggest, len(chunk))
            self.first = int(chunk.vblocks[0]) if self.first is None else self.first
            self.ok &= int(chunk.vblocks[0]) == self.last + 1 and bool(
                (chunk.data_blocks - chunk.vblocks == 7).all())
            self.last = int(chunk.vblocks[-1])
            self.n += len(chunk)

    n = 100_000_000
    sink = Bounds()
    text = (f'<superblock uuid="" time="0" transaction="0" data_block_size="128" '
            f'nr_data_blocks="{n + 7}"><device dev_id="0" mapped_blocks="{n}" transaction="0" '
            f'creation_time="0" snap_time="0"><range_mapping origin_begin="0" data_begin="7" '
            f'length="{n}" time="0"/></device></superblock>')
    read_xml(io.BytesIO(text.encode()), sink)
    assert (sink.n, sink.first, sink.last, sink.ok) == (n, 0, n - 1, True)
    assert sink.biggest == CHUNK_SIZE


# -- reader: bad input ----------------------------------------------------------------------

def doc(*body: str, sb: str = SB) -> str:
    """A document with ``body`` lines inside the first device, one element per line."""
    return "\n".join([sb, DEV, *body, "</device>", "</superblock>"])


BAD = {
    "unknown element": (doc("<foo/>"), "line 3: <foo>: unknown element"),
    "unknown top element": ("<metadata/>", "line 1: <metadata>: unknown element"),
    "unknown attribute superblock": (doc(sb=SB.replace("<superblock", '<superblock colour="red"')),
                                     "line 1: <superblock>: unknown attribute 'colour'"),
    "unknown attribute device": (doc().replace("<device", '<device name="x"'),
                                 "line 2: <device>: unknown attribute 'name'"),
    "unknown attribute single": (doc('<single_mapping origin_block="0" data_block="0" time="0" x="1"/>'),
                                 "line 3: <single_mapping>: unknown attribute 'x'"),
    "unknown attribute range": (doc('<range_mapping origin_begin="0" data_begin="0" length="2" '
                                    'time="0" len="2"/>'),
                                "line 3: <range_mapping>: unknown attribute 'len'"),
    "missing superblock time": (doc(sb=SB.replace(' time="1"', "")),
                                "line 1: <superblock>: missing attribute 'time'"),
    "missing uuid": (doc(sb=SB.replace(' uuid=""', "")),
                     "line 1: <superblock>: missing attribute 'uuid'"),
    "missing dev_id": (doc().replace(' dev_id="0"', ""),
                       "line 2: <device>: missing attribute 'dev_id'"),
    "missing time": (doc('<single_mapping origin_block="0" data_block="0"/>'),
                     "line 3: <single_mapping>: missing attribute 'time'"),
    "missing length": (doc('<range_mapping origin_begin="0" data_begin="0" time="0"/>'),
                       "line 3: <range_mapping>: missing attribute 'length'"),
    "word": (doc('<single_mapping origin_block="abc" data_block="0" time="0"/>'),
             "line 3: <single_mapping>: attribute origin_block='abc' is not a decimal integer"),
    "negative": (doc('<single_mapping origin_block="0" data_block="-1" time="0"/>'),
                 "attribute data_block='-1' is not a decimal integer"),
    "plus sign": (doc('<range_mapping origin_begin="0" data_begin="0" length="+2" time="0"/>'),
                  "attribute length='+2' is not a decimal integer"),
    "space": (doc('<single_mapping origin_block=" 1" data_block="0" time="0"/>'),
              "attribute origin_block=' 1' is not a decimal integer"),
    "empty": (doc('<single_mapping origin_block="" data_block="0" time="0"/>'),
              "attribute origin_block='' is not a decimal integer"),
    "underscore": (doc('<single_mapping origin_block="1_0" data_block="0" time="0"/>'),
                   "attribute origin_block='1_0' is not a decimal integer"),
    "fraction": (doc(sb=SB.replace('"128"', '"12.8"')), "<superblock>: attribute data_block_size"),
    "non-ascii digit": (doc('<single_mapping origin_block="\u0663" data_block="0" time="0"/>'),
                        "is not a decimal integer"),
    "dev_id too big": (doc().replace('dev_id="0"', 'dev_id="16777216"'),
                       "line 2: <device>: attribute dev_id=16777216 is out of range"),
    "mapping time too big": (doc('<single_mapping origin_block="0" data_block="0" time="16777216"/>'),
                             "line 3: <single_mapping>: time 16777216 is out of range"),
    "mapping time, generic path": (doc('<single_mapping time="16777216" origin_block="0" '
                                       'data_block="0"/>'),
                                   "line 3: <single_mapping>: time 16777216 is out of range"),
    "creation_time too big": (doc().replace('creation_time="0"', 'creation_time="4294967296"'),
                              "<device>: attribute creation_time=4294967296 is out of range"),
    "data_block_size too big": (doc(sb=SB.replace('"128"', '"4294967296"')),
                                "<superblock>: attribute data_block_size=4294967296 is out of range"),
    "flags too big": (doc(sb=SB.replace('flags="0"', 'flags="4294967296"')),
                      "attribute flags=4294967296 is out of range"),
    "transaction too big": (doc(sb=SB.replace('transaction="3"', f'transaction="{1 << 64}"')),
                            "attribute transaction=18446744073709551616 is out of range"),
    "vblock past 2^64": (doc(f'<range_mapping origin_begin="{(1 << 64) - 1}" data_begin="0" '
                             'length="2" time="0"/>'), "line 3: <range_mapping>: virtual block"),
    "out of order": (doc('<single_mapping origin_block="5" data_block="0" time="0"/>',
                         '<single_mapping origin_block="4" data_block="1" time="0"/>'),
                     "line 4: <single_mapping>: virtual block 4 is out of order or overlaps"),
    "duplicate vblock": (doc('<single_mapping origin_block="5" data_block="0" time="0"/>',
                             '<single_mapping origin_block="5" data_block="1" time="0"/>'),
                         "line 4: <single_mapping>: virtual block 5 is out of order"),
    "overlapping range": (doc('<range_mapping origin_begin="0" data_begin="0" length="10" time="0"/>',
                              '<single_mapping origin_block="9" data_block="20" time="0"/>'),
                          "line 4: <single_mapping>: virtual block 9 is out of order or overlaps"),
    "zero length": (doc('<range_mapping origin_begin="0" data_begin="0" length="0" time="0"/>'),
                    "line 3: <range_mapping>: length must be at least 1"),
    "beyond data device": (doc('<single_mapping origin_block="0" data_block="1024" time="0"/>'),
                           "line 3: <single_mapping>: mapping beyond end of data device (1024 >= 1024)"),
    "range beyond data device": (doc('<range_mapping origin_begin="0" data_begin="1000" length="30" '
                                     'time="0"/>'), "mapping beyond end of data device (1024 >= 1024)"),
    "data block past 40 bits": (
        doc(f'<single_mapping origin_block="0" data_block="{1 << 40}" time="0"/>',
            sb=SB.replace('"1024"', f'"{1 << 41}"')), "does not fit in 40 bits"),
    "unclosed": (SB + "\n" + DEV + "\n", "malformed XML at line 3"),
    "mismatched tag": (doc("</superblock>"), "malformed XML at line 3, column 3: mismatched tag"),
    "not xml": ("hello world", "malformed XML at line 1"),
    "empty document": ("", "malformed XML at line 1"),
    "two roots": (doc() + "\n" + SB + "</superblock>",
                  "malformed XML at line 5, column 1: junk after document element"),
    "mapping outside device": ("\n".join([SB, '<single_mapping origin_block="0" data_block="0" '
                                              'time="0"/>', "</superblock>"]),
                               "line 2: <single_mapping>: mapping outside a device"),
    "mapping as root": ('<range_mapping origin_begin="0" data_begin="0" length="1" time="0"/>',
                        "<range_mapping>: mapping outside a device"),
    "missing superblock": (DEV + "</device>", "line 1: <device>: device outside a superblock"),
    "nested device": (doc(DEV, "</device>"), "line 3: <device>: nested device"),
    "nested superblock": (doc(SB, "</superblock>"), "line 3: <superblock>: nested superblock"),
    "duplicate device": (doc().replace("</device>", "</device>" + DEV + "</device>"),
                         "<device>: duplicate dev_id 0"),
    "element inside mapping": (
        doc('<single_mapping origin_block="0" data_block="0" time="0"><foo/></single_mapping>'),
        "line 3: <foo>: unexpected element inside <single_mapping>"),
    "text in device": (doc("surprise"), "line 3: unexpected text 'surprise' in <device>"),
    "rust def": (doc(sb=SB + '\n<def name="a"></def>'), "line 2: <def>: shared-leaf"),
    "rust ref": (doc('<ref name="a"/>'), "line 3: <ref>: shared-leaf <def>/<ref> elements"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_is_one_clear_line(name: str) -> None:
    text, message = BAD[name]
    with pytest.raises(XmlFormatError) as info:
        parse(text)
    msg = str(info.value)
    assert message in msg
    assert "\n" not in msg and "line " in msg


def test_error_stops_before_bad_mapping_is_delivered() -> None:
    """Mappings are validated before they reach the sink."""
    rec = Recorder()
    with pytest.raises(XmlFormatError):
        read_xml(io.BytesIO(BAD["beyond data device"][0].encode()), rec)
    assert rec.chunk_sizes == []
