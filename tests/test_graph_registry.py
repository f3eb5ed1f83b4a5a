"""Driver registry and Docker's selection: by name, by prior state in the root, by priority."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from archivetools import needs_root
from thinpool.graph import registry
from thinpool.graph.driver import GraphError, NotSupported, PrerequisitesMissing
from thinpool.graph.options import parse_size, split_option
from thinpool.graph.driver import BadOption

pytestmark = needs_root


def test_builtin_drivers_are_registered_in_dockers_priority_order() -> None:
    names = registry.registered()
    assert "vfs" in names and names[-1] == "vfs"
    assert names == [n for n in registry.PRIORITY if n in names]


def test_driver_modules_are_imported_only_when_initialised(tmp_path: Path) -> None:
    """Names and priorities need no driver module; initialising vfs loads only vfs's (a fresh
    process: devicemapper's module would pull in the pool engine and numpy at every start-up)."""
    code = f"""
import sys
from thinpool.graph import registry
drivers = ("thinpool.graph.vfs", "thinpool.graph.overlay2", "thinpool.graph.btrfs", "thinpool.graph.devmapper")
loaded = lambda: [m for m in drivers if m in sys.modules]
assert registry.registered() == ["overlay2", "btrfs", "devicemapper", "vfs"], registry.registered()
assert registry.prior_drivers({str(tmp_path)!r}) == [] and loaded() == [], loaded()
assert registry.new_driver({str(tmp_path)!r}, "vfs").name == "vfs"
assert loaded() == ["thinpool.graph.vfs"], loaded()
assert "numpy" not in sys.modules and "thinpool.pool.engine" not in sys.modules
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_lazy_registration(tmp_path: Path) -> None:
    reg = registry.Registry()
    reg.register_lazy("vfs", "thinpool.graph.vfs", "VfsDriver", automatic=False)
    assert reg.registered() == ["vfs"]
    with pytest.raises(GraphError, match="^no supported storage driver found$"):  # named only
        reg.new_driver(str(tmp_path / "root"))
    d = reg.new_driver(str(tmp_path / "root"), "vfs")
    assert d.name == "vfs" and d.home == str(tmp_path / "root" / "vfs")
    with pytest.raises(GraphError, match="name already registered vfs"):
        reg.register("vfs", registry.DEFAULT._drivers["vfs"])  # noqa: SLF001


def test_register_twice_is_an_error() -> None:
    reg = registry.Registry()
    reg.register("vfs", registry.DEFAULT._drivers["vfs"])  # noqa: SLF001 - the real vfs init
    with pytest.raises(GraphError, match="name already registered vfs"):
        reg.register("vfs", registry.DEFAULT._drivers["vfs"])  # noqa: SLF001


def test_by_name(tmp_path: Path) -> None:
    d = registry.new_driver(str(tmp_path), "vfs")
    assert d.name == "vfs" and d.home == str(tmp_path / "vfs")
    with pytest.raises(NotSupported, match="driver not supported: unknown driver 'nosuch'"):
        registry.new_driver(str(tmp_path), "nosuch")


def test_automatic_selection_uses_the_priority_list(tmp_path: Path) -> None:
    d = registry.new_driver(str(tmp_path / "root"))
    first_supported = registry.registered()[0]
    if first_supported == "btrfs":  # not on btrfs here: skipped
        first_supported = registry.registered()[1]
    assert d.name == first_supported


def test_not_supported_is_skipped_and_vfs_is_no_prior_state(tmp_path: Path) -> None:
    reg = registry.Registry()
    reg.register("vfs", registry.DEFAULT._drivers["vfs"])  # noqa: SLF001
    if "btrfs" in registry.DEFAULT.registered():
        reg.register("btrfs", registry.DEFAULT._drivers["btrfs"])  # noqa: SLF001
    root = tmp_path / "root"
    assert reg.new_driver(str(root)).name == "vfs"  # btrfs (if any) said PrerequisitesMissing: skipped
    assert (root / "vfs" / "dir").is_dir()
    assert reg.prior_drivers(str(root)) == []  # a vfs home never counts as prior state
    assert reg.new_driver(str(root)).name == "vfs"


def test_prior_state_wins_and_its_failure_is_fatal(tmp_path: Path) -> None:
    if "btrfs" not in registry.registered():
        pytest.skip("no btrfs driver registered")
    root = tmp_path / "root"
    (root / "btrfs" / "subvolumes").mkdir(parents=True)  # left by a btrfs driver: not on btrfs now
    assert registry.prior_drivers(str(root)) == ["btrfs"]
    with pytest.raises(PrerequisitesMissing):
        registry.new_driver(str(root))
    (root / "btrfs" / "subvolumes").rmdir()  # an empty home is no prior state
    assert registry.prior_drivers(str(root)) == []


def test_several_prior_drivers(tmp_path: Path) -> None:
    names = [n for n in registry.registered() if n != "vfs"]
    if len(names) < 2:
        pytest.skip("needs two registered drivers besides vfs")
    root = tmp_path / "root"
    for n in names[:2]:
        (root / n).mkdir(parents=True)
        (root / n / "x").write_text("state")
    with pytest.raises(GraphError) as info:
        registry.new_driver(str(root))
    assert str(info.value) == (f"{root} contains several valid graphdrivers: {names[0]}, {names[1]}; "
                               "cleanup or explicitly choose storage driver (-s <DRIVER>)")
    assert registry.new_driver(str(root), "vfs").name == "vfs"  # naming one is always possible


def test_no_supported_driver(tmp_path: Path) -> None:
    reg = registry.Registry()
    if "btrfs" not in registry.registered():
        pytest.skip("no btrfs driver registered")
    reg.register("btrfs", registry.DEFAULT._drivers["btrfs"])  # noqa: SLF001
    with pytest.raises(GraphError, match="^no supported storage driver found .btrfs: prerequisites"):
        reg.new_driver(str(tmp_path / "root"))


def test_option_parsing() -> None:
    assert parse_size("10") == 10
    assert parse_size("512k") == 512 << 10
    assert parse_size("10M") == 10 << 20
    assert parse_size("10MB") == 10 << 20
    assert parse_size("1.5GiB") == 3 << 29
    assert parse_size("2 gb") == 2 << 30
    for bad in ("", "abc", "10Q", "-1", "1.2.3", "١٠"):
        with pytest.raises(BadOption, match="invalid size"):
            parse_size(bad)
    assert split_option(" Overlay2.Size = 10G ") == ("overlay2.size", "10G")
    for bad in ("novalue", "=x", " =x"):
        with pytest.raises(BadOption, match="unable to parse key/value option"):
            split_option(bad)
