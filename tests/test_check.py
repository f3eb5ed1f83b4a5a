"""thinpool.tools.check against the real thin_check 0.9.0.

Kernel-written images must get thin_check's verdict and name the blocks it
names; images restored by thin_restore must be clean; every kind of damage
done to a copy of a good image must be reported, naming the damaged block.
No mocks: images come from the kernel fixtures or from thin_restore, and the
damage is written into real files.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable, cast

import pytest

from conftest import KERNEL_IMAGES, require_tool, run_tool
from thinpool.ondisk import spacemap as smf
from thinpool.ondisk.checksum import BLOCK_SIZE, Salt, classify, stamp
from thinpool.ondisk.node import INDEX_ENTRY, NodeView, values_offset
from thinpool.thin.reader import MetadataReader
from thinpool.tools.check import CheckReport, check

BLOCK_RE = re.compile(r"\(block (\d+)\)")


# -- helpers -------------------------------------------------------------------------------


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def checked(path: Path, snapshot: bool = False) -> CheckReport:
    """Run our check, asserting the input is left untouched."""
    before = sha256(path)
    report = check(path, snapshot=snapshot)
    assert sha256(path) == before, "check modified its input"
    return report


def thin_check(path: Path, *opts: str) -> subprocess.CompletedProcess[str]:
    return run_tool("thin_check", *opts, path)


def problems(report: CheckReport) -> str:
    return "\n".join(report.errors + report.leaks)


def names_block(lines: list[str], block: int) -> bool:
    pattern = re.compile(rf"\bblock {block}\b")
    return any(pattern.search(line) for line in lines)


def read_block(path: Path, b: int) -> bytearray:
    with open(path, "rb") as f:
        f.seek(b * BLOCK_SIZE)
        return bytearray(f.read(BLOCK_SIZE))


def write_block(path: Path, b: int, data: bytes | bytearray) -> None:
    with open(path, "r+b") as f:
        f.seek(b * BLOCK_SIZE)
        f.write(data)


def edit_block(path: Path, b: int, edit: Callable[[bytearray], None], salt: Salt | None) -> None:
    """Apply ``edit`` to block ``b``; restamp its checksum with ``salt`` unless None."""
    data = read_block(path, b)
    edit(data)
    if salt is not None:
        stamp(data, salt)
    write_block(path, b, data)


def put_u64(data: bytearray, off: int, value: int) -> None:
    data[off:off + 8] = value.to_bytes(8, "little")


def put_u32(data: bytearray, off: int, value: int) -> None:
    data[off:off + 4] = value.to_bytes(4, "little")


def data_index(r: MetadataReader) -> dict[int, tuple[int, int, int]]:
    """Data space-map index entries by bitmap number."""
    items = r.tree_items(r.sb.data_sm.bitmap_root, INDEX_ENTRY)
    return cast(dict[int, tuple[int, int, int]], dict(items))


def roles(path: Path) -> dict[str, int]:
    """One block of every kind in a restored image (device 1 has an internal root)."""
    with MetadataReader(path) as r:
        sb = r.sb
        out = {
            "superblock": 0,
            "details leaf": sb.device_details_root,
            "top-level leaf": sb.data_mapping_root,
            "data index leaf": sb.data_sm.bitmap_root,
            "data overflow leaf": sb.data_sm.ref_count_root,
            "metadata index block": sb.metadata_sm.bitmap_root,
            "metadata overflow leaf": sb.metadata_sm.ref_count_root,
        }
        index = smf.decode_index_block(r.bm.read(sb.metadata_sm.bitmap_root, Salt.INDEX),
                                       sb.metadata_sm.bitmap_root)
        out["metadata bitmap"] = index[0][0]
        out["data bitmap"] = data_index(r)[0][0]
        root = r.mapping_roots()[1]
        node = r.node(root, 8)
        assert not node.is_leaf
        out["mapping internal node"] = root
        out["mapping leaf"] = node.u64_at(1)
    return out


def node_view(path: Path, b: int) -> NodeView:
    return NodeView(bytes(read_block(path, b)))


def set_count(path: Path, bitmap_block: int, entry: int, value: int) -> None:
    """Set one 2-bit entry of a space-map bitmap (0..3), with a valid checksum."""
    counts = smf.decode_bitmap(bytes(read_block(path, bitmap_block)), bitmap_block)
    counts[entry] = value
    write_block(path, bitmap_block, smf.encode_bitmap(counts, bitmap_block))


def get_count(path: Path, bitmap_block: int, entry: int) -> int:
    return int(smf.decode_bitmap(bytes(read_block(path, bitmap_block)), bitmap_block)[entry])


# -- restored images -----------------------------------------------------------------------

NR_DATA_BLOCKS = 40_000  # three data bitmaps, the last one partial


def generated_xml(seed: int = 7) -> str:
    """Several devices: ranges and singles, an internal root, an empty device, data
    blocks 0-299 mapped by four devices (count 4: a one-leaf data overflow tree), and
    mappings in all three data bitmaps."""
    rng = random.Random(seed)
    lines = [f'<superblock uuid="" time="3" transaction="9" flags="0" version="2" '
             f'data_block_size="128" nr_data_blocks="{NR_DATA_BLOCKS}">']

    def device(dev: int, body: list[str]) -> None:
        lines.append(f'  <device dev_id="{dev}" mapped_blocks="0" transaction="{dev}" '
                     f'creation_time="{min(dev, 3)}" snap_time="3">')
        lines.extend(body)
        lines.append("  </device>")

    shared = '    <range_mapping origin_begin="0" data_begin="0" length="300" time="0"/>'
    device(1, [shared,
               '    <range_mapping origin_begin="300" data_begin="300" length="19700" time="1"/>',
               '    <single_mapping origin_block="50000" data_block="39999" time="2"/>'])
    device(2, [shared])
    device(3, [shared, '    <range_mapping origin_begin="5000" data_begin="20000" length="300" '
                       'time="2"/>'])
    device(4, [])
    device(5, [shared])
    singles = sorted(rng.sample(range(100_000), 600))
    data = rng.sample(range(20_300, 39_999), 600)
    device(7, [f'    <single_mapping origin_block="{v}" data_block="{d}" time="{rng.randint(0, 3)}"/>'
               for v, d in zip(singles, data)])
    lines.append("</superblock>")
    return "\n".join(lines) + "\n"


SPEC_EXAMPLE_XML = """\
<superblock uuid="" time="1" transaction="3" flags="0" version="2" data_block_size="128" nr_data_blocks="1024">
  <device dev_id="0" mapped_blocks="5" transaction="0" creation_time="0" snap_time="1">
    <range_mapping origin_begin="0" data_begin="0" length="4" time="0"/>
    <single_mapping origin_block="10" data_block="7" time="1"/>
  </device>
  <device dev_id="1" mapped_blocks="4" transaction="1" creation_time="1" snap_time="1">
    <range_mapping origin_begin="0" data_begin="0" length="3" time="0"/>
    <single_mapping origin_block="3" data_block="5" time="1"/>
  </device>
</superblock>
"""

EMPTY_POOL_XML = """\
<superblock uuid="" time="0" transaction="0" flags="0" version="2" data_block_size="128" nr_data_blocks="0">
</superblock>
"""


def restore(xml: str, out: Path, size: int = 8 << 20) -> Path:
    xml_path = out.with_suffix(".xml")
    xml_path.write_text(xml)
    with open(out, "wb") as f:
        f.truncate(size)
    run_tool("thin_restore", "-q", "-i", xml_path, "-o", out, check=True)
    return out


@pytest.fixture(scope="session")
def restored(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A read-only image restored from ``generated_xml()``."""
    path = restore(generated_xml(), tmp_path_factory.mktemp("restored") / "pool.bin")
    path.chmod(0o444)
    return path


@pytest.fixture
def damaged(restored: Path, tmp_path: Path) -> Path:
    """A writable copy of the restored image, to damage."""
    path = tmp_path / "damaged.bin"
    shutil.copyfile(restored, path)
    return path


# -- kernel images -------------------------------------------------------------------------


def _compare_with_thin_check(report: CheckReport, expected: dict) -> None:
    ours = report.errors + report.leaks
    assert report.clean == (expected["rc"] == 0), "\n".join(ours) or expected["output"]
    for block in map(int, BLOCK_RE.findall(expected["output"])):
        assert names_block(ours, block), f"thin_check names block {block}; we said:\n" + \
            "\n".join(ours)
    m = re.search(r"TRANSACTION_ID=(\d+)", expected["output"])
    if m:
        assert report.transaction_id == int(m.group(1))


@pytest.mark.parametrize("name", KERNEL_IMAGES)
def test_kernel_image_matches_thin_check(name: str, kernel_image, kernel_index) -> None:
    path = kernel_image(name)
    report = checked(path)
    _compare_with_thin_check(report, kernel_index[name]["tools"]["thin_check"])
    assert report.metadata_snap == kernel_index[name]["metadata_snap_block"]


@pytest.mark.parametrize("name", KERNEL_IMAGES)
def test_kernel_image_snapshot_matches_thin_check_m(name: str, kernel_image,
                                                      kernel_index) -> None:
    info = kernel_index[name]
    path = kernel_image(name)
    report = checked(path, snapshot=True)
    if "thin_check_m" not in info["tools"]:
        assert info["metadata_snap_block"] == 0
        assert not report.clean
        assert "no metadata snapshot is held" in report.errors[0]
        return
    _compare_with_thin_check(report, info["tools"]["thin_check_m"])


def test_kernel_corrupt_snapshot_superblock_is_named(kernel_image) -> None:
    """thin_check only says "bad checksum in superblock"; we name the copy's block."""
    for snapshot in (False, True):
        report = checked(kernel_image("tmeta_with_corrupted_metadata_snap"), snapshot)
        assert names_block(report.errors, 7), report.errors


def test_kernel_summary_fields(kernel_image) -> None:
    report = checked(kernel_image("tmeta"))
    assert report.clean
    assert (report.transaction_id, report.time, report.nr_devices) == (21, 15, 11)
    assert report.data_blocks_used == 11302  # README: 11302 data blocks in use
    assert report.nr_data_blocks == 65536 and report.metadata_nr_blocks == 16384
    # The metadata snapshot shares almost every node with the live trees.
    snap = checked(kernel_image("tmeta_with_metadata_snap"))
    assert report.metadata_blocks_used is not None
    assert snap.clean and snap.metadata_blocks_used == report.metadata_blocks_used + 1


def test_kernel_shared_root_count_lowered(kernel_image, tmp_path: Path) -> None:
    """Two devices share an internal root (count 2); count 1 is too low: fatal."""
    path = tmp_path / "shared.bin"
    shutil.copyfile(kernel_image("tmeta_with_shared_internal_root"), path)
    with MetadataReader(path) as r:
        roots = r.mapping_roots()
        index = smf.decode_index_block(r.bm.read(r.sb.metadata_sm.bitmap_root, Salt.INDEX),
                                       r.sb.metadata_sm.bitmap_root)
    assert roots[1] == roots[2]
    bitmap = index[0][0]
    assert get_count(path, bitmap, roots[1]) == 2
    set_count(path, bitmap, roots[1], 1)
    report = checked(path)
    assert names_block(report.errors, roots[1]) and not report.leaks
    assert thin_check(path).returncode != 0


# -- restored images: clean ----------------------------------------------------------------


@pytest.mark.parametrize("xml", [generated_xml(), generated_xml(seed=8), SPEC_EXAMPLE_XML,
                                 EMPTY_POOL_XML], ids=["generated", "generated2", "spec", "empty"])
def test_restored_image_is_clean(xml: str, tmp_path: Path) -> None:
    path = restore(xml, tmp_path / "pool.bin")
    assert thin_check(path).returncode == 0
    report = checked(path)
    assert report.clean, problems(report)
    assert report.nr_devices == xml.count("<device ")


def test_restored_image_uses_data_overflow_and_counts(restored: Path) -> None:
    report = checked(restored)
    assert report.clean, problems(report)
    assert (report.transaction_id, report.nr_data_blocks) == (9, NR_DATA_BLOCKS)
    assert report.nr_devices == 6
    assert report.nr_mappings == 20_001 + 300 + 600 + 300 + 600
    assert report.data_blocks_used == 20_000 + 1 + 300 + 600
    overflow = node_view(restored, roles(restored)["data overflow leaf"])
    assert overflow.is_leaf and overflow.nr_entries == 300  # data blocks 0-299: count 4
    assert thin_check(restored).returncode == 0


# -- damage ---------------------------------------------------------------------------------

ALL_ROLES = ["superblock", "details leaf", "top-level leaf", "mapping internal node",
             "mapping leaf", "data index leaf", "data overflow leaf", "metadata index block",
             "metadata overflow leaf", "metadata bitmap", "data bitmap"]


@pytest.mark.parametrize("role", ALL_ROLES)
def test_bit_flip_is_reported(role: str, damaged: Path) -> None:
    b = roles(damaged)[role]

    def flip(data: bytearray) -> None:
        data[2000] ^= 0x10

    edit_block(damaged, b, flip, salt=None)
    report = checked(damaged)
    assert not report.clean
    assert names_block(report.errors, b), report.errors
    assert any("bad checksum" in e for e in report.errors)
    assert thin_check(damaged).returncode != 0


@pytest.mark.parametrize("role", [r for r in ALL_ROLES if r != "superblock"])
def test_wrong_blocknr_is_reported(role: str, damaged: Path) -> None:
    b = roles(damaged)[role]
    salt = classify(read_block(damaged, b))
    assert salt is not None
    edit_block(damaged, b, lambda d: put_u64(d, 8, b + 1), salt)
    report = checked(damaged)
    assert any("bad block nr" in e and names_block([e], b) for e in report.errors), report.errors
    assert thin_check(damaged).returncode != 0


def test_zeroed_superblock(damaged: Path) -> None:
    write_block(damaged, 0, bytes(BLOCK_SIZE))
    report = checked(damaged)
    assert len(report.errors) == 1 and names_block(report.errors, 0)
    assert report.transaction_id is None
    assert thin_check(damaged).returncode != 0


def test_wrong_magic(damaged: Path) -> None:
    edit_block(damaged, 0, lambda d: put_u64(d, 32, 12345), Salt.SUPERBLOCK)
    report = checked(damaged)
    assert len(report.errors) == 1 and "magic" in report.errors[0]
    assert names_block(report.errors, 0)
    assert thin_check(damaged).returncode == 0  # 0.9.0 only checks the checksum


def test_superblock_blocknr(damaged: Path) -> None:
    edit_block(damaged, 0, lambda d: put_u64(d, 8, 5), Salt.SUPERBLOCK)
    report = checked(damaged)
    assert len(report.errors) == 1 and "bad block nr" in report.errors[0]


def test_snapshot_requested_but_none_held(restored: Path) -> None:
    report = checked(restored, snapshot=True)
    assert report.errors == ["superblock (block 0): no metadata snapshot is held"]
    assert thin_check(restored, "-m").returncode != 0


@pytest.mark.parametrize("size", [0, 100, BLOCK_SIZE - 1])
def test_tiny_file(size: int, tmp_path: Path) -> None:
    path = tmp_path / "tiny.bin"
    path.write_bytes(b"\xff" * size)
    report = checked(path)
    assert len(report.errors) == 1 and "too small" in report.errors[0]
    assert thin_check(path).returncode != 0


def test_missing_file_and_directory(tmp_path: Path) -> None:
    assert "cannot open" in check(tmp_path / "nope.bin").errors[0]
    report = check(tmp_path)
    assert not report.clean and len(report.errors) == 1


def test_garbage_file(tmp_path: Path) -> None:
    path = tmp_path / "garbage.bin"
    path.write_bytes(random.Random(1).randbytes(1 << 20))
    report = checked(path)
    assert len(report.errors) == 1 and "bad checksum in superblock" in report.errors[0]
    assert thin_check(path).returncode != 0


def test_truncated_file(damaged: Path) -> None:
    """Everything past block 40 is gone: each lost block is named, no exception."""
    with open(damaged, "r+b") as f:
        f.truncate(40 * BLOCK_SIZE)
    report = checked(damaged)
    assert not report.clean
    assert any("beyond the end of the metadata device" in e for e in report.errors)
    assert thin_check(damaged).returncode != 0


# -- reference counts -----------------------------------------------------------------------


def metadata_bitmap(path: Path) -> int:
    return roles(path)["metadata bitmap"]


def test_metadata_count_raised_is_a_leak(damaged: Path) -> None:
    b = roles(damaged)["details leaf"]
    bitmap = metadata_bitmap(damaged)
    assert get_count(damaged, bitmap, b) == 1
    set_count(damaged, bitmap, b, 2)
    report = checked(damaged)
    assert report.errors == [] and len(report.leaks) == 1
    assert names_block(report.leaks, b) and "leaked" in report.leaks[0]
    assert thin_check(damaged).returncode == 1
    assert thin_check(damaged, "--ignore-non-fatal-errors").returncode == 0


def test_count_on_unreferenced_metadata_block_is_a_leak(damaged: Path) -> None:
    bitmap = metadata_bitmap(damaged)
    free = 2000
    assert get_count(damaged, bitmap, free) == 0
    set_count(damaged, bitmap, free, 1)
    report = checked(damaged)
    assert report.errors == [] and len(report.leaks) == 1 and names_block(report.leaks, free)
    assert thin_check(damaged).returncode == 1


def test_metadata_count_lowered_is_fatal(damaged: Path) -> None:
    b = roles(damaged)["mapping leaf"]
    bitmap = metadata_bitmap(damaged)
    set_count(damaged, bitmap, b, 0)
    report = checked(damaged)
    assert len(report.errors) == 1 and names_block(report.errors, b) and not report.leaks
    assert thin_check(damaged).returncode != 0


def test_metadata_count_three_without_overflow_entry(damaged: Path) -> None:
    b = roles(damaged)["details leaf"]
    set_count(damaged, metadata_bitmap(damaged), b, 3)
    report = checked(damaged)
    assert any("no entry in the overflow tree" in e for e in report.errors), report.errors
    assert thin_check(damaged).returncode != 0


def data_bitmap_of(path: Path, data_block: int) -> int:
    with MetadataReader(path) as r:
        return data_index(r)[data_block // smf.ENTRIES_PER_BITMAP][0]


@pytest.mark.parametrize("data_block", [1500, 39_999])
def test_data_count_raised_is_a_leak(data_block: int, damaged: Path) -> None:
    bitmap = data_bitmap_of(damaged, data_block)
    entry = data_block % smf.ENTRIES_PER_BITMAP
    assert get_count(damaged, bitmap, entry) == 1
    set_count(damaged, bitmap, entry, 2)
    report = checked(damaged)
    assert report.errors == [] and len(report.leaks) == 1
    assert f"data block {data_block} " in report.leaks[0] and names_block(report.leaks, bitmap)


def test_data_count_on_unmapped_block_is_a_leak(damaged: Path) -> None:
    bitmap = data_bitmap_of(damaged, 39_000)
    entry = 39_000 % smf.ENTRIES_PER_BITMAP
    while get_count(damaged, bitmap, entry):  # mapped by device 7: try the next one
        entry += 1
    set_count(damaged, bitmap, entry, 1)
    report = checked(damaged)
    assert report.errors == [] and len(report.leaks) == 1


def test_data_count_lowered_is_fatal(damaged: Path) -> None:
    bitmap = data_bitmap_of(damaged, 1500)
    set_count(damaged, bitmap, 1500, 0)
    report = checked(damaged)
    assert len(report.errors) == 1 and "data block 1500 " in report.errors[0]
    assert not report.leaks
    assert thin_check(damaged).returncode == 0  # 0.9.0 does not compare data counts


def test_data_overflow_count_changed(damaged: Path) -> None:
    """Blocks 0-299 are mapped by four leaves; the overflow tree says so."""
    leaf = roles(damaged)["data overflow leaf"]
    view = node_view(damaged, leaf)
    assert view.keys()[10] == 10
    off = values_offset(view.max_entries) + 4 * 10
    for count, fatal in ((5, False), (3, True)):
        edit_block(damaged, leaf, lambda d: put_u32(d, off, count), Salt.NODE)
        report = checked(damaged)
        lines = report.errors if fatal else report.leaks
        assert len(lines) == 1 and "data block 10 " in lines[0]
        assert (report.errors == []) != fatal


def test_data_count_three_without_overflow_entry(damaged: Path) -> None:
    bitmap = data_bitmap_of(damaged, 1500)
    set_count(damaged, bitmap, 1500, 3)
    report = checked(damaged)
    assert any("no entry in the overflow tree" in e and "1500" in e for e in report.errors)


# -- thin-level consistency -----------------------------------------------------------------


def details_value_offset(path: Path, dev: int) -> tuple[int, int]:
    leaf = roles(path)["details leaf"]
    view = node_view(path, leaf)
    i = view.keys().tolist().index(dev)
    return leaf, values_offset(view.max_entries) + 24 * i


def test_mapped_blocks_off_by_one(damaged: Path) -> None:
    leaf, off = details_value_offset(damaged, 3)
    edit_block(damaged, leaf, lambda d: put_u64(d, off, 601), Salt.NODE)
    report = checked(damaged)
    assert len(report.errors) == 1 and not report.leaks
    assert "device 3" in report.errors[0] and names_block(report.errors, leaf)
    assert thin_check(damaged).returncode == 0  # 0.9.0 does not check mapped_blocks


def test_mapping_beyond_data_device(damaged: Path) -> None:
    leaf = roles(damaged)["mapping leaf"]
    view = node_view(damaged, leaf)
    off = values_offset(view.max_entries) + 8 * 5
    edit_block(damaged, leaf, lambda d: put_u64(d, off, NR_DATA_BLOCKS << 24), Salt.NODE)
    report = checked(damaged)
    assert any("beyond the end of the data device" in e and names_block([e], leaf)
               for e in report.errors), report.errors


def test_device_missing_from_details(damaged: Path) -> None:
    """Drop the last device (7) from the details leaf; 0.9.0 accepts that."""
    leaf = roles(damaged)["details leaf"]
    edit_block(damaged, leaf, lambda d: put_u32(d, 16, node_view(damaged, leaf).nr_entries - 1),
               Salt.NODE)
    report = checked(damaged)
    assert len(report.errors) == 1 and "[7]" in report.errors[0]
    assert "missing from the device details tree" in report.errors[0]


def test_corrupt_device_tree_does_not_stop_the_others(damaged: Path) -> None:
    """A bad device subtree is reported and other devices are still checked."""
    with MetadataReader(damaged) as r:
        root5 = r.mapping_roots()[5]
    write_block(damaged, root5, bytes(BLOCK_SIZE))
    leaf, off = details_value_offset(damaged, 3)
    edit_block(damaged, leaf, lambda d: put_u64(d, off, 1), Salt.NODE)
    report = checked(damaged)
    assert any("mapping tree of device 5" in e and names_block([e], root5) for e in report.errors)
    assert any("device 3 has mapped_blocks 1" in e for e in report.errors)
    assert not report.leaks  # references below the bad node are unknown


# -- node rules -------------------------------------------------------------------------------


def _keys_swapped(d: bytearray) -> None:
    d[32:40], d[40:48] = d[40:48], d[32:40]


NODE_DAMAGE: dict[str, tuple[str, Callable[[bytearray], None], str]] = {
    "flags 3": ("mapping leaf", lambda d: put_u32(d, 4, 3), "bad flags"),
    "max entries 251": ("mapping leaf", lambda d: put_u32(d, 20, 251), "not divisible by 3"),
    "value size": ("details leaf", lambda d: put_u32(d, 24, 8), "value size"),
    "too many entries": ("mapping leaf", lambda d: put_u32(d, 16, 253), "nr_entries"),
    "too few entries": ("mapping leaf", lambda d: put_u32(d, 16, 8), "too few entries (8 < 84)"),
    "keys out of order": ("mapping leaf", _keys_swapped, "not strictly increasing"),
    "parent key mismatch": ("mapping internal node", lambda d: put_u64(d, 32 + 8, 10**9),
                            "parent key mismatch"),
}


@pytest.mark.parametrize("case", NODE_DAMAGE)
def test_node_rule_violation(case: str, damaged: Path) -> None:
    role, edit, message = NODE_DAMAGE[case]
    b = roles(damaged)[role]
    edit_block(damaged, b, edit, Salt.NODE)
    report = checked(damaged)
    assert any(message in e and names_block([e], b) for e in report.errors), report.errors
    assert thin_check(damaged).returncode != 0


def test_unbalanced_tree(damaged: Path) -> None:
    """Device 1's root points at device 3's internal root instead of a leaf."""
    with MetadataReader(damaged) as r:
        roots = r.mapping_roots()
    root1, root3 = roots[1], roots[3]
    view = node_view(damaged, root1)
    off = values_offset(view.max_entries) + 8 * (view.nr_entries - 1)
    edit_block(damaged, root1, lambda d: put_u64(d, off, root3), Salt.NODE)
    report = checked(damaged)
    assert any("unbalanced" in e and names_block([e], root1) for e in report.errors)
    assert thin_check(damaged).returncode != 0


def test_cycle(damaged: Path) -> None:
    """An internal node pointing at itself is reported, not followed for ever."""
    root1 = roles(damaged)["mapping internal node"]
    off = values_offset(node_view(damaged, root1).max_entries)
    edit_block(damaged, root1, lambda d: put_u64(d, off + 8, root1), Salt.NODE)
    report = checked(damaged)
    assert any("cycle" in e and names_block([e], root1) for e in report.errors)
    assert thin_check(damaged).returncode != 0


SUPERBLOCK_FIELDS = [56, 60, 64, 68, 80, 88, 192, 196, 208, 216, 320, 328]  # roots, sizes
NODE_FIELDS = [8, 16, 20, 24, 32, 40, 2048, 2056]  # header, first keys, first values


def test_random_damage_never_raises(restored: Path, tmp_path: Path) -> None:
    """Garbage with valid checksums in any block, superblock fields included: the
    damage is reported or harmless, and check never raises."""
    path = tmp_path / "fuzz.bin"
    rng = random.Random(1234)
    blocks = sorted(set(roles(restored).values()))
    original = restored.read_bytes()
    for _ in range(200):
        path.write_bytes(original)
        b = rng.choice(blocks)
        data = read_block(path, b)
        salt = classify(data)
        assert salt is not None
        for _ in range(rng.randint(1, 4)):
            off = rng.choice(SUPERBLOCK_FIELDS if b == 0 else
                             NODE_FIELDS + [rng.randrange(4, BLOCK_SIZE - 4)])
            data[off:off + 4] = rng.randbytes(4)
        stamp(data, salt)
        write_block(path, b, data)
        checked(path)


def test_data_counts_of_255_and_more(tmp_path: Path) -> None:
    """300 devices map data block 0 (count 300); counts past a byte are exact."""
    devices = "".join(f'<device dev_id="{d}" mapped_blocks="1" transaction="0" creation_time="0" '
                      f'snap_time="0"><single_mapping origin_block="0" data_block="0" time="0"/>'
                      f'</device>\n' for d in range(300))
    xml = (f'<superblock uuid="" time="0" transaction="1" flags="0" version="2" '
           f'data_block_size="128" nr_data_blocks="100">\n{devices}</superblock>\n')
    path = restore(xml, tmp_path / "many.bin")
    report = checked(path)
    assert report.clean and report.nr_devices == 300, problems(report)
    with MetadataReader(path) as r:
        leaf = r.sb.data_sm.ref_count_root
    off = values_offset(node_view(path, leaf).max_entries)
    for count, fatal in ((299, True), (301, False)):
        edit_block(path, leaf, lambda d: put_u32(d, off, count), Salt.NODE)
        report = checked(path)
        lines = report.errors if fatal else report.leaks
        assert len(lines) == 1 and "data block 0 " in lines[0] and "expected 300" in lines[0]


def test_data_counts_gathered_in_many_rounds(restored: Path, damaged: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A tiny buffer folds leaves into the per-bitmap counts many times over."""
    from thinpool.tools import check as check_module
    full = checked(restored)
    monkeypatch.setattr(check_module._DataCounts, "BUFFER", 300)
    small = checked(restored)
    assert small.clean and small.data_blocks_used == full.data_blocks_used
    set_count(damaged, data_bitmap_of(damaged, 150), 150, 3)  # true count 4 is in overflow
    assert checked(damaged).clean
    set_count(damaged, data_bitmap_of(damaged, 150), 150, 2)
    assert "data block 150 " in checked(damaged).errors[0]


# -- speed and memory -------------------------------------------------------------------------


def big_xml(per_dev: int = 100_000, nr_devices: int = 10, seed: int = 1) -> str:
    """An origin and snapshots: runs of up to 64 blocks, 15% rewritten per snapshot."""
    rng = random.Random(seed)
    runs = []
    v = d = total = 0
    while total < per_dev:
        n = min(rng.randint(1, 64), per_dev - total)
        runs.append((v, d, n))
        total += n
        v += n + rng.randint(0, 8)
        d += n + rng.randint(0, 3)
    next_free = d
    nr_data = d + per_dev * nr_devices // 5
    out = [f'<superblock uuid="" time="{nr_devices}" transaction="1" flags="0" version="2" '
           f'data_block_size="128" nr_data_blocks="{nr_data}">']
    for dev in range(nr_devices):
        out.append(f'<device dev_id="{dev}" mapped_blocks="0" transaction="0" '
                   f'creation_time="{dev}" snap_time="{nr_devices}">')
        for vb, db, n in runs:
            if dev and rng.random() < 0.15:
                db, next_free = next_free, next_free + n
            out.append(f'<range_mapping origin_begin="{vb}" data_begin="{db}" length="{n}" '
                       f'time="{dev}"/>')
        out.append("</device>")
    out.append("</superblock>")
    assert next_free <= nr_data
    return "\n".join(out) + "\n"


_MEMORY_PROBE = """
import resource, sys, tracemalloc
from thinpool.tools.check import check
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
tracemalloc.start()
r = check(sys.argv[1])
assert r.clean, r.errors + r.leaks
assert r.nr_mappings == 1_000_000
print(tracemalloc.get_traced_memory()[1] >> 10, base,
      resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


@pytest.mark.slow
def test_million_mappings_clean_in_bounded_memory(tmp_path: Path) -> None:
    """A 1,000,000-mapping image checks clean in a fresh process in bounded memory.

    The bound is asserted on what our code allocates (tracemalloc sees Python
    objects and numpy buffers) and on the peak RSS growth after imports: the
    absolute RSS also counts shared-library pages, which vary with the host's
    page cache (large folios) and once pushed a 51 MB run past 200 MB in CI.
    Speed and absolute RSS against thin_check are in benchmarks/metadata_bench.py.
    """
    path = restore(big_xml(), tmp_path / "big.bin", size=256 << 20)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1] / "src"))
    proc = subprocess.run([sys.executable, "-c", _MEMORY_PROBE, str(path)],
                          capture_output=True, text=True, env=env, check=True)
    traced_kib, base_kib, peak_kib = map(int, proc.stdout.split()[-3:])
    assert traced_kib < 64 * 1024, f"check allocated {traced_kib} KiB at peak"
    assert peak_kib - base_kib < 150 * 1024, f"RSS grew {base_kib} -> {peak_kib} KiB"
    assert run_tool("thin_check", "-q", path).returncode == 0
