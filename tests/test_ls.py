"""thinpool.tools.ls against thin_ls 0.9.0: kernel images and restored sharing scenarios.

Also home of the scenario builder used by test_delta.py: pools written as
thin_dump XML and restored with the real thin_restore, with devices that
share data blocks in every way (snapshots, partial overwrites, blocks mapped
twice, cross-mapped blocks at other virtual addresses, empty and disjoint
devices).
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import random
from pathlib import Path

import pytest

import thinpool.tools.ls as ls_mod
from thinpool.errors import MetadataError, ThinpoolError
from thinpool.tools.ls import (DEFAULT_FIELDS, FIELDS, format_disk_unit, format_ls,
                               list_devices, parse_fields)

from conftest import KERNEL_FIXTURES, KERNEL_IMAGES, run_tool

Devices = dict[int, list[tuple[int, int, int]]]  # dev -> [(vblock, data block, time)]

COLUMNS = ["DEV", "MAPPED_BLOCKS", "EXCLUSIVE_BLOCKS", "SHARED_BLOCKS"]
FIELD_LISTS = [
    COLUMNS,
    list(DEFAULT_FIELDS),
    list(FIELDS),
    ["SHARED", "DEV", "EXCLUSIVE_BYTES", "MAPPED_SECTORS", "SNAP_TIME", "DEV"],
    ["TRANSACTION", "CREATE_TIME", "EXCLUSIVE", "SHARED_SECTORS", "MAPPED_BYTES"],
]


# -- scenario pools ---------------------------------------------------------------------------

def sharing_devices(seed: int) -> tuple[Devices, int]:
    """Devices sharing data blocks in many ways, and the number of data blocks used."""
    rng = random.Random(seed)
    fresh = itertools.count(rng.randrange(0, 50))

    def alloc() -> int:
        if rng.random() < 0.1:  # break data contiguity now and then
            next(fresh)
        return next(fresh)

    origin: list[tuple[int, int, int]] = []
    v = rng.randrange(0, 4)
    while len(origin) < 700:
        for _ in range(rng.randrange(1, 40)):
            origin.append((v, alloc(), 0))
            v += 1
        v += rng.randrange(0, 6)
    vmax = v

    snap = []  # snapshot of the origin, partly overwritten, trimmed and extended
    for v, d, t in origin:
        r = rng.random()
        if r < 0.15:
            snap.append((v, alloc(), 2))
        elif r > 0.9:
            continue
        else:
            snap.append((v, d, t))
    taken = {v for v, _, _ in snap}
    extra = sorted(set(rng.sample(range(vmax + 60), 80)) - taken)
    snap = sorted(snap + [(v, alloc(), 3) for v in extra])

    snap_of_snap = [(v, alloc(), 4) if rng.random() < 0.05 else (v, d, t) for v, d, t in snap]
    disjoint = [(5000 + i, alloc(), 1) for i in range(300)]
    relocated = [(v, alloc(), 1) for v, _, _ in origin]  # same vblocks, all different data
    pool = [alloc() for _ in range(10)]
    repeated = sorted([(v, pool[v % 10], 1) for v in range(100)]
                      + [(200 + i, disjoint[i * 7][1], 1) for i in range(20)])
    shifted = [(v + 3, d, 0) for v, d, _ in origin[100:160]]  # origin's blocks, other vblocks

    devices: Devices = {
        0: origin, 1: list(origin), 2: snap, 3: [], 4: disjoint, 5: relocated,
        6: repeated, 8: shifted, 10: snap_of_snap,
    }
    return devices, next(fresh) + 1


def pool_xml(devices: Devices, nr_data_blocks: int, data_block_size: int = 128) -> str:
    lines = [f'<superblock uuid="" time="5" transaction="9" flags="0" version="2" '
             f'data_block_size="{data_block_size}" nr_data_blocks="{nr_data_blocks}">']
    for dev, maps in sorted(devices.items()):
        lines.append(f'  <device dev_id="{dev}" mapped_blocks="{len(maps)}" transaction="{dev}"'
                     f' creation_time="{dev % 4}" snap_time="{dev % 3 + 1}">')
        lines += [f'    <single_mapping origin_block="{v}" data_block="{d}" time="{t}"/>'
                  for v, d, t in maps]
        lines.append("  </device>")
    lines.append("</superblock>")
    return "\n".join(lines) + "\n"


def restore_pool(directory: Path, devices: Devices, nr_data_blocks: int,
                 data_block_size: int = 128, name: str = "meta") -> Path:
    """Metadata restored by the real thin_restore from generated XML."""
    xml = directory / f"{name}.xml"
    xml.write_text(pool_xml(devices, nr_data_blocks, data_block_size))
    meta = directory / f"{name}.bin"
    with open(meta, "wb") as f:
        f.truncate(16 << 20)
    r = run_tool("thin_restore", "-i", xml, "-o", meta)
    assert r.returncode == 0, r.stderr
    return meta


SCENARIOS = {  # name -> (seed, data_block_size)
    "seed1": (1, 128),
    "seed2-1GiB-blocks": (2, 2097152),
    "seed3-huge-blocks": (3, 4294967295),
}


@pytest.fixture(scope="module", params=sorted(SCENARIOS))
def scenario(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    seed, dbs = SCENARIOS[request.param]
    devices, nr = sharing_devices(seed)
    return restore_pool(tmp_path_factory.mktemp(request.param), devices, nr, dbs)


# -- helpers -------------------------------------------------------------------------------

def thin_ls(meta: Path, fields: list[str] | tuple[str, ...] | None = None, headers: bool = True,
            snapshot: bool = False) -> str:
    args = ["thin_ls"] + (["-m"] if snapshot else []) + ([] if headers else ["--no-headers"])
    if fields is not None:
        args += ["-o", ",".join(fields)]
    r = run_tool(*args, meta)
    assert r.returncode == 0, r.stderr
    return r.stdout


def ours(meta: Path, fields: list[str] | tuple[str, ...] = DEFAULT_FIELDS, headers: bool = True,
         snapshot: bool = False) -> str:
    return format_ls(list_devices(meta, snapshot=snapshot), fields, headers)


# -- kernel-written images -------------------------------------------------------------------

KERNEL_CASES = [(name, snap) for name in KERNEL_IMAGES for snap in (False, True)]


@pytest.mark.parametrize("name,snapshot", KERNEL_CASES,
                         ids=[f"{n}{'-m' if s else ''}" for n, s in KERNEL_CASES])
def test_kernel_image_matches_recorded_thin_ls(name: str, snapshot: bool, kernel_image,
                                               kernel_index) -> None:
    tool = "thin_ls_m" if snapshot else "thin_ls"
    meta = kernel_image(name)
    recorded = kernel_index[name]["tools"].get(tool)
    if recorded is None:  # no metadata snapshot held: thin_ls -m fails too
        assert snapshot and kernel_index[name]["metadata_snap_block"] == 0
        assert run_tool("thin_ls", "-m", meta).returncode != 0
    if recorded is None or recorded["rc"] != 0:
        with pytest.raises(MetadataError) as exc:
            list_devices(meta, snapshot=snapshot)
        assert "\n" not in str(exc.value) and str(exc.value)
        return
    got = ours(meta, COLUMNS, headers=False, snapshot=snapshot)
    suffix = "_m" if snapshot else ""
    assert got == (KERNEL_FIXTURES / f"{name}.thin_ls{suffix}.txt").read_text()
    assert hashlib.sha256(got.encode()).hexdigest() == recorded["stdout_sha256"]
    assert got == thin_ls(meta, COLUMNS, headers=False, snapshot=snapshot)


@pytest.mark.parametrize("name", ["tmeta", "tmeta_with_metadata_snap",
                                  "tmeta_with_shared_internals_and_leaves",
                                  "tmeta_with_empty_roots"])
@pytest.mark.parametrize("fields", [None, list(FIELDS)], ids=["default", "all"])
def test_kernel_image_all_fields(name: str, fields: list[str] | None, kernel_image) -> None:
    meta = kernel_image(name)
    want = thin_ls(meta, fields)
    assert ours(meta, fields or DEFAULT_FIELDS) == want
    if name == "tmeta_with_metadata_snap":
        assert ours(meta, fields or DEFAULT_FIELDS, snapshot=True) == thin_ls(meta, fields,
                                                                             snapshot=True)


# -- restored scenarios ----------------------------------------------------------------------

@pytest.mark.parametrize("fields", FIELD_LISTS, ids=range(len(FIELD_LISTS)))
@pytest.mark.parametrize("headers", [True, False], ids=["headers", "no-headers"])
def test_scenario_matches_thin_ls(scenario: Path, fields: list[str], headers: bool) -> None:
    assert ours(scenario, fields, headers) == thin_ls(scenario, fields, headers)


def test_scenario_default_output(scenario: Path) -> None:
    assert ours(scenario) == thin_ls(scenario)


def test_sharing_semantics(tmp_path: Path) -> None:
    """Exclusive = the data block has exactly one mapping anywhere, even within one device."""
    devices: Devices = {
        0: [(0, 7, 0), (1, 7, 0), (2, 8, 0), (3, 20, 0)],  # 7 mapped twice by dev 0
        1: [(0, 9, 0), (5, 20, 0)],                         # 20 also mapped by dev 0
        2: [],
    }
    meta = restore_pool(tmp_path, devices, 100)
    rows = {r.dev_id: (r.mapped_blocks, r.exclusive_blocks, r.shared_blocks)
            for r in list_devices(meta)}
    assert rows == {0: (4, 1, 3), 1: (2, 1, 1), 2: (0, 0, 0)}
    assert ours(meta, COLUMNS) == thin_ls(meta, COLUMNS)


def test_small_batches_and_chunks_give_same_result(scenario: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    want = thin_ls(scenario, FIELDS)
    monkeypatch.setattr(ls_mod, "BATCH", 3)
    monkeypatch.setattr(ls_mod, "CHUNK_BITS", 2)
    assert ours(scenario, FIELDS) == want


@pytest.mark.parametrize("devices", [{}, {4: []}], ids=["no-devices", "one-empty"])
@pytest.mark.parametrize("headers", [True, False], ids=["headers", "no-headers"])
def test_empty_pools(tmp_path: Path, devices: Devices, headers: bool) -> None:
    meta = restore_pool(tmp_path, devices, 64)
    for fields in (list(DEFAULT_FIELDS), list(FIELDS)):
        assert ours(meta, fields, headers) == thin_ls(meta, fields, headers)


# -- field lists and units -------------------------------------------------------------------

@pytest.mark.parametrize("spec", ["DEV,", "DEV,MAPPED,", "", "DEV,,DEV", ",DEV", "dev", "FOO",
                                  "DEV,DEV", "SNAP_TIME,DEV"])
def test_parse_fields_like_thin_ls(spec: str, scenario: Path) -> None:
    r = run_tool("thin_ls", "-o", spec, scenario)
    if r.returncode == 0:
        assert format_ls(list_devices(scenario), parse_fields(spec), True) == r.stdout
    else:
        assert r.stderr == "unknown field\n"
        with pytest.raises(ThinpoolError):
            parse_fields(spec)


def test_unknown_field_rejected() -> None:
    with pytest.raises(ThinpoolError):
        format_ls([], ["DEV", "HIGHEST_BLOCK"], True)


@pytest.mark.parametrize("nbytes,text", [
    (0, "0"), (512, "512"), (4096, "4096"), (8192, "8192"), (8193, "8KiB"),
    (65536, "64KiB"), (1048576, "1024KiB"), (1048577, "1024KiB"), (134152192, "128MiB"),
    (1 << 30, "1024MiB"), (1025 << 30, "1025GiB"), (2199023255040, "2047GiB"),
    (1319413953024000000, "1171PiB"), (1344465221650448384, "1194PiB"),
    (8704, "9KiB"), (10751, "10KiB"), (10752, "11KiB"), (8192 * 1024 + 1023, "8192KiB"),
])
def test_format_disk_unit(nbytes: int, text: str) -> None:
    """Values observed from thin_ls 0.9.0 (rounding half up after truncating divisions)."""
    assert format_disk_unit(nbytes) == text


def test_unsigned_wraparound_of_sizes(tmp_path: Path) -> None:
    """Byte counts wrap at 2**64 as in the C++ tool (u64 arithmetic)."""
    devices: Devices = {0: [(v, v, 0) for v in range(2048)]}
    meta = restore_pool(tmp_path, devices, 4096, data_block_size=4294967295)
    rows = list_devices(meta)
    assert rows[0].mapped_blocks == 2048
    assert ours(meta, FIELDS) == thin_ls(meta, FIELDS)
    big = [dataclasses.replace(r, mapped_blocks=1 << 40) for r in rows]
    assert format_ls(big, ["MAPPED_BYTES", "MAPPED_SECTORS"], False) == \
        f"{((1 << 40) * 4294967295 * 512) % (1 << 64)} {((1 << 40) * 4294967295) % (1 << 64)} \n"
    assert format_ls(big, ["MAPPED_SECTORS", "MAPPED"], False, data_block_size=2) == \
        f"{1 << 41} 1024TiB \n"
