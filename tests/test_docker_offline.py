"""``thinpool docker``: Docker devicemapper data roots read offline, never written.

The roots are made the way Docker makes them: by thinpool's own devicemapper graph driver under
``thinpool.images`` (Docker's layout and records; ext4 and xfs), then variants of a copy: the
pre-0.12 single ``devicemapper/json`` record file, metadata rebuilt by the real ``thin_restore``
from ``thin_dump``'s XML, a pool with a damaged mapping tree, and one with a damaged superblock.
(``test_images_dockerd.py`` does the same with roots the real dockerd wrote.)  Every test checks
that the root's files (contents, sizes, modes, mtimes) are unchanged afterwards.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

import dockerkit as K
from archivetools import needs_root
from conftest import KERNEL_FIXTURES, require_tool
from graphkit import base_layer, child_layer, unmount_tree
from imagekit import docker_save, sha, tree_digest
from thinpool.linux import loop
from thinpool.graph import registry
from thinpool.linux import mounts
from thinpool.images.digest import chain_ids
from thinpool.images.dockerroot import DockerRoot
from thinpool.images.errors import ImageError, NotFound
from thinpool.images.store import ImageRoot
from thinpool.thin.reader import MetadataReader

pytestmark = [needs_root, pytest.mark.skipif("devicemapper" not in registry.registered(),
                                             reason="no devicemapper driver in this build")]
TAG = "imgtest/app:1"


@dataclass
class Built:
    root: Path
    fs: str
    layers: list[bytes]
    export: dict[str, tuple]        # listing of the container's export, made while building
    image_export: dict[str, tuple]
    changes: list[str]
    devices: dict[str, int]         # layer id -> thin device id, from the driver
    digest: dict[str, str]


def build_root(base: Path, fs: str) -> Built:
    """A Docker data root on devicemapper: one image (two layers), one changed container."""
    root = base / f"docker-{fs}"
    layers = [base_layer(), child_layer()]
    archive = base / "app.tar"
    docker_save(archive, layers, TAG)
    opts = [f"dm.basesize={'512M' if fs == 'xfs' else '256M'}", "dm.loopdatasize=4G", "dm.loopmetadatasize=64M", f"dm.fs={fs}"]
    driver = registry.new_driver(str(root), "devicemapper", opts)
    with ImageRoot(str(root), driver) as r:
        r.load(str(archive))
        r.create_container(TAG, "web")
        mp = Path(r.mount("web"))
        (mp / "etc/passwd").write_text("changed\n")
        (mp / "usr/bin/new").unlink()
        (mp / "srv").mkdir()
        (mp / "srv/data").write_bytes(os.urandom(300_000))
        r.umount("web")
        export = K.tar_listing(b"".join(r.export("web")))
        image_export = K.tar_listing(b"".join(r.export_image(TAG)))
        changes = [str(c) for c in r.changes("web")]
        devices = driver.device_ids()  # type: ignore[attr-defined]
    return Built(root, fs, layers, export, image_export, changes, devices, tree_digest(root))


@pytest.fixture(scope="module", params=["ext4", "xfs"])
def built(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Built]:
    base = tmp_path_factory.mktemp(f"dockerroot-{request.param}")
    try:
        yield build_root(base, request.param)
    finally:  # also when building failed half-way (a pool server, mounts)
        K.stop_pool_servers(base)
        unmount_tree(base)


@pytest.fixture
def untouched(built: Built) -> Iterator[Built]:
    """The built root, checked unchanged after the test."""
    yield built
    assert tree_digest(built.root) == built.digest, "the Docker root was written to"


def copy_root(src: Path, dest: Path) -> Path:
    subprocess.run(["cp", "-a", "--sparse=always", str(src), str(dest)], check=True)
    return dest


def run(*args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run([sys.executable, "-m", "thinpool.cli", *args], capture_output=True, text=True)
    assert (r.returncode == 0) == ok, (args, r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    return r


def leftovers() -> tuple[list[str], list[str]]:
    """Loop devices and mounts of 'thinpool docker' still around."""
    loops = [d for d in (f"/dev/loop{n}" for n in range(256)) if "/thinpool-docker-" in (loop.backing_file(d) or "")]
    points = [m.mountpoint for m in mounts.mountinfo() if "/thinpool-docker-" in m.mountpoint]
    return loops, points


# -- reading ---------------------------------------------------------------------------------------
def test_ls_reports_images_layers_containers_and_devices(untouched: Built) -> None:
    rep = json.loads(run("docker", "ls", str(untouched.root), "--json").stdout)
    assert rep["Driver"] == "devicemapper" and rep["BlockSize"] == 65536 and rep["Problems"] == []
    [image] = rep["Images"]
    assert image["RepoTags"] == [TAG] and image["Layers"] == 2 and image["Status"] == "ok"
    chains = chain_ids([sha(x) for x in untouched.layers])
    assert sorted(layer["ChainID"] for layer in rep["Layers"]) == sorted(chains)
    for layer in rep["Layers"]:
        assert layer["Device"]["DeviceId"] == untouched.devices[layer["CacheID"]]
        assert layer["Device"]["Status"] == "ok" and layer["Device"]["Mapped"] > 0
    [c] = rep["Containers"]
    assert c["Name"] == "web" and c["Image"] == TAG
    assert c["Device"]["DeviceId"] == untouched.devices[c["MountID"]]
    assert c["InitDevice"]["DeviceId"] == untouched.devices[c["MountID"] + "-init"]
    text = run("docker", "ls", str(untouched.root)).stdout
    assert "imgtest/app:1" in text and "web" in text


def test_export_container_and_image(untouched: Built, tmp_path: Path) -> None:
    out = tmp_path / "web.tar"
    run("docker", "export", str(untouched.root), "web", "-o", str(out))
    assert K.tar_listing(out.read_bytes()) == untouched.export
    piped = subprocess.run([sys.executable, "-m", "thinpool.cli", "docker", "export", str(untouched.root), TAG],
                           capture_output=True)
    assert piped.returncode == 0 and K.tar_listing(piped.stdout) == untouched.image_export
    if untouched.fs == "xfs":  # the default reader fell back to the kernel; the userspace one refuses
        err = run("docker", "export", str(untouched.root), "web", "-o", str(out), "--reader", "userspace",
                  ok=False).stderr
        assert "no ext2/ext3/ext4 superblock" in err and err.count("\n") == 1
    assert leftovers() == ([], [])


def test_mount_is_read_only_and_goes_away(untouched: Built, tmp_path: Path) -> None:
    mp = tmp_path / "mnt"
    mp.mkdir()
    assert run("docker", "mount", str(untouched.root), "web", str(mp)).stdout.strip() == str(mp)
    try:
        assert (mp / "etc/passwd").read_text() == "changed\n"
        assert (mp / ".dockerenv").exists() and not (mp / "usr/bin/new").exists()
        with pytest.raises(OSError) as e:
            (mp / "new-file").write_text("x")
        assert e.value.errno == 30  # EROFS
        assert "already a mount point" in run("docker", "mount", str(untouched.root), "web", str(mp),
                                              ok=False).stderr
    finally:
        umounted = subprocess.run([sys.executable, "-m", "thinpool.cli", "docker", "umount", str(mp)],
                                  capture_output=True, text=True)
        if mounts.is_mountpoint(str(mp)):  # its server tears down once the mount point is gone
            subprocess.run(["umount", "-l", str(mp)])
    assert umounted.returncode == 0, umounted.stderr
    assert not mounts.is_mountpoint(str(mp))
    assert leftovers() == ([], [])
    assert "is not mounted" in run("docker", "umount", str(mp), ok=False).stderr


@pytest.mark.parametrize("to", ["vfs", "overlay2"])
def test_migrate_keeps_diff_ids_images_and_containers(untouched: Built, to: str, tmp_path: Path) -> None:
    dest = tmp_path / "new"
    out = run("docker", "migrate", str(untouched.root), "--to", to, "--dest", str(dest)).stdout
    assert "1 images, 2 layers, 1 containers" in out
    with ImageRoot(str(dest), registry.new_driver(str(dest), to, [])) as r:
        saved = tmp_path / "saved.tar"
        r.save([TAG], str(saved))
        assert K.saved_layers(saved) == ([sha(x) for x in untouched.layers], untouched.layers)
        [c] = r.list_containers()
        assert c.name == "web"
        assert [str(x) for x in r.changes("web")] == untouched.changes
        assert K.tar_listing(b"".join(r.export("web"))) == untouched.export
    assert "not empty" in run("docker", "migrate", str(untouched.root), "--to", to, "--dest", str(dest),
                              ok=False).stderr
    assert "overlaps" in run("docker", "migrate", str(untouched.root), "--to", to, "--dest",
                             str(untouched.root / "sub"), ok=False).stderr
    if untouched.fs == "xfs":  # the default reader fell back to the kernel; the userspace one refuses
        err = run("docker", "migrate", str(untouched.root), "--to", to, "--dest", str(tmp_path / "u"),
                  "--reader", "userspace", ok=False).stderr
        assert "no ext2/ext3/ext4 superblock" in err and err.count("\n") == 1
        assert not (tmp_path / "u").exists()
    assert leftovers() == ([], [])


@pytest.mark.parametrize("built", ["ext4"], indirect=True)  # the filesystem does not matter here
def test_bad_input(untouched: Built, tmp_path: Path) -> None:
    for args, message in [
        (["ls", str(tmp_path / "nowhere")], "not a directory"),
        (["ls", str(tmp_path)], "no devicemapper storage found"),
        (["export", str(untouched.root), "ghost", "-o", str(tmp_path / "x.tar")], "no container or image 'ghost'"),
        (["mount", str(untouched.root), "ghost", str(tmp_path)], "no container or image 'ghost'"),
        (["migrate", str(untouched.root), "--to", "nosuch", "--dest", str(tmp_path / "d")], "unknown driver"),
    ]:
        r = run("docker", *args, ok=False)
        assert message in r.stderr, (args, r.stderr)
    assert not (tmp_path / "x.tar").exists() and not (tmp_path / "d").exists()


# -- other ways the same root can look ----------------------------------------------------------------
@pytest.mark.parametrize("built", ["ext4"], indirect=True)  # the filesystem does not matter here
def test_pre_012_json_records(built: Built, tmp_path: Path) -> None:
    """Docker before 0.12 kept every device in devicemapper/json."""
    root = copy_root(built.root, tmp_path / "old")
    meta = root / "devicemapper" / "metadata"
    devices = {}
    for name in os.listdir(meta):
        if name in ("deviceset-metadata", "transaction-metadata"):
            continue
        raw = json.loads((meta / name).read_text())
        devices["" if name == "base" else name] = {k: raw[k] for k in ("device_id", "size", "transaction_id",
                                                                         "initialized")}
        (meta / name).unlink()
    (root / "devicemapper" / "devicemapper" / "json").write_text(json.dumps({"Devices": devices}))
    before = tree_digest(root)
    dr = DockerRoot(str(root))
    assert {h: d.device_id for h, d in dr.devices.items()} == built.devices
    assert K.tar_listing(b"".join(dr.export("web"))) == built.export
    assert DockerRoot(str(root)).report().problems == []
    assert tree_digest(root) == before  # not migrated to per-device files as Docker would


@pytest.mark.parametrize("built", ["ext4"], indirect=True)  # the filesystem does not matter here
def test_metadata_rebuilt_by_thin_restore(built: Built, tmp_path: Path) -> None:
    """A pool whose metadata the real thin-provisioning-tools wrote (thin_dump | thin_restore)."""
    root = copy_root(built.root, tmp_path / "restored")
    meta = root / "devicemapper" / "devicemapper" / "metadata"
    xml = tmp_path / "pool.xml"
    subprocess.run([require_tool("thin_dump"), "-o", str(xml), str(meta)], check=True)
    size = meta.stat().st_size
    meta.unlink()
    subprocess.run(["truncate", "-s", str(size), str(meta)], check=True)
    subprocess.run([require_tool("thin_restore"), "-i", str(xml), "-o", str(meta)], check=True,
                   capture_output=True)
    dr = DockerRoot(str(root))
    assert dr.report().problems == []
    assert K.tar_listing(b"".join(dr.export("web"))) == built.export
    assert K.tar_listing(b"".join(dr.export(TAG))) == built.image_export


@pytest.mark.parametrize("built", ["ext4"], indirect=True)  # the filesystem does not matter here
def test_damaged_mapping_tree(built: Built, tmp_path: Path) -> None:
    """The container's mapping tree is damaged: reported, refused; the image still exports whole."""
    root = copy_root(built.root, tmp_path / "damaged")
    meta = root / "devicemapper" / "devicemapper" / "metadata"
    web = built.devices[DockerRoot(str(built.root)).layerdb.get_mount(
        DockerRoot(str(built.root)).containers.resolve("web").id).mount_id]
    with MetadataReader(str(meta)) as reader:
        roots = reader.mapping_roots()
    assert list(roots.values()).count(roots[web]) == 1  # the container's root block is its own
    with open(meta, "r+b") as f:
        f.seek(roots[web] * 4096 + 100)
        f.write(os.urandom(64))
    before = tree_digest(root)
    r = run("docker", "ls", str(root), "--json")
    rep = json.loads(r.stdout)
    [c] = rep["Containers"]
    assert c["Device"]["Status"] != "ok" and any("damaged" in p or "unreadable" in p for p in rep["Problems"])
    err = run("docker", "export", str(root), "web", "-o", str(tmp_path / "web.tar"), ok=False).stderr
    assert "cannot be read" in err and err.count("\n") == 1
    assert not (tmp_path / "web.tar").exists()
    run("docker", "export", str(root), TAG, "-o", str(tmp_path / "image.tar"))
    assert K.tar_listing((tmp_path / "image.tar").read_bytes()) == built.image_export
    assert "cannot be read" in run("docker", "migrate", str(root), "--to", "vfs", "--dest",
                                   str(tmp_path / "mig"), ok=False).stderr
    assert not (tmp_path / "mig").exists()  # refused before the destination was made
    assert tree_digest(root) == before
    assert leftovers() == ([], [])


@pytest.mark.parametrize("built", ["ext4"], indirect=True)  # the filesystem does not matter here
def test_damaged_superblock(built: Built, tmp_path: Path) -> None:
    root = copy_root(built.root, tmp_path / "nosb")
    meta = root / "devicemapper" / "devicemapper" / "metadata"
    with open(meta, "r+b") as f:
        f.write(os.urandom(512))
    r = run("docker", "ls", str(root))
    assert "imgtest/app:1" in r.stdout and "web" in r.stdout  # Docker's records still list everything
    assert "pool metadata" in r.stderr and "unreadable" in r.stderr
    err = run("docker", "export", str(root), "web", "-o", str(tmp_path / "x.tar"), ok=False).stderr
    assert "cannot be read" in err


@pytest.mark.parametrize("built", ["ext4"], indirect=True)  # the filesystem does not matter here
def test_plugin_naming(built: Built, tmp_path: Path) -> None:
    """A graphdriver plugin's root: <root>/NAME/devicemapper/ and image/NAME/."""
    root = copy_root(built.root, tmp_path / "plug")
    (root / "myplugin").mkdir()
    os.rename(root / "devicemapper", root / "myplugin" / "devicemapper")
    os.rename(root / "image" / "devicemapper", root / "image" / "myplugin")
    rep = DockerRoot(str(root)).report()
    assert rep.driver_name == "myplugin" and rep.problems == [] and len(rep.containers) == 1
    assert K.tar_listing(b"".join(DockerRoot(str(root)).export("web"))) == built.export
    with pytest.raises(NotFound):
        DockerRoot(str(root)).export("ghost")
    with pytest.raises(ImageError, match="no devicemapper storage"):
        DockerRoot(str(root), driver_name="devicemapper")
    shutil.rmtree(root)


@pytest.mark.parametrize("built", ["ext4"], indirect=True)  # the filesystem does not matter here
def test_damaged_docker_records(built: Built, tmp_path: Path) -> None:
    """Docker's own JSON damaged (a device record, the tags, a container's config): what can still be
    read is listed and exported, each damage is named, migrate refuses rather than copy part of it."""
    root = copy_root(built.root, tmp_path / "records")
    dr = DockerRoot(str(root))
    web = dr.containers.resolve("web")
    init_hash = dr.layerdb.get_mount(web.id).init_id
    (root / "devicemapper" / "metadata" / init_hash).write_text('{"device_id": ')
    (root / "image" / "devicemapper" / "repositories.json").write_text("[not json")
    ghost = "f" * 64
    (root / "containers" / ghost).mkdir()
    (root / "containers" / ghost / "config.v2.json").write_text("\0garbage")
    before = tree_digest(root)
    rep = json.loads(run("docker", "ls", str(root), "--json").stdout)
    problems = "\n".join(rep["Problems"])
    for needle in (f"metadata/{init_hash} is unreadable", "repositories.json is unreadable",
                   f"container {ghost}: config.v2.json is unreadable"):
        assert needle in problems, (needle, problems)
    [image] = rep["Images"]
    assert image["RepoTags"] == [] and image["Status"] == "ok"
    [c] = rep["Containers"]
    assert c["Name"] == "web" and c["InitDevice"] is None and c["Device"]["Status"] == "ok"
    run("docker", "export", str(root), "web", "-o", str(tmp_path / "web.tar"))
    assert K.tar_listing((tmp_path / "web.tar").read_bytes()) == built.export
    run("docker", "export", str(root), image["Id"][7:19], "-o", str(tmp_path / "image.tar"))
    assert K.tar_listing((tmp_path / "image.tar").read_bytes()) == built.image_export
    err = run("docker", "migrate", str(root), "--to", "vfs", "--dest", str(tmp_path / "mig"), ok=False).stderr
    assert "refusing to migrate" in err and "repositories.json" in err and err.count("\n") == 1
    assert not (tmp_path / "mig").exists()
    assert tree_digest(root) == before
    assert leftovers() == ([], [])


def test_root_on_kernel_written_pool_metadata(kernel_image, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Docker's records over pool metadata the real dm-thin kernel target wrote (the vendored ``tmeta``
    sample: 11 thin devices, snapshots sharing blocks and subtrees).  Device 1 is an image layer whose
    ext4 we place where the kernel's mapping (as the real ``thin_dump`` reads it) says its blocks live;
    devices 2-4 are the base device and a container's; the rest are stray devices Docker left."""
    root = tmp_path / "docker"
    pool = root / "devicemapper" / "devicemapper"
    pool.mkdir(parents=True)
    meta = pool / "metadata"
    subprocess.run(["cp", "--sparse=always", str(kernel_image("tmeta")), str(meta)], check=True)
    meta.chmod(0o600)
    block = 128 * 512
    with open(pool / "data", "wb") as f:
        f.truncate(65536 * block)  # nr_data_blocks of the sample
    # an ext4 holding rootfs/, 18 pool blocks long: device 1 maps virtual blocks 0-17
    src = tmp_path / "src"
    (src / "rootfs/etc").mkdir(parents=True)
    (src / "rootfs/etc/hostname").write_text("kernel-made pool\n")
    (src / "rootfs/bin").mkdir()
    tool = os.urandom(200_000)
    (src / "rootfs/bin/tool").write_bytes(tool)
    (src / "rootfs/bin/tool").chmod(0o755)
    (src / "rootfs/link").symlink_to("etc/hostname")
    fs = tmp_path / "fs.img"
    subprocess.run(["mke2fs", "-q", "-t", "ext4", "-O", "^has_journal", "-d", str(src), str(fs),
                    str(18 * block // 1024) + "K"], check=True)
    image = fs.read_bytes()
    xml = subprocess.run([require_tool("thin_dump"), "--dev-id", "1", str(meta)], check=True,
                         capture_output=True, text=True).stdout
    where: dict[int, int] = {}
    for line in xml.splitlines():
        fields = dict(part.split("=", 1) for part in line.strip(" <>/").split()[1:])
        attrs = {k: int(v.strip('"')) for k, v in fields.items() if k in ("origin_begin", "data_begin", "length",
                                                                          "origin_block", "data_block")}
        if "origin_begin" in attrs:
            where.update({attrs["origin_begin"] + i: attrs["data_begin"] + i for i in range(attrs["length"])})
        elif "origin_block" in attrs:
            where[attrs["origin_block"]] = attrs["data_block"]
    with open(pool / "data", "r+b") as f:
        for v in range(len(image) // block):
            f.seek(where[v] * block)
            f.write(image[v * block:(v + 1) * block])
    # Docker's records: devices, a one-layer image, a container on it
    hashes = {1: "1" * 64, 3: "3" * 64, 4: "3" * 64 + "-init"}
    records = root / "devicemapper" / "metadata"
    records.mkdir()
    # thin-provisioning-tools' thin_ls of the sample: device, mapped blocks, ...
    thin_ls = {int(line.split()[0]): int(line.split()[1]) for line in
               (KERNEL_FIXTURES / "tmeta.thin_ls.txt").read_text().splitlines()}
    for dev in thin_ls:
        name = "base" if dev == 2 else hashes.get(dev, f"{dev:064x}")
        size = len(image) if dev == 1 else 16384 * block
        (records / name).write_text(json.dumps({"device_id": dev, "size": size, "transaction_id": dev,
                                                "initialized": False, "deleted": False}))
    (records / "deviceset-metadata").write_text(json.dumps({"next_device_id": 17, "BaseDeviceUUID": "",
                                                            "BaseDeviceFilesystem": "ext4"}))
    diff_id = sha(b"the layer tar, not kept here")
    layerdb = root / "image/devicemapper/layerdb"
    (layerdb / "sha256" / diff_id[7:]).mkdir(parents=True)
    for name, value in (("cache-id", hashes[1]), ("diff", diff_id), ("size", "200000")):
        (layerdb / "sha256" / diff_id[7:] / name).write_text(value)
    config = json.dumps({"os": "linux", "rootfs": {"type": "layers", "diff_ids": [diff_id]}}).encode()
    content = root / "image/devicemapper/imagedb/content/sha256"
    content.mkdir(parents=True)
    (content / sha(config)[7:]).write_bytes(config)
    (root / "image/devicemapper/repositories.json").write_text(json.dumps(
        {"Repositories": {"kernel/pool": {"kernel/pool:1": sha(config)}}}))
    cid = "c" * 64
    (layerdb / "mounts" / cid).mkdir(parents=True)
    for name, value in (("mount-id", hashes[3]), ("init-id", hashes[4]), ("parent", diff_id)):
        (layerdb / "mounts" / cid / name).write_text(value)
    (root / "containers" / cid).mkdir(parents=True)
    (root / "containers" / cid / "config.v2.json").write_text(json.dumps(
        {"ID": cid, "Name": "/k", "Image": sha(config), "Config": {"Image": "kernel/pool:1"}}))
    before = tree_digest(root)

    rep = json.loads(run("docker", "ls", str(root), "--json").stdout)
    assert (rep["BlockSize"], rep["TransactionId"], rep["Problems"]) == (block, 21, [])
    [layer] = rep["Layers"]
    assert layer["Device"]["DeviceId"] == 1 and layer["Device"]["Mapped"] == thin_ls[1] * block
    [c] = rep["Containers"]
    assert (c["Device"]["DeviceId"], c["Device"]["Mapped"]) == (3, thin_ls[3] * block)
    assert (c["InitDevice"]["DeviceId"], c["InitDevice"]["Mapped"]) == (4, thin_ls[4] * block)
    out = tmp_path / "image.tar"
    run("docker", "export", str(root), "kernel/pool:1", "-o", str(out))
    listing = K.tar_listing(out.read_bytes())
    assert sorted(listing) == ["bin", "bin/tool", "etc", "etc/hostname", "link"]
    assert listing["bin/tool"][1:] == (0o755, 0, 0, len(tool), "", hashlib.sha256(tool).hexdigest())
    assert listing["link"][5] == "etc/hostname"
    # the container's device holds what the kernel's test wrote (no filesystem): refused in one line
    err = run("docker", "export", str(root), "k", "-o", str(tmp_path / "k.tar"), ok=False).stderr
    assert "holds no ext4 or xfs filesystem" in err and err.count("\n") == 1
    assert not (tmp_path / "k.tar").exists()
    assert tree_digest(root) == before
    assert leftovers() == ([], [])
