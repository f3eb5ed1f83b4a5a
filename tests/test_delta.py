"""thinpool.tools.delta against thin_delta 0.9.0 on restored and kernel-written metadata."""

from __future__ import annotations

import io
import itertools
from pathlib import Path

import pytest

import thinpool.tools.delta as delta_mod
from thinpool.errors import MetadataError, ThinpoolError
from thinpool.thin.reader import MetadataReader
from thinpool.tools.delta import delta, write_delta

from conftest import run_tool
from test_ls import Devices, restore_pool, sharing_devices


def thin_delta(meta: Path, a: int, b: int, verbose: bool = False,
               snapshot: bool = False) -> str:
    args = (["thin_delta"] + (["-m"] if snapshot else []) + (["--verbose"] if verbose else [])
            + ["--snap1", str(a), "--snap2", str(b), str(meta)])
    r = run_tool(*args)
    assert r.returncode == 0, r.stderr
    return r.stdout


def device_ids(meta: Path, snapshot: bool = False) -> list[int]:
    with MetadataReader(meta, snapshot=snapshot) as r:
        return sorted(r.mapping_roots())


@pytest.fixture(scope="module", params=[1, 2])
def sharing_pool(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    devices, nr = sharing_devices(request.param)
    return restore_pool(tmp_path_factory.mktemp(f"delta{request.param}"), devices, nr)


@pytest.mark.parametrize("verbose", [False, True], ids=["brief", "verbose"])
def test_every_device_pair(sharing_pool: Path, verbose: bool) -> None:
    """Identical, snapshot, disjoint, empty, relocated and cross-mapped devices, both orders."""
    devs = device_ids(sharing_pool)
    for a, b in itertools.product(devs, devs):
        assert delta(sharing_pool, a, b, verbose=verbose) == \
            thin_delta(sharing_pool, a, b, verbose), (a, b)


@pytest.mark.parametrize("batch", [1, 2, 7, 250])
def test_window_size_does_not_change_output(sharing_pool: Path, batch: int,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(delta_mod, "BATCH", batch)
    for a, b in [(0, 2), (2, 10), (5, 0), (0, 8), (6, 4), (3, 0), (2, 2)]:
        for verbose in (False, True):
            assert delta(sharing_pool, a, b, verbose=verbose) == \
                thin_delta(sharing_pool, a, b, verbose), (a, b, verbose)


def test_runs_ignore_time_and_split_on_data(tmp_path: Path) -> None:
    """Hand-made cases for run merging: times differ, data jumps inside a virtual run."""
    devices: Devices = {
        0: [(v, 100 + v, v % 3) for v in range(20)],  # one run, mixed times
        1: [(v, 100 + v if v < 5 or v > 12 else 300 + v, 0) for v in range(20)],
        2: [(v, 100 + v, 0) for v in range(3, 8)] + [(v, 200 + v, 0) for v in range(8, 30)],
        3: [(v, 100 + v, 0) for v in range(0, 20, 2)],  # every other block
        4: [(0, 5, 0), (1, 5, 0), (2, 5, 0), (40, 6, 0)],  # one block mapped thrice
    }
    meta = restore_pool(tmp_path, devices, 1000)
    for a, b in itertools.product(devices, devices):
        for verbose in (False, True):
            assert delta(meta, a, b, verbose=verbose) == thin_delta(meta, a, b, verbose)


def test_empty_devices(tmp_path: Path) -> None:
    meta = restore_pool(tmp_path, {0: [], 1: [], 2: [(7, 1, 0)]}, 10)
    for a, b in [(0, 0), (0, 1), (0, 2), (2, 0)]:
        for verbose in (False, True):
            assert delta(meta, a, b, verbose=verbose) == thin_delta(meta, a, b, verbose)
    assert delta(meta, 0, 1) == ('<superblock uuid="" time="5" transaction="9" '
                                 'data_block_size="128" nr_data_blocks="10">\n'
                                 '  <diff left="0" right="1">\n  </diff>\n</superblock>\n')


@pytest.mark.parametrize("a,b,which", [(99, 0, "snap1"), (0, 99, "snap2"), (98, 99, "snap1")])
def test_missing_device(sharing_pool: Path, a: int, b: int, which: str) -> None:
    r = run_tool("thin_delta", "--snap1", str(a), "--snap2", str(b), sharing_pool)
    assert r.returncode != 0 and r.stdout == ""
    message = r.stderr.splitlines()[0]
    assert message == f"Unable to find mapping tree for {which} ({a if which == 'snap1' else b})"
    out = io.StringIO()
    with pytest.raises(ThinpoolError) as exc:
        write_delta(sharing_pool, a, b, out)
    assert str(exc.value) == message
    assert out.getvalue() == ""


# -- kernel-written images -------------------------------------------------------------------

@pytest.mark.parametrize("verbose", [False, True], ids=["brief", "verbose"])
def test_kernel_snapshots(kernel_image, verbose: bool) -> None:
    """tmeta has 11 devices made of snapshots of snapshots; live and -m (nr_data_blocks=0)."""
    meta = kernel_image("tmeta_with_metadata_snap")
    devs = device_ids(meta)
    pairs = [(1, d) for d in devs] + [(d, 1) for d in devs] + list(zip(devs, devs[1:]))
    for a, b in pairs:
        assert delta(meta, a, b, verbose=verbose) == thin_delta(meta, a, b, verbose), (a, b)
    for a, b in pairs[:4]:
        assert delta(meta, a, b, snapshot=True, verbose=verbose) == \
            thin_delta(meta, a, b, verbose, snapshot=True), (a, b)


@pytest.mark.parametrize("name", ["tmeta_with_empty_roots", "tmeta_with_shared_internal_root",
                                  "tmeta_with_shared_internals_and_leaves",
                                  "tmeta_device_id_reuse", "tmeta_with_deleted_snapshot"])
def test_kernel_small_images(kernel_image, name: str) -> None:
    meta = kernel_image(name)
    snaps = [False, True] if name in ("tmeta_device_id_reuse", "tmeta_with_deleted_snapshot") \
        else [False]
    for snapshot in snaps:
        devs = device_ids(meta, snapshot)
        for a, b in itertools.product(devs, devs):
            for verbose in (False, True):
                assert delta(meta, a, b, snapshot, verbose) == \
                    thin_delta(meta, a, b, verbose, snapshot), (snapshot, a, b)


@pytest.mark.parametrize("name,snapshot", [
    ("corrupted_tmeta_with_metadata_snap", False),
    ("tmeta_with_corrupted_metadata_snap", True),
    ("tmeta_device_id_reuse_with_corrupted_thins", True),
    ("tmeta", True),  # no metadata snapshot held
])
def test_kernel_damaged_images_fail_cleanly(kernel_image, name: str, snapshot: bool) -> None:
    meta = kernel_image(name)
    r = run_tool("thin_delta", *(["-m"] if snapshot else []), "--snap1", "1", "--snap2", "1", meta)
    assert r.returncode != 0
    with pytest.raises(MetadataError) as exc:
        delta(meta, 1, 1, snapshot=snapshot)
    assert str(exc.value) and "\n" not in str(exc.value)
