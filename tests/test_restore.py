"""thinpool restore against the real tools, in both directions."""

from __future__ import annotations

import gzip
import random
from pathlib import Path

import pytest

from conftest import KERNEL_FIXTURES, run_tool
from thinpool.errors import ThinpoolError, XmlFormatError
from thinpool.tools.dump import dump
from thinpool.tools.restore import restore

from thinmodel import assert_thin_check_clean, thin_dump

DUMPABLE = ["tmeta", "tmeta_with_empty_roots", "tmeta_device_id_reuse", "tmeta_with_deleted_snapshot",
            "tmeta_with_shared_internal_root", "tmeta_with_shared_internals_and_leaves"]


def empty_file(path: Path, size: int = 64 << 20) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def kernel_xml(name: str, kernel_image, tmp_path: Path) -> str:
    stored = KERNEL_FIXTURES / f"{name}.thin_dump.xml"
    if stored.exists():
        return stored.read_text()
    gz = KERNEL_FIXTURES / f"{name}.thin_dump.xml.gz"
    if gz.exists():
        return gzip.decompress(gz.read_bytes()).decode()
    return thin_dump(kernel_image(name))


@pytest.mark.parametrize("name", DUMPABLE)
def test_restore_kernel_dumps(name: str, kernel_image, tmp_path: Path) -> None:
    """Our restore of kernel metadata's XML -> thin_check clean, thin_dump identical."""
    text = kernel_xml(name, kernel_image, tmp_path)
    xml = tmp_path / "in.xml"
    xml.write_text(text)
    meta = empty_file(tmp_path / "meta")
    restore(xml, meta)
    assert_thin_check_clean(meta)
    assert thin_dump(meta) == text
    ours = tmp_path / "ours.xml"
    with open(ours, "w") as f:
        dump(meta, f)
    assert ours.read_text() == text


def random_xml(seed: int, devices: int = 6, nr_data: int = 200_000) -> str:
    rng = random.Random(seed)
    lines = [f'<superblock uuid="" time="{devices}" transaction="{seed}" flags="0" version="2" '
             f'data_block_size="128" nr_data_blocks="{nr_data}">']
    base = [(v, rng.randrange(nr_data)) for v in sorted(rng.sample(range(50_000), 3000))]
    for dev in range(devices):
        maps = dict(base)
        for v in rng.sample(range(60_000), 500):  # exclusive blocks
            maps[v] = rng.randrange(nr_data)
        items = sorted(maps.items())
        lines.append(f'  <device dev_id="{dev * 3}" mapped_blocks="{len(items)}" transaction="{dev}" '
                     f'creation_time="{dev}" snap_time="{devices}">')
        i = 0
        while i < len(items):
            v, d = items[i]
            run = 1
            while (i + run < len(items) and items[i + run][0] == v + run
                   and items[i + run][1] == d + run):
                run += 1
            t = 0 if (v + dev) % 5 else dev
            if run == 1 or t != 0:
                lines.append(f'    <single_mapping origin_block="{v}" data_block="{d}" time="{t}"/>')
                i += 1
                continue
            lines.append(f'    <range_mapping origin_begin="{v}" data_begin="{d}" length="{run}" '
                         f'time="{t}"/>')
            i += run
        lines.append("  </device>")
    lines.append("</superblock>")
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_round_trip_both_directions(seed: int, tmp_path: Path) -> None:
    text = random_xml(seed)
    xml = tmp_path / "in.xml"
    xml.write_text(text)
    ours, theirs = empty_file(tmp_path / "ours"), empty_file(tmp_path / "theirs")
    restore(xml, ours)
    run_tool("thin_restore", "-i", xml, "-o", theirs, check=True)
    assert_thin_check_clean(ours)
    their_dump = thin_dump(theirs)
    assert thin_dump(ours) == their_dump
    for meta in (ours, theirs):
        out = tmp_path / "dump.xml"
        with open(out, "w") as f:
            dump(meta, f)
        assert out.read_text() == their_dump


def test_restore_counts_three_way_sharing(tmp_path: Path) -> None:
    """Data blocks mapped by 3+ devices need the data overflow tree."""
    head = ('<superblock uuid="" time="1" transaction="1" flags="0" version="2" '
            'data_block_size="128" nr_data_blocks="1000">\n')
    devs = "".join(
        f'  <device dev_id="{i}" mapped_blocks="10" transaction="0" creation_time="0" snap_time="1">\n'
        '    <range_mapping origin_begin="0" data_begin="0" length="10" time="0"/>\n'
        '  </device>\n' for i in range(5))
    xml = tmp_path / "x.xml"
    xml.write_text(head + devs + "</superblock>\n")
    meta = empty_file(tmp_path / "m", 1 << 20)
    restore(xml, meta)
    assert_thin_check_clean(meta)
    from thinpool.thin.metadata import PoolMetadata

    with PoolMetadata(meta, read_only=True) as md:
        assert md.data_block_count(3) == 5


def test_restore_needs_room(tmp_path: Path) -> None:
    xml = tmp_path / "x.xml"
    xml.write_text(random_xml(4))
    small = empty_file(tmp_path / "small", 64 * 1024)
    with pytest.raises(ThinpoolError, match="too small|not enough"):
        restore(xml, small)
    tiny = empty_file(tmp_path / "tiny", 4096)
    with pytest.raises(XmlFormatError, match="too small"):
        restore(xml, tiny)
