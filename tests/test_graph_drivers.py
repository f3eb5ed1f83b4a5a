"""Per-driver behaviour the contract does not cover: on-disk layouts, mounts and options."""

from __future__ import annotations

import io
import os
import stat
import subprocess
from pathlib import Path

import pytest

from archivetools import needs_root
from graphkit import base_layer, child_layer, tree, unmount_tree, xfs_fs, xfs_pquota_fs  # noqa: F401
from thinpool.graph import registry
from thinpool.graph.driver import BadOption, CreateOpts

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
