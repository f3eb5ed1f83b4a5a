"""Docker's graphdriver contract, run against every registered driver that can run here.

The parametrization is ``registry.registered()``: registering a driver (see
tests/graphkit.py) adds it here. Each test gets a fresh driver on a fresh
root (btrfs: a fresh directory on a loop-mounted btrfs). The reference for
what a stack of layers must look like is the archive layer applying the
same tars into a plain directory.
"""

from __future__ import annotations

import gzip
import io
import os
import threading
from pathlib import Path
from typing import Iterator

import pytest

from archivetools import needs_root
from graphkit import (PASSWD1, TEST_OPTIONS, base_layer, btrfs_fs, build_tar, child_layer, dir_, driver_root,  # noqa: F401
                      hard, header_size_sum, reg, sym, tar_names, tar_of, tree, unmount_tree)
from thinpool.archive import ArchiveError, ChangeKind, UnsafeArchiveError, apply_layer
from thinpool.graph import registry
from thinpool.linux import mounts
from thinpool.graph.driver import (BadOption, CreateOpts, GraphDriver, InvalidLayerId, LayerBusy,
                                   LayerExists, LayerNotFound, NotSupported)

pytestmark = needs_root


def _new(name: str, root: Path) -> GraphDriver:
    return registry.new_driver(str(root), name, TEST_OPTIONS.get(name, []))


class Env:
    """A driver under test, and a way to start it again on the same root ("restart")."""

    def __init__(self, name: str, root: Path, tmp_path: Path) -> None:
        self.name = name
        self.root = root
        self.tmp = tmp_path
        self.driver = _new(name, root)
        self.extra: list[GraphDriver] = []

    def restart(self) -> GraphDriver:
        d = _new(self.name, self.root)
        self.extra.append(d)
        return d

    def plain(self, *layers: bytes, name: str = "plain") -> Path:
        """The reference: ``layers`` applied in order into a plain directory."""
        path = self.tmp / name
        path.mkdir()
        for data in layers:
            apply_layer(str(path), io.BytesIO(data))
        return path

    def stack(self, *layers: bytes, prefix: str = "l") -> list[str]:
        """Image layers l0, l1... each created on the previous and filled with its tar."""
        ids: list[str] = []
        for i, data in enumerate(layers):
            id = f"{prefix}{i}"
            self.driver.create(id, ids[-1] if ids else None)
            self.driver.apply_diff(id, ids[-1] if ids else None, io.BytesIO(data))
            ids.append(id)
        return ids


@pytest.fixture(params=registry.registered())
def env(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Env]:
    name = request.param
    root = driver_root(name, request, tmp_path)
    try:
        e = Env(name, root, tmp_path)
    except NotSupported as err:
        pytest.skip(f"{name} cannot run here: {err}")
    try:
        yield e
    finally:
        for d in [e.driver] + e.extra:
            d.cleanup()
        unmount_tree(root)


# -- create / create_rw / remove / exists ------------------------------------------------------

def test_create_exists_remove(env: Env) -> None:
    d = env.driver
    assert not d.exists("a")
    d.create("a", None)
    assert d.exists("a")
    d.create_rw("b", "a")
    assert d.exists("b")
    assert os.path.isdir(d.get("b"))
    d.put("b")
    d.remove("b")
    assert not d.exists("b")
    d.remove("b")  # idempotent
    d.remove("never-existed")
    d.remove("a")
    assert not d.exists("a")


def test_create_errors_leave_nothing(env: Env) -> None:
    d = env.driver
    d.create("a", None)
    with pytest.raises(LayerExists):
        d.create("a", None)
    with pytest.raises(LayerExists):
        d.create_rw("a", None)
    with pytest.raises(LayerNotFound, match="missing"):
        d.create("b", "missing")
    assert not d.exists("b")
    with pytest.raises(LayerNotFound):
        d.create_rw("c", "missing")
    assert not d.exists("c")
    for bad in ("", "../x", "a/b", ".", "..", ".hidden", "x" * 256, "a\x00b"):
        with pytest.raises(InvalidLayerId):
            d.create(bad, None)
        assert not d.exists(bad)
    with pytest.raises(InvalidLayerId):
        d.create("ok", "../a")
    assert not d.exists("ok")


def test_unknown_storage_opt_is_refused(env: Env) -> None:
    d = env.driver
    d.create("a", None)
    with pytest.raises(BadOption):
        d.create_rw("b", "a", CreateOpts(storage_opt={"no-such-option": "1"}))
    assert not d.exists("b")
    with pytest.raises(BadOption):
        d.create("c", "a", CreateOpts(storage_opt={"no-such-option": "1"}))
    assert not d.exists("c")
    d.create_rw("e", "a", CreateOpts())  # no options: fine


def test_unknown_daemon_option_is_refused(env: Env) -> None:
    with pytest.raises(BadOption):
        registry.new_driver(str(env.root), env.name, TEST_OPTIONS.get(env.name, []) + ["no.such.option=1"])
    with pytest.raises(BadOption):
        registry.new_driver(str(env.root), env.name, ["garbage-without-equals"])


def test_unknown_ids(env: Env) -> None:
    d = env.driver
    with pytest.raises(LayerNotFound):
        d.get("nope")
    with pytest.raises(LayerNotFound):
        d.put("nope")
    with pytest.raises(LayerNotFound):
        d.get_metadata("nope")
    with pytest.raises(LayerNotFound):
        d.diff("nope", None)
    with pytest.raises(LayerNotFound):
        d.changes("nope", None)
    with pytest.raises(LayerNotFound):
        d.diff_size("nope", None)
    with pytest.raises(LayerNotFound):
        d.apply_diff("nope", None, io.BytesIO(base_layer()))
    assert not d.exists("nope")


def test_status_and_metadata_shapes(env: Env) -> None:
    d = env.driver
    status = d.status()
    assert isinstance(status, list)
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in status)
    d.create("a", None)
    meta = d.get_metadata("a")
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())
    assert d.capabilities() == {"ReproducesExactDiffs": False}


# -- get / put reference counting --------------------------------------------------------------

def test_get_put_counts(env: Env) -> None:
    d = env.driver
    env.stack(base_layer())
    d.create_rw("c", "l0")
    p1 = d.get("c")
    assert os.path.isabs(p1) and os.path.isfile(os.path.join(p1, "etc/passwd"))
    mounted = mounts.is_mountpoint(p1)
    p2 = d.get("c")
    assert p2 == p1
    d.put("c")
    assert mounts.is_mountpoint(p1) == mounted  # still held once
    assert os.path.isfile(os.path.join(p1, "etc/passwd"))
    with pytest.raises(LayerBusy):
        d.remove("c")
    d.put("c")
    if mounted:
        assert not mounts.is_mountpoint(p1)
    d.put("c")  # not held: a no-op, as in Docker
    d.remove("c")
    assert not d.exists("c")


def test_refcount_reseeded_after_restart(env: Env) -> None:
    env.stack(base_layer())
    env.driver.create_rw("c", "l0")
    path = env.driver.get("c")
    mounted = mounts.is_mountpoint(path)
    again = env.restart()  # a new driver on the same root: the mount counts once
    assert again.get("c") == path
    again.put("c")
    assert mounts.is_mountpoint(path) == mounted
    assert os.path.isfile(os.path.join(path, "etc/passwd"))
    if mounted:
        with pytest.raises(LayerBusy):
            env.restart().remove("c")
    again.put("c")  # the seeded hold: 1 -> 0
    assert not mounts.is_mountpoint(path)
    again.remove("c")
    assert not again.exists("c")


def test_concurrent_get_put(env: Env) -> None:
    env.stack(base_layer())
    env.driver.create_rw("c", "l0")
    path = env.driver.get("c")
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            for _ in range(20):
                assert env.driver.get("c") == path
                assert os.path.isfile(os.path.join(path, "etc/passwd"))
                env.driver.put("c")
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert os.path.isfile(os.path.join(path, "etc/passwd"))
    env.driver.put("c")
    assert not mounts.is_mountpoint(path)


# -- layers stacking ---------------------------------------------------------------------------

def test_apply_diff_stacks_like_the_archive_layer(env: Env) -> None:
    d = env.driver
    base, child = base_layer(), child_layer()
    d.create("l0", None)
    assert d.apply_diff("l0", None, io.BytesIO(base)) == header_size_sum(base)
    d.create("l1", "l0")
    assert d.apply_diff("l1", "l0", io.BytesIO(gzip.compress(child))) == header_size_sum(child)
    want0 = tree(env.plain(base, name="p0"))
    want1 = tree(env.plain(base, child, name="p1"))
    try:
        got0, got1 = tree(d.get("l0")), tree(d.get("l1"))
    finally:
        d.put("l0")
        d.put("l1")
    assert got0 == want0
    assert got1 == want1
    # the things the child layer did, spelled out
    assert "etc/hostname" not in got1 and "opt/gone" not in got1
    assert sorted(k for k in got1 if k.startswith("opt/keep/")) == ["opt/keep/c"]
    assert got1["usr/bin/tool"][8] == {"security.capability": bytes.fromhex("0000000200040000") + bytes(12)}
    assert got1["usr/bin/new"][-1] == ("usr/bin/new", "usr/bin/new2")
    assert got1["usr/bin/tool"][-1] == ("usr/bin/tool", "usr/bin/tool-link")
    assert got1["var/lib/app/data"][2:4] == (2000, 2000)
    assert got1["dev/null"][6] == os.makedev(1, 3) and got1["dev/loop0"][6] == os.makedev(7, 0)
    assert got1["usr/bin/suid"][1] == 0o4755 and got1["tmp"][1] == 0o1777


def test_diff_round_trip(env: Env) -> None:
    d = env.driver
    env.stack(base_layer(), child_layer())
    whole = tar_of(d.diff("l0", None))
    delta = tar_of(d.diff("l1", "l0"))
    names = tar_names(delta)
    assert "etc/.wh.hostname" in names and "opt/.wh.gone" in names
    assert "opt/keep/a" not in names and "usr/bin/tool" not in names  # unchanged: not in the diff
    rebuilt = env.plain(whole, delta, name="rebuilt")
    try:
        assert tree(rebuilt) == tree(d.get("l1"))
        assert tree(env.plain(whole, name="rebuilt0")) == tree(d.get("l0"))
    finally:
        d.put("l1")
        d.put("l0")
    # a diff against a non-direct ancestor works too (naive)
    d.create("l2", "l1")
    d.apply_diff("l2", "l1", io.BytesIO(build_tar(dir_("srv", mtime=1_600_000_500),
                                                  reg("srv/f", b"f", mtime=1_600_000_500))))
    skip = tar_of(d.diff("l2", "l0"))
    try:
        assert tree(env.plain(whole, skip, name="rebuilt2")) == tree(d.get("l2"))
    finally:
        d.put("l2")


def test_diff_stream_releases_layers(env: Env) -> None:
    d = env.driver
    env.stack(base_layer(), child_layer())
    stream = d.diff("l1", "l0")
    next(stream)
    stream.close()  # type: ignore[attr-defined]
    d.remove("l1")  # not held any more
    unread = d.diff("l0", None)
    del unread
    d.remove("l0")


def test_changes_and_diff_size_of_image_layers(env: Env) -> None:
    d = env.driver
    env.stack(base_layer(), child_layer())
    got = [str(c) for c in d.changes("l1", "l0")]
    assert got == [
        "C /dev", "A /dev/zero", "C /etc", "D /etc/hostname", "C /etc/passwd",
        "C /opt", "D /opt/gone", "C /opt/keep", "D /opt/keep/a", "D /opt/keep/b", "A /opt/keep/c",
        "C /usr", "C /usr/bin", "A /usr/bin/new", "A /usr/bin/new2",
        "C /var", "C /var/lib", "C /var/lib/app", "C /var/lib/app/data", "C /var/lib/app/old.txt",
        "A /var/lib/app/old.txt/inside",
    ]
    everything = d.changes("l0", None)
    assert all(c.kind == ChangeKind.ADD for c in everything) and len(everything) == 26
    # modified / added non-directories: passwd, c, new (new2 is the same inode), data, inside, zero
    assert d.diff_size("l1", "l0") == len(PASSWD1) + 1 + len(b"new binary") + 4000 + len(b"inside")


# -- a container ------------------------------------------------------------------------------

def _init_layer(d: GraphDriver, mount_id: str, image: str) -> None:
    """Docker's container set-up: <id>-init with the mount-point placeholders, then <id> on it."""
    d.create_rw(f"{mount_id}-init", image)
    root = d.get(f"{mount_id}-init")
    try:
        for p in ("dev/pts", "dev/shm", "proc", "sys"):
            os.makedirs(os.path.join(root, p), exist_ok=True)
        for f in (".dockerenv", "etc/resolv.conf", "etc/hosts", "etc/hostname", "dev/console"):
            open(os.path.join(root, f), "w").close()
        os.symlink("/proc/mounts", os.path.join(root, "etc/mtab"))
    finally:
        d.put(f"{mount_id}-init")
    d.create_rw(mount_id, f"{mount_id}-init")


def test_container_changes_and_diff(env: Env) -> None:
    d = env.driver
    env.stack(base_layer(), child_layer())
    _init_layer(d, "ctr", "l1")
    root = d.get("ctr")
    try:
        with open(os.path.join(root, "etc/new.conf"), "w") as f:
            f.write("new\n")
        with open(os.path.join(root, "etc/passwd"), "a") as f:
            f.write("more:x:1:1::/:/bin/sh\n")
        os.unlink(os.path.join(root, "usr/bin/suid"))
        os.makedirs(os.path.join(root, "srv/data"))
        with open(os.path.join(root, "srv/data/f"), "w") as f:
            f.write("12345")
        os.chmod(os.path.join(root, "tmp"), 0o1770)
        os.chown(os.path.join(root, "opt/keep/c"), 7, 7)
        want = tree(root, seconds=True)
    finally:
        d.put("ctr")
    got = [str(c) for c in d.changes("ctr", "ctr-init")]
    assert got == ["C /etc", "A /etc/new.conf", "C /etc/passwd", "C /opt", "C /opt/keep", "C /opt/keep/c",
                   "A /srv", "A /srv/data", "A /srv/data/f", "C /tmp",
                   "C /usr", "C /usr/bin", "D /usr/bin/suid"]
    passwd = len(PASSWD1) + len("more:x:1:1::/:/bin/sh\n")
    assert d.diff_size("ctr", "ctr-init") == len("new\n") + passwd + 1 + 5
    init_tar = tar_of(d.diff("ctr-init", None))
    delta = tar_of(d.diff("ctr", "ctr-init"))
    assert "usr/bin/.wh.suid" in tar_names(delta)
    assert tree(env.plain(init_tar, delta, name="ctr-rebuilt"), seconds=True) == want
    # the init layer is what the container sees below it
    init_changes = [str(c) for c in d.changes("ctr-init", "l1")]
    assert "A /.dockerenv" in init_changes and "A /etc/mtab" in init_changes
    assert "A /etc/hostname" in init_changes  # deleted in l1, back as a placeholder
    # an image layer committed from the container (docker commit)
    d.create("commit", "l1")
    d.apply_diff("commit", "l1", io.BytesIO(delta))
    try:
        committed = tree(d.get("commit"), seconds=True)
    finally:
        d.put("commit")
    for path in ("etc/new.conf", "etc/passwd", "srv/data/f", "tmp", "opt/keep/c"):
        assert committed[path] == want[path]
    assert "usr/bin/suid" not in committed


# -- removal ----------------------------------------------------------------------------------

def test_remove_refuses_children_and_held_layers(env: Env) -> None:
    d = env.driver
    env.stack(base_layer(), child_layer())
    d.create_rw("c", "l1")
    with pytest.raises(LayerBusy, match="child"):
        d.remove("l1")
    with pytest.raises(LayerBusy, match="child"):
        d.remove("l0")
    d.get("c")
    with pytest.raises(LayerBusy):
        d.remove("c")
    d.put("c")
    d.remove("c")
    d.remove("l1")
    d.remove("l0")
    assert not any(d.exists(i) for i in ("c", "l1", "l0"))
    d.remove("l0")


def test_removing_a_parent_keeps_nothing_of_it(env: Env) -> None:
    d = env.driver
    env.stack(base_layer())
    d.remove("l0")
    d.create("l0", None)  # the same id again: a fresh, empty layer
    try:
        assert os.listdir(d.get("l0")) == []
    finally:
        d.put("l0")


# -- bad layer streams ------------------------------------------------------------------------

def _outside(env: Env) -> Path:
    sentinel = env.tmp / "outside"
    sentinel.mkdir(exist_ok=True)
    (sentinel / "keep").write_text("keep")
    return sentinel


@pytest.mark.parametrize("case", ["dotdot", "hardlink-out", "bad-whiteout", "dotdot-after-files"])
def test_hostile_layer_fails_and_leaves_no_layer(env: Env, case: str) -> None:
    d = env.driver
    sentinel = _outside(env)
    rel_out = os.path.relpath(sentinel / "evil", "/")
    tars = {
        "dotdot": build_tar(reg("../../../../../../../../../" + rel_out, b"evil")),
        "hardlink-out": build_tar(reg("ok", b"ok"), hard("link", "../../../../../../../../../" + rel_out)),
        "bad-whiteout": build_tar(reg(".wh..", b"")),
        "dotdot-after-files": build_tar(dir_("a"), reg("a/f", b"f" * 5000), reg("a/../../evil", b"evil")),
    }
    env.stack(base_layer())
    d.create("bad", "l0")
    with pytest.raises(ArchiveError) as info:
        d.apply_diff("bad", "l0", io.BytesIO(tars[case]))
    assert "removed" in str(info.value)
    assert isinstance(info.value, UnsafeArchiveError)
    assert not d.exists("bad")
    assert sorted(os.listdir(sentinel)) == ["keep"]
    try:
        assert tree(d.get("l0")) == tree(env.plain(base_layer()))  # the parent is untouched
    finally:
        d.put("l0")
    d.create("bad", "l0")  # the id is free again
    assert d.exists("bad")


def test_symlink_tricks_stay_inside_the_layer(env: Env) -> None:
    d = env.driver
    sentinel = _outside(env)
    data = build_tar(sym("esc", str(sentinel)), reg("esc/evil", b"evil"),
                     sym("up", "../../../../../../../.."), reg("up" + str(sentinel) + "/evil2", b"evil"))
    d.create("sym", None)
    d.apply_diff("sym", None, io.BytesIO(data))
    assert sorted(os.listdir(sentinel)) == ["keep"]
    root = d.get("sym")
    try:
        assert os.readlink(os.path.join(root, "esc")) == str(sentinel)
        assert (Path(root) / str(sentinel).lstrip("/") / "evil").read_bytes() == b"evil"
    finally:
        d.put("sym")


@pytest.mark.parametrize("case", ["truncated", "truncated-gzip", "garbage", "empty", "bad-checksum"])
def test_corrupt_layer_stream_leaves_no_layer(env: Env, case: str) -> None:
    d = env.driver
    good = build_tar(*[reg(f"f{i}", bytes([i]) * 20000) for i in range(10)])
    broken = bytearray(good)
    broken[512 * 82 + 148] ^= 0x55  # the checksum field of the third header (41 blocks per file)
    streams = {
        "truncated": good[:len(good) // 2 + 100],
        "truncated-gzip": gzip.compress(good)[:300],
        "garbage": b"this is not a tar at all" * 100,
        "empty": b"",
        "bad-checksum": bytes(broken),
    }
    env.stack(base_layer())
    d.create("bad", "l0")
    with pytest.raises(ArchiveError):
        d.apply_diff("bad", "l0", io.BytesIO(streams[case]))
    assert not d.exists("bad")
    d.create("bad", "l0")
    try:
        assert tree(d.get("bad")) == tree(env.plain(base_layer()))
    finally:
        d.put("bad")


def test_failed_apply_on_a_held_layer_says_it_is_left(env: Env) -> None:
    d = env.driver
    env.stack(base_layer())
    d.create("held", "l0")
    d.get("held")
    try:
        with pytest.raises(ArchiveError, match="layer held is left half-applied: .*in use"):
            d.apply_diff("held", "l0", io.BytesIO(build_tar(reg("../x", b"x"))))
        assert d.exists("held")
    finally:
        d.put("held")
    d.remove("held")
