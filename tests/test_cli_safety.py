"""No data loss from a mistyped or unusual command, and clear errors for everything else.

Each case here was once seen to lose data or to end in a traceback; the tests run the
real command line in a subprocess and check both the message and that nothing the
command was given changed.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_cli import THINPOOL, fails, ok, sha, tp
from thinmodel import assert_thin_check_clean

BS = 64 * 1024
ROOT = os.geteuid() == 0


def read_bytes(*args: str | Path) -> bytes:
    r = tp("read", *args)
    assert r.returncode == 0, r.stderr.decode()
    return r.stdout


def make_pool(tmp_path: Path, *extra: str) -> Path:
    d = tmp_path / "pool"
    ok("pool", "create", d, "--data-size", "64M", "--metadata-size", "8M", *extra)
    return d


def image(tmp_path: Path, size: int = 4 << 20) -> Path:
    img = tmp_path / "disk.raw"
    with open(img, "wb") as f:
        f.truncate(size)
        f.seek(BS + 100)
        f.write(os.urandom(70_000))
        f.seek(size - 5)
        f.write(b"tail!")
    return img


# -- transaction ids ---------------------------------------------------------------------------

def test_docker_transaction_bracket_across_processes(tmp_path: Path) -> None:
    """Docker records the next id, sends the message, then set_transaction_id old new."""
    d = make_pool(tmp_path)
    ok("message", d, "create_thin 0")
    ok("message", d, "set_transaction_id 0 1")
    ok("message", d, "create_snap 1 0")
    ok("create-thin", d, "2", "--size", "1M")
    ok("pool", "resize", d, "--data-size", "128M")
    ok("message", d, "set_transaction_id 1 2")
    assert ok("status", d).split()[0] == "2"
    fails("message", d, "set_transaction_id 1 3", match="current is 2, not 1")
    ok("delete", d, "2")
    assert ok("status", d).split()[0] == "2"
    assert_thin_check_clean(d / "metadata")


# -- import-image from pipes and block devices --------------------------------------------------

def test_import_image_from_a_pipe(tmp_path: Path) -> None:
    d = make_pool(tmp_path)
    img = image(tmp_path)
    ok("create-thin", d, "0", "--size", "4M")
    ok("write", d, "0", "--offset", "3M", "-", input=b"old data that must go")
    ok("import-image", d, "0", "/dev/stdin", input=img.read_bytes())
    assert read_bytes(d, "0") == img.read_bytes()
    # the zero blocks of the stream stay unprovisioned: blocks 1, 2 and the last one
    assert ok("status", d, "--thin", "0").split()[0] == str(3 * 128)
    # through bash process substitution, as a user types it
    r = subprocess.run(["bash", "-c", f'"$@" import-image {d} 0 <(cat {img})', "x", *THINPOOL],
                       capture_output=True)
    assert r.returncode == 0, r.stderr
    assert read_bytes(d, "0") == img.read_bytes()


def test_import_image_from_a_pipe_longer_than_the_volume(tmp_path: Path) -> None:
    d = make_pool(tmp_path)
    ok("create-thin", d, "0", "--size", "1M")
    err = fails("import-image", d, "0", "/dev/stdin", input=b"x" * (2 << 20),
                match="longer than volume 0")
    assert "holds its first 1048576 bytes" in err


def test_import_image_larger_file_writes_nothing(tmp_path: Path) -> None:
    d = make_pool(tmp_path)
    ok("create-thin", d, "0", "--size", "1M")
    ok("write", d, "0", "-", input=b"keep me")
    fails("import-image", d, "0", image(tmp_path), match="nothing was written")
    assert ok("read", d, "0", "--length", "7") == "keep me"


@pytest.mark.skipif(not ROOT or not shutil.which("losetup"), reason="needs root and losetup")
def test_import_image_from_a_block_device(tmp_path: Path) -> None:
    d = make_pool(tmp_path)
    img = image(tmp_path)
    ok("create-thin", d, "0", "--size", "4M")
    loop = subprocess.run(["losetup", "-f", "--show", "-r", str(img)], capture_output=True,
                          text=True, check=True).stdout.strip()
    try:
        ok("import-image", d, "0", loop)
    finally:
        subprocess.run(["losetup", "-d", loop], check=True)
    assert read_bytes(d, "0") == img.read_bytes()


# -- pool create on existing metadata ----------------------------------------------------------

def test_pool_create_keeps_valid_metadata(tmp_path: Path) -> None:
    d = make_pool(tmp_path)
    ok("create-thin", d, "0", "--size", "1M")
    ok("write", d, "0", "-", input=b"precious")
    meta, data = tmp_path / "meta.img", tmp_path / "data.img"
    shutil.copyfile(d / "metadata", meta)
    shutil.copyfile(d / "data", data)
    before = sha(meta)
    out = ok("pool", "create", tmp_path / "again", "--data-dev", data, "--metadata-dev", meta)
    assert "using the existing dm-thin metadata" in out and "1 thin devices" in out
    assert ok("read", tmp_path / "again", "0", "--length", "8") == "precious"
    # the same through a table line
    shutil.copyfile(d / "metadata", meta)
    ok("pool", "create", tmp_path / "table", "--table",
       f"0 131072 thin-pool {meta} {data} 128 0")
    assert ok("read", tmp_path / "table", "0", "--length", "8") == "precious"
    # a different block size is refused, metadata unchanged
    shutil.copyfile(d / "metadata", meta)
    fails("pool", "create", tmp_path / "bs", "--data-dev", data, "--metadata-dev", meta,
          "--block-size", "128K", match="128-sector data blocks, not 256")
    assert sha(meta) == before and not (tmp_path / "bs").exists()
    # --format is the explicit way to start empty
    out = ok("pool", "create", tmp_path / "fresh", "--data-dev", data, "--metadata-dev", meta,
             "--format")
    assert "formatted new metadata" in out
    assert ok("list", tmp_path / "fresh").count("\n") == 1


def test_pool_create_refuses_foreign_metadata_content(tmp_path: Path) -> None:
    meta, data = tmp_path / "meta.img", tmp_path / "data.img"
    meta.write_bytes(b"my thesis, chapter 1" + bytes(1 << 20))
    data.write_bytes(bytes(1 << 20))
    before = sha(meta)
    fails("pool", "create", tmp_path / "p", "--data-dev", data, "--metadata-dev", meta,
          match="not valid dm-thin metadata")
    assert sha(meta) == before and not (tmp_path / "p").exists()
    fails("pool", "create", tmp_path / "p", "--data-dev", data, "--metadata-dev",
          tmp_path / "missing", match="no such file")


def test_failed_pool_create_leaves_nothing_behind(tmp_path: Path) -> None:
    for args, match in ((["--data-size", "0"], "smaller than one"),
                        (["--metadata-size", "100K"], "too small"),
                        (["--metadata-size", "20G"], "limit"),
                        (["--data-size", "99999999P"], "beyond what dm-thin can address")):
        fails("pool", "create", tmp_path / "p", *args, match=match)
        assert not (tmp_path / "p").exists()
    (tmp_path / "p").mkdir()
    fails("pool", "create", tmp_path / "p", "--data-size", "0", match="smaller than one")
    assert list((tmp_path / "p").iterdir()) == []  # an existing directory stays, empty
    ok("pool", "create", tmp_path / "p", "--data-size", "1M", "--metadata-size", "1M")


@pytest.mark.skipif(not ROOT, reason="needs root to mount a tmpfs")
def test_pool_create_on_a_full_disk_cleans_up(tmp_path: Path) -> None:
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8k", "tmpfs", str(mnt)], check=True)
    try:
        for _ in range(2):  # the retry fails the same way, not with "File exists"
            err = fails("pool", "create", mnt / "p", "--data-size", "64M",
                        "--metadata-size", "8M", match="No space left on device")
            assert "File exists" not in err
            assert not (mnt / "p").exists()
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


# -- restore, dump, export: inputs are never outputs -------------------------------------------

def test_restore_validates_input_before_touching_output(tmp_path: Path) -> None:
    d = make_pool(tmp_path)
    ok("create-thin", d, "0", "--size", "1M")
    meta = d / "metadata"
    before = sha(meta)
    fails("restore", "-i", tmp_path / "nonexistent.xml", "-o", meta, match="cannot open")
    bad = tmp_path / "bad.xml"
    xml = ok("dump", meta)
    bad.write_text(xml.replace("</superblock>", "<device"))
    fails("restore", "-i", bad, "-o", meta, match="line")
    beyond = tmp_path / "beyond.xml"
    beyond.write_text(xml.replace('</device>', '<single_mapping origin_block="0" '
                                  'data_block="5000" time="0"/></device>'))
    fails("restore", "-i", beyond, "-o", meta, match="beyond")
    # an output too small for what the XML needs: found by the dry run, output intact
    big = tmp_path / "big.xml"
    mappings = "".join(f'<single_mapping origin_block="{i * 2}" data_block="{i}" time="0"/>'
                       for i in range(60_000))
    big.write_text('<superblock uuid="" time="0" transaction="0" flags="0" version="2" '
                   'data_block_size="128" nr_data_blocks="100000"><device dev_id="1" '
                   f'mapped_blocks="60000" transaction="0" creation_time="0" snap_time="0">'
                   f'{mappings}</device></superblock>')
    small = tmp_path / "small.meta"
    shutil.copyfile(meta, small)
    os.truncate(small, 256 * 1024)
    small_before = sha(small)
    fails("restore", "-i", big, "-o", small, match="too small")
    assert sha(small) == small_before
    fails("restore", "-i", meta, "-o", meta, match="refusing to write")
    assert sha(meta) == before
    assert_thin_check_clean(meta)


def test_outputs_that_are_inputs_are_refused(tmp_path: Path) -> None:
    d = make_pool(tmp_path)
    ok("create-thin", d, "0", "--size", "1M")
    ok("write", d, "0", "-", input=b"data")
    origin = tmp_path / "origin.raw"
    origin.write_bytes(b"o" * BS)
    ok("create-thin", d, "1", "--origin", origin)
    (tmp_path / "link").symlink_to(d / "metadata")
    os.link(d / "data", tmp_path / "hardlink")
    sums = {p: sha(p) for p in (d / "metadata", d / "data", d / "volumes.log", origin)}
    for target in (d / "metadata", d / "data", d / "volumes.log", d / "pool.json",
                   tmp_path / "link", tmp_path / "hardlink", origin):
        fails("export-image", d, "0", target, match="refusing to write")
        fails("read", d, "0", "-o", target, match="refusing to write")
    fails("dump", d / "metadata", "-o", d / "metadata", match="refusing to write")
    fails("dump", d / "metadata", "-o", tmp_path / "link", match="refusing to write")
    fails("import-image", d, "0", d / "data", match="refusing")
    assert {p: sha(p) for p in sums} == sums
    assert_thin_check_clean(d / "metadata")


# -- ranges are checked first --------------------------------------------------------------------

def test_over_long_writes_and_reads_change_nothing(tmp_path: Path) -> None:
    d = make_pool(tmp_path)
    ok("create-thin", d, "0", "--size", "1M")
    ok("write", d, "0", "-", input=b"keep")
    src = tmp_path / "src"
    src.write_bytes(b"z" * (3 << 20))
    for source, inp in ((src, None), ("-", src.read_bytes())):
        err = fails("write", d, "0", source, input=inp, match="beyond the end of volume 0")
        assert "nothing was written" in err
    assert ok("read", d, "0", "--length", "4") == "keep"
    assert ok("status", d, "--thin", "0").split()[0] == "128"  # still one block mapped
    out = tmp_path / "out"
    err = fails("read", d, "0", "--length", "99999999999", "-o", out,
                match="range 0+99999999999 is beyond the end of volume 0")
    assert not out.exists()
    fails("read", d, "0", "--offset", "2M", match="beyond the end")


def test_offsets_and_lengths_take_units(tmp_path: Path) -> None:
    d = make_pool(tmp_path)
    ok("create-thin", d, "0", "--size", "4M")
    ok("write", d, "0", "--offset", "1M", "-", input=b"x" * (2 * BS))
    assert ok("status", d, "--thin", "0").split()[0] == str(2 * 128)
    assert ok("read", d, "0", "--offset", "1M", "--length", "1K") == "x" * 1024
    ok("discard", d, "0", "--offset", "1M", "--length", "1M")  # the README's example
    assert ok("status", d, "--thin", "0").split()[0] == "0"


# -- clear errors ---------------------------------------------------------------------------------

USAGE, FAILURE = 2, 1


@pytest.mark.parametrize("args,status,match", [
    (["pool", "create", "{tmp}/q", "--data-size", "99999999P"], FAILURE,
     "beyond what dm-thin can address"),
    (["pool", "create", "{tmp}/q", "--table", "0 99999999999999999999999 thin-pool m d 128 0"],
     FAILURE, "beyond what dm-thin can address"),
    (["pool", "resize", "{pool}", "--data-size", "99999999P"], FAILURE, "beyond what dm-thin"),
    (["pool", "resize", "{pool}", "--metadata-size", "20G"], FAILURE, "dm-thin's limit"),
    (["create-thin", "{pool}", "7", "--size", "99999999P"], FAILURE, "too large"),
    (["message", "{pool}", "create_thin \u00b2"], FAILURE, "Invalid device id"),
    (["message", "{pool}", "set_transaction_id \u0660 1"], FAILURE, "Invalid transaction id"),
    (["create-thin", "{pool}", "\u00b2"], USAGE, "invalid device id"),
    (["pool", "create", "{tmp}/q", "--data-size", "\uff15G"], USAGE, "invalid size"),
    (["read", "{pool}", "0", "-o", "/proc/version", "--length", "10"], FAILURE,
     "cannot write to /proc/version"),
    (["pool", "create", "{tmp}/q", "--block-size", "128K", "--table",
      "0 2048 thin-pool {tmp}/m {tmp}/d 128 0"], USAGE, "cannot be combined with --table"),
    (["pool", "create", "{tmp}/q", "--skip-block-zeroing", "--table",
      "0 2048 thin-pool {tmp}/m {tmp}/d 128 0"], USAGE, "--skip-block-zeroing cannot be"),
    (["create-thin", "{pool}", "8", "--name", "123"], FAILURE, "not all digits"),
    (["read", "{pool}", "0", "--offset", "-1"], USAGE, "invalid size"),
    (["frobnicate"], USAGE, "No such command"),
])
def test_clear_errors(tmp_path: Path, args: list[str], status: int, match: str) -> None:
    d = make_pool(tmp_path)
    ok("create-thin", d, "0", "--size", "1M")
    r = tp(*[a.format(tmp=tmp_path, pool=d) for a in args])
    err = r.stderr.decode()
    assert r.returncode == status, err
    assert "Traceback" not in err and match in err, err
    assert not (tmp_path / "q").exists()


def test_output_closed_early_ends_quietly(tmp_path: Path) -> None:
    d = make_pool(tmp_path)
    ok("create-thin", d, "0", "--size", "32M")
    r = subprocess.run(["bash", "-c", 'set -o pipefail; "$@" | head -c 10 >/dev/null',
                        "x", *THINPOOL, "read", str(d), "0"], capture_output=True)
    assert r.returncode == 141 and r.stderr == b"", r.stderr
    r = subprocess.run(["bash", "-c", 'set -o pipefail; "$@" | head -n 1 >/dev/null',
                        "x", *THINPOOL, "dump", str(d / "metadata")], capture_output=True)
    assert r.returncode in (0, 141) and r.stderr == b"", r.stderr


DEFAULT_SIGINT = ("import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
                  "os.execv(sys.executable, [sys.executable] + sys.argv[1:])")


def test_ctrl_c_exits_130(tmp_path: Path) -> None:
    d = make_pool(tmp_path)
    ok("create-thin", d, "0", "--size", "1M")
    # a write waiting for more input, with the pool open; SIGINT back to its default first,
    # since a shell ignores it in the programs it starts in the background (and Python
    # then keeps it ignored)
    proc = subprocess.Popen([sys.executable, "-c", DEFAULT_SIGINT, *THINPOOL[1:], "write", str(d),
                             "0", "-"], stdin=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdin is not None
    proc.stdin.write(b"partial")
    proc.stdin.flush()
    time.sleep(1.5)
    proc.send_signal(signal.SIGINT)
    err = proc.stderr.read() if proc.stderr else b""
    proc.wait(timeout=60)
    proc.stdin.close()
    assert proc.returncode == 130, err
    assert b"interrupted" in err and b"Traceback" not in err
    ok("status", d)  # the pool is not left locked


def test_demo_takes_a_directory(tmp_path: Path) -> None:
    out = ok("demo", tmp_path / "demo")
    assert "I am snap1" in out
    assert (tmp_path / "demo" / "pool" / "metadata").exists()  # kept: the user asked for it
    assert_thin_check_clean(tmp_path / "demo" / "pool" / "metadata")


# -- the snapshot family -------------------------------------------------------------------------

def test_list_tree_shows_the_family_with_thin_ls_counts(tmp_path: Path) -> None:
    d = make_pool(tmp_path)
    ok("create-thin", d, "0", "--size", "1M", "--name", "base")
    ok("write", d, "0", "-", input=b"a" * (3 * BS))
    ok("message", d, "create_snap 1 0")
    ok("write", d, "1", "-", input=b"b" * BS)
    ok("create-snap", d, "2", "1", "--name", "grandchild")
    ok("create-snap", d, "3", "0")
    ok("message", d, "create_thin 4")
    ok("write", d, "4", "-", input=b"c" * BS)
    tree = json.loads(ok("list", d, "--tree", "--json"))
    assert [r["id"] for r in tree] == [0, 4]
    base = tree[0]
    assert [s["id"] for s in base["snapshots"]] == [1, 3]
    assert [s["id"] for s in base["snapshots"][0]["snapshots"]] == [2]
    ls = {}
    for line in subprocess.run(["thin_ls", "--no-headers", "-o",
                                "DEV,MAPPED_BYTES,EXCLUSIVE_BYTES,SHARED_BYTES",
                                str(d / "metadata")],
                               capture_output=True, text=True, check=True).stdout.splitlines():
        dev, *counts = line.split()
        ls[int(dev)] = [int(c) for c in counts]

    def walk(nodes: list[dict]) -> None:
        for n in nodes:
            assert [n["mapped_bytes"], n["exclusive_bytes"], n["shared_bytes"]] == ls[n["id"]]
            walk(n["snapshots"])
    walk(tree)
    assert ls[4] == [BS, BS, 0] and ls[0] == [3 * BS, 0, 3 * BS] and ls[1] == [3 * BS, 0, 3 * BS]
    text = ok("list", d, "--tree")
    assert text.splitlines()[1].startswith("0 base") and "`- 2 grandchild" in text
    # a deleted parent leaves its snapshots as roots that say where they came from
    ok("delete", d, "1")
    text = ok("list", d, "--tree")
    assert "2 grandchild (snapshot of deleted 1)" in text


def test_list_tree_shows_unrecorded_snapshots_as_roots(tmp_path: Path) -> None:
    """Volumes snapshotted before thinpool recorded origins (old journal lines) are roots."""
    d = make_pool(tmp_path)
    ok("message", d, "create_thin 0")
    ok("message", d, "create_snap 1 0")
    (d / "volumes.log").write_bytes(
        b'{"tid":1,"set":{"0":{"size":1048576}},"del":[]}\n'
        b'{"tid":2,"set":{"1":{"size":1048576}},"del":[]}\n')
    tree = json.loads(ok("list", d, "--tree", "--json"))
    assert [(r["id"], r["snapshot_of"], r["snapshots"]) for r in tree] == \
        [(0, None, []), (1, None, [])]


def test_damaged_registry_line_is_reported(tmp_path: Path) -> None:
    d = make_pool(tmp_path)
    for i in range(3):
        ok("create-thin", d, str(i), "--size", f"{i + 1}M")
    journal = d / "volumes.log"
    lines = journal.read_bytes().split(b"\n")
    lines[1] = b"#" * len(lines[1])
    journal.write_bytes(b"\n".join(lines))
    r = tp("list", d)
    assert r.returncode == 0 and b"line 2" in r.stderr and b"skipped" in r.stderr
    assert journal.read_bytes() == b"\n".join(lines)  # a read-only open changes nothing
    r = tp("create-thin", d, "9", "--size", "1M")
    assert r.returncode == 0 and b"copy of the damaged journal" in r.stderr
    sizes = {int(l.split()[0]): int(l.split()[1]) for l in ok("list", d).splitlines()[1:]}
    assert sizes == {0: 1 << 20, 1: 64 << 20, 2: 3 << 20, 9: 1 << 20}
