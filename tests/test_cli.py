"""The thinpool command line: real subprocesses, clear one-line errors, no tracebacks."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from thinmodel import assert_thin_check_clean

THINPOOL = [sys.executable, "-m", "thinpool.cli"]


def tp(*args: str | Path, input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([*THINPOOL, *map(str, args)], capture_output=True, input=input,
                          timeout=120)


def ok(*args: str | Path, input: bytes | None = None) -> str:
    r = tp(*args, input=input)
    assert r.returncode == 0, r.stderr.decode()
    return r.stdout.decode()


def fails(*args: str | Path, match: str, input: bytes | None = None) -> str:
    r = tp(*args, input=input)
    err = r.stderr.decode()
    assert r.returncode != 0, f"expected failure: {args}"
    assert "Traceback" not in err, err
    assert match in err, err
    assert len([l for l in err.splitlines() if "rror" in l]) == 1, err
    return err


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_demo_runs() -> None:
    out = ok("demo")
    assert "hello world, I am a base" in out and "I am snap1" in out
    assert "discard_passdown" in out and ("<superblock" in out or "exit 0" in out)


def test_demo_falls_back_to_block_level_without_fuse(tmp_path: Path) -> None:
    """Where FUSE cannot mount (here /dev/fuse is /dev/null, in a private mount namespace)
    the demo says so and walks through at block level."""
    import shutil as sh
    if os.geteuid() != 0 or sh.which("unshare") is None:
        pytest.skip("needs root and unshare (a private mount namespace)")
    script = ('mount --bind /dev/null /dev/fuse && exec "$@"')
    r = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script,
                        "x", *THINPOOL, "demo", str(tmp_path / "d")], capture_output=True,
                       timeout=300)
    out = r.stdout.decode()
    assert r.returncode == 0, r.stderr.decode()
    assert "real filesystems are not possible here: attaching volume 0 failed" in out
    assert "I am snap1" in out and "<superblock" in out and "    clean" in out


def test_pool_lifecycle(tmp_path: Path) -> None:
    d = tmp_path / "pool"
    ok("pool", "create", d, "--data-size", "64M", "--metadata-size", "8M", "--block-size", "64K")
    ok("message", d, "create_thin 0")
    ok("write", d, "0", "--offset", "10", "-", input=b"hello world, I am a base")
    ok("create-snap", d, "1", "0", "--name", "snap")
    ok("write", d, "1", "--offset", "34", "-", input=b" I am snap1")
    assert ok("read", d, "0", "--offset", "10", "--length", "24") == "hello world, I am a base"
    assert ok("read", d, "1", "--offset", "10", "--length", "35") == \
        "hello world, I am a base I am snap1"
    ok("create-thin", d, "5", "--size", "1M")
    status = ok("status", d).split()
    assert status[0] == "0" and status[2] == "2/1024" and status[4] == "rw"
    assert ok("status", d, "--thin", "1").strip() == "128 127"
    assert '"mapped_sectors": 128' in ok("status", d, "--thin", "1", "--json")
    listing = ok("list", d)
    assert "snap" in listing and "1048576" in listing
    ok("discard", d, "1", "--offset", "0", "--length", "65536")
    assert ok("status", d, "--thin", "1").strip() == "0 -"
    ok("delete", d, "1")
    ok("create-snap", d, "2", "0")
    ok("write", d, "2", "--offset", "1M", "-", input=b"x" * 65536)  # one block of its own
    used = int(ok("status", d).split()[2].split("/")[0])
    ok("delete", d, "2", "--discard")  # frees (and punches) that block, not the shared ones
    assert int(ok("status", d).split()[2].split("/")[0]) == used - 1
    assert ok("read", d, "0", "--offset", "10", "--length", "24") == "hello world, I am a base"
    img = tmp_path / "img"
    ok("export-image", d, "0", img)
    assert img.read_bytes()[10:34] == b"hello world, I am a base"
    fails("import-image", d, "5", img, match="larger than volume")
    ok("create-thin", d, "6", "--size", "64M")
    ok("import-image", d, "6", img)
    assert ok("read", d, "6", "--offset", "10", "--length", "24") == "hello world, I am a base"
    ok("pool", "resize", d, "--data-size", "128M")
    assert ok("status", d).split()[2] == "2/2048"
    assert_thin_check_clean(d / "metadata")
    ok("check", d / "metadata")


def test_pool_create_with_table(tmp_path: Path) -> None:
    d = tmp_path / "pool"
    meta, data = tmp_path / "meta.img", tmp_path / "data.img"
    ok("pool", "create", d, "--metadata-size", "4M", "--table",
       f"0 20971520 thin-pool {meta} {data} 128 32768 1 skip_block_zeroing")
    assert data.stat().st_size == 20971520 * 512
    assert ok("status", d).split()[2] == "0/163840"
    fails("pool", "create", tmp_path / "p2", "--table",
          f"0 2048 thin-pool {meta} {data} 100 0", match="Invalid block size")
    fails("pool", "create", tmp_path / "p3", "--table",
          f"0 2048 thin-pool {meta} {data} 128 0 1 turbo", match="Unrecognised pool feature")


def test_cli_bad_input(tmp_path: Path) -> None:
    d = tmp_path / "pool"
    ok("pool", "create", d, "--data-size", "1M", "--metadata-size", "1M")
    fails("pool", "create", tmp_path / "x", "--block-size", "100K", match="Invalid block size")
    fails("pool", "create", tmp_path / "y", "--data-size", "lots", match="invalid size")
    fails("message", tmp_path, "create_thin 0", match="not a thinpool pool")
    fails("message", d, "create_thin zero", match="EINVAL")
    fails("message", d, "create_snap 1 0", match="ENODATA")
    fails("message", d, "what 1", match="Unrecognised")
    ok("create-thin", d, "0", "--size", "64K")
    fails("create-thin", d, "0", "--size", "64K", match="EEXIST")
    fails("read", d, "0", "--offset", "65000", "--length", "1000", match="beyond the end")
    fails("read", d, "9", match="does not exist")
    fails("write", d, "0", "--offset", "65530", "-", match="beyond the end", input=b"0123456789")
    fails("pool", "resize", d, "--data-size", "64K", match="cannot shrink")
    fails("status", d, "--thin", "99", match="does not exist")


def corruptions(tmp_path: Path, good: Path) -> dict[str, Path]:
    out = {}

    def variant(name: str, data: bytes) -> None:
        p = tmp_path / name
        p.write_bytes(data)
        out[name] = p

    raw = good.read_bytes()
    variant("truncated", raw[:2048])
    variant("zeroed", bytes(len(raw)))
    variant("garbage", os.urandom(64 * 1024))
    flipped = bytearray(raw)
    flipped[4096 + 100] ^= 0x10
    variant("flipped_bit", bytes(flipped))
    magic = bytearray(raw)
    magic[32] ^= 1
    variant("bad_checksum_superblock", bytes(magic))
    return out


def test_tools_reject_damaged_metadata(tmp_path: Path) -> None:
    d = tmp_path / "pool"
    ok("pool", "create", d, "--data-size", "16M", "--metadata-size", "1M")
    ok("create-thin", d, "0", "--size", "1M")
    ok("write", d, "0", "-", input=os.urandom(300_000))
    for name, path in corruptions(tmp_path, d / "metadata").items():
        before = sha(path)
        for cmd in (["check"], ["dump"], ["ls"]):
            r = tp(*cmd, path)
            err = r.stderr.decode()
            assert r.returncode != 0, (name, cmd)
            assert "Traceback" not in err, (name, cmd, err)
            assert err.strip(), (name, cmd)
        assert sha(path) == before, name


def test_restore_rejects_bad_xml(tmp_path: Path) -> None:
    meta = tmp_path / "meta"
    with open(meta, "wb") as f:
        f.truncate(4 << 20)
    head = '<superblock uuid="" time="0" transaction="1" flags="0" version="2" ' \
           'data_block_size="128" nr_data_blocks="100">'
    cases = {
        "unknown_element": (head + "<frob/></superblock>", "frob"),
        "missing_attribute": ('<superblock uuid="" time="0" transaction="1" '
                              'data_block_size="128"></superblock>', "nr_data_blocks"),
        "beyond_data": (head + '<device dev_id="1" mapped_blocks="1" transaction="0" '
                        'creation_time="0" snap_time="0"><single_mapping origin_block="0" '
                        'data_block="100" time="0"/></device></superblock>', "beyond"),
        "not_xml": ("this is not xml", "line"),
    }
    for name, (text, match) in cases.items():
        xml = tmp_path / f"{name}.xml"
        xml.write_text(text)
        before = sha(xml)
        fails("restore", "-i", xml, "-o", meta, match=match)
        assert sha(xml) == before
