"""Images and containers (``thinpool.images``) on every registered graph driver, and their CLI.

Archives are built here (docker save and OCI layouts of the graph tests' layers, which hold every
entry type, xattrs, hard links, whiteouts and an opaque directory); ``image save`` must give back
the loaded layer tars byte for byte.  Bad archives must fail with one clear error and leave the
driver's home and the layer store as they were; a process killed mid-load is cleaned up at the
next open.
"""

from __future__ import annotations

import io
import json
import os
import pty
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path
from typing import Iterator

import pytest

import dockerkit as K
from archivetools import needs_root
from graphkit import TEST_OPTIONS, base_layer, btrfs_fs, child_layer, driver_root, header_size_sum, unmount_tree  # noqa: F401
from imagekit import docker_save, oci_layout, saved_layers, sha
from thinpool.errors import ThinpoolError
from thinpool.graph import registry
from thinpool.images.digest import chain_ids
from thinpool.images.errors import Conflict, DigestMismatch, ImageError, NotFound
from thinpool.images.store import ImageRoot

pytestmark = needs_root

DRIVERS = [d for d in ("vfs", "overlay2", "btrfs", "devicemapper") if d in registry.registered()]
LAYER_DIRS = {"vfs": "vfs/dir", "overlay2": "overlay2", "btrfs": "btrfs/subvolumes",
              "devicemapper": "devicemapper/metadata"}
TAG = "imgtest/app:1"


@pytest.fixture(scope="module")
def layers() -> list[bytes]:
    return [base_layer(), child_layer()]


@pytest.fixture(params=DRIVERS)
def root(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """(driver, data root) with the driver working there (skipped where it cannot run)."""
    name = request.param
    path = driver_root(name, request, tmp_path)
    try:
        driver = registry.new_driver(str(path), name, TEST_OPTIONS.get(name, []))
    except Exception as e:  # noqa: BLE001 - a driver that cannot run here is skipped, as dockerd does
        if "not supported" in str(e) or "prerequisites" in str(e):
            pytest.skip(f"{name} cannot run here: {e}")
        raise
    driver.cleanup()
    try:
        yield name, path
    finally:  # also after a failure that left a container mounted (a devicemapper pool server)
        K.stop_pool_servers(path)
        unmount_tree(path)


def open_root(driver: str, path: Path) -> ImageRoot:
    return ImageRoot(str(path), registry.new_driver(str(path), driver, TEST_OPTIONS.get(driver, [])))


def layer_listing(driver: str, path: Path) -> list[str]:
    """The driver's layers as its directory shows them (devicemapper's records of removed
    layers whose devices wait for the background deletion, ``deleted:N``, are no layers)."""
    return sorted(n for n in os.listdir(path / LAYER_DIRS[driver]) if not n.startswith("deleted:"))


# -- load / ls / save / rm ----------------------------------------------------------------------------
def test_load_lays_out_like_docker_and_save_gives_the_layers_back(root: tuple[str, Path], layers: list[bytes],
                                                                  tmp_path: Path) -> None:
    driver, path = root
    archive = tmp_path / "app.tar"
    config = docker_save(archive, layers, TAG)
    diff_ids = [sha(x) for x in layers]
    with open_root(driver, path) as r:
        assert r.load(str(archive)) == [(sha(config), [TAG])]
        db = path / "image" / driver / "layerdb" / "sha256"
        chains = chain_ids(diff_ids)
        assert sorted(os.listdir(db)) == sorted(c.split(":")[1] for c in chains)
        for i, chain in enumerate(chains):
            d = db / chain.split(":")[1]
            assert (d / "diff").read_text() == diff_ids[i]
            assert (d / "size").read_text() == str(header_size_sum(layers[i]))
            assert r.driver.exists((d / "cache-id").read_text())
            assert (d / "parent").read_text() == chains[i - 1] if i else not (d / "parent").exists()
            assert (d / "tar-split.json.gz").exists()
        assert (path / "image" / driver / "imagedb" / "content" / "sha256" / sha(config).split(":")[1]
                ).read_bytes() == config
        repos = json.loads((path / "image" / driver / "repositories.json").read_text())
        assert repos == {"Repositories": {"imgtest/app": {TAG: sha(config)}}}
        [summary] = r.list_images()
        assert (summary.tags, summary.layers) == ([TAG], 2)
        assert summary.size == sum(header_size_sum(x) for x in layers)
        out = tmp_path / "saved.tar"
        r.save([TAG], str(out))
        assert K.saved_layers(out) == (diff_ids, layers)
        # a second load of the same archive reuses every layer
        assert r.load(str(archive)) == [(sha(config), [TAG])]
        assert len(os.listdir(db)) == 2
        assert r.remove_image(TAG) == [f"Untagged: {TAG}", f"Deleted: {sha(config)}",
                                       f"Deleted: {chains[1]}", f"Deleted: {chains[0]}"]
        assert os.listdir(db) == [] and r.list_images() == []


def test_oci_layout_with_gzip_and_zstd_layers(root: tuple[str, Path], layers: list[bytes], tmp_path: Path) -> None:
    driver, path = root
    archive = tmp_path / "oci.tar"
    config = oci_layout(archive, layers, "imgtest/oci:2", ["gzip", "zstd"])
    with open_root(driver, path) as r:
        assert r.load(str(archive)) == [(sha(config), ["imgtest/oci:2"])]
        out = tmp_path / "saved.tar"
        r.save(["imgtest/oci:2"], str(out))
        assert K.saved_layers(out) == ([sha(x) for x in layers], layers)


def test_container_lifecycle(root: tuple[str, Path], layers: list[bytes], tmp_path: Path) -> None:
    driver, path = root
    archive = tmp_path / "app.tar"
    docker_save(archive, layers, TAG)
    with open_root(driver, path) as r:
        r.load(str(archive))
        c = r.create_container(TAG, "web")
        assert [x.name for x in r.list_containers()] == ["web"]
        m = r.layers.get_mount(c.id)
        assert m.init_id == m.mount_id + "-init" and m.parent == chain_ids([sha(x) for x in layers])[-1]
        mp = Path(r.mount("web"))
        assert r.mount(c.id[:10]) == str(mp)  # mounted once, by name or id prefix
        default_size = os.statvfs(mp).f_blocks * os.statvfs(mp).f_frsize
        for name in (".dockerenv", "etc/resolv.conf", "etc/hosts", "etc/hostname", "dev/console"):
            st = os.lstat(mp / name)
            assert st.st_size == 0 and st.st_mode & 0o7777 == 0o755, name
        assert os.readlink(mp / "etc/mtab") == "/proc/mounts"
        for name in ("dev/pts", "dev/shm", "proc", "sys"):
            assert (mp / name).is_dir() and not (mp / name).is_symlink()
        (mp / "etc/passwd").write_text("changed\n")
        (mp / "usr/bin/new").unlink()
        (mp / "srv").mkdir()
        (mp / "srv/data").write_bytes(b"payload" * 1000)
        r.umount("web")
        with pytest.raises(ImageError, match="not mounted"):
            r.umount("web")
        changes = [str(x) for x in r.changes("web")]
        assert {"C /etc/passwd", "A /srv", "A /srv/data", "D /usr/bin/new"} <= set(changes)
        assert not any(".dockerenv" in x or "/proc" in x for x in changes)  # the init layer is the base
        exported = K.tar_listing(b"".join(r.export("web")))
        assert ".dockerenv" in exported and "srv/data" in exported and "usr/bin/new" not in exported
        image_id = r.commit("web", "imgtest/committed:1")
        out = tmp_path / "committed.tar"
        r.save(["imgtest/committed:1"], str(out))
        diff_ids, saved = K.saved_layers(out)
        assert saved[:2] == layers and diff_ids[2] == sha(saved[2])
        top = K.tar_listing(saved[2])
        assert {"etc/passwd", "srv/data", "usr/bin/.wh.new"} <= set(top)
        assert ".dockerenv" not in top  # the init layer is not part of the container's changes
        with pytest.raises(Conflict, match="web"):
            r.remove_image(TAG)
        # a container on the committed image, then everything removed again
        c2 = r.create_container("imgtest/committed:1")
        assert (Path(r.mount(c2.id)) / "srv/data").read_bytes() == b"payload" * 1000
        with pytest.raises(Conflict, match="mounted"):
            r.remove_container(c2.id)
        r.remove_container(c2.id, force=True)
        r.remove_container("web")
        with pytest.raises(NotFound):
            r.remove_container("web")
        assert r.remove_image(image_id)[-1].startswith("Deleted: ")
        # a per-container option the driver does not know: refused, nothing of the container left
        layers_before = layer_listing(driver, path)
        with pytest.raises(ThinpoolError, match="(?i)unknown option|not supported"):
            r.create_container(TAG, "odd", {"nosuchopt": "1"})
        assert layer_listing(driver, path) == layers_before and r.list_containers() == []
        if driver == "devicemapper":  # --storage-opt size=: a device and filesystem bigger than the base
            r.create_container(TAG, "big", {"size": "300M"})
            fs = os.statvfs(r.mount("big"))
            assert fs.f_blocks * fs.f_frsize > default_size + (30 << 20)  # 300M instead of dm.basesize=256M
            r.remove_container("big", force=True)
        r.remove_image(TAG)
        assert os.listdir(path / "image" / driver / "layerdb" / "sha256") == []
        assert os.listdir(path / "image" / driver / "layerdb" / "mounts") == []


# -- bad input: clear errors, nothing half-imported ----------------------------------------------------
def _bad_archives(tmp_path: Path, layers: list[bytes]) -> dict[str, tuple[Path, type, str]]:
    out: dict[str, tuple[Path, type, str]] = {}
    p = tmp_path / "mismatch.tar"
    docker_save(p, layers, TAG, layer_data=[layers[0], layers[1][:-1024] + b"\1" * 1024])
    out["digest mismatch"] = (p, ImageError, "")
    p = tmp_path / "truncated-layer.tar"
    docker_save(p, layers, TAG, layer_data=[layers[0], layers[1][:4096]])
    out["truncated layer"] = (p, ImageError, "truncated|layer")
    p = tmp_path / "missing.tar"
    docker_save(p, layers, TAG, layer_names=["a/layer.tar", "b/layer.tar"])
    with tarfile.open(p) as t:
        members = [(m, t.extractfile(m).read()) for m in t.getmembers() if m.name != "b/layer.tar"]  # type: ignore[union-attr]
    with tarfile.open(p, "w") as t:
        for m, data in members:
            t.addfile(m, io.BytesIO(data))
    out["missing layer"] = (p, ImageError, "has no 'b/layer.tar'")
    p = tmp_path / "blob.tar"
    oci_layout(p, layers, "imgtest/oci:1", ["gzip", "gzip"], corrupt_blob=1)
    out["oci blob corrupt"] = (p, ImageError, "")
    p = tmp_path / "cut.tar"
    docker_save(p, layers, TAG)
    p.write_bytes(p.read_bytes()[:-30000])
    out["archive cut short"] = (p, ImageError, "")
    p = tmp_path / "garbage.tar"
    p.write_bytes(os.urandom(20000))
    out["not an archive"] = (p, ImageError, "not an image archive")
    return out


def test_bad_archives_fail_cleanly_and_leave_nothing(root: tuple[str, Path], layers: list[bytes],
                                                     tmp_path: Path) -> None:
    driver, path = root
    with open_root(driver, path) as r:
        before = layer_listing(driver, path)
        for what, (archive, error, match) in _bad_archives(tmp_path, layers).items():
            with pytest.raises(error, match=match or None) as e:
                r.load(str(archive))
            assert "\n" not in str(e.value), what
            assert layer_listing(driver, path) == before, what
            assert os.listdir(path / "image" / driver / "layerdb" / "sha256") == [], what
            assert os.listdir(path / "image" / driver / "layerdb" / "tmp") == [], what
            assert r.list_images() == [], what
        good = tmp_path / "good.tar"
        docker_save(good, layers, TAG)
        r.load(str(good))
        lying = tmp_path / "lying.tar"
        docker_save(lying, layers, TAG, diff_ids=[sha(layers[0]), sha(b"something else")])
        with pytest.raises(DigestMismatch, match="digest mismatch"):
            r.load(str(lying))  # same tag, a layer that is not what the config says: the good image stays
        assert [i.tags for i in r.list_images()] == [[TAG]]


def test_unknown_names_are_clear_errors(tmp_path: Path, layers: list[bytes]) -> None:
    with open_root("vfs", tmp_path / "root") as r:
        with pytest.raises(NotFound, match="No such image: nosuch"):
            r.create_container("nosuch")
        with pytest.raises(NotFound, match="No such container: ghost"):
            r.export("ghost")
        with pytest.raises(NotFound):
            r.changes("0123456789ab")
        with pytest.raises(ImageError, match="invalid reference"):
            r.commit("ghost", "Bad:Tag:x")
        with pytest.raises(ImageError, match="no such file"):
            r.load(str(tmp_path / "missing.tar"))
        archive = tmp_path / "app.tar"
        docker_save(archive, layers, TAG)
        r.load(str(archive))
        r.create_container(TAG, "web")
        with pytest.raises(Conflict, match="already in use"):
            r.create_container(TAG, "web")
        with pytest.raises(ImageError, match="invalid container name"):
            r.create_container(TAG, "w")  # Docker's rule: two characters at least
        assert len(r.layers.mounts()) == 1 and len(os.listdir(tmp_path / "root" / "vfs" / "dir")) == 4
        with pytest.raises(ImageError, match="inside the data root"):
            r.save([TAG], str(tmp_path / "root" / "x.tar"))
        # a layer record whose diff id does not give its chain id
        top = chain_ids([sha(x) for x in layers])[1]
        diff = tmp_path / "root/image/vfs/layerdb/sha256" / top[7:] / "diff"
        diff.write_text(sha(b"other"))
        with pytest.raises(ImageError, match=f"layer {top}: its record .* has chain id"):
            r.save([TAG], str(tmp_path / "x.tar"))
        assert not (tmp_path / "x.tar").exists()
        # tags that are not references fail before any layer is made
        bad = tmp_path / "badtag.tar"
        docker_save(bad, [layers[0]], "Not/A:valid:tag")
        with pytest.raises(ImageError, match="invalid reference"):
            r.load(str(bad))


# -- a process killed mid-load ------------------------------------------------------------------------
KILLER = textwrap.dedent("""
    import os, sys
    from thinpool.graph import registry
    from thinpool.images import layers, tarsplit
    from thinpool.images.store import ImageRoot
    root, archive, where, threshold = sys.argv[1:5]
    if where == "after-first-layer":
        commit = layers.LayerStore._commit
        calls = []
        def dying(self, files, dest):
            commit(self, files, dest)
            calls.append(dest)
            if len(calls) == 1:
                os._exit(9)
        layers.LayerStore._commit = dying
    else:  # in the middle of applying the second layer
        read = tarsplit.Recorder.read
        seen = {"n": 0}
        def dying_read(self, n=-1):
            data = read(self, n)
            seen["n"] += len(data)
            if seen["n"] > int(threshold):
                os._exit(9)
            return data
        tarsplit.Recorder.read = dying_read
    ImageRoot(root, registry.new_driver(root, "vfs", [])).load(archive)
""")


@pytest.mark.parametrize("where", ["after-first-layer", "mid-apply"])
def test_killed_load_is_undone_at_the_next_open(where: str, tmp_path: Path, layers: list[bytes]) -> None:
    archive = tmp_path / "app.tar"
    docker_save(archive, layers, TAG)
    root = tmp_path / "root"
    threshold = len(layers[0]) + 4096  # inside the second layer
    r = subprocess.run([sys.executable, "-c", KILLER, str(root), str(archive), where, str(threshold)],
                       capture_output=True, text=True)
    assert r.returncode == 9, r.stderr
    db = root / "image" / "vfs" / "layerdb"
    assert os.listdir(db / "tmp")  # the dead process left its records
    assert os.listdir(root / "vfs" / "dir")  # and at least one driver layer
    with open_root("vfs", root) as again:
        assert any("rolled back" in line or "half-made" in line for line in again.recovered)
        assert os.listdir(db / "tmp") == [] and os.listdir(db / "sha256") == []
        assert os.listdir(root / "vfs" / "dir") == []
        assert again.list_images() == []
        again.load(str(archive))
        assert [i.tags for i in again.list_images()] == [[TAG]]


# -- the command line --------------------------------------------------------------------------------
def run(*args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run([sys.executable, "-m", "thinpool.cli", *args], capture_output=True, text=True)
    assert (r.returncode == 0) == ok, (args, r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    return r


def test_cli_images_and_containers(tmp_path: Path, layers: list[bytes]) -> None:
    archive = tmp_path / "app.tar"
    docker_save(archive, layers, TAG)
    img = ["image", "--root", str(tmp_path / "root"), "--driver", "vfs"]
    ctr = ["container", "--root", str(tmp_path / "root"), "-s", "vfs"]
    assert run(*img, "load", str(archive)).stdout == f"Loaded image: {TAG}\n"
    [listed] = json.loads(run(*img, "ls", "--json").stdout)
    assert listed["RepoTags"] == [TAG] and listed["Layers"] == 2
    assert "imgtest/app" in run(*img, "ls").stdout
    cid = run(*ctr, "create", TAG, "--name", "web").stdout.strip()
    assert len(cid) == 64
    [c] = json.loads(run(*ctr, "ls", "--json").stdout)
    assert (c["Id"], c["Name"], c["Mounted"]) == (cid, "web", None)
    mp = Path(run(*ctr, "mount", "web").stdout.strip())
    (mp / "etc/passwd").write_text("changed\n")
    assert json.loads(run(*ctr, "ls", "--json").stdout)[0]["Mounted"] == str(mp)
    run(*ctr, "umount", "web")
    assert run(*ctr, "diff", "web").stdout == "C /etc\nC /etc/passwd\n"
    assert json.loads(run(*ctr, "changes", "web", "--json").stdout) == [
        {"Path": "/etc", "Kind": 0}, {"Path": "/etc/passwd", "Kind": 0}]
    out = tmp_path / "export.tar"
    run(*ctr, "export", "web", "-o", str(out))
    assert ".dockerenv" in K.tar_listing(out.read_bytes())
    new_id = run(*ctr, "commit", "web", "imgtest/new:1").stdout.strip()
    assert new_id.startswith("sha256:")
    saved = tmp_path / "saved.tar"
    run(*img, "save", "imgtest/new:1", "-o", str(saved))
    assert K.saved_layers(saved)[1][:2] == layers
    piped = subprocess.run([sys.executable, "-m", "thinpool.cli", *img, "save", TAG], capture_output=True)
    assert piped.returncode == 0
    assert saved_layers(piped.stdout) == ([sha(x) for x in layers], layers)
    # errors: one line, status 1
    for args in (["rm", "ghost"], ["export", "ghost", "-o", str(tmp_path / "x.tar")], ["mount", "ghost"]):
        err = run(*ctr, *args, ok=False).stderr
        assert err.count("\n") == 1 and "No such container: ghost" in err
    assert "No such image" in run(*img, "rm", "ghost", ok=False).stderr
    assert "not an image archive" in run(*img, "load", "/etc/passwd", ok=False).stderr
    assert "uses it" in run(*img, "rm", TAG, ok=False).stderr
    assert not (tmp_path / "x.tar").exists()
    run(*ctr, "rm", "web")
    run(*img, "rm", "imgtest/new:1", TAG)
    assert json.loads(run(*img, "ls", "--json").stdout) == []


def test_image_and_container_take_graphs_options() -> None:
    """--root, --driver/-s and --storage-opt: the same options, defaults and help as 'thinpool graph'."""
    from thinpool.cli import cli

    def options(group: str) -> dict[str | None, tuple]:
        command = cli.commands[group]  # type: ignore[attr-defined]
        return {p.name: (tuple(p.opts), p.default, p.multiple, getattr(p, "help", None)) for p in command.params}

    assert set(options("graph")) == {"root", "driver", "storage_opt"}
    assert options("image") == options("graph") == options("container")


def test_progress_bars_on_a_terminal(tmp_path: Path) -> None:
    """Long work draws progress bars on standard error when it is a terminal, and nothing otherwise."""
    big = io.BytesIO()
    with tarfile.open(fileobj=big, mode="w") as tar:
        info = tarfile.TarInfo("blob")
        info.size = 16 << 20
        tar.addfile(info, io.BytesIO(os.urandom(1 << 20) * 16))
    archive = tmp_path / "big.tar"
    docker_save(archive, [big.getvalue()], "imgtest/big:1")
    del big
    img = ["image", "--root", str(tmp_path / "root"), "-s", "vfs"]

    def on_a_terminal(*args: str) -> str:
        main, sub = pty.openpty()
        try:
            proc = subprocess.Popen([sys.executable, "-m", "thinpool.cli", *args], stdin=subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL, stderr=sub, env={**os.environ, "TERM": "xterm",
                                                                                "COLUMNS": "120"})
        finally:
            os.close(sub)
        out = b""
        try:
            while True:
                try:
                    data = os.read(main, 65536)
                except OSError:  # EIO: the process closed the terminal
                    break
                if not data:
                    break
                out += data
        finally:
            os.close(main)
            assert proc.wait(120) == 0, out.decode(errors="replace")
        return out.decode(errors="replace")

    assert "loading layer 1/1" in on_a_terminal(*img, "load", str(archive))
    assert "saving imgtest/big:1" in on_a_terminal(*img, "save", "imgtest/big:1", "-o", str(tmp_path / "s.tar"))
    quiet = run(*img, "save", "imgtest/big:1", "-o", str(tmp_path / "s2.tar"))
    assert quiet.stderr == ""  # not a terminal: no bars


def test_write_atomically_across_writeback_steps(tmp_path: Path) -> None:
    """Writes of more than WRITEBACK_EVERY bytes (their disk writes started on the way) land
    whole; a failure while producing leaves the old file and no temporary file."""
    from thinpool.images.archives import WRITEBACK_EVERY, write_atomically

    out = tmp_path / "big.tar"
    out.write_bytes(b"old")
    parts = [os.urandom(1 << 20) for _ in range(3)] * (WRITEBACK_EVERY // (3 << 20) + 2)
    assert write_atomically(str(out), iter(parts)) == sum(map(len, parts))
    assert out.read_bytes() == b"".join(parts)

    def failing() -> Iterator[bytes]:
        yield from parts
        raise ImageError("the source went away")

    out.write_bytes(b"old")
    with pytest.raises(ImageError, match="the source went away"):
        write_atomically(str(out), failing())
    assert out.read_bytes() == b"old" and os.listdir(tmp_path) == ["big.tar"]
