"""Helpers for the graph driver tests: roots per driver, loop-mounted filesystems, trees, layer tars.

Adding a driver to the contract tests: register it (one ``register_lazy`` line in
``thinpool/graph/__init__.py``); ``registry.registered()`` then puts it in
the parametrization of ``tests/test_graph_contract.py``. If it needs more
than a plain directory as its root (btrfs needs a btrfs filesystem), add a
function to ``ROOT_PROVIDERS``; if it needs options for the tests (small
sizes), add them to ``TEST_OPTIONS``.
"""

from __future__ import annotations

import contextlib
import io
import os
import stat
import subprocess
import tarfile
import uuid
from pathlib import Path
from typing import Callable, Iterator

import pytest

from archivetools import build_tar, dir_, hard, reg, snapshot, sym, ti
from conftest import require_tool
from leakguard import keep_for_session
from thinpool.linux import mounts

CAP_V2 = bytes([0, 0, 0, 2, 0x00, 0x04, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0])  # cap_net_bind_service
T0 = 1_600_000_000
PASSWD1 = b"root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/app:/bin/sh\n"  # etc/passwd in child_layer()


# -- loop-mounted filesystems ------------------------------------------------------------------

class MountFailed(Exception):
    pass


@contextlib.contextmanager
def loop_fs(base: Path, fstype: str, size: str = "1G", mkfs_args: tuple[str, ...] = (),
            mount_opts: str = "") -> Iterator[Path]:
    """A fresh ``fstype`` filesystem on a sparse file, loop-mounted under ``base``; torn down always."""
    base.mkdir(parents=True, exist_ok=True)
    image = base / f"{fstype}-{uuid.uuid4().hex[:8]}.img"
    mnt = base / f"{fstype}-mnt-{uuid.uuid4().hex[:8]}"
    mnt.mkdir()
    subprocess.run(["truncate", "-s", size, str(image)], check=True)
    try:
        mkfs = require_tool(f"mkfs.{fstype}")
        r = subprocess.run([mkfs, "-q", *mkfs_args, str(image)], capture_output=True, text=True)
        if r.returncode:
            pytest.fail(f"mkfs.{fstype} {image}: exit {r.returncode}: {r.stderr.strip()}")
        opts = "loop" + (f",{mount_opts}" if mount_opts else "")
        r = subprocess.run(["mount", "-t", fstype, "-o", opts, str(image), str(mnt)], capture_output=True,
                           text=True)
        if r.returncode:
            raise MountFailed(f"mount -t {fstype} -o {opts}: {(r.stderr.strip().splitlines() or ['failed'])[0]}")
        try:
            yield mnt
        finally:
            unmount_tree(mnt)
    finally:
        image.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            mnt.rmdir()


def unmount_tree(path: str | Path) -> None:
    """Detach everything mounted at or below ``path`` (test teardown)."""
    with contextlib.suppress(OSError):
        mounts.unmount_all_below(str(path))


def session_dir(factory: pytest.TempPathFactory, name: str) -> Path:
    """A temporary directory whose mounts live for the whole session (the leak guard knows)."""
    path = factory.mktemp(name)
    keep_for_session(path)
    return path


@pytest.fixture(scope="session")
def btrfs_fs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One loop-mounted btrfs for the session; each test root is a fresh directory in it."""
    require_tool("btrfs")
    with loop_fs(session_dir(tmp_path_factory, "btrfs"), "btrfs", "1G") as mnt:
        yield mnt


@pytest.fixture(scope="session")
def xfs_fs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One loop-mounted xfs without quotas."""
    with loop_fs(session_dir(tmp_path_factory, "xfs"), "xfs", "1G") as mnt:
        yield mnt


@pytest.fixture(scope="session")
def xfs_pquota_fs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One loop-mounted xfs with project quotas enforced (overlay2.size, vfs size).

    Skips when the kernel cannot mount xfs with ``pquota`` (built without
    CONFIG_XFS_QUOTA: "quota support not available in this kernel").
    """
    try:
        with loop_fs(session_dir(tmp_path_factory, "xfs-pquota"), "xfs", "1G", mount_opts="pquota") as mnt:
            yield mnt
    except MountFailed as e:
        pytest.skip(f"this kernel cannot mount xfs with project quotas: {e}")


def _plain_root(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    return tmp_path / "root"


def _btrfs_root(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    fs: Path = request.getfixturevalue("btrfs_fs")
    root = fs / f"root-{uuid.uuid4().hex[:12]}"
    root.mkdir()
    return root


ROOT_PROVIDERS: dict[str, Callable[[pytest.FixtureRequest, Path], Path]] = {"btrfs": _btrfs_root}
"""Driver name -> a fresh root directory for one test (default: a directory in tmp_path)."""

TEST_OPTIONS: dict[str, list[str]] = {
    "devicemapper": ["dm.basesize=256M", "dm.loopdatasize=4G", "dm.loopmetadatasize=64M",
                     "dm.fs=ext4"],
}
"""Driver name -> the daemon-wide options the tests use."""


def driver_root(name: str, request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    return ROOT_PROVIDERS.get(name, _plain_root)(request, tmp_path)


# -- trees -------------------------------------------------------------------------------------

def tree(root: str | Path, *, seconds: bool = False) -> dict[str, tuple]:
    """Every path's metadata and content digest (``archivetools.snapshot``) plus its hard-link group.

    ``seconds``: mtimes truncated to whole seconds (what a tar keeps).
    """
    snap = snapshot(root)
    groups: dict[tuple[int, int], list[str]] = {}
    for rel in snap:
        st = os.lstat(os.path.join(root, rel))
        if not stat.S_ISDIR(st.st_mode) and st.st_nlink > 1:
            groups.setdefault((st.st_dev, st.st_ino), []).append(rel)
    links = {rel: tuple(sorted(g)) for g in groups.values() if len(g) > 1 for rel in g}
    out = {}
    for rel, value in snap.items():
        if seconds:
            value = value[:5] + (value[5] // 1_000_000_000,) + value[6:]
        out[rel] = value + (links.get(rel, ()),)
    return out


def tar_of(chunks: Iterator[bytes]) -> bytes:
    return b"".join(chunks)


def tar_names(data: bytes) -> list[str]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        return tf.getnames()


# -- the layers the contract tests stack -------------------------------------------------------

def base_layer() -> bytes:
    """A small root filesystem: every entry type, owners, modes, xattrs, hard links, devices."""
    return build_tar(
        dir_("bin", mtime=T0), dir_("dev", mtime=T0), dir_("etc", mtime=T0),
        dir_("opt", mtime=T0), dir_("opt/gone", mtime=T0), dir_("opt/keep", mtime=T0),
        dir_("tmp", mode=0o1777, mtime=T0), dir_("usr", mtime=T0), dir_("usr/bin", mtime=T0),
        dir_("var", mtime=T0), dir_("var/lib", mtime=T0),
        dir_("var/lib/app", mode=0o750, uid=1000, gid=1000, mtime=T0),
        ti("dev/null", tarfile.CHRTYPE, mode=0o666, devmajor=1, devminor=3, mtime=T0),
        ti("dev/loop0", tarfile.BLKTYPE, mode=0o660, gid=6, devmajor=7, devminor=0, mtime=T0),
        ti("dev/initctl", tarfile.FIFOTYPE, mode=0o600, mtime=T0),
        reg("etc/hostname", b"base\n", mtime=T0 + 1),
        reg("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n", mtime=T0 + 2),
        sym("etc/localtime", "/usr/share/zoneinfo/UTC", mtime=T0),
        reg("opt/gone/x", b"x" * 100, mtime=T0),
        reg("opt/keep/a", b"a", mtime=T0), reg("opt/keep/b", b"b", mtime=T0),
        reg("usr/bin/tool", b"\x7fELF tool" * 50, mode=0o755, mtime=T0 + 3,
            pax={"SCHILY.xattr.security.capability": CAP_V2.decode("latin-1")}),
        hard("usr/bin/tool-link", "usr/bin/tool", mode=0o755, mtime=T0 + 3),
        reg("usr/bin/suid", b"#!/bin/sh\n", mode=0o4755, mtime=T0 + 4),
        reg("var/lib/app/data", b"data" * 1000, mode=0o640, uid=1000, gid=1000, mtime=T0 + 5,
            pax={"SCHILY.xattr.user.note": "hello"}),
        reg("var/lib/app/old.txt", b"old", uid=1000, gid=1000, mtime=T0 + 6),
    )


def child_layer() -> bytes:
    """On top of base_layer(): whiteouts, an opaque directory, changes, a file turned directory."""
    return build_tar(
        dir_("dev", mtime=T0 + 100), dir_("etc", mtime=T0 + 100), dir_("opt", mtime=T0 + 100),
        dir_("opt/keep", mtime=T0 + 100), dir_("usr", mtime=T0), dir_("usr/bin", mtime=T0 + 100),
        dir_("var", mtime=T0), dir_("var/lib", mtime=T0),
        dir_("var/lib/app", mode=0o750, uid=1000, gid=1000, mtime=T0 + 100),
        ti("dev/zero", tarfile.CHRTYPE, mode=0o666, devmajor=1, devminor=5, mtime=T0 + 100),
        reg("etc/.wh.hostname", mtime=T0 + 100),
        reg("etc/passwd", PASSWD1, mtime=T0 + 101),
        reg("opt/.wh.gone", mtime=T0 + 100),
        reg("opt/keep/.wh..wh..opq", mtime=T0 + 100),
        reg("opt/keep/c", b"c", mtime=T0 + 102),
        reg("usr/bin/new", b"new binary", mode=0o755, mtime=T0 + 103),
        hard("usr/bin/new2", "usr/bin/new", mode=0o755, mtime=T0 + 103),
        reg("var/lib/app/data", b"data" * 1000, mode=0o640, uid=2000, gid=2000, mtime=T0 + 5,
            pax={"SCHILY.xattr.user.note": "hello"}),
        dir_("var/lib/app/old.txt", mode=0o700, uid=1000, gid=1000, mtime=T0 + 104),
        reg("var/lib/app/old.txt/inside", b"inside", uid=1000, gid=1000, mtime=T0 + 104),
    )


def header_size_sum(data: bytes) -> int:
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        return sum(m.size for m in tf.getmembers())


__all__ = ["CAP_V2", "PASSWD1", "T0", "base_layer", "btrfs_fs", "build_tar", "child_layer", "dir_", "driver_root",
           "hard", "header_size_sum", "loop_fs", "reg", "sym", "tar_names", "tar_of", "ti", "tree",
           "unmount_tree", "xfs_fs", "xfs_pquota_fs", "MountFailed", "TEST_OPTIONS", "ROOT_PROVIDERS"]
