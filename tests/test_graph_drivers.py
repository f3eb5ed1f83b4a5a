"""Per-driver behaviour the contract does not cover: on-disk layouts, mounts and options."""

from __future__ import annotations

import io
import os
import re
import shutil
import stat
import subprocess
from pathlib import Path
from typing import Iterator

import pytest

from archivetools import needs_root
from conftest import require_tool
from graphkit import (base_layer, btrfs_fs, build_tar, child_layer, loop_fs, reg, tar_names, tree,  # noqa: F401
                      unmount_tree, xfs_fs, xfs_pquota_fs)
from thinpool.archive import ArchiveError
from thinpool.graph import registry
from thinpool.linux import mounts
from thinpool.graph.btrfs import BtrfsDriver
from thinpool.graph.driver import (BadOption, CreateOpts, GraphError, IncompatibleFS, NotSupported,
                                   PrerequisitesMissing)
from thinpool.graph.overlay2 import Overlay2Driver

pytestmark = needs_root


# -- vfs ---------------------------------------------------------------------------------------

def test_vfs_layout_is_dockers(tmp_path: Path) -> None:
    d = registry.new_driver(str(tmp_path), "vfs")
    d.create("base", None)
    d.apply_diff("base", None, io.BytesIO(base_layer()))
    d.create("child", "base")
    home = tmp_path / "vfs"
    assert sorted(os.listdir(home)) == ["dir", "parent"]
    assert sorted(os.listdir(home / "dir")) == ["base", "child"]
    assert d.get("child") == str(home / "dir" / "child")
    d.put("child")
    assert (home / "parent" / "child").read_text() == "base"
    assert not (home / "parent" / "base").exists()
    # a full, independent copy: same tree, other inodes
    assert tree(home / "dir" / "child") == tree(home / "dir" / "base")
    a, b = os.stat(home / "dir/base/etc/passwd"), os.stat(home / "dir/child/etc/passwd")
    assert a.st_ino != b.st_ino
    (home / "dir/child/etc/passwd").write_text("changed")
    assert (home / "dir/base/etc/passwd").read_text().startswith("root:")


def test_vfs_copies_sockets_and_keeps_hard_links_apart_from_the_parent(tmp_path: Path) -> None:
    import socket

    d = registry.new_driver(str(tmp_path), "vfs")
    d.create("base", None)
    root = Path(d.get("base"))
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(root / "sock"))
    s.close()
    (root / "f").write_text("x")
    os.link(root / "f", root / "g")
    os.setxattr(root / "f", "trusted.test", b"t")
    d.put("base")
    d.create("c", "base")
    croot = Path(d.get("c"))
    assert stat.S_ISSOCK(os.lstat(croot / "sock").st_mode)
    assert os.stat(croot / "f").st_ino == os.stat(croot / "g").st_ino != os.stat(root / "f").st_ino
    assert os.getxattr(croot / "g", "trusted.test") == b"t"


def test_vfs_stale_staging_is_removed_at_start(tmp_path: Path) -> None:
    registry.new_driver(str(tmp_path), "vfs")
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tmp_path / "vfs" / "dir" / f".tmp-{dead.pid}-x"
    (stale / "sub").mkdir(parents=True)
    live = tmp_path / "vfs" / "dir" / f".tmp-{os.getppid()}-y"
    live.mkdir()
    d = registry.new_driver(str(tmp_path), "vfs")
    assert not stale.exists() and live.exists()
    assert not d.exists(".tmp-1-x")


def test_vfs_size_needs_project_quotas(tmp_path: Path) -> None:
    with pytest.raises(BadOption, match="Filesystem does not support, or has not enabled quotas"):
        registry.new_driver(str(tmp_path), "vfs", ["size=10M"])
    d = registry.new_driver(str(tmp_path), "vfs")
    d.create("base", None)
    with pytest.raises(BadOption, match="quotas"):
        d.create_rw("c", "base", CreateOpts(storage_opt={"size": "10M"}))
    assert not d.exists("c")
    with pytest.raises(BadOption, match="not supported for vfs on read-only layers"):
        d.create("r", "base", CreateOpts(storage_opt={"size": "10M"}))
    with pytest.raises(BadOption, match="unknown option bogus for vfs"):
        registry.new_driver(str(tmp_path), "vfs", ["bogus=1"])


def test_vfs_size_on_xfs_without_pquota(xfs_fs: Path) -> None:
    with pytest.raises(BadOption, match="Filesystem does not support, or has not enabled quotas"):
        registry.new_driver(str(xfs_fs / "vfs-noquota"), "vfs", ["size=10M"])
    assert not (xfs_fs / "vfs-noquota" / "vfs" / "backingFsBlockDev").exists()


def test_vfs_size_with_xfs_project_quota(xfs_pquota_fs: Path) -> None:
    root = xfs_pquota_fs / "vfs-quota"
    d = registry.new_driver(str(root), "vfs", ["vfs.size=20M"])
    d.create("base", None)
    d.apply_diff("base", None, io.BytesIO(base_layer()))
    d.create_rw("small", "base", CreateOpts(storage_opt={"size": "4M"}))
    d.create_rw("default", "base")
    big = os.urandom(1 << 20)
    path = Path(d.get("small"))
    with pytest.raises(OSError) as info:
        with open(path / "fill", "wb") as f:
            for _ in range(8):
                f.write(big)
                f.flush()
                os.fsync(f.fileno())
    assert info.value.errno == 122  # EDQUOT
    d.put("small")
    path = Path(d.get("default"))
    with open(path / "fill", "wb") as f:
        for _ in range(8):
            f.write(big)
    os.unlink(path / "fill")
    with pytest.raises(OSError):
        with open(path / "fill", "wb") as f:
            for _ in range(24):
                f.write(big)
                f.flush()
                os.fsync(f.fileno())
    d.put("default")
    d.remove("small")
    d.remove("default")
    d.remove("base")
    unmount_tree(root)


# -- overlay2 ----------------------------------------------------------------------------------

LINK_RE = re.compile(r"[A-Z2-7]{26}")


def _overlay(tmp_path: Path) -> Overlay2Driver:
    d = registry.new_driver(str(tmp_path / "root"), "overlay2")
    assert isinstance(d, Overlay2Driver)
    return d


@pytest.fixture
def ovl(tmp_path: Path) -> Iterator[Overlay2Driver]:
    d = _overlay(tmp_path)
    try:
        yield d
    finally:
        d.cleanup()
        unmount_tree(tmp_path)


def _mount_of(path: str) -> mounts.MountEntry:
    entry = mounts.mount_entry(path)
    assert entry is not None, f"{path} is not mounted"
    return entry


def _super_opts(entry: mounts.MountEntry) -> dict[str, str]:
    return dict(o.partition("=")[::2] for o in entry.super_options.split(","))


def test_overlay2_layout_is_dockers(ovl: Overlay2Driver) -> None:
    home = Path(ovl.home)
    ovl.create("base", None)
    ovl.create("mid", "base")
    ovl.create_rw("top", "mid")
    links = {}
    for id in ("base", "mid", "top"):
        link = (home / id / "link").read_text()
        assert LINK_RE.fullmatch(link)
        assert os.readlink(home / "l" / link) == f"../{id}/diff"
        assert (home / "l" / link).resolve() == (home / id / "diff").resolve()
        links[id] = link
    assert len(set(links.values())) == 3
    assert sorted(os.listdir(home / "l")) == sorted(links.values())
    assert sorted(os.listdir(home / "base")) == ["committed", "diff", "link"]
    assert sorted(os.listdir(home / "mid")) == ["committed", "diff", "link", "lower", "work"]
    assert sorted(os.listdir(home / "top")) == ["diff", "link", "lower", "work"]
    assert (home / "mid" / "lower").read_text() == f"l/{links['base']}"
    assert (home / "top" / "lower").read_text() == f"l/{links['mid']}:l/{links['base']}"
    assert (home / "base" / "committed").read_bytes() == b""
    assert stat.S_IMODE(os.stat(home / "top" / "work").st_mode) == 0o700
    assert stat.S_IMODE(os.stat(home / "l").st_mode) == 0o700
    assert ovl.get_metadata("top") == {
        "WorkDir": str(home / "top/work"), "MergedDir": str(home / "top/merged"), "UpperDir": str(home / "top/diff"),
        "LowerDir": f"{home}/mid/diff:{home}/base/diff"}
    assert "LowerDir" not in ovl.get_metadata("base")
    # get of a base layer is its diff directory, nothing mounted
    assert ovl.get("base") == str(home / "base" / "diff")
    assert not mounts.is_mountpoint(str(home / "base" / "diff"))
    ovl.put("base")
    # remove drops the short link too
    ovl.remove("top")
    assert links["top"] not in os.listdir(home / "l") and not (home / "top").exists()


def test_overlay2_mount_options(ovl: Overlay2Driver) -> None:
    home = Path(ovl.home)
    ovl.create("base", None)
    ovl.apply_diff("base", None, io.BytesIO(base_layer()))
    ovl.create("mid", "base")
    ovl.apply_diff("mid", "base", io.BytesIO(child_layer()))
    ovl.create_rw("top", "mid")
    top = ovl.get("top")
    assert top == str(home / "top" / "merged")
    entry = _mount_of(top)
    assert entry.fstype == "overlay"
    opts = _super_opts(entry)
    link = {i: (home / i / "link").read_text() for i in ("base", "mid")}
    assert opts["lowerdir"] == f"{home}/l/{link['mid']}:{home}/l/{link['base']}"
    assert opts["upperdir"] == f"{home}/top/diff" and opts["workdir"] == f"{home}/top/work"
    assert "ro" not in entry.options.split(",")
    assert ovl.index_off == ("index=off," if os.path.exists("/sys/module/overlay/parameters/index") else "")
    (Path(top) / "written").write_text("rw")
    assert (home / "top" / "diff" / "written").read_text() == "rw"
    # mid is committed (it has a child): mounted without an upper directory, so read-only
    mid = ovl.get("mid")
    opts = _super_opts(_mount_of(mid))
    assert opts["lowerdir"] == f"{home}/mid/diff:{home}/l/{link['base']}"
    assert "upperdir" not in opts and "workdir" not in opts
    with pytest.raises(OSError) as info:
        (Path(mid) / "nope").write_text("x")
    assert info.value.errno == 30  # EROFS
    ovl.put("mid")
    ovl.put("top")
    assert not (home / "top" / "merged").exists() and not (home / "mid" / "merged").exists()


def test_overlay2_deep_chain_mounts_with_relative_paths_and_stops_at_128(tmp_path: Path) -> None:
    deep = tmp_path / ("long-directory-name-" * 6) / "root"
    d = registry.new_driver(str(deep), "overlay2")
    try:
        ids = [f"layer{i:03d}" for i in range(129)]
        d.create(ids[0], None)
        d.apply_diff(ids[0], None, io.BytesIO(build_tar(reg("f0", b"0"))))
        for i in range(1, 129):
            d.create(ids[i], ids[i - 1])
            if i % 40 == 0:
                d.apply_diff(ids[i], ids[i - 1], io.BytesIO(build_tar(reg(f"f{i}", str(i).encode()))))
        assert len((Path(d.home) / ids[128] / "lower").read_text().split(":")) == 128
        absolute = len(",".join(os.path.join(d.home, x) for x in (Path(d.home) / ids[128] / "lower")
                                .read_text().split(":")))
        assert absolute > os.sysconf("SC_PAGESIZE")  # too long for mount(2): relative paths are needed
        with pytest.raises(GraphError, match="max depth exceeded"):
            d.create("one-too-many", ids[128])
        assert not d.exists("one-too-many")
        d.create_rw("ctr", ids[127])
        root = Path(d.get("ctr"))
        assert sorted(os.listdir(root)) == ["f0", "f120", "f40", "f80"]
        assert (root / "f120").read_text() == "120"
        (root / "new").write_text("new")
        entry = _mount_of(str(root))
        assert _super_opts(entry)["upperdir"].endswith("ctr/diff")
        d.put("ctr")
        assert not mounts.is_mountpoint(str(root))
        assert (Path(d.home) / "ctr/diff/new").read_text() == "new"
    finally:
        d.cleanup()
        unmount_tree(tmp_path)


def test_overlay2_refuses_an_overlay_home(tmp_path: Path) -> None:
    for sub in ("lower", "upper", "work", "merged"):
        (tmp_path / sub).mkdir()
    mounts.mount("overlay", str(tmp_path / "merged"), "overlay", 0,
                 f"lowerdir={tmp_path}/lower,upperdir={tmp_path}/upper,workdir={tmp_path}/work")
    try:
        with pytest.raises(IncompatibleFS, match="^backing file system is unsupported for this graph driver: "
                                                 "'overlay2' is not supported over overlayfs$"):
            registry.new_driver(str(tmp_path / "merged" / "root"), "overlay2")
        assert os.listdir(tmp_path / "merged") == []  # nothing was created
        # automatic selection skips it (IncompatibleFS is a NotSupported)
        assert registry.new_driver(str(tmp_path / "merged" / "root")).name == "vfs"
    finally:
        unmount_tree(tmp_path / "merged")


def test_overlay2_refuses_a_filesystem_without_d_type(tmp_path: Path) -> None:
    with loop_fs(tmp_path, "ext4", "64M", mkfs_args=("-O", "^filetype")) as mnt:
        with pytest.raises(NotSupported, match="formatted without d_type support.*-O filetype"):
            registry.new_driver(str(mnt / "root"), "overlay2")
        assert sorted(os.listdir(mnt)) == ["lost+found"]


def test_overlay2_status(ovl: Overlay2Driver) -> None:
    status = ovl.status()
    assert [k for k, _ in status] == ["Backing Filesystem", "Supports d_type", "Using metacopy",
                                      "Native Overlay Diff", "userxattr"]
    values = dict(status)
    assert values["Backing Filesystem"] == mounts.fs_name(ovl.home) == "extfs"
    assert values["Supports d_type"] == "true" and values["userxattr"] == "false"
    assert values["Native Overlay Diff"] == ("true" if ovl.native_diff_problem() is None else "false")
    assert values["Using metacopy"] == ("true" if Path("/sys/module/overlay/parameters/metacopy").read_text()
                                        .strip() == "Y" else "false")


def test_overlay2_native_diff_uses_overlay_whiteouts(ovl: Overlay2Driver) -> None:
    if ovl.native_diff_problem() is not None:
        pytest.skip(f"native diff is off here: {ovl.native_diff_problem()}")
    home = Path(ovl.home)
    ovl.create("base", None)
    ovl.apply_diff("base", None, io.BytesIO(base_layer()))
    ovl.create("mid", "base")
    ovl.apply_diff("mid", "base", io.BytesIO(child_layer()))
    diff = home / "mid" / "diff"
    wh = os.lstat(diff / "etc" / "hostname")
    assert stat.S_ISCHR(wh.st_mode) and wh.st_rdev == 0  # the overlay whiteout format on disk
    assert os.getxattr(diff / "opt" / "keep", "trusted.overlay.opaque") == b"y"
    names = tar_names(b"".join(ovl.diff("mid", "base")))
    assert "etc/.wh.hostname" in names and "opt/.wh.gone" in names and "opt/keep/.wh..wh..opq" in names
    assert "etc/hostname" not in names and "opt/keep/a" not in names
    # a container that deletes a directory of its image and makes it again: the kernel marks it opaque
    ovl.create_rw("ctr", "mid")
    root = Path(ovl.get("ctr"))
    shutil.rmtree(root / "var" / "lib" / "app")
    (root / "var" / "lib" / "app").mkdir()
    (root / "var" / "lib" / "app" / "fresh").write_text("fresh")
    os.unlink(root / "usr" / "bin" / "tool-link")
    want = tree(root, seconds=True)
    ovl.put("ctr")
    delta = b"".join(ovl.diff("ctr", "mid"))
    names = tar_names(delta)
    assert "var/lib/app/.wh..wh..opq" in names and "usr/bin/.wh.tool-link" in names
    assert ovl.diff_size("ctr", "mid") == len("fresh")
    ovl.create("committed", "mid")
    ovl.apply_diff("committed", "mid", io.BytesIO(delta))
    got = tree(ovl.get("committed"), seconds=True)
    ovl.put("committed")
    assert got == want


def test_overlay2_size_options_without_xfs(tmp_path: Path, ovl: Overlay2Driver) -> None:
    with pytest.raises(BadOption, match="^Storage Option overlay2.size only supported for backingFS XFS. "
                                        "Found extfs$"):
        registry.new_driver(str(tmp_path / "other"), "overlay2", ["overlay2.size=10G"])
    with pytest.raises(BadOption, match="^overlay2: unknown option overlay2.bogus$"):
        registry.new_driver(str(tmp_path / "other"), "overlay2", ["overlay2.bogus=1"])
    ovl.create("base", None)
    with pytest.raises(BadOption, match="only supported for ReadWrite Layers"):
        ovl.create("ro", "base", CreateOpts(storage_opt={"size": "1G"}))
    with pytest.raises(BadOption, match="supported only for overlay over xfs with 'pquota' mount option"):
        ovl.create_rw("rw", "base", CreateOpts(storage_opt={"size": "1G"}))
    assert not ovl.exists("ro") and not ovl.exists("rw")


def test_overlay2_size_on_xfs_without_pquota(xfs_fs: Path) -> None:
    with pytest.raises(BadOption, match="^Storage option overlay2.size not supported. Filesystem does not "
                                        "support Project Quota: Filesystem does not support, or has not enabled"):
        registry.new_driver(str(xfs_fs / "ovl-noquota"), "overlay2", ["overlay2.size=10M"])
    d = registry.new_driver(str(xfs_fs / "ovl-noquota"), "overlay2")
    assert dict(d.status())["Backing Filesystem"] == "xfs"


def test_overlay2_size_with_xfs_project_quota(xfs_pquota_fs: Path) -> None:
    d = registry.new_driver(str(xfs_pquota_fs / "ovl-quota"), "overlay2", ["overlay2.size=20M"])
    try:
        d.create("base", None)
        d.create_rw("small", "base", CreateOpts(storage_opt={"size": "4M"}))
        path = Path(d.get("small"))
        with pytest.raises(OSError) as info:
            with open(path / "fill", "wb") as f:
                for _ in range(8):
                    f.write(os.urandom(1 << 20))
                    f.flush()
                    os.fsync(f.fileno())
        assert info.value.errno == 122  # EDQUOT
        d.put("small")
    finally:
        d.cleanup()


# -- btrfs -------------------------------------------------------------------------------------

@pytest.fixture
def bt(btrfs_fs: Path) -> Iterator[BtrfsDriver]:
    root = btrfs_fs / f"root-{os.urandom(6).hex()}"
    root.mkdir()
    d = registry.new_driver(str(root), "btrfs")
    assert isinstance(d, BtrfsDriver)
    yield d


def _btrfs_show(path: str | Path) -> dict[str, str]:
    out = subprocess.run([require_tool("btrfs"), "subvolume", "show", str(path)], capture_output=True, text=True,
                         check=True).stdout
    fields = {}
    for line in out.splitlines()[1:]:
        key, sep, value = line.strip().partition(":")
        if sep:
            fields[key.strip()] = value.strip()
    return fields


def test_btrfs_layout_subvolumes_and_snapshots(bt: BtrfsDriver) -> None:
    home = Path(bt.home)
    bt.create("base", None)
    bt.apply_diff("base", None, io.BytesIO(base_layer()))
    bt.create("child", "base")
    bt.create_rw("ctr", "child")
    assert sorted(os.listdir(home)) == ["subvolumes"]
    assert sorted(os.listdir(home / "subvolumes")) == ["base", "child", "ctr"]
    for id in ("base", "child", "ctr"):
        assert os.stat(home / "subvolumes" / id).st_ino == 256  # a subvolume root
    base, child, ctr = (_btrfs_show(home / "subvolumes" / i) for i in ("base", "child", "ctr"))
    assert base["Parent UUID"] == "-"
    assert child["Parent UUID"] == base["UUID"] and ctr["Parent UUID"] == child["UUID"]
    assert bt.children("base") == ["child"] and bt.children("child") == ["ctr"]
    assert bt.get("child") == str(home / "subvolumes" / "child")
    bt.put("child")
    assert (home / "subvolumes/child/etc/passwd").read_bytes() == (home / "subvolumes/base/etc/passwd").read_bytes()
    listed = subprocess.run([require_tool("btrfs"), "subvolume", "list", "-o", str(home / "subvolumes")],
                            capture_output=True, text=True, check=True).stdout
    assert sum(1 for line in listed.splitlines() if "subvolumes/" in line) == 3
    assert bt.status() == [("Btrfs", "")] and bt.get_metadata("ctr") == {}


def test_btrfs_remove_destroys_nested_subvolumes(bt: BtrfsDriver) -> None:
    bt.create("base", None)
    bt.create_rw("ctr", "base")
    root = Path(bt.get("ctr"))
    subprocess.run([require_tool("btrfs"), "subvolume", "create", str(root / "nested")], check=True,
                   capture_output=True)
    subprocess.run([require_tool("btrfs"), "subvolume", "create", str(root / "nested" / "deeper")], check=True,
                   capture_output=True)
    (root / "nested" / "deeper" / "f").write_text("f")
    bt.put("ctr")
    bt.remove("ctr")
    assert not bt.exists("ctr") and not (root).exists()
    listed = subprocess.run([require_tool("btrfs"), "subvolume", "list", str(bt.home)], capture_output=True,
                            text=True, check=True).stdout
    mine = [line for line in listed.splitlines() if f"{Path(bt.home).parent.name}/" in line]
    assert [line.rsplit("/", 1)[-1] for line in mine] == ["base"]


def test_btrfs_needs_btrfs(tmp_path: Path) -> None:
    with pytest.raises(PrerequisitesMissing, match="^prerequisites for driver not satisfied \\(wrong filesystem\\?\\)"
                                                   ": .* is on extfs, not btrfs$"):
        registry.new_driver(str(tmp_path / "root"), "btrfs")
    assert not (tmp_path / "root").exists()


def test_btrfs_options(bt: BtrfsDriver) -> None:
    with pytest.raises(BadOption, match="^Unknown option btrfs.bogus$"):
        registry.new_driver(str(Path(bt.home).parent), "btrfs", ["btrfs.bogus=1"])
    bt.create("base", None)
    with pytest.raises(BadOption, match="^Unknown option color$"):
        bt.create_rw("c", "base", CreateOpts(storage_opt={"color": "red"}))
    with pytest.raises(BadOption, match="^btrfs: invalid storage size: 0B$"):
        bt.create_rw("c", "base", CreateOpts(storage_opt={"size": "0"}))
    with pytest.raises(BadOption, match="invalid size"):
        bt.create_rw("c", "base", CreateOpts(storage_opt={"size": "lots"}))
    assert not bt.exists("c")
    strict = registry.new_driver(str(Path(bt.home).parent), "btrfs", ["btrfs.min_space=16M"])
    with pytest.raises(BadOption, match="^btrfs: storage size cannot be less than 16.78MB$"):
        strict.create_rw("c", "base", CreateOpts(storage_opt={"size": "8M"}))
    assert not bt.exists("c")


def test_btrfs_size_is_a_qgroup_limit(bt: BtrfsDriver) -> None:
    bt.create("base", None)
    bt.apply_diff("base", None, io.BytesIO(base_layer()))
    bt.create_rw("small", "base", CreateOpts(storage_opt={"size": "8M"}))
    home = Path(bt.home)
    assert (home / "quotas" / "small").read_text() == str(8 << 20)
    shown = subprocess.run([require_tool("btrfs"), "qgroup", "show", "-r", "--raw", str(home / "subvolumes/small")],
                           capture_output=True, text=True, check=True).stdout
    assert str(8 << 20) in shown
    root = Path(bt.get("small"))
    with pytest.raises(OSError) as info:
        with open(root / "fill", "wb") as f:
            for _ in range(32):
                f.write(os.urandom(1 << 20))
                f.flush()
                os.fsync(f.fileno())
    assert info.value.errno == 122  # EDQUOT
    bt.put("small")
    bt.remove("small")
    assert not (home / "quotas" / "small").exists()


# -- a full filesystem ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["vfs", "overlay2"])
def test_out_of_space_mid_apply_leaves_no_layer(tmp_path: Path, name: str) -> None:
    small = tmp_path / "small"
    small.mkdir()
    mounts.mount("tmpfs", str(small), "tmpfs", 0, "size=2m")
    try:
        d = registry.new_driver(str(small / "root"), name)
        d.create("base", None)
        d.apply_diff("base", None, io.BytesIO(build_tar(reg("small", b"s" * 1000))))
        d.create("big", "base")
        big = build_tar(*[reg(f"f{i}", os.urandom(256 << 10)) for i in range(16)])  # 4 MiB
        with pytest.raises(ArchiveError, match="No space left on device.*layer big removed"):
            d.apply_diff("big", "base", io.BytesIO(big))
        assert not d.exists("big")
        d.create("next", "base")  # the space came back
        d.apply_diff("next", "base", io.BytesIO(build_tar(reg("ok", b"ok" * 1000))))
        d.cleanup()
    finally:
        unmount_tree(small)
