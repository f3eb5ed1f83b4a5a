"""thinpool repair against the real thin_repair 0.9.0, judged by thin_check and thin_dump.

Every repaired image must pass thin_check.  Damage is done to real images
(made by thin_restore, by thinpool's restore, by thinpool's copy-on-write
engine, and by the kernel) and both repairs are compared through thin_dump:
ours must hold everything thin_repair's holds, and exactly what the input
held minus the mappings under the damaged block (the expected loss is worked
out from the undamaged image).  Where thin_repair salvages less, the test
says so.  Inputs are never modified (sha256 before/after).
"""

from __future__ import annotations

import copy
import functools
import hashlib
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest

from conftest import KERNEL_IMAGES, run_tool
from thinmodel import Model, assert_thin_check_clean, parse_dump, thin_dump
from thinpool.errors import MetadataError, ThinpoolError
from thinpool.ondisk import spacemap as smf
from thinpool.ondisk.checksum import BLOCK_SIZE, Salt, stamp
from thinpool.ondisk.node import INDEX_ENTRY, values_offset
from thinpool.thin.builder import format_metadata
from thinpool.thin.metadata import PoolMetadata
from thinpool.thin.reader import MetadataReader
from thinpool.tools.repair import RepairReport, repair
from thinpool.tools.restore import restore as our_restore

DAMAGED_KERNEL = ["tmeta_with_corrupted_metadata_snap", "corrupted_tmeta_with_metadata_snap",
                  "tmeta_device_id_reuse_with_corrupted_thins"]
CLEAN_KERNEL = [n for n in KERNEL_IMAGES if n not in DAMAGED_KERNEL]
NR_DATA_BLOCKS = 100_000
META_SIZE = 8 << 20


# -- helpers ----------------------------------------------------------------------------------

def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def blank(path: Path, size: int = META_SIZE) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def ours(src: Path, out: Path, size: int = META_SIZE, **overrides: int) -> RepairReport:
    """Our repair into a fresh file; asserts the input is untouched."""
    before = sha256(src)
    report = repair(src, blank(out, size), **overrides)
    assert sha256(src) == before, "repair modified its input"
    return report


def theirs(src: Path, out: Path, *args: str, size: int = META_SIZE
           ) -> subprocess.CompletedProcess[str]:
    return run_tool("thin_repair", "-i", src, "-o", blank(out, size), *args)


def model(meta: Path) -> tuple[dict[str, str], Model, dict[int, dict[str, int]]]:
    return parse_dump(thin_dump(meta))


@functools.lru_cache(maxsize=None)
def _good_model(meta: Path) -> tuple[dict[str, str], Model, dict[int, dict[str, int]]]:
    return model(meta)


def good_model(meta: Path) -> tuple[dict[str, str], Model, dict[int, dict[str, int]]]:
    """``model`` of an undamaged, read-only image (parsed once, copied for the caller)."""
    return copy.deepcopy(_good_model(meta))


def read_block(path: Path, b: int) -> bytearray:
    with open(path, "rb") as f:
        f.seek(b * BLOCK_SIZE)
        return bytearray(f.read(BLOCK_SIZE))


def write_block(path: Path, b: int, data: bytes | bytearray) -> None:
    with open(path, "r+b") as f:
        f.seek(b * BLOCK_SIZE)
        f.write(data)


def edit_node(path: Path, b: int, edit: Callable[[bytearray, int], None]) -> None:
    """Change a btree node (``edit(data, values offset)``) and restamp its checksum."""
    data = read_block(path, b)
    edit(data, values_offset(int.from_bytes(data[20:24], "little")))
    stamp(data, Salt.NODE)
    write_block(path, b, data)


def key_offset(i: int) -> int:
    return 32 + 8 * i


def leaf_keys(path: Path, b: int) -> list[int]:
    """Keys of every leaf under node ``b`` (from the undamaged image)."""
    with MetadataReader(path) as r:
        return [k for leaf in r.leaves(b, 8) for k in leaf.keys().tolist()]


def copy_damaged(src: Path, dst: Path, block: int, how: str) -> Path:
    shutil.copyfile(src, dst)
    os.chmod(dst, 0o644)
    write_block(dst, block, bytes(BLOCK_SIZE) if how == "zero"
                else random.Random(block).randbytes(BLOCK_SIZE))
    return dst


def assert_contains(big: Model, small: Model) -> None:
    """Every device and mapping of ``small`` is in ``big``, unchanged."""
    for dev, maps in small.items():
        assert dev in big, f"device {dev} missing"
        missing = {v: m for v, m in maps.items() if big[dev].get(v) != m}
        assert not missing, f"device {dev}: {len(missing)} mappings missing or different"


# -- images -----------------------------------------------------------------------------------

def pool_xml(seed: int = 5) -> str:
    """Device 1: 70,000 mappings (three levels with 126- or 252-entry leaves); 2: a
    snapshot-like copy of part of 1 with its own writes; 3: empty; 4: 1,000 scattered
    mappings (an internal root); 5: one mapping (a leaf root)."""
    rng = random.Random(seed)
    head = (f'<superblock uuid="" time="4" transaction="12" flags="0" version="2" '
            f'data_block_size="128" nr_data_blocks="{NR_DATA_BLOCKS}">')
    lines = [head]

    def device(dev: int, ctime: int, maps: list[str]) -> None:
        lines.append(f'  <device dev_id="{dev}" mapped_blocks="0" transaction="{dev + 3}" '
                     f'creation_time="{ctime}" snap_time="{max(ctime, 2)}">')
        lines.extend(maps)
        lines.append("  </device>")

    device(1, 0, ['    <range_mapping origin_begin="0" data_begin="0" length="40000" time="0"/>',
                  '    <range_mapping origin_begin="50000" data_begin="40000" length="30000" '
                  'time="1"/>'])
    device(2, 2, ['    <range_mapping origin_begin="0" data_begin="0" length="300" time="0"/>',
                  '    <range_mapping origin_begin="300" data_begin="70000" length="200" '
                  'time="3"/>'])
    device(3, 3, [])
    vblocks = sorted(rng.sample(range(1_000_000), 1000))
    data = rng.sample(range(70_200, NR_DATA_BLOCKS), 1000)
    device(4, 3, [f'    <single_mapping origin_block="{v}" data_block="{d}" time="{rng.randint(0, 4)}"/>'
                  for v, d in zip(vblocks, data)])
    device(5, 4, ['    <single_mapping origin_block="7" data_block="99999" time="4"/>'])
    lines.append("</superblock>")
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="session")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same pool restored by thin_restore and by thinpool (read-only files)."""
    d = tmp_path_factory.mktemp("repair-images")
    xml = d / "pool.xml"
    xml.write_text(pool_xml())
    out = {"thin_restore": blank(d / "thin_restore.bin"), "thinpool": blank(d / "thinpool.bin")}
    run_tool("thin_restore", "-i", xml, "-o", out["thin_restore"], check=True)
    our_restore(xml, out["thinpool"])
    for p in out.values():
        assert_thin_check_clean(p)
        p.chmod(0o444)
    return out


@functools.lru_cache(maxsize=None)
def roles(path: Path) -> dict[str, int]:
    """A block of every kind worth damaging."""
    with MetadataReader(path) as r:
        sb = r.sb
        roots = r.mapping_roots()
        root1 = r.node(roots[1], 8)
        assert not root1.is_leaf
        internal = root1.u64_at(1)
        node = r.node(internal, 8)
        assert not node.is_leaf, "device 1 must have three levels"
        index = smf.decode_index_block(r.bm.read(sb.metadata_sm.bitmap_root, Salt.INDEX),
                                       sb.metadata_sm.bitmap_root)
        data_index = dict(r.tree_items(sb.data_sm.bitmap_root, INDEX_ENTRY))
        return {
            "leaf": node.u64_at(2),
            "internal node": internal,
            "device subtree root": roots[4],
            "leaf subtree root": roots[5],
            "details root": sb.device_details_root,
            "top-level root": sb.data_mapping_root,
            "data bitmap": data_index[0][0],
            "data index root": sb.data_sm.bitmap_root,
            "metadata bitmap": index[0][0],
            "metadata index": sb.metadata_sm.bitmap_root,
        }


def expected_after(path: Path, role: str, block: int) -> tuple[Model, set[int]]:
    """The mappings that must survive damage to ``block``, and the devices whose details
    must be recreated."""
    _sb, devices, _details = good_model(path)
    if role in ("leaf", "internal node", "device subtree root", "leaf subtree root"):
        owner = 1 if role in ("leaf", "internal node") else 4 if role == "device subtree root" else 5
        for k in leaf_keys(path, block):
            del devices[owner][k]
        return devices, set()
    if role == "details root":
        return devices, set(devices)
    return devices, set()  # top-level root: every device tree is found and matched


# -- generated damage --------------------------------------------------------------------------

ROLES = ["leaf", "internal node", "device subtree root", "leaf subtree root", "details root",
         "top-level root", "data bitmap", "data index root", "metadata bitmap", "metadata index"]


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("source,how", [("thin_restore", "zero"), ("thin_restore", "garble"),
                                        ("thinpool", "zero")])
def test_generated_damage(source: str, how: str, role: str, images: dict[str, Path],
                          tmp_path: Path) -> None:
    """One damaged block (zeroed, or random bytes): ours passes thin_check, loses exactly
    what lies under the block, and holds everything thin_repair's output holds."""
    good = images[source]
    block = roles(good)[role]
    bad = copy_damaged(good, tmp_path / "bad.bin", block, how)
    report = ours(bad, tmp_path / "ours.bin")
    assert_thin_check_clean(tmp_path / "ours.bin")
    sb, got, details = model(tmp_path / "ours.bin")
    want, recreated = expected_after(good, role, block)
    assert got == want
    good_sb, _m, good_details = good_model(good)
    assert sb == good_sb
    for dev in got:
        if dev in recreated:
            assert details[dev]["snap_time"] == int(sb["time"]) and details[dev]["transaction"] == 0
        else:
            assert details[dev] == dict(good_details[dev], mapped_blocks=len(got[dev]))

    r = theirs(bad, tmp_path / "theirs.bin")
    assert r.returncode == 0, r.stderr
    t_sb, t_got, t_details = model(tmp_path / "theirs.bin")
    assert t_sb == sb
    assert_contains(got, t_got)
    if role == "details root":
        # thin_repair finds no details and silently writes a pool without devices;
        # we keep every device with harmless details (see tools/repair.py)
        assert t_got == {} and recreated == set(got)
        assert all("details lost" in line for line in report.summary()[2:])
    elif role == "top-level root":
        # thin_repair drops every device; each of ours records a different number of
        # mappings, so every unreferenced device tree is matched to its device
        assert t_got == {}
        notes = {d.dev_id: d.note for d in report.devices}
        assert all("using the unreferenced device tree" in notes[d] for d in (1, 2, 4, 5))
        assert notes[3] and "kept empty" in notes[3]
    else:
        assert t_got == got and t_details == details
    if role in ("leaf", "internal node"):
        [lost] = [d for d in report.devices if d.damaged]
        assert lost.dev_id == 1 and lost.expected == 70_000
        assert lost.salvaged == 70_000 - len(leaf_keys(good, block))
        assert f"block {block}" in lost.line()


def test_lost_top_level_tree_ambiguous_counts(tmp_path: Path) -> None:
    """Top-level tree lost and no older copy: a device tree is matched to a device only
    when its mapping count is unique on both sides; the others are dropped and named."""
    def dev(d: int, begin: int, n: int) -> str:
        return (f'<device dev_id="{d}" mapped_blocks="{n}" transaction="0" creation_time="0" '
                f'snap_time="0"><range_mapping origin_begin="0" data_begin="{begin}" '
                f'length="{n}" time="0"/></device>')
    xml = tmp_path / "in.xml"
    xml.write_text('<superblock uuid="" time="0" transaction="1" flags="0" version="2" '
                   'data_block_size="128" nr_data_blocks="1000">'
                   + dev(1, 0, 300) + dev(2, 300, 300) + dev(3, 600, 5) + "</superblock>")
    good = blank(tmp_path / "good.bin")
    run_tool("thin_restore", "-i", xml, "-o", good, check=True)
    with MetadataReader(good) as r:
        top = r.sb.data_mapping_root
    bad = copy_damaged(good, tmp_path / "bad.bin", top, "zero")
    report = ours(bad, tmp_path / "ours.bin")
    assert_thin_check_clean(tmp_path / "ours.bin")
    _s, got, _d = model(tmp_path / "ours.bin")
    _s, want, _d = model(good)
    assert got == {3: want[3]}
    assert [d.line() for d in report.devices if d.dropped] == [
        "device 1: dropped, its mapping tree root is lost (300 mappings)",
        "device 2: dropped, its mapping tree root is lost (300 mappings)"]


def test_superblock_unreadable(images: dict[str, Path], tmp_path: Path) -> None:
    """Without a superblock the three values must be given (the error names them, the
    output is untouched); with them everything is found again by scanning, where
    thin_repair 0.9.0 salvages nothing (its scan rejects a pool with an empty device)."""
    good = images["thinpool"]
    bad = copy_damaged(good, tmp_path / "bad.bin", 0, "zero")
    out = blank(tmp_path / "out.bin")
    out.write_bytes(b"keep" * (META_SIZE // 4))
    before = sha256(out)
    with pytest.raises(MetadataError, match="--transaction-id, --data-block-size, --nr-data-blocks"):
        repair(bad, out)
    with pytest.raises(MetadataError, match="give --nr-data-blocks"):
        repair(bad, out, transaction_id=12, data_block_size=128)
    assert sha256(out) == before
    args = dict(transaction_id=12, data_block_size=128, nr_data_blocks=NR_DATA_BLOCKS)
    report = ours(bad, tmp_path / "ours.bin", **args)
    assert "found by scanning" in report.source
    assert_thin_check_clean(tmp_path / "ours.bin")
    assert thin_dump(tmp_path / "ours.bin") == thin_dump(good)
    r = theirs(bad, tmp_path / "theirs.bin", "--transaction-id", "12", "--data-block-size", "128",
               "--nr-data-blocks", str(NR_DATA_BLOCKS))
    t_sb, t_got, _d = model(tmp_path / "theirs.bin")
    assert r.returncode == 0 and t_got == {} and t_sb["time"] == "100000"


# -- damage a lookup cannot see: keys out of order, overlaps, loops ----------------------------

@pytest.fixture
def leaf_image(images: dict[str, Path], tmp_path: Path) -> tuple[Path, int, list[int]]:
    """A writable copy of the thin_restore image, a leaf of device 1 and its keys."""
    path = tmp_path / "edited.bin"
    shutil.copyfile(images["thin_restore"], path)
    path.chmod(0o644)
    leaf = roles(path)["leaf"]
    return path, leaf, leaf_keys(path, leaf)


def lost_mappings(path: Path, good: Model) -> dict[int, set[int]]:
    _sb, got, _d = model(path)
    assert_contains(good, got)  # nothing invented
    return {dev: set(good[dev]) - set(got.get(dev, {})) for dev in good
            if set(good[dev]) - set(got.get(dev, {}))}


@pytest.mark.parametrize("case", ["swapped keys", "duplicate key"])
def test_keys_out_of_order_in_a_leaf(case: str, leaf_image: tuple[Path, int, list[int]],
                                     images: dict[str, Path], tmp_path: Path) -> None:
    """thin_repair drops the whole leaf; we drop only the two entries at the break."""
    path, leaf, keys = leaf_image
    i = 10

    def edit(d: bytearray, _off: int) -> None:
        a, b = d[key_offset(i):key_offset(i + 1)], d[key_offset(i + 1):key_offset(i + 2)]
        d[key_offset(i):key_offset(i + 1)] = b
        if case == "swapped keys":
            d[key_offset(i + 1):key_offset(i + 2)] = a

    edit_node(path, leaf, edit)
    _sb, good, _d = good_model(images["thin_restore"])
    report = ours(path, tmp_path / "ours.bin")
    assert_thin_check_clean(tmp_path / "ours.bin")
    assert lost_mappings(tmp_path / "ours.bin", good) == {1: {keys[i], keys[i + 1]}}
    assert report.devices[0].unreachable == 2
    assert theirs(path, tmp_path / "theirs.bin").returncode == 0
    assert lost_mappings(tmp_path / "theirs.bin", good) == {1: set(keys)}


def test_leaf_overlapping_its_sibling(leaf_image: tuple[Path, int, list[int]],
                                      images: dict[str, Path], tmp_path: Path) -> None:
    """A leaf whose last key reaches into the next leaf's range: that one entry is out of
    reach of any lookup and goes.  thin_repair keeps it, so the key gets the wrong data
    block, and drops the whole next leaf instead."""
    path, leaf, keys = leaf_image
    with MetadataReader(path) as r:
        parent = r.node(roles(path)["internal node"], 8)
        siblings = parent.values_raw().cast("Q").tolist()
    nxt = siblings[siblings.index(leaf) + 1]
    next_keys = leaf_keys(path, nxt)
    n = len(keys)
    edit_node(path, leaf, lambda d, _o: d.__setitem__(slice(key_offset(n - 1), key_offset(n)),
                                                      (next_keys[0] + 1).to_bytes(8, "little")))
    _sb, good, _d = good_model(images["thin_restore"])
    ours(path, tmp_path / "ours.bin")
    assert_thin_check_clean(tmp_path / "ours.bin")
    assert lost_mappings(tmp_path / "ours.bin", good) == {1: {keys[-1]}}
    assert theirs(path, tmp_path / "theirs.bin").returncode == 0
    _sb, t_got, _d = model(tmp_path / "theirs.bin")
    wrong = next_keys[0] + 1
    assert t_got[1][wrong] == good[1][keys[-1]] != good[1][wrong]
    assert set(good[1]) - set(t_got[1]) == {keys[-1]} | set(next_keys) - {wrong}


def test_mapping_beyond_the_data_device(leaf_image: tuple[Path, int, list[int]],
                                        images: dict[str, Path], tmp_path: Path) -> None:
    """One mapping to a data block past the end: we drop it; thin_repair aborts."""
    path, leaf, keys = leaf_image
    edit_node(path, leaf, lambda d, off: d.__setitem__(
        slice(off, off + 8), ((NR_DATA_BLOCKS + 5) << 24).to_bytes(8, "little")))
    _sb, good, _d = good_model(images["thin_restore"])
    report = ours(path, tmp_path / "ours.bin")
    assert_thin_check_clean(tmp_path / "ours.bin")
    assert lost_mappings(tmp_path / "ours.bin", good) == {1: {keys[0]}}
    assert report.devices[0].beyond_data == 1
    assert "1 beyond the end of the data device" in report.devices[0].line()
    r = theirs(path, tmp_path / "theirs.bin")
    assert r.returncode != 0 and "mapping beyond end of data device" in r.stderr


def test_loop_in_a_device_tree(leaf_image: tuple[Path, int, list[int]],
                               images: dict[str, Path], tmp_path: Path) -> None:
    """An internal node listing itself as a child: the loop is cut, nothing else lost."""
    path, _leaf, _keys = leaf_image
    internal = roles(path)["internal node"]
    first_child_keys = leaf_keys(images["thin_restore"], node_child(path, internal, 0))
    edit_node(path, internal, lambda d, off: d.__setitem__(slice(off, off + 8),
                                                           internal.to_bytes(8, "little")))
    _sb, good, _d = good_model(images["thin_restore"])
    report = ours(path, tmp_path / "ours.bin")
    assert_thin_check_clean(tmp_path / "ours.bin")
    assert lost_mappings(tmp_path / "ours.bin", good) == {1: set(first_child_keys)}
    assert any("reached twice" in p for p in report.devices[0].problems)


def node_child(path: Path, b: int, i: int) -> int:
    with MetadataReader(path) as r:
        return r.node(b, 8).u64_at(i)


def test_overrides_and_mapped_blocks(images: dict[str, Path], tmp_path: Path) -> None:
    """--transaction-id and --nr-data-blocks override a readable superblock (as with
    thin_repair); mappings past the new end are dropped; mapped_blocks is recounted."""
    good = images["thinpool"]
    report = ours(good, tmp_path / "ours.bin", transaction_id=77, nr_data_blocks=80_000)
    assert_thin_check_clean(tmp_path / "ours.bin")
    sb, got, details = model(tmp_path / "ours.bin")
    assert sb["transaction"] == "77" and sb["nr_data_blocks"] == "80000"
    _s, good_maps, _d = model(good)
    for dev, maps in good_maps.items():
        assert got[dev] == {v: m for v, m in maps.items() if m[0] < 80_000}
        assert details[dev]["mapped_blocks"] == len(got[dev])
    dropped = {d.dev_id: d.beyond_data for d in report.devices if d.beyond_data}
    assert dropped == {4: sum(1 for m in good_maps[4].values() if m[0] >= 80_000), 5: 1}


SUPERBLOCK_FIELDS = [4, 32, 36, 40, 48, 56, 64, 96, 192, 320, 328, 336, 340]  # incl. roots
NODE_FIELDS = [4, 8, 16, 20, 24, 32, 40, 48, 2048, 2056, 2064]  # header, keys, values


def fuzz_image(tmp_path: Path) -> Path:
    """A small pool: an internal root, single mappings, sharing, an empty device."""
    rng = random.Random(9)
    parts = ['<superblock uuid="" time="2" transaction="3" flags="0" version="2" '
             'data_block_size="128" nr_data_blocks="5000">']
    for d, n in ((1, 1500), (2, 40), (3, 0), (4, 300)):
        parts.append(f'<device dev_id="{d}" mapped_blocks="0" transaction="{d}" '
                     f'creation_time="{d % 3}" snap_time="2">')
        for v in sorted(rng.sample(range(20_000), n)):
            parts.append(f'<single_mapping origin_block="{v}" data_block="{rng.randrange(5000)}" '
                         f'time="{rng.randint(0, 2)}"/>')
        parts.append("</device>")
    parts.append("</superblock>")
    xml = tmp_path / "fuzz.xml"
    xml.write_text("\n".join(parts))
    path = blank(tmp_path / "fuzz.bin", 1 << 20)
    run_tool("thin_restore", "-i", xml, "-o", path, check=True)
    return path


def test_random_damage_with_valid_checksums(tmp_path: Path) -> None:
    """Garbage that passes the checksum (superblock fields, node headers, keys, values,
    one to four at a time): repair either succeeds with thin_check-clean output whose
    mappings all lie inside the data device, or fails with a ThinpoolError; it never
    raises anything else.  (A garbled value that stays in range cannot be told from a
    real one, by us or by thin_repair.)"""
    good = fuzz_image(tmp_path)
    with MetadataReader(good) as r:
        blocks = [0, r.sb.device_details_root, r.sb.data_mapping_root,
                  *r.mapping_roots().values(), *leaf_blocks(good, r.mapping_roots()[1])]
    original = good.read_bytes()
    bad, out = tmp_path / "bad.bin", tmp_path / "out.bin"
    rng = random.Random(77)
    outcomes = {"repaired": 0, "refused": 0}
    for _ in range(40):
        bad.write_bytes(original)
        b = rng.choice(blocks)
        data = read_block(bad, b)
        for _ in range(rng.randint(1, 4)):
            off = rng.choice(SUPERBLOCK_FIELDS if b == 0 else
                             NODE_FIELDS + [rng.randrange(32, BLOCK_SIZE - 8)])
            data[off:off + 4] = rng.randbytes(4)
        stamp(data, Salt.SUPERBLOCK if b == 0 else Salt.NODE)
        write_block(bad, b, data)
        try:
            report = repair(bad, blank(out, 1 << 20), transaction_id=3, data_block_size=128,
                            nr_data_blocks=5000)
        except ThinpoolError:
            outcomes["refused"] += 1
            continue
        outcomes["repaired"] += 1
        assert_thin_check_clean(out)
        _s, got, _d = model(out)
        assert all(m[0] < 5000 for maps in got.values() for m in maps.values())
        assert report.nr_mappings == sum(len(maps) for maps in got.values())
    assert outcomes["repaired"] > 30, outcomes


# -- thinpool's copy-on-write engine: older trees stay behind ---------------------------------

@pytest.fixture(scope="session")
def cow_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four commits by PoolMetadata; the last adds 500 mappings to device 2."""
    path = blank(tmp_path_factory.mktemp("cow") / "cow.bin", 8 << 20)
    format_metadata(path, data_block_size=128, nr_data_blocks=NR_DATA_BLOCKS)
    with PoolMetadata(path) as md:
        md.create_thin(1)
        md.insert_many(1, [(v, md.alloc_data_block()) for v in range(3000)])
        md.set_transaction_id(0, 1)
        md.commit()
        md.create_snap(2, 1)
        md.insert_many(1, [(v, md.alloc_data_block()) for v in range(0, 3000, 7)])
        md.set_transaction_id(1, 2)
        md.commit()
        md.create_thin(3)
        md.set_transaction_id(2, 3)
        md.commit()
        md.insert_many(2, [(v, md.alloc_data_block()) for v in range(5000, 5500)])
        md.set_transaction_id(3, 4)
        md.commit()
    assert_thin_check_clean(path)
    path.chmod(0o444)
    return path


@pytest.mark.parametrize("role", ["details root", "top-level root", "superblock"])
def test_cow_metadata_older_trees_are_found(role: str, cow_image: Path, tmp_path: Path) -> None:
    """With a live root lost, the newest older tree that agrees with the surviving one is
    used (the report says so); thin_repair 0.9.0 writes a pool without devices here."""
    with MetadataReader(cow_image) as r:
        block = {"details root": r.sb.device_details_root, "top-level root": r.sb.data_mapping_root,
                 "superblock": 0}[role]
    bad = copy_damaged(cow_image, tmp_path / "bad.bin", block, "zero")
    args = dict(transaction_id=4, data_block_size=128, nr_data_blocks=NR_DATA_BLOCKS) \
        if role == "superblock" else {}
    report = ours(bad, tmp_path / "ours.bin", **args)
    assert_thin_check_clean(tmp_path / "ours.bin")
    assert "found by scanning" in report.source
    sb, got, details = model(tmp_path / "ours.bin")
    good_sb, good, good_details = model(cow_image)
    assert sb == good_sb
    if role == "top-level root":
        # the previous top-level tree: device 2 without the last commit's 500 mappings
        assert {d: len(m) for d, m in got.items()} == {1: 3000, 2: 3000, 3: 0}
        assert_contains(good, {1: got[1], 2: got[2]})
        assert [d.line() for d in report.devices if d.damaged] == \
            ["device 2: 500 of 3500 mappings lost"]
    else:
        assert got == good
    if role == "superblock":
        assert details == good_details
    targs = [f"--{k.replace('_', '-')}={v}" for k, v in args.items()]
    r = theirs(bad, tmp_path / "theirs.bin", *targs)
    assert r.returncode == 0 and model(tmp_path / "theirs.bin")[1] == {}


# -- kernel-made images -------------------------------------------------------------------------

@pytest.mark.parametrize("name", CLEAN_KERNEL)
def test_clean_kernel_image_round_trips(name: str, kernel_image, tmp_path: Path) -> None:
    """Repairing clean metadata changes nothing thin_dump shows; thin_repair agrees."""
    src = kernel_image(name)
    report = ours(src, tmp_path / "ours.bin")
    assert_thin_check_clean(tmp_path / "ours.bin")
    assert thin_dump(tmp_path / "ours.bin") == thin_dump(src)
    assert theirs(src, tmp_path / "theirs.bin").returncode == 0
    assert thin_dump(tmp_path / "theirs.bin") == thin_dump(src)
    assert report.source == "from the superblock"
    assert not any(d.damaged for d in report.devices)


@pytest.mark.parametrize("name", CLEAN_KERNEL)
def test_kernel_image_without_superblock(name: str, kernel_image, tmp_path: Path) -> None:
    """Superblock zeroed: the scan finds the live trees among the older copies the kernel
    left behind, so the result equals the live metadata's dump.  thin_repair 0.9.0 picks
    an older state for tmeta (device 14, deleted, comes back) and writes no devices at
    all where a device is empty (its scan takes an empty device tree for a top-level one)."""
    src = kernel_image(name)
    with MetadataReader(src) as r:
        sb = r.sb
    bad = copy_damaged(src, tmp_path / "bad.bin", 0, "zero")
    args = dict(transaction_id=sb.trans_id, data_block_size=sb.data_block_size,
                nr_data_blocks=sb.data_sm.nr_blocks)
    ours(bad, tmp_path / "ours.bin", **args)
    assert_thin_check_clean(tmp_path / "ours.bin")
    assert thin_dump(tmp_path / "ours.bin") == thin_dump(src)
    targs = [f"--{k.replace('_', '-')}={v}" for k, v in args.items()]
    assert theirs(bad, tmp_path / "theirs.bin", *targs).returncode == 0
    text, good = thin_dump(tmp_path / "theirs.bin"), thin_dump(src)
    if name == "tmeta":
        assert re.sub(r'  <device dev_id="14" .*?  </device>\n', "", text, flags=re.S) == good
        assert '<device dev_id="14" ' in text
    elif name in ("tmeta_device_id_reuse", "tmeta_with_deleted_snapshot"):
        assert "<device" not in text
    else:
        assert text == good


def leaf_blocks(path: Path, root: int) -> dict[int, list[int]]:
    """Leaf block -> its keys, for every leaf under ``root``."""
    out = {}
    with MetadataReader(path) as r:
        stack = [root]
        while stack:
            b = stack.pop()
            node = r.node(b, 8)
            if node.is_leaf:
                out[b] = node.keys().tolist()
            else:
                stack.extend(node.values_raw().cast("Q").tolist())
    return out


@pytest.mark.parametrize("what", ["shared leaf", "shared internal node"])
def test_kernel_shared_node_damaged(what: str, kernel_image, tmp_path: Path) -> None:
    """A node shared by a snapshot and its origin: both lose exactly the mappings under
    it, nothing else; thin_repair's result is the same."""
    src = kernel_image("tmeta_with_shared_internals_and_leaves")
    with MetadataReader(src) as r:
        roots = r.mapping_roots()
        if what == "shared leaf":
            shared = sorted(leaf_blocks(src, roots[1]).keys() & leaf_blocks(src, roots[2]).keys())
            block = shared[len(shared) // 2]
        else:
            kids = [set(r.node(roots[d], 8).values_raw().cast("Q").tolist()) for d in (1, 2)]
            block = min(kids[0] & kids[1])
            assert not r.node(block, 8).is_leaf
    lost = set(leaf_keys(src, block))
    bad = copy_damaged(src, tmp_path / "bad.bin", block, "zero")
    report = ours(bad, tmp_path / "ours.bin")
    assert_thin_check_clean(tmp_path / "ours.bin")
    _s, good, _d = model(src)
    _s, got, _d = model(tmp_path / "ours.bin")
    assert got == {dev: {v: m for v, m in maps.items() if v not in lost}
                   for dev, maps in good.items()}
    assert [(d.dev_id, d.expected - d.salvaged) for d in report.devices] == \
        [(1, len(lost)), (2, len(lost))]
    assert theirs(bad, tmp_path / "theirs.bin").returncode == 0
    assert thin_dump(tmp_path / "theirs.bin") == thin_dump(tmp_path / "ours.bin")


@pytest.mark.parametrize("name", ["tmeta_with_corrupted_metadata_snap",
                                  "tmeta_device_id_reuse_with_corrupted_thins"])
def test_kernel_damaged_snapshot(name: str, kernel_image, tmp_path: Path) -> None:
    """Damage only in the metadata snapshot: the live metadata is kept whole (a repair
    never writes a snapshot), exactly as thin_repair does."""
    src = kernel_image(name)
    report = ours(src, tmp_path / "ours.bin")
    assert_thin_check_clean(tmp_path / "ours.bin")
    assert thin_dump(tmp_path / "ours.bin") == thin_dump(src)
    assert theirs(src, tmp_path / "theirs.bin").returncode == 0
    assert thin_dump(tmp_path / "theirs.bin") == thin_dump(tmp_path / "ours.bin")
    assert report.notes == ["the metadata snapshot (block 7) is not carried over"]


def test_kernel_wiped_live_roots(kernel_image, tmp_path: Path) -> None:
    """corrupted_tmeta_with_metadata_snap: every live root is wiped.  thin_repair writes a
    pool without devices.  Our scan finds the trees of transaction 2, the newest that
    survive (the snapshot's, transaction 1, hold only device 1): device 2, the one live
    device, comes back (its own tree was wiped too, so it is empty; it was empty anyway),
    and so does device 1, deleted in transaction 3 and empty."""
    src = kernel_image("corrupted_tmeta_with_metadata_snap")
    report = ours(src, tmp_path / "ours.bin")
    assert_thin_check_clean(tmp_path / "ours.bin")
    sb, got, details = model(tmp_path / "ours.bin")
    assert sb["transaction"] == "3" and got == {1: {}, 2: {}}
    assert details[2]["transaction"] == 1
    assert report.source == ("details root 18 (found by scanning), "
                             "mapping root 17 (found by scanning)")
    lines = report.summary()
    assert any("device details tree damaged" in line and "block 6" in line for line in lines)
    assert any("top-level mapping tree damaged" in line and "block 20" in line for line in lines)
    assert any(line.startswith("device 2:") and "block 3" in line for line in lines)
    assert theirs(src, tmp_path / "theirs.bin").returncode == 0
    t_sb, t_got, _d = model(tmp_path / "theirs.bin")
    assert t_got == {} and t_sb == sb


# -- paths, bad input, the CLI -----------------------------------------------------------------

def tp(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "thinpool.cli", *map(str, args)],
                          capture_output=True, text=True)


def one_line_error(r: subprocess.CompletedProcess[str], match: str) -> None:
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and match in lines[0], r.stderr


def test_cli_repair_prints_a_summary(images: dict[str, Path], tmp_path: Path) -> None:
    good = images["thin_restore"]
    leaf = roles(good)["leaf"]
    bad = copy_damaged(good, tmp_path / "bad.bin", leaf, "zero")
    out = blank(tmp_path / "out.bin")
    r = tp("repair", "-i", bad, "-o", out)
    assert r.returncode == 0, r.stderr
    assert r.stdout == ""
    lines = r.stderr.splitlines()
    assert lines[0].startswith(f"repaired {bad} -> {out}: 5 devices, ")
    assert len(lines) == 2 and lines[1].startswith("device 1: ") and f"block {leaf}" in lines[1]
    assert_thin_check_clean(out)
    r = tp("repair", "-i", good, "-o", out)
    assert r.returncode == 0 and r.stderr.splitlines()[-1] == "nothing was lost"


def test_bad_paths_and_input(images: dict[str, Path], tmp_path: Path) -> None:
    """One clear line each (through the CLI), neither the input nor the output touched."""
    good = images["thin_restore"]
    out = blank(tmp_path / "out.bin")
    out.write_bytes(b"keep" * (META_SIZE // 4))
    keep = sha256(out)
    link = tmp_path / "link.bin"
    link.symlink_to(out)
    (tmp_path / "empty").write_bytes(b"")
    (tmp_path / "random").write_bytes(random.Random(3).randbytes(1 << 20))
    (tmp_path / "tiny").write_bytes(bytes(4096))
    overrides = ["--transaction-id", "1", "--data-block-size", "128", "--nr-data-blocks", "100"]
    cli_cases = [
        (["-i", out, "-o", out], "is the input metadata itself"),
        (["-i", tmp_path, "-o", out], "is not a metadata file or block device"),
        (["-i", tmp_path / "empty", "-o", out], "too small to hold thin metadata"),
        (["-i", tmp_path / "random", "-o", out],
         "superblock unreadable (bad checksum in superblock (block 0)"),
        (["-i", tmp_path / "random", "-o", out, *overrides], "nothing can be salvaged"),
    ]
    api_cases: list[tuple[Path, Path, dict[str, int], str]] = [
        (out, link, {}, "is the input metadata itself"),
        (tmp_path / "missing", out, {}, "No such file or directory"),
        (good, tmp_path / "missing", {}, "must be an existing file or block device"),
        (good, tmp_path, {}, "is not a regular file or block device"),
        (good, tmp_path / "tiny", {}, "is too small"),
        (good, out, {"data_block_size": 100}, "invalid data block size 100"),
    ]
    before = {p: sha256(p) for p in (good, tmp_path / "random")}
    for args, match in cli_cases:
        one_line_error(tp("repair", *args), match)
        assert sha256(out) == keep, args
    for src, dst, kwargs, match in api_cases:
        with pytest.raises(ThinpoolError, match=re.escape(match)):
            repair(src, dst, **kwargs)
        assert sha256(out) == keep, (src, dst)
    assert {p: sha256(p) for p in before} == before


def test_output_on_failure_has_no_superblock(images: dict[str, Path], tmp_path: Path) -> None:
    """An output too small for what was salvaged is left without a valid superblock (as
    thin_repair leaves it), never with a half-written pool that looks valid."""
    out = blank(tmp_path / "small.bin", 64 << 10)
    one_line_error(tp("repair", "-i", images["thinpool"], "-o", out),
                   "metadata device too small")
    assert read_block(out, 0) == bytes(BLOCK_SIZE)
    assert run_tool("thin_check", out).returncode != 0


# -- scale ------------------------------------------------------------------------------------

@pytest.mark.slow
def test_million_mappings(tmp_path: Path) -> None:
    """The 1,000,000-mapping image of the check tests repairs to metadata that dumps
    exactly like the input and like thin_repair's output.  (Time is not asserted on a
    shared machine; measured: about a third of thin_repair's.)"""
    from test_check import big_xml

    xml = tmp_path / "big.xml"
    xml.write_text(big_xml())
    src = blank(tmp_path / "big.bin", 256 << 20)
    run_tool("thin_restore", "-i", xml, "-o", src, check=True)
    report = ours(src, tmp_path / "ours.bin", size=256 << 20)
    assert report.nr_mappings == 1_000_000 and report.lossless
    assert_thin_check_clean(tmp_path / "ours.bin")
    assert theirs(src, tmp_path / "theirs.bin", size=256 << 20).returncode == 0
    assert thin_dump(tmp_path / "ours.bin") == thin_dump(tmp_path / "theirs.bin") == thin_dump(src)
