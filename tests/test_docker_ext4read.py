"""``thinpool docker export`` reading ext2/3/4 in userspace from a thin device's blocks (``extfs``).

The userspace reader must write the tar the kernel path writes (a read-only kernel mount walked
by ``archive.export_tree``), byte for byte.  Content is made by the real kernel: in a container of
a Docker root built by thinpool's devicemapper driver (ext4, and ext3 made by Docker's mkfs with
``dm.mkfsarg``), and in image files formatted by the real mke2fs with other feature sets.
Filesystems the reader does not handle (xfs, an unreplayed journal) fall back to the kernel; damaged
ones (bad extent header, dirent rec_len 0, a directory inside itself, blocks past the end, huge
sizes) are a one-line error from the CLI, never a traceback or a hang.  The Docker root is checked
unchanged after every test.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import stat
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest
from crc32c import crc32c

import dockerkit as K
from archivetools import build_tar, dir_, hard, needs_root, reg, sym
from graphkit import T0, base_layer, child_layer, tree, unmount_tree
from imagekit import docker_save, tree_digest
from thinpool.archive import export_tree
from thinpool.extfs import CorruptFilesystem, FileSource
from thinpool.graph import registry
from thinpool.images.dockerroot import DockerRoot
from thinpool.images.errors import ImageError
from thinpool.images import tarsplit
from thinpool.images.exttree import ExtTree
from thinpool.images.store import ImageRoot

pytestmark = [needs_root, pytest.mark.skipif("devicemapper" not in registry.registered(),
                                             reason="no devicemapper driver in this build")]
TAG = "imgtest/ext:1"
BIG_SPARSE = 100 << 20  # past the 12 direct blocks and the single-indirect range of a 4 KiB-block file


def populate(r: Path, xattr_size: int = 3000) -> None:
    """Every kind of content the reader must get right, made by the kernel in the directory ``r``."""
    (r / "etc").mkdir(exist_ok=True)
    (r / "etc/hosts").write_text("127.0.0.1 localhost\n")
    (r / "big").write_bytes(os.urandom(5_000_000))             # double-indirect on ext3
    with open(r / "fragmented", "wb") as f:                     # hundreds of extents: tree depth >= 1
        for i in range(400):
            f.seek(i * 65536)
            f.write(os.urandom(4096))
            f.flush()
            os.fsync(f.fileno())
    with open(r / "sparse", "wb") as f:
        f.write(b"head")
        f.seek(BIG_SPARSE)
        f.write(b"tail")
    fd = os.open(r / "unwritten", os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        os.posix_fallocate(fd, 0, 1 << 20)                       # unwritten extents (ext4)
        os.pwrite(fd, b"in the middle", 500_000)
    finally:
        os.close(fd)
    subprocess.run(["fallocate", "-n", "-l", "1M", str(r / "etc/hosts")], capture_output=True)  # past EOF
    (r / "empty").write_bytes(b"")
    (r / "truncated").write_bytes(os.urandom(300_000))
    os.truncate(r / "truncated", 1000)
    (r / "deleted").write_text("gone")
    (r / "deleted").unlink()
    os.link(r / "etc/hosts", r / "hosts-link")
    os.link(r / "etc/hosts", r / "etc/hosts-link2")
    os.symlink("etc/hosts", r / "fast-link")
    os.symlink("/" + "long/" * 60 + "target", r / "slow-link")
    os.mknod(r / "chr", 0o620 | stat.S_IFCHR, os.makedev(4, 5))
    os.mknod(r / "blk", 0o660 | stat.S_IFBLK, os.makedev(300, 70000))  # the new device encoding
    os.mknod(r / "whiteout", 0o600 | stat.S_IFCHR, os.makedev(0, 0))
    os.mkfifo(r / "fifo", 0o640)
    dir_fd = os.open(r, os.O_PATH)
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.bind(f"/proc/self/fd/{dir_fd}/socket")  # the mount point's path may be too long to bind
    finally:
        os.close(dir_fd)
    (r / "setuid").write_bytes(b"#!/bin/sh\n")
    os.chmod(r / "setuid", 0o6755)
    (r / "sticky").mkdir()
    os.chmod(r / "sticky", 0o1777)
    os.chown(r / "empty", 100_000, 200_000)
    os.lchown(r / "fast-link", 70_000, 70_001)
    os.utime(r / "empty", ns=(0, -10 * 365 * 86400 * 10**9 + 5))          # before 1970
    os.utime(r / "big", ns=(0, 5_000_000_000 * 10**9 + 999_999_999))      # after 2038
    os.setxattr(r / "big", "user.small", b"value")
    os.setxattr(r / "big", "trusted.bin", b"\0\1\2\3")
    os.setxattr(r / "big", "security.capability", struct.pack("<5I", 0x02000001, 0x400, 0, 0, 0))
    os.setxattr(r / "setuid", "security.capability", struct.pack("<6I", 0x03000001, 0x3000, 0, 0, 0, 0))
    os.setxattr(r / "fragmented", "security.capability", struct.pack("<6I", 0x03000000, 0x20, 0, 0, 0, 1000))
    os.setxattr(r / "empty", "user.large", os.urandom(xattr_size))          # in the xattr block
    os.setxattr(r / "empty", "security.label", b"x" * 40)
    acl = struct.pack("<I" + "HHI" * 5, 2, 1, 7, 0xFFFFFFFF, 2, 5, 1234, 4, 5, 0xFFFFFFFF, 0x10, 5, 0xFFFFFFFF,
                      0x20, 5, 0xFFFFFFFF)
    os.setxattr(r / "sticky", "system.posix_acl_access", acl)
    os.setxattr(r / "sticky", "system.posix_acl_default", acl)
    (r / "many").mkdir()                                           # thousands of entries: an htree
    for i in range(3000):
        (r / "many" / f"entry-{i:05d}-{'n' * 40}").write_text(str(i))
    (r / os.fsdecode(b"latin1-\xe9t\xe9")).write_text("not utf-8")
    deep = r / ("d" * 60) / ("e" * 60) / ("f" * 60)
    deep.mkdir(parents=True)
    (deep / ("g" * 255)).write_text("a long path")


def sha_of(chunks: Iterator[bytes]) -> str:
    h = hashlib.sha256()
    for chunk in chunks:
        h.update(chunk)
    return h.hexdigest()


# -- image files formatted by mke2fs ---------------------------------------------------------------
@pytest.mark.parametrize("mkfs", [
    ["-t", "ext4"], ["-t", "ext4", "-b", "1024"], ["-t", "ext4", "-I", "128"],
    ["-t", "ext4", "-O", "^64bit,^metadata_csum"], ["-t", "ext4", "-O", "^dir_index,^filetype"],
    ["-t", "ext4", "-O", "^extents,^64bit"], ["-t", "ext3"], ["-t", "ext2"],
], ids=lambda a: "".join(a).replace("-t", "").replace("-", "_"))
def test_image_file_matches_the_kernel_mount(mkfs: list[str], tmp_path: Path) -> None:
    img, mnt = tmp_path / "fs.img", tmp_path / "mnt"
    mnt.mkdir()
    with open(img, "wb") as f:
        f.truncate(600 << 20)  # "default" mke2fs type: 4 KiB blocks unless asked
    subprocess.run(["mke2fs", "-q", *mkfs, str(img)], check=True)
    subprocess.run(["mount", "-o", "loop", str(img), str(mnt)], check=True)
    try:
        (mnt / "rootfs").mkdir()
        populate(mnt / "rootfs", 700 if "1024" in mkfs else 3000)
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
    ro = "ro" if "ext2" in mkfs else "ro,noload"
    subprocess.run(["mount", "-o", f"loop,{ro}", str(img), str(mnt)], check=True)
    try:
        kernel = sha_of(export_tree(str(mnt / "rootfs")))
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
    fd = os.open(img, os.O_RDONLY)
    try:
        assert sha_of(ExtTree(FileSource(fd)).export()) == kernel
    finally:
        os.close(fd)


def read_outcome(files: tarsplit.FileSource, path: str, size: int) -> bytes | str:
    """The bytes ``files`` gives for ``path``, or the reason it gives none."""
    try:
        return b"".join(files.read(path.split("/"), size))
    except tarsplit.Unreadable as e:
        return f"unreadable: {e}"


def test_file_lookup_matches_the_mounted_tree(tmp_path: Path) -> None:
    """``ExtTree.read`` (what migrate rebuilds layer tars from) finds what ``DirSource`` finds on a
    read-only kernel mount of the same filesystem, refusing the same paths for the same reasons."""
    img, mnt = tmp_path / "fs.img", tmp_path / "mnt"
    mnt.mkdir()
    with open(img, "wb") as f:
        f.truncate(128 << 20)
    subprocess.run(["mke2fs", "-q", "-t", "ext4", str(img)], check=True)
    subprocess.run(["mount", "-o", "loop", str(img), str(mnt)], check=True)
    big = os.urandom(3_000_000)  # several chunks
    try:
        r = mnt / "rootfs"
        (r / "etc").mkdir(parents=True)
        (r / "etc/motd").write_bytes(big)
        (r / "var").mkdir()
        (r / "many").mkdir()                                           # an htree
        for i in range(3000):
            (r / "many" / f"entry-{i:05d}-{'n' * 40}").write_text(str(i))
        (r / "file").write_text("plain")
        os.symlink("etc", r / "rel")
        os.symlink("/var/../etc", r / "abs")                           # restarts at the top
        os.symlink("../../../../etc", r / "var/up")                    # ".." stops at the top
        os.symlink("loop", r / "loop")
        os.symlink("etc/motd", r / "filelink")
        os.mkfifo(r / "fifo")
        os.mknod(r / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        (r / os.fsdecode(b"latin1-\xe9")).write_bytes(b"not utf-8")
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
    subprocess.run(["mount", "-o", "loop,ro,noload", str(img), str(mnt)], check=True)
    cases = [("etc/motd", 5_000_000), ("etc/motd", 1000), ("many/entry-02999-" + "n" * 40, 10), ("rel/motd", 10),
             ("abs/motd", 10), ("var/up/motd", 10), (os.fsdecode(b"latin1-\xe9"), 100), ("missing", 1),
             ("etc/missing", 1), ("missing/x", 1), ("file/x", 1), ("filelink/x", 1), ("filelink", 1),
             ("etc", 1), ("fifo", 1), ("null", 1), ("loop/x", 1), ("rel", 1)]
    fd = os.open(img, os.O_RDONLY)
    try:
        ext = ExtTree(FileSource(fd))
        with tarsplit.DirSource(str(mnt / "rootfs")) as tree:
            got = {(path, size): read_outcome(ext, path, size) for path, size in cases}
            assert got == {(path, size): read_outcome(tree, path, size) for path, size in cases}
    finally:
        os.close(fd)
        subprocess.run(["umount", str(mnt)], check=True)
    assert got[("etc/motd", 5_000_000)] == big and got[("etc/motd", 1000)] == big[:1000]
    assert got[("abs/motd", 10)] == got[("var/up/motd", 10)] == big[:10]
    assert got[("many/entry-02999-" + "n" * 40, 10)] == b"2999"
    assert got[("missing/x", 1)] == "unreadable: No such file or directory"
    assert got[("filelink/x", 1)] == "unreadable: 'etc/motd' is not a directory"
    assert got[("fifo", 1)] == got[("filelink", 1)] == got[("etc", 1)] == "unreadable: not a regular file"
    assert "too many levels of symlinks" in str(got[("loop/x", 1)])


# -- Docker roots -------------------------------------------------------------------------------------
@dataclass
class Root:
    root: Path
    fs: str
    digest: dict[str, str]
    web: str           # the container's device hash
    init: str


def lookup_layer() -> bytes:
    """On top of child_layer(): files migrate finds by path - thousands in a directory, one over
    several read chunks (and hard-linked), some written through symlinks (relative; absolute with "..")."""
    return build_tar(
        dir_("lots", mtime=T0), *[reg(f"lots/f-{i:05d}", str(i).encode(), mtime=T0) for i in range(2000)],
        reg("big", os.urandom(3_000_000), mtime=T0), hard("big-link", "big", mtime=T0),
        sym("alias", "opt/keep", mtime=T0), reg("alias/z", b"through a symlink", mtime=T0),
        sym("abs", "/var/lib/../../etc", mtime=T0), reg("abs/motd", b"through an absolute symlink", mtime=T0),
    )


@pytest.fixture(scope="module", params=["ext4", "ext3"])
def droot(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Root]:
    """A devicemapper Docker root whose container 'web' holds everything ``populate`` makes."""
    base = tmp_path_factory.mktemp(f"ext4read-{request.param}")
    root = base / "docker"
    archive = base / "app.tar"
    docker_save(archive, [base_layer(), child_layer(), lookup_layer()], TAG)
    opts = ["dm.basesize=1G", "dm.loopdatasize=4G", "dm.loopmetadatasize=64M", "dm.fs=ext4"]
    if request.param == "ext3":
        opts += ["dm.mkfsarg=-t", "dm.mkfsarg=ext3"]
    try:
        driver = registry.new_driver(str(root), "devicemapper", opts)
        with ImageRoot(str(root), driver) as r:
            r.load(str(archive))
            r.create_container(TAG, "web")
            populate(Path(r.mount("web")))
            r.umount("web")
        dr = DockerRoot(str(root))
        m = dr.layerdb.get_mount(dr.containers.resolve("web").id)
        yield Root(root, request.param, tree_digest(root), m.mount_id, m.init_id)
    finally:
        K.stop_pool_servers(base)
        unmount_tree(base)


@pytest.fixture
def untouched(droot: Root) -> Iterator[Root]:
    yield droot
    assert tree_digest(droot.root) == droot.digest, "the Docker root was written to"


def cli(*args: str, ok: bool = True, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    r = subprocess.run([sys.executable, "-m", "thinpool.cli", *args], capture_output=True, text=True,
                       timeout=timeout)
    assert (r.returncode == 0) == ok, (args, r.returncode, r.stderr)
    assert "Traceback" not in r.stderr
    return r


def test_userspace_export_is_the_kernel_export(untouched: Root, tmp_path: Path) -> None:
    image = Device(untouched.root, untouched.web).image(tmp_path / "dev.img")
    if untouched.fs == "ext4":  # the content has what it is meant to have
        assert "Level Entries" in debugfs(image, "ex /rootfs/fragmented")
        assert " 1/ 1 " in debugfs(image, "ex /rootfs/fragmented")
        assert "Uninit" in debugfs(image, "ex /rootfs/unwritten")
    flags = int(debugfs(image, "stat /rootfs/many").split("Flags: ")[1].split()[0], 16)
    assert flags & 0x1000  # EXT4_INDEX_FL: an htree directory
    dr = DockerRoot(str(untouched.root))
    for ref in ("web", TAG):
        kernel = sha_of(dr.export(ref, "kernel"))
        assert sha_of(dr.export(ref, "userspace")) == kernel, ref
    listing = K.tar_listing(b"".join(dr.export("web", "userspace")))
    assert "socket" not in listing and "fragmented" in listing and "many/entry-02999-" + "n" * 40 in listing
    out = tmp_path / "web.tar"
    cli("docker", "export", str(untouched.root), "web", "-o", str(out))  # the default reader
    assert hashlib.sha256(out.read_bytes()).hexdigest() == sha_of(dr.export("web", "kernel"))
    assert "unknown reader" in str(pytest.raises(ImageError, dr.export, "web", "nfs").value)


def copy_root(src: Path, dest: Path) -> Path:
    subprocess.run(["cp", "-a", "--sparse=always", str(src), str(dest)], check=True)
    return dest


class Device:
    """A Docker device's bytes in a copy of the root: read for debugfs, patched in place."""

    def __init__(self, root: Path, hash: str) -> None:
        self.dr = DockerRoot(str(root))
        dev = self.dr.device(hash)
        self.mapping = self.dr.mapping(dev)
        self.block = self.dr.block_bytes
        self.size = dev.size
        self.data = root / "devicemapper" / "devicemapper" / "data"

    def image(self, dest: Path) -> Path:
        with open(self.data, "rb") as src, open(dest, "wb") as out:
            out.truncate(self.size)
            for v, d in enumerate(self.mapping):
                if d >= 0:
                    src.seek(int(d) * self.block)
                    out.seek(v * self.block)
                    out.write(src.read(self.block))
        return dest

    def patch(self, offset: int, data: bytes) -> None:
        v, within = divmod(offset, self.block)
        assert within + len(data) <= self.block and self.mapping[v] >= 0
        with open(self.data, "r+b") as f:
            f.seek(int(self.mapping[v]) * self.block + within)
            f.write(data)

    def read(self, offset: int, n: int) -> bytes:
        v, within = divmod(offset, self.block)
        with open(self.data, "rb") as f:
            f.seek(int(self.mapping[v]) * self.block + within)
            return f.read(n)


def debugfs(image: Path, request: str) -> str:
    return subprocess.run(["debugfs", "-R", request, str(image)], capture_output=True, text=True,
                          check=True).stdout


def inode_offset(image: Path, path: str) -> tuple[int, int]:
    """(inode number, byte offset of the inode on the device) of ``path``, as debugfs finds it."""
    ino = int(debugfs(image, f"stat {path}").split("Inode: ")[1].split()[0])
    where = debugfs(image, f"imap <{ino}>")
    m = re.search(r"located at block (\d+), offset (0x[0-9a-f]+)", where)
    assert m, where
    block_size = int(re.search(r"Block size:\s+(\d+)", debugfs(image, "stats")).group(1))  # type: ignore[union-attr]
    return ino, int(m.group(1)) * block_size + int(m.group(2), 16)


def first_block(image: Path, path: str) -> int:
    """Byte offset of the first data block of ``path``."""
    block_size = int(re.search(r"Block size:\s+(\d+)", debugfs(image, "stats")).group(1))  # type: ignore[union-attr]
    return int(debugfs(image, f"blocks {path}").split()[0]) * block_size


def set_feature(dev: Device, incompat_bit: int) -> None:
    """Set an incompatible feature bit in the ext superblock, its checksum kept right."""
    sb = bytearray(dev.read(1024, 1024))
    sb[0x60:0x64] = (int.from_bytes(sb[0x60:0x64], "little") | incompat_bit).to_bytes(4, "little")
    if int.from_bytes(sb[0x64:0x68], "little") & 0x400:  # metadata_csum
        sb[0x3FC:0x400] = (crc32c(bytes(sb[:0x3FC])) ^ 0xFFFFFFFF).to_bytes(4, "little")
    dev.patch(1024, bytes(sb))


@pytest.mark.parametrize("droot", ["ext4"], indirect=True)
def test_unclean_journal_falls_back_to_the_kernel(untouched: Root, tmp_path: Path) -> None:
    root = copy_root(untouched.root, tmp_path / "unclean")
    set_feature(Device(root, untouched.web), 0x4)  # needs_recovery
    dr = DockerRoot(str(root))
    with pytest.raises(ImageError, match="needs_recovery"):
        b"".join(dr.export("web", "userspace"))
    out = tmp_path / "web.tar"
    cli("docker", "export", str(root), "web", "-o", str(out))
    assert hashlib.sha256(out.read_bytes()).hexdigest() == sha_of(DockerRoot(str(untouched.root)).export(
        "web", "kernel"))
    set_feature(Device(root, untouched.web), 0x80000000)  # a feature nobody knows: never guessed at
    with pytest.raises(ImageError, match="unknown incompatible features 0x80000000"):
        b"".join(DockerRoot(str(root)).export("web", "userspace"))


@pytest.mark.parametrize("droot", ["ext3"], indirect=True)
def test_ext3_is_read_without_extents(untouched: Root, tmp_path: Path) -> None:
    """Docker's mkfs with ``-t ext3``: block maps instead of extents, still read in userspace."""
    features = debugfs(Device(untouched.root, untouched.web).image(tmp_path / "dev.img"), "stats")
    assert "has_journal" in features and "extent" not in features.split("Filesystem features:")[1].split("\n")[0]
    dr = DockerRoot(str(untouched.root))
    tar = b"".join(dr.export("web", "userspace"))
    assert hashlib.sha256(tar).hexdigest() == sha_of(dr.export("web", "kernel"))
    listing = K.tar_listing(tar)
    assert listing["sparse"][4] == BIG_SPARSE + 4 and listing["big"][4] == 5_000_000


@pytest.mark.parametrize("droot", ["ext4"], indirect=True)
@pytest.mark.parametrize("damage", ["extent header", "rec_len 0", "directory in itself", "block past the end",
                                    "huge size"])
def test_damaged_filesystem_is_a_one_line_error(untouched: Root, damage: str, tmp_path: Path) -> None:
    root = copy_root(untouched.root, tmp_path / "damaged")
    dev = Device(root, untouched.web)
    image = dev.image(tmp_path / "device.img")
    if damage == "extent header":
        ino, at = inode_offset(image, "/rootfs/big")
        dev.patch(at + 0x28, b"\x0b\xad")
        expect = ["big", f"inode {ino}", "bad extent header"]
    elif damage == "rec_len 0":
        at = first_block(image, "/rootfs/etc")
        dev.patch(at + 4, b"\0\0")
        expect = ["etc", "bad record at 0 (length 0"]
    elif damage == "directory in itself":
        ino, _ = inode_offset(image, "/rootfs/sticky")
        at = first_block(image, "/rootfs/sticky")  # ".", "..", then nothing: make ".." a child
        block = bytearray(dev.read(at, 24))
        assert block[20:22] == b".."  # the ".." record (at 12) becomes "x", naming the directory itself
        block[12:16] = ino.to_bytes(4, "little")
        block[18:20] = b"\x01\x02"
        block[20:21] = b"x"
        dev.patch(at, bytes(block))
        expect = ["sticky/x", "reached twice"]
    elif damage == "block past the end":
        ino, at = inode_offset(image, "/rootfs/etc/hosts")
        leaf = bytearray(dev.read(at + 0x28, 24))
        leaf[12 + 6:12 + 8] = b"\xff\x00"  # the first extent's start_hi
        dev.patch(at + 0x28, bytes(leaf))
        expect = ["etc/hosts", f"inode {ino}", "outside the filesystem"]
    else:
        ino, at = inode_offset(image, "/rootfs/sparse")
        dev.patch(at + 0x6C, b"\xff\xff\xff\x7f")
        expect = ["sparse", f"inode {ino}", "larger than a file can be"]
    before = tree_digest(root)
    out = tmp_path / "web.tar"
    for reader in ("auto", "userspace"):
        err = cli("docker", "export", str(root), "web", "-o", str(out), "--reader", reader, ok=False,
                  timeout=120).stderr
        assert err.count("\n") == 1 and all(e in err for e in expect), (damage, err)
        assert not out.exists()
    assert tree_digest(root) == before
    fd = os.open(dev.image(tmp_path / "again.img"), os.O_RDONLY)
    try:
        with pytest.raises(CorruptFilesystem):
            for _ in ExtTree(FileSource(fd)).export():
                pass
    finally:
        os.close(fd)


# -- migrate ------------------------------------------------------------------------------------------
def migrated_layers(dest: Path) -> dict[str, tuple[str, dict[str, tuple]]]:
    """chain id -> (diff id, every path's metadata and content) of a root migrated to vfs.

    Directory mtimes are left out: applying a file through a symlink sets its directory's to the
    time of the apply (the layer's tar does not hold that directory)."""
    out = {}
    for d in (dest / "image" / "vfs" / "layerdb" / "sha256").iterdir():
        meta = tree(dest / "vfs" / "dir" / (d / "cache-id").read_text())
        out[d.name] = ((d / "diff").read_text(), {path: v[:5] + v[6:] if stat.S_ISDIR(v[0]) else v
                                                   for path, v in meta.items()})
    return out


def migrate(root: Path, dest: Path, reader: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    return cli("docker", "migrate", str(root), "--to", "vfs", "--dest", str(dest), "--reader", reader, ok=ok)


def test_migrate_reads_layers_in_userspace(untouched: Root, tmp_path: Path) -> None:
    """The userspace reader and the kernel mount give the same new root: same diff ids, same trees."""
    layers, containers = {}, {}
    for reader in ("userspace", "kernel"):
        dest = tmp_path / reader
        assert "1 images, 3 layers, 1 containers" in migrate(untouched.root, dest, reader).stdout
        layers[reader] = migrated_layers(dest)
        with ImageRoot(str(dest), registry.new_driver(str(dest), "vfs", [])) as r:
            containers[reader] = K.tar_listing(b"".join(r.export("web")))
    assert layers["userspace"] == layers["kernel"]
    source = DockerRoot(str(untouched.root)).layerdb.all()
    assert {chain: diff for chain, (diff, _) in layers["kernel"].items()} == {
        layer.chain_id.removeprefix("sha256:"): layer.diff_id for layer in source.values()}
    assert containers["userspace"] == containers["kernel"]
    paths = [path for _, tree in layers["kernel"].values() for path in tree]
    assert "opt/keep/z" in paths and "etc/motd" in paths and "lots/f-01999" in paths


@pytest.mark.parametrize("droot", ["ext4"], indirect=True)
def test_migrate_falls_back_to_the_kernel(untouched: Root, tmp_path: Path) -> None:
    """A layer whose journal needs replaying: ``--reader userspace`` refuses before making anything,
    ``auto`` reads that layer through the kernel and gives the same root."""
    root = copy_root(untouched.root, tmp_path / "unclean")
    dr = DockerRoot(str(root))
    [top] = [layer for layer in dr.layerdb.all().values() if
             not any(other.parent == layer.chain_id for other in dr.layerdb.all().values())]
    set_feature(Device(root, top.cache_id), 0x4)  # needs_recovery
    before = tree_digest(root)
    dest = tmp_path / "new"
    err = migrate(root, dest, "userspace", ok=False).stderr
    assert err.count("\n") == 1 and "needs_recovery" in err and top.cache_id in err, err
    assert not dest.exists()
    migrate(root, dest, "auto")
    migrate(untouched.root, tmp_path / "kernel", "kernel")
    assert migrated_layers(dest) == migrated_layers(tmp_path / "kernel")
    assert tree_digest(root) == before


@pytest.mark.parametrize("droot", ["ext4"], indirect=True)
def test_migrate_damaged_layer_file_is_a_one_line_error(untouched: Root, tmp_path: Path) -> None:
    root = copy_root(untouched.root, tmp_path / "damaged")
    dr = DockerRoot(str(root))
    [top] = [layer for layer in dr.layerdb.all().values() if
             not any(other.parent == layer.chain_id for other in dr.layerdb.all().values())]
    dev = Device(root, top.cache_id)
    ino, at = inode_offset(dev.image(tmp_path / "device.img"), "/rootfs/big")
    dev.patch(at + 0x28, b"\x0b\xad")
    before = tree_digest(root)
    for reader in ("auto", "userspace"):  # damage is never a reason to fall back
        err = migrate(root, tmp_path / reader, reader, ok=False).stderr.splitlines()
        assert [line for line in err if not line.startswith("migrated layer ")] == err[-1:], err  # one error
        assert f"{top.cache_id}): big: ext inode {ino}: bad extent header" in err[-1], err
        assert "is incomplete" in err[-1]
    assert tree_digest(root) == before
