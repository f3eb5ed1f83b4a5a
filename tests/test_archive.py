"""The archive layer: applying layer tars, changes between trees, exporting layer tars.

Tars are built in the tests (tarfile, GNU tar, our own writer); GNU tar is the
outside judge for interoperability both ways.
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import os
import shutil
import stat
import subprocess
import tarfile
from pathlib import Path

import pytest
import zstandard

from archivetools import build_tar, dir_, hard, needs_root, reg, snapshot, sym, ti
from conftest import require_tool
from thinpool.archive import (ArchiveError, Change, ChangeKind, apply_layer, changes, changes_size,
                              export_changes, export_overlay, export_tree, open_layer_stream)
from thinpool.archive.tarformat import TarReader, encode_header, padding, END_OF_ARCHIVE
from thinpool.errors import ThinpoolError

pytestmark = needs_root

T0 = 1_600_000_000
CAP_V2 = bytes([0, 0, 0, 2, 0x00, 0x04, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0])  # cap_net_bind_service
CAP_RAW = CAP_V2[:4] + bytes([0x00, 0x20]) + CAP_V2[6:]  # cap_net_raw
CAP_V3 = CAP_V2[:3] + b"\x03" + CAP_V2[4:] + (1000).to_bytes(4, "little")


def apply(root: Path, data: bytes, **kw: object) -> int:
    return apply_layer(str(root), io.BytesIO(data), **kw)  # type: ignore[arg-type]


def tar_bytes(chunks) -> bytes:
    return b"".join(chunks)


def names(data: bytes) -> list[str]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        return tf.getnames()


# -- apply: entry types and metadata ----------------------------------------------------------

def test_apply_every_entry_type_with_metadata(tmp_path: Path) -> None:
    data = build_tar(
        dir_("d", mode=0o1777, uid=5, gid=6, mtime=T0 + 10),
        reg("d/suid", b"#!/bin/sh\n", mode=0o4755, uid=1000, gid=1001, mtime=T0 + 20,
            pax={"SCHILY.xattr.user.note": "hello"}),
        reg("d/sgid", b"x", mode=0o2711, mtime=T0 + 21, pax={"atime": str(T0 + 99)}),
        sym("d/abs", "/etc/passwd", uid=7, gid=8, mtime=T0 + 30),
        hard("d/hl", "d/suid", mode=0o4755, uid=1000, gid=1001, mtime=T0 + 20),
        ti("d/null", tarfile.CHRTYPE, mode=0o666, devmajor=1, devminor=3, mtime=T0 + 40),
        ti("d/loop", tarfile.BLKTYPE, mode=0o660, gid=6, devmajor=7, devminor=0, mtime=T0 + 41),
        ti("d/fifo", tarfile.FIFOTYPE, mode=0o620, mtime=T0 + 42),
    )
    root = tmp_path / "root"
    root.mkdir()
    size = apply(root, data)
    assert size == len(b"#!/bin/sh\n") + 1
    st = os.lstat(root / "d")
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_mtime_ns) == (0o1777, 5, 6, (T0 + 10) * 10**9)
    st = os.lstat(root / "d/suid")
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_nlink) == (0o4755, 1000, 1001, 2)
    assert st.st_mtime_ns == st.st_atime_ns == (T0 + 20) * 10**9  # the link's header applies to the inode too
    assert (root / "d/suid").read_bytes() == b"#!/bin/sh\n"
    assert os.getxattr(root / "d/suid", "user.note") == b"hello"
    assert os.path.samefile(root / "d/suid", root / "d/hl")
    st = os.lstat(root / "d/sgid")
    assert stat.S_IMODE(st.st_mode) == 0o2711 and st.st_atime_ns == (T0 + 99) * 10**9
    st = os.lstat(root / "d/abs")
    assert stat.S_ISLNK(st.st_mode) and os.readlink(root / "d/abs") == "/etc/passwd"
    assert (st.st_uid, st.st_gid, st.st_mtime_ns) == (7, 8, (T0 + 30) * 10**9)
    st = os.lstat(root / "d/null")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(1, 3) and stat.S_IMODE(st.st_mode) == 0o666
    st = os.lstat(root / "d/loop")
    assert stat.S_ISBLK(st.st_mode) and st.st_rdev == os.makedev(7, 0) and st.st_gid == 6
    st = os.lstat(root / "d/fifo")
    assert stat.S_ISFIFO(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o620


def test_apply_binary_xattrs_and_capability(tmp_path: Path) -> None:
    body = b"ELF"
    data = (encode_header("ping", "0", mode=0o755, size=len(body), mtime=T0,
                          xattrs={"security.capability": CAP_V2, "trusted.blob": bytes(range(256))})
            + body + padding(len(body)) + END_OF_ARCHIVE)
    root = tmp_path / "root"
    root.mkdir()
    assert apply(root, data) == 3
    assert os.getxattr(root / "ping", "security.capability") == CAP_V2
    assert os.getxattr(root / "ping", "trusted.blob") == bytes(range(256))


def test_apply_creates_implied_parents_and_sets_dir_times_last(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    apply(root, build_tar(dir_("a", mtime=T0), reg("a/b/c/file", b"x", mtime=T0 + 5), reg("a/f", b"y")))
    assert os.lstat(root / "a").st_mtime_ns == T0 * 10**9  # not disturbed by a/b and a/f created after it
    for implied in ("a/b", "a/b/c"):
        st = os.lstat(root / implied)
        assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o755 and st.st_uid == 0


def test_apply_replaces_paths_and_merges_directories(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "was_file").mkdir(parents=True)
    (root / "was_file").rmdir()
    (root / "was_file").write_text("old")
    (root / "was_dir/sub").mkdir(parents=True)
    (root / "was_dir/sub/deep").write_text("old")
    (root / "merge").mkdir(mode=0o700)
    (root / "merge/kept").write_text("kept")
    (root / "link").symlink_to("merge")
    apply(root, build_tar(dir_("was_file"), reg("was_dir", b"now a file"), dir_("merge", mode=0o751, uid=3),
                          reg("merge/new", b"n"), reg("link", b"not a link any more")))
    assert (root / "was_file").is_dir() and not (root / "was_file").is_symlink()
    assert (root / "was_dir").read_bytes() == b"now a file"
    assert (root / "merge/kept").read_text() == "kept" and (root / "merge/new").read_bytes() == b"n"
    st = os.lstat(root / "merge")
    assert (stat.S_IMODE(st.st_mode), st.st_uid) == (0o751, 3)
    assert not (root / "link").is_symlink() and (root / "link").read_bytes() == b"not a link any more"


def test_apply_skips_root_entry_and_strips_leading_slash(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir(mode=0o711)
    apply(root, build_tar(dir_("./", mode=0o700, uid=9), reg("/abs/file", b"1"), reg("./rel", b"2")))
    assert stat.S_IMODE(os.lstat(root).st_mode) == 0o711 and os.lstat(root).st_uid == 0
    assert (root / "abs/file").read_bytes() == b"1" and (root / "rel").read_bytes() == b"2"


def test_apply_no_chown(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    apply(root, build_tar(reg("f", b"1", uid=1234, gid=4321)), chown=False)
    assert (os.lstat(root / "f").st_uid, os.lstat(root / "f").st_gid) == (0, 0)


# -- whiteouts ----------------------------------------------------------------------------------

def _lower(tmp_path: Path) -> Path:
    lower = tmp_path / "lower"
    (lower / "etc/conf.d").mkdir(parents=True)
    (lower / "etc/conf.d/a").write_text("a")
    (lower / "etc/conf.d/b").write_text("b")
    (lower / "etc/hosts").write_text("hosts")
    (lower / "var/cache/x").mkdir(parents=True)
    (lower / "var/cache/x/big").write_text("big")
    (lower / "var/cache/keep").write_text("old keep")
    return lower


def test_whiteouts_delete_files_and_trees(tmp_path: Path) -> None:
    root = _lower(tmp_path)
    size = apply(root, build_tar(reg("etc/.wh.hosts"), reg("var/.wh.cache"), reg("etc/.wh.never-existed")))
    assert size == 0
    assert not (root / "etc/hosts").exists() and not (root / "var/cache").exists()
    assert (root / "etc/conf.d/a").exists() and (root / "var").is_dir()


def test_opaque_directory_keeps_only_this_layers_entries(tmp_path: Path) -> None:
    root = _lower(tmp_path)
    apply(root, build_tar(reg("var/cache/new1", b"1"), dir_("var/cache/x"), reg("var/cache/keep", b"new keep"),
                          reg("var/cache/.wh..wh..opq"), reg("var/cache/new2", b"2"), reg("etc/.wh..wh..opq")))
    assert sorted(os.listdir(root / "var/cache")) == ["keep", "new1", "new2", "x"]
    assert (root / "var/cache/keep").read_text() == "new keep"
    assert os.listdir(root / "var/cache/x") == []  # re-created in this layer: its old content is hidden
    assert os.listdir(root / "etc") == []


def test_aufs_metadata_skipped_and_plnk_hard_links(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    data = build_tar(reg(".wh..wh.aufs", b"meta"), dir_(".wh..wh.orph"), reg(".wh..wh.orph/x", b"x"),
                     dir_(".wh..wh.plnk"), reg(".wh..wh.plnk/123.456", b"shared", mode=0o640, uid=42, mtime=T0),
                     hard("usr/a", ".wh..wh.plnk/123.456"), hard("usr/b", ".wh..wh.plnk/123.456"))
    assert apply(root, data) == 4 + 1 + 6
    assert sorted(os.listdir(root)) == ["usr"]
    st = os.lstat(root / "usr/a")
    assert (root / "usr/a").read_bytes() == b"shared" and os.path.samefile(root / "usr/a", root / "usr/b")
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_mtime_ns, st.st_nlink) == (0o640, 42, T0 * 10**9, 2)
    with pytest.raises(ArchiveError, match="invalid AUFS hard link"):
        apply(root, build_tar(hard("c", ".wh..wh.plnk/missing")))


def test_overlay_whiteout_format(tmp_path: Path) -> None:
    upper = tmp_path / "upper"
    upper.mkdir()
    apply(upper, build_tar(dir_("etc"), reg("etc/.wh.hosts", uid=3, gid=4), dir_("var/cache"),
                           reg("var/cache/.wh..wh..opq"), reg("var/cache/new", b"n")), whiteouts="overlay")
    st = os.lstat(upper / "etc/hosts")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0 and (st.st_uid, st.st_gid) == (3, 4)
    assert os.getxattr(upper / "var/cache", "trusted.overlay.opaque") == b"y"
    assert sorted(os.listdir(upper / "var/cache")) == ["new"]
    out = tar_bytes(export_overlay(str(upper)))
    assert names(out) == ["etc", "etc/.wh.hosts", "var", "var/cache", "var/cache/.wh..wh..opq", "var/cache/new"]
    with tarfile.open(fileobj=io.BytesIO(out)) as tf:
        assert "SCHILY.xattr.trusted.overlay.opaque" not in tf.getmember("var/cache").pax_headers
        wh = tf.getmember("etc/.wh.hosts")
        assert wh.isreg() and wh.size == 0 and (wh.uid, wh.gid) == (3, 4)


def test_overlay_round_trip_equals_delete_mode(tmp_path: Path) -> None:
    layer = build_tar(dir_("etc"), reg("etc/.wh.hosts"), dir_("var/cache", mtime=T0), reg("var/cache/.wh..wh..opq"),
                      reg("var/cache/new", b"n", mtime=T0), reg("etc/conf.d/a", b"A", mtime=T0))
    lower = _lower(tmp_path)
    direct, via_upper = tmp_path / "direct", tmp_path / "via"
    for copy in (direct, via_upper):
        subprocess.run(["cp", "-a", str(lower), str(copy)], check=True)
    apply(direct, layer)
    upper = tmp_path / "upper"
    upper.mkdir()
    apply(upper, layer, whiteouts="overlay")
    apply(via_upper, tar_bytes(export_overlay(str(upper))))
    assert changes(str(via_upper), str(direct)) == []
    # the same except the mtimes of directories the upper dir held only as parents
    # (exported with whole seconds, the direct application left them at "now")
    assert ({p: v[:5] + v[6:] for p, v in snapshot(via_upper).items()}
            == {p: v[:5] + v[6:] for p, v in snapshot(direct).items()})


def test_overlay_xattrs_in_a_tar_are_not_applied(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    apply(root, build_tar(dir_("d", pax={"SCHILY.xattr.trusted.overlay.opaque": "y",
                                         "SCHILY.xattr.trusted.overlay.redirect": "/etc",
                                         "SCHILY.xattr.user.fine": "1"})), whiteouts="overlay")
    assert os.listxattr(root / "d") == ["user.fine"]


# -- compression and bad input ----------------------------------------------------------------------

def _sample_tar() -> bytes:
    return build_tar(dir_("d"), reg("d/a", os.urandom(70000)), reg("d/b", b"b" * 3000), sym("d/s", "a"))


@pytest.mark.parametrize("kind", ["tar", "gzip", "gzip-multi", "zstd", "zstd-multi", "bzip2", "xz"])
def test_compressed_layers(tmp_path: Path, kind: str) -> None:
    raw = _sample_tar()
    half = len(raw) // 2
    packed = {
        "tar": raw,
        "gzip": gzip.compress(raw),
        "gzip-multi": gzip.compress(raw[:half]) + gzip.compress(raw[half:]),
        "zstd": zstandard.ZstdCompressor().compress(raw),
        "zstd-multi": (b"\x50\x2a\x4d\x18" + (3).to_bytes(4, "little") + b"abc"  # skippable frame
                       + zstandard.ZstdCompressor().compress(raw[:half])
                       + zstandard.ZstdCompressor().compress(raw[half:])),
        "bzip2": bz2.compress(raw),
        "xz": lzma.compress(raw),
    }[kind]
    assert open_layer_stream(io.BytesIO(packed)).read() == raw
    reference = tmp_path / "ref"
    reference.mkdir()
    apply(reference, raw)
    root = tmp_path / "root"
    root.mkdir()
    assert apply(root, packed) == 70000 + 3000
    assert snapshot(root) == snapshot(reference)


def _bad_inputs() -> dict[str, tuple[bytes, str]]:
    raw = _sample_tar()
    gz = gzip.compress(raw)
    zs = zstandard.ZstdCompressor(write_checksum=True).compress(raw)
    with tarfile.open(fileobj=io.BytesIO(raw)) as tf:
        data_of_a = tf.getmember("d/a").offset_data
        header_of_s = tf.getmember("d/s").offset
    lying = bytearray(build_tar(reg("f", b"abc")))
    lying[124:136] = b"%011o\0" % 10**6  # size field lies: 1 MB of data that is not there
    lying[148:156] = b" " * 8
    lying[148:156] = b"%06o\0 " % sum(lying[:512])
    bad_octal = bytearray(build_tar(reg("f", b"abc"), fmt=tarfile.USTAR_FORMAT))
    bad_octal[124:136] = b"00000000x03\0"
    bad_octal[148:156] = b" " * 8
    bad_octal[148:156] = b"%06o\0 " % sum(bad_octal[:512])
    second_bad = bytearray(build_tar(reg("a", b"1"), reg("b", b"2"), fmt=tarfile.USTAR_FORMAT))
    second_bad[1024 + 5] ^= 0xFF
    huge = encode_header("././@PaxHeader", "x", size=64 << 20) + bytes(512)  # a 64 MiB PAX header
    return {
        "empty": (b"", "empty"),
        "garbage": (os.urandom(4096), "not a layer"),
        "short garbage": (b"hello", "not a layer"),
        "truncated data": (raw[:data_of_a + 2000], "truncated tar archive: stream ended inside the data"),
        "truncated header": (raw[:header_of_s + 300], "truncated tar archive: stream ended inside the tar header"),
        "no end marker": (build_tar(reg("f", b"abc"))[:1024], "before the end-of-archive marker"),
        "lying size": (bytes(lying), "truncated"),
        "bad octal": (bytes(bad_octal), "bad size field"),
        "bad checksum later": (bytes(second_bad), "bad checksum"),
        "huge pax": (huge, "exceeds"),
        "corrupt gzip": (gz[:40] + bytes(b ^ 0x55 for b in gz[40:80]) + gz[80:], "corrupt gzip|not a tar archive"),
        "truncated gzip": (gz[:len(gz) // 2], "corrupt gzip layer stream: truncated"),
        "corrupt zstd": (zs[:30] + bytes(b ^ 0x55 for b in zs[30:60]) + zs[60:], "corrupt zstd|not a tar archive"),
        "truncated zstd": (zs[:len(zs) // 2], "corrupt zstd layer stream: truncated"),
        "truncated bzip2": (bz2.compress(raw)[:300], "corrupt bzip2"),
        "gzip of garbage": (gzip.compress(os.urandom(2000)), "not a tar archive"),
    }


@pytest.mark.parametrize("case", list(_bad_inputs()))
def test_bad_input_is_a_clear_error(tmp_path: Path, case: str) -> None:
    data, message = _bad_inputs()[case]
    root = tmp_path / "root"
    root.mkdir()
    with pytest.raises(ArchiveError, match=message) as info:
        apply(root, data)
    assert isinstance(info.value, ThinpoolError) and "\n" not in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["root"]


def test_source_read_error_is_clear(tmp_path: Path) -> None:
    class Broken(io.RawIOBase):
        def __init__(self) -> None:
            self.data = io.BytesIO(gzip.compress(_sample_tar()))

        def readable(self) -> bool:
            return True

        def read(self, n: int = -1) -> bytes:
            if self.data.tell() > 100:
                raise OSError(5, "Input/output error")
            return self.data.read(min(n, 64))

    with pytest.raises(ArchiveError, match="cannot read the layer stream: Input/output error"):
        apply_layer(str(tmp_path), Broken())


def test_unsupported_entries_are_clear_errors(tmp_path: Path) -> None:
    sparse = ti("s", tarfile.GNUTYPE_SPARSE)
    with pytest.raises(ArchiveError, match="sparse"):
        apply(tmp_path, build_tar(sparse, fmt=tarfile.GNU_FORMAT))
    with pytest.raises(ArchiveError, match="unknown whiteout format"):
        apply(tmp_path, build_tar(reg("f")), whiteouts="aufs")
    with pytest.raises(ArchiveError, match="cannot apply tar entry 'dev'"):
        apply(tmp_path, build_tar(ti("dev", tarfile.CHRTYPE, devmajor=2**40), fmt=tarfile.GNU_FORMAT))
    nul_xattr = encode_header("x", "0", xattrs={"user.a\0b": b"1"}) + END_OF_ARCHIVE
    with pytest.raises(ArchiveError, match="cannot apply tar entry 'x'"):
        apply(tmp_path, nul_xattr)
    with pytest.raises(ArchiveError, match="unsupported tar entry 'v': type 'V'"):
        apply(tmp_path, build_tar(ti("v", b"V"), fmt=tarfile.GNU_FORMAT))


def test_reader_long_names_big_numbers_and_non_utf8(tmp_path: Path) -> None:
    long_dir = "/".join(["d" * 60] * 5)
    odd = os.fsdecode(b"caf\xe9-latin1")
    chunks = [encode_header(long_dir + "/", "5", mode=0o755, mtime=T0),
              encode_header(long_dir + "/" + "f" * 120, "0", mode=0o600, uid=3_000_000, gid=2**32 - 2,
                            size=1, mtime=2**33) + b"z" + padding(1),
              encode_header(odd, "2", linkname="t" * 150, mode=0o777),
              END_OF_ARCHIVE]
    root = tmp_path / "root"
    root.mkdir()
    apply(root, b"".join(chunks))
    st = os.lstat(root / long_dir / ("f" * 120))
    assert (st.st_uid, st.st_gid, st.st_mtime_ns) == (3_000_000, 2**32 - 2, 2**33 * 10**9)
    assert os.readlink(os.path.join(str(root), odd)) == "t" * 150
    with tarfile.open(fileobj=io.BytesIO(b"".join(chunks))) as tf:  # Python's reader agrees
        assert tf.getmember(long_dir + "/" + "f" * 120).uid == 3_000_000


# -- changes ---------------------------------------------------------------------------------------

def _set_times(path: Path, seconds: float) -> None:
    ns = int(seconds * 10**9)
    os.utime(path, ns=(ns, ns), follow_symlinks=False)


def _pair(tmp_path: Path) -> tuple[Path, Path]:
    old = tmp_path / "old"
    (old / "dir/sub").mkdir(parents=True)
    for name in ("same", "content", "mode", "owner", "mtime", "gone", "cap", "dir/sub/deep"):
        (old / name).write_text(name)
    (old / "gone_dir/x").mkdir(parents=True)
    (old / "gone_dir/x/y").write_text("y")
    (old / "file_to_dir").write_text("f")
    (old / "dir_to_file").mkdir()
    (old / "dir_to_file/child").write_text("c")
    (old / "dirmtime").mkdir()
    for p in old.rglob("*"):
        _set_times(p, T0)
    new = tmp_path / "new"
    subprocess.run(["cp", "-a", str(old), str(new)], check=True)
    (new / "content").write_text("CONTENT-changed")
    _set_times(new / "content", T0)  # same mtime, different size
    os.chmod(new / "mode", 0o600)
    os.chown(new / "owner", 1, 1)
    _set_times(new / "mtime", T0 + 1)
    os.unlink(new / "gone")
    shutil.rmtree(new / "gone_dir")
    os.setxattr(new / "cap", "security.capability", CAP_V2)
    (new / "dir/sub/added").write_text("a")
    os.unlink(new / "file_to_dir")
    (new / "file_to_dir/inner").mkdir(parents=True)
    shutil.rmtree(new / "dir_to_file")
    (new / "dir_to_file").write_text("now a file")
    _set_times(new / "dirmtime", T0 + 50)  # a directory's mtime alone is no change
    return new, old


def test_changes_docker_semantics(tmp_path: Path) -> None:
    new, old = _pair(tmp_path)
    got = [(c.path, str(c.kind)) for c in changes(str(new), str(old))]
    assert got == [
        ("/cap", "C"), ("/content", "C"), ("/dir", "C"), ("/dir/sub", "C"), ("/dir/sub/added", "A"),
        ("/dir_to_file", "C"), ("/file_to_dir", "C"), ("/file_to_dir/inner", "A"), ("/gone", "D"),
        ("/gone_dir", "D"), ("/mode", "C"), ("/mtime", "C"), ("/owner", "C"),
    ]
    assert [int(c.kind) for c in changes(str(new), str(old))][:1] == [0]
    assert ChangeKind.ADD == 1 and ChangeKind.DELETE == 2 and str(Change("/x", ChangeKind.ADD)) == "A /x"


def test_changes_mtime_tolerance_and_capability(tmp_path: Path) -> None:
    old, new = tmp_path / "old", tmp_path / "new"
    old.mkdir()
    new.mkdir()
    for root, secs in ((old, T0 + 0.123456789), (new, T0)):
        (root / "rounded").write_text("x")
        _set_times(root / "rounded", secs)
    for root, secs in ((old, T0 + 0.5), (new, T0 + 0.25)):
        (root / "subsecond").write_text("x")
        _set_times(root / "subsecond", secs)
    assert [(c.path, c.kind) for c in changes(str(new), str(old))] == [("/subsecond", ChangeKind.MODIFY)]


def test_changes_without_parent_and_same_inode_pruning(tmp_path: Path) -> None:
    base = tmp_path / "base"
    (base / "a/b").mkdir(parents=True)
    (base / "a/b/f").write_text("f")
    assert [(c.path, c.kind) for c in changes(str(base), None)] == [
        ("/a", ChangeKind.ADD), ("/a/b", ChangeKind.ADD), ("/a/b/f", ChangeKind.ADD)]
    linked = tmp_path / "linked"
    subprocess.run(["cp", "-al", str(base), str(linked)], check=True)
    os.chmod(base / "a/b/f", 0o600)  # shared inode: the change is on both sides, so none
    assert changes(str(linked), str(base)) == []


def test_changes_size(tmp_path: Path) -> None:
    new, old = _pair(tmp_path)
    os.link(new / "dir/sub/added", new / "dir/sub/added2")
    ch = changes(str(new), str(old))
    expected = sum(len(n) for n in ("cap", "CONTENT-changed", "mode", "owner", "mtime", "now a file")) + 1  # links once
    assert changes_size(str(new), ch) == expected


def test_bad_roots_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ArchiveError, match="cannot open directory"):
        changes(str(tmp_path / "missing"), None)
    with pytest.raises(ArchiveError, match="cannot open directory"):
        apply_layer(str(tmp_path / "missing"), io.BytesIO(build_tar(reg("f"))))
    with pytest.raises(ArchiveError, match="cannot open directory"):
        b"".join(export_tree(str(tmp_path / "missing")))
    with pytest.raises(ArchiveError, match="invalid change path"):
        b"".join(export_changes(str(tmp_path), [Change("/a/../b", ChangeKind.ADD)]))
    with pytest.raises(ArchiveError, match="no longer exists"):
        b"".join(export_changes(str(tmp_path), [Change("/nope", ChangeKind.ADD)]))


# -- export and round trips -------------------------------------------------------------------------

def _rich_tree(root: Path) -> None:
    (root / "usr/bin").mkdir(parents=True)
    (root / "usr/bin/tool").write_bytes(os.urandom(5000))
    os.chmod(root / "usr/bin/tool", 0o4755)
    os.setxattr(root / "usr/bin/tool", "security.capability", CAP_V2)
    os.setxattr(root / "usr/bin/tool", "user.origin", b"test")
    os.link(root / "usr/bin/tool", root / "usr/bin/tool-alias")
    (root / "usr/big").write_bytes(os.urandom(3 << 20))
    (root / "tmp").mkdir(mode=0o1777)
    os.chmod(root / "tmp", 0o1777)
    (root / "srv").mkdir()
    os.chmod(root / "srv", 0o2775)
    os.chown(root / "srv", 33, 33)
    (root / "srv/data").write_text("www")
    os.chown(root / "srv/data", 33, 33)
    (root / "lib").symlink_to("usr/lib")
    os.mknod(root / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    os.mknod(root / "loop0", 0o660 | stat.S_IFBLK, os.makedev(7, 0))
    os.mkfifo(root / "fifo", 0o600)
    (root / ("n" * 150)).write_text("long name")
    (root / "empty").write_bytes(b"")
    for p in sorted(root.rglob("*"), reverse=True):
        _set_times(p, T0 + len(p.name))


def test_export_tree_round_trip(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    _rich_tree(src)
    data = tar_bytes(export_tree(str(src)))
    assert data == tar_bytes(export_tree(str(src)))  # deterministic
    out = tmp_path / "out"
    out.mkdir()
    apply(out, data)
    assert snapshot(out) == snapshot(src)
    assert changes(str(out), str(src)) == []
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        alias = tf.getmember("usr/bin/tool-alias")
        assert alias.islnk() and alias.linkname == "usr/bin/tool"
        assert tf.getnames()[:3] == ["empty", "fifo", "lib"]


def test_export_changes_round_trip(tmp_path: Path) -> None:
    parent = tmp_path / "parent"
    parent.mkdir()
    _rich_tree(parent)
    (parent / "etc/old").mkdir(parents=True)
    (parent / "etc/old/conf").write_text("c")
    (parent / "etc/keep").write_text("k")
    child = tmp_path / "child"
    subprocess.run(["cp", "-a", str(parent), str(child)], check=True)
    shutil.rmtree(child / "etc/old")
    os.unlink(child / "usr/big")
    (child / "usr/bin/tool").write_bytes(b"patched")
    os.chmod(child / "srv/data", 0o640)
    os.setxattr(child / "usr/bin/tool", "security.capability", CAP_RAW)
    os.mknod(child / "console", 0o600 | stat.S_IFCHR, os.makedev(5, 1))
    (child / "new/a").mkdir(parents=True)
    (child / "new/a/one").write_text("1")
    os.link(child / "new/a/one", child / "new/two")
    (child / "lib").unlink()
    (child / "lib").symlink_to("/usr/lib64")
    for p in [child / "usr/bin/tool", child / "srv/data", child / "console", child / "new/a/one", child / "new/a",
              child / "new", child / "lib", child / "etc", child / "usr", child / "usr/bin", child / "srv"]:
        _set_times(p, T0 + 1000)
    ch = changes(str(child), str(parent))
    data = tar_bytes(export_changes(str(child), ch))
    listed = names(data)
    assert listed == sorted(listed, key=os.fsencode)
    assert "etc/.wh.old" in listed and "usr/.wh.big" in listed and "etc/old/conf" not in listed
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        assert tf.getmember("new/two").islnk() and tf.getmember("new/two").linkname == "new/a/one"
        assert tf.getmember("usr/bin/tool").pax_headers["SCHILY.xattr.security.capability"].encode(
            "utf-8", "surrogateescape") == CAP_RAW
    applied = tmp_path / "applied"
    subprocess.run(["cp", "-a", str(parent), str(applied)], check=True)
    apply(applied, data)
    assert snapshot(applied) == snapshot(child)
    assert changes(str(applied), str(child)) == []


def test_namespaced_capability_is_exported_as_v2(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "ping").write_text("x")
    os.setxattr(src / "ping", "security.capability", CAP_V3)
    out = tmp_path / "out"
    out.mkdir()
    apply(out, tar_bytes(export_tree(str(src))))
    assert os.getxattr(out / "ping", "security.capability") == CAP_V2


def test_export_sub_second_mtimes_are_tolerated(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "d/f").write_text("f")
    _set_times(src / "d/f", T0 + 0.75)
    out = tmp_path / "out"
    out.mkdir()
    apply(out, tar_bytes(export_tree(str(src))))
    assert os.lstat(out / "d/f").st_mtime_ns == T0 * 10**9
    assert changes(str(out), str(src)) == []  # whole seconds on one side: the same time


# -- GNU tar as the outside judge ---------------------------------------------------------------

def test_gnu_tar_extracts_our_tars(tmp_path: Path) -> None:
    tar = require_tool("tar")
    src = tmp_path / "src"
    src.mkdir()
    _rich_tree(src)
    (tmp_path / "ours.tar").write_bytes(tar_bytes(export_tree(str(src))))
    out = tmp_path / "gnu"
    out.mkdir()
    r = subprocess.run([tar, "--xattrs", "--xattrs-include=*", "-xpf", str(tmp_path / "ours.tar"), "-C", str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert snapshot(out) == snapshot(src)


@pytest.mark.parametrize("fmt", ["posix", "gnu"])
def test_we_extract_gnu_tars_like_gnu_tar(tmp_path: Path, fmt: str) -> None:
    tar = require_tool("tar")
    src = tmp_path / "src"
    src.mkdir()
    _rich_tree(src)
    xattrs = ["--xattrs", "--xattrs-include=*"] if fmt == "posix" else []
    r = subprocess.run([tar, f"--format={fmt}", *xattrs, "-cf", str(tmp_path / "gnu.tar"), "-C", str(src), "."],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    by_gnu, by_us = tmp_path / "by_gnu", tmp_path / "by_us"
    by_gnu.mkdir()
    by_us.mkdir()
    subprocess.run([tar, *xattrs, "-xpf", str(tmp_path / "gnu.tar"), "-C", str(by_gnu)], check=True)
    with open(tmp_path / "gnu.tar", "rb") as f:
        apply_layer(str(by_us), f)
    assert snapshot(by_us) == snapshot(by_gnu)


def test_reader_iterates_what_it_was_given() -> None:
    data = build_tar(dir_("a"), reg("a/f", b"12345"), sym("a/s", "f"))
    reader = TarReader(io.BytesIO(data))  # type: ignore[arg-type]
    seen = [(e.name, e.type, e.size) for e in reader.entries()]
    assert seen == [("a/", "5", 0), ("a/f", "0", 5), ("a/s", "2", 0)]
