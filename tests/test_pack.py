"""thinpool pack / unpack: the thin_metadata_pack format, judged by the kernel-written packs."""

from __future__ import annotations

import hashlib
import os
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from thinpool.ondisk import checksum
from thinpool.ondisk.checksum import BLOCK_SIZE, Salt
from thinpool.thin.builder import format_metadata
from thinpool.thin.metadata import PoolMetadata
from thinpool.tools.pack import (MAGIC, RECORDS_PER_FRAME, PackError, PackReader, decode_block,
                                 encode_block, pack, unpack)

from conftest import KERNEL_FIXTURES, KERNEL_IMAGES, KERNEL_PACKS, run_tool
from test_cli import fails, ok
from thinmodel import assert_thin_check_clean

M64 = (1 << 64) - 1


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def records(path: Path) -> dict[int, bytes]:
    """Block number -> byte-code of every record in a pack."""
    with PackReader(path) as reader:
        return {rec.block: rec.program for rec in reader.records()}


def stored_blocks(image: Path) -> dict[int, bytes]:
    """Block number -> data of every block of an image with a valid checksum."""
    data = image.read_bytes()
    blocks = (data[i:i + BLOCK_SIZE] for i in range(0, len(data) - BLOCK_SIZE + 1, BLOCK_SIZE))
    return {b: d for b, d in enumerate(blocks) if checksum.classify(d) is not None}


# -- the kernel packs ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", KERNEL_IMAGES)
def test_kernel_pack_unpacks_byte_for_byte(name: str, kernel_index: dict, tmp_path: Path) -> None:
    """Each kernel pack regenerates the image thin_metadata_unpack made, as a sparse file."""
    out = tmp_path / "meta"
    summary = unpack(KERNEL_PACKS / f"{name}.pack", out)
    info = kernel_index[name]
    assert sha(out) == info["image_sha256"]
    assert (summary.nr_blocks, summary.stored_blocks) == (info["nr_blocks"], info["stored_blocks"])
    assert out.stat().st_size == info["image_bytes"]
    assert out.stat().st_blocks * 512 <= 2 * summary.stored_blocks * BLOCK_SIZE  # holes stay holes


@pytest.mark.parametrize("name", KERNEL_IMAGES)
def test_pack_matches_kernel_pack_programs(name: str, kernel_image, tmp_path: Path) -> None:
    """Packing a kernel image stores the same blocks with the very same byte-code.

    Only the compressed bytes may differ (thin_metadata_pack spreads records
    over threads in shuffled order); unpacking our pack gives the same image.
    """
    image = kernel_image(name)
    ours = tmp_path / "ours.pack"
    summary = pack(image, ours)
    theirs = records(KERNEL_PACKS / f"{name}.pack")
    mine = records(ours)
    assert sorted(mine) == sorted(theirs) == sorted(stored_blocks(image))
    assert mine == theirs
    assert summary.stored_blocks == len(theirs)
    out = tmp_path / "out"
    unpack(ours, out)
    assert out.read_bytes() == image.read_bytes()


def test_frames_hold_at_most_1024_records(kernel_image, tmp_path: Path) -> None:
    """The writer's frames: u64 length + one complete zlib stream of at most 1024 records."""
    ours = tmp_path / "ours.pack"
    pack(kernel_image("tmeta"), ours)  # 353 records: one frame
    big = tmp_path / "big"
    image = kernel_image("tmeta").read_bytes()
    superblock = image[:BLOCK_SIZE]
    with open(big, "wb") as f:       # 2500 copies of a valid block
        f.write(superblock * 2500)
    pack(big, ours)
    raw = ours.read_bytes()
    assert struct.unpack_from("<4Q", raw) == (MAGIC, 3, 4096, 2500)
    pos, counts = 32, []
    while pos < len(raw):
        (length,) = struct.unpack_from("<Q", raw, pos)
        stream = zlib.decompress(raw[pos + 8:pos + 8 + length])
        counts.append(len(stream) // (8 + 3 + BLOCK_SIZE))  # u64 + LIT_W w2 + the block
        pos += 8 + length
    assert counts == [RECORDS_PER_FRAME, RECORDS_PER_FRAME, 2500 - 2 * RECORDS_PER_FRAME]


# -- the command line and the real tools ---------------------------------------------------------
def test_cli_round_trip_judged_by_thin_tools(kernel_image, tmp_path: Path) -> None:
    """pack then unpack through the CLI: identical image, clean thin_check, same thin_dump."""
    name = "tmeta_with_shared_internals_and_leaves"
    packed, out = tmp_path / "m.pack", tmp_path / "m.bin"
    assert ok("pack", "-i", kernel_image(name), "-o", packed) == ""
    assert ok("unpack", "--input", packed, "--output", out) == ""
    assert out.read_bytes() == kernel_image(name).read_bytes()
    assert_thin_check_clean(out)
    dump = run_tool("thin_dump", out, check=True).stdout
    assert dump == (KERNEL_FIXTURES / f"{name}.thin_dump.xml").read_text()


def test_round_trip_keeps_checksummed_blocks_only(tmp_path: Path) -> None:
    """unpack(pack(x)) == x on every block with a valid checksum and zero elsewhere."""
    meta = tmp_path / "meta"
    with open(meta, "wb") as f:
        f.truncate(16 << 20)
    format_metadata(meta, 128, 1 << 16)
    with PoolMetadata(meta) as md:
        md.create_thin(0)
        for v in range(3000):
            md.insert(0, v * 7, md.alloc_data_block())
        md.create_snap(1, 0)
        for v in range(0, 3000, 5):
            md.insert(1, v * 7, md.alloc_data_block())
        md.commit()
    image = bytearray(meta.read_bytes())
    rng = np.random.default_rng(7)
    junk = [3000, 3001, 4000]  # unused blocks: random bytes, a node with a broken checksum
    image[3000 * BLOCK_SIZE:3002 * BLOCK_SIZE] = rng.bytes(2 * BLOCK_SIZE)
    victim = bytearray(stored_blocks(meta).popitem()[1])
    victim[100] ^= 1
    image[4000 * BLOCK_SIZE:4001 * BLOCK_SIZE] = victim
    damaged = tmp_path / "damaged"
    damaged.write_bytes(image)
    valid = stored_blocks(damaged)
    assert not set(junk) & set(valid) and len(valid) > 30

    summary = pack(damaged, tmp_path / "p")
    unpack(tmp_path / "p", tmp_path / "out")
    out = (tmp_path / "out").read_bytes()
    assert summary.stored_blocks == len(valid) and len(out) == len(image)
    expected = bytearray(len(image))
    for b, data in valid.items():
        expected[b * BLOCK_SIZE:(b + 1) * BLOCK_SIZE] = data
    assert out == expected
    assert_thin_check_clean(tmp_path / "out")


def test_sparse_image_holes_are_not_read(kernel_image, tmp_path: Path) -> None:
    """A 256 GiB sparse metadata file packs and unpacks at once (holes are skipped).

    Reading it block by block would take minutes; SEEK_DATA/SEEK_HOLE makes it
    the cost of the stored blocks.  The unpacked file is as sparse.
    """
    big = tmp_path / "big"
    shutil.copyfile(kernel_image("tmeta_with_empty_roots"), big)
    with open(big, "r+b") as f:
        f.truncate(256 << 30)
    ok("pack", "-i", big, "-o", tmp_path / "p")
    ok("unpack", "-i", tmp_path / "p", "-o", tmp_path / "out")
    out = tmp_path / "out"
    assert out.stat().st_size == 256 << 30 and out.stat().st_blocks * 512 < 1 << 20
    with open(out, "rb") as f:
        assert f.read(4 << 20) == kernel_image("tmeta_with_empty_roots").read_bytes()


# -- the byte-code machine -----------------------------------------------------------------------
def padded(program: bytes, emitted: int) -> bytes:
    """``program`` completed to a whole block by a LIT_W of zero bytes."""
    pad = BLOCK_SIZE - emitted
    return program + bytes([0xA2]) + pad.to_bytes(2, "little") + bytes(pad)


def literal(data: bytes) -> bytes:
    """LIT_W with a 2-byte length."""
    return b"\xa2" + len(data).to_bytes(2, "little") + data


def u64s(*values: int) -> bytes:
    return struct.pack(f"<{len(values)}Q", *values)


MACHINE_CASES = {
    "count then pos": (b"\x01\x05\x73\x12", u64s(5, 7, 9, 11)),
    "neg wraps": (b"\x01\x01\x32", u64s(1, M64)),
    "second count replaces the first": (b"\x02\x34\x12\x73\x72\x11", u64s(0x1234, 0x1235, 0x1236)),
    "pos_w wraps": (b"\x08" + b"\xff" * 8 + b"\x21\x02", u64s(M64, 1)),
    "neg_w": (b"\x01\x00\x44\x10\x00\x00\x00", u64s(0, M64 - 15)),
    "const8": (b"\x01\x07\x60\x14", u64s(*[7] * 21)),
    "count8": (b"\x01\x00\x81\x00\x11", u64s(*range(257))),
    "count 0 sets base without emitting": (b"\x01\x03\x70\x01\x09\x11", u64s(3, 10)),
    "shifted, high sub-program overshoots": (b"\xb0\x01" + b"\x72\x01\x05" + b"\x13",
                                             u64s(5 << 24 | 8)),
    "shifted keeps 40 + 24 bits": (b"\xb0\x01" + b"\x08" + b"\xff" * 8 + b"\x04" + b"\xff" * 4,
                                   u64s(M64)),
}


@pytest.mark.parametrize("case", MACHINE_CASES)
def test_machine_instructions(case: str) -> None:
    program, emitted = MACHINE_CASES[case]
    block = decode_block(padded(program, len(emitted)))
    assert block[:len(emitted)] == emitted and block[len(emitted):] == bytes(BLOCK_SIZE - len(emitted))


BAD_PROGRAMS = {
    "repeat before a literal": (padded(b"\x72\x91\x00", 0), "repeat count 2 before LIT"),
    "operand width 3": (b"\x03\x00\x00\x00", "operand width 3"),
    "unknown opcode": (b"\xc0", "unknown opcode 0xc"),
    "runs past the block": (b"\x01\x00" + padded(b"", 0), "LIT_W of 4096 bytes runs past the end"),
    "count runs past the block": (literal(bytes(4090)) + b"\x72\x01\x00", "SET runs past the end"),
    "ends early": (b"\x01", "ends before its block is complete"),
    "bytes left over": (padded(b"", 0) + b"\x11", "1 bytes of byte-code left"),
    "nested too deeply": (b"\xb0\x01" * 9, "SHIFTED nested too deeply"),
}


@pytest.mark.parametrize("case", BAD_PROGRAMS)
def test_machine_rejects(case: str) -> None:
    program, message = BAD_PROGRAMS[case]
    with pytest.raises(PackError) as raised:
        decode_block(program)
    assert message in str(raised.value)


RUN = st.tuples(st.integers(0, M64), st.one_of(st.integers(0, 20), st.integers(0, M64)),
                st.integers(1, 300))


@settings(max_examples=300, deadline=None)
@given(runs=st.lists(RUN, min_size=1, max_size=12),
       flags=st.sampled_from([1, 2, 2, 0, 3]),
       max_entries=st.one_of(st.integers(0, 254), st.integers(0, 600)),
       value_size=st.sampled_from([8, 8, 24, 16, 4, 0]),
       head=st.binary(min_size=8, max_size=8))
def test_encode_decode_round_trip(runs: list[tuple[int, int, int]], flags: int, max_entries: int,
                                  value_size: int, head: bytes) -> None:
    """Any block, coded as a node (arithmetic runs, wrap-around, odd headers) or not, decodes back."""
    values: list[int] = []
    for start, step, count in runs:
        values += [(start + step * k) & M64 for k in range(count)]
    values = (values * (508 // len(values) + 1))[:508]
    header = head[:4] + struct.pack("<IQIIII", flags, 42, 7, max_entries, value_size, 0)
    block = header + u64s(*values)
    assert decode_block(encode_block(block, node=True)) == block
    assert decode_block(encode_block(block, node=False)) == block


# -- bad input and refused outputs ---------------------------------------------------------------
def make_pack(path: Path, nr_blocks: int, frames: list[bytes], version: int = 3,
              block_size: int = 4096, magic: int = MAGIC) -> Path:
    """A pack written by hand: header, then each frame as u64 length + bytes."""
    out = struct.pack("<4Q", magic, version, block_size, nr_blocks)
    for frame in frames:
        out += struct.pack("<Q", len(frame)) + frame
    path.write_bytes(out)
    return path


def stream(*records: tuple[int, bytes]) -> bytes:
    return zlib.compress(b"".join(struct.pack("<Q", b) + p for b, p in records))


@pytest.fixture
def good(kernel_image) -> tuple[bytes, bytes]:
    """(superblock, btree node) of a kernel image, as valid blocks to build packs from."""
    image = kernel_image("tmeta_with_empty_roots").read_bytes()
    blocks = {checksum.classify(image[i:i + BLOCK_SIZE]): image[i:i + BLOCK_SIZE]
              for i in range(0, len(image), BLOCK_SIZE)}
    return blocks[Salt.SUPERBLOCK], blocks[Salt.NODE]


def bad_packs(tmp: Path, good: tuple[bytes, bytes]) -> dict[str, tuple[Path, str]]:
    sb, node = good
    real = (KERNEL_PACKS / "tmeta_with_empty_roots.pack").read_bytes()
    ok_frame = stream((0, literal(sb)), (5, encode_block(node, True)))
    flipped = bytearray(ok_frame)
    flipped[len(flipped) // 2] ^= 0xFF

    def put(name: str, data: bytes) -> Path:
        (tmp / name).write_bytes(data)
        return tmp / name

    return {
        "empty": (put("empty", b""), "not a thin_metadata_pack file (bad magic)"),
        "wrong magic": (make_pack(tmp / "magic", 10, [ok_frame], magic=MAGIC ^ 1), "bad magic"),
        "truncated header": (put("hdr", real[:20]), "truncated header"),
        "wrong version": (make_pack(tmp / "v2", 10, [ok_frame], version=2),
                          "unsupported pack version 2"),
        "wrong block size": (make_pack(tmp / "bs", 10, [ok_frame], block_size=8192),
                             "block size 8192, expected 4096"),
        "no blocks": (make_pack(tmp / "zero", 0, []), "impossible image size of 0 blocks"),
        "too many blocks": (make_pack(tmp / "huge", 1 << 51, [ok_frame]),
                            "impossible image size of 2251799813685248 blocks"),
        "truncated frame": (put("cut", real[:-10]), "(truncated)"),
        "truncated frame length": (put("len", real + b"\x01\x02\x03"), "truncated frame length"),
        "corrupt zlib": (make_pack(tmp / "z", 10, [bytes(flipped)]), "corrupt zlib stream"),
        "data after the stream": (make_pack(tmp / "after", 10, [ok_frame + b"xx"]),
                                  "bytes after the end of the zlib stream"),
        "truncated zlib": (make_pack(tmp / "tz", 10, [ok_frame[:-6]]), "zlib stream is truncated"),
        "byte-code past a block": (make_pack(tmp / "past", 10, [stream((0, literal(sb[:4090]) + b"\x01\x05"))]),
                                   "block 0: bad byte-code (SET runs past the end of the block)"),
        "record ends mid-block": (make_pack(tmp / "mid", 10, [stream((0, literal(sb)[:100]))]),
                                  "block 0: record ends before its block is complete"),
        "block beyond the image": (make_pack(tmp / "beyond", 10, [stream((10, literal(sb)))]),
                                   "block 10: beyond the end of the image (10 blocks)"),
        "block stored twice": (make_pack(tmp / "twice", 10, [ok_frame, stream((5, literal(node)))]),
                               "block 5: stored twice"),
        "no valid checksum": (make_pack(tmp / "csum", 10, [stream((3, literal(bytes(4096))))]),
                              "block 3: does not regenerate with a valid metadata checksum"),
    }


def test_bad_packs_fail_cleanly_leaving_output_untouched(good, tmp_path: Path) -> None:
    """Every kind of bad input: one error line, no traceback, the old output intact, no temp file."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    outdir = tmp_path / "out"
    outdir.mkdir()
    out = outdir / "meta"
    out.write_bytes(b"previous contents")
    for case, (path, message) in bad_packs(inputs, good).items():
        err = fails("unpack", "-i", path, "-o", out, match=message)
        assert str(path) in err, case
        assert out.read_bytes() == b"previous contents", case
        assert os.listdir(outdir) == ["meta"], case
        with pytest.raises(PackError) as raised:
            unpack(path, outdir / "new")
        assert message in str(raised.value), case
        assert os.listdir(outdir) == ["meta"], case


def test_hand_made_pack_is_accepted(good, tmp_path: Path) -> None:
    """The same builder makes a valid pack (so the failures above are the intended ones)."""
    sb, node = good
    path = make_pack(tmp_path / "p", 10, [stream((5, encode_block(node, True))), stream((0, literal(sb)))])
    unpack(path, tmp_path / "out")
    assert (tmp_path / "out").read_bytes() == sb + bytes(4 * BLOCK_SIZE) + node + bytes(4 * BLOCK_SIZE)


def test_output_that_is_the_input_is_refused(kernel_image, tmp_path: Path) -> None:
    packed = tmp_path / "m.pack"
    shutil.copyfile(KERNEL_PACKS / "tmeta_with_empty_roots.pack", packed)
    before = sha(packed)
    (tmp_path / "link").symlink_to(packed)
    fails("unpack", "-i", packed, "-o", packed, match="is the input file")
    fails("unpack", "-i", packed, "-o", tmp_path / "link", match="is the input file")
    assert sha(packed) == before
    meta = tmp_path / "meta"
    shutil.copyfile(kernel_image("tmeta_with_empty_roots"), meta)
    (tmp_path / "mlink").symlink_to(meta)
    fails("pack", "-i", meta, "-o", meta, match="is the input file")
    fails("pack", "-i", tmp_path / "mlink", "-o", meta, match="is the input file")
    assert meta.read_bytes() == kernel_image("tmeta_with_empty_roots").read_bytes()
    fails("unpack", "-i", packed, "-o", tmp_path, match="is a directory")
    fails("unpack", "-i", packed, "-o", tmp_path / "no" / "such", match="directory does not exist")
    fails("unpack", "-i", tmp_path / "missing.pack", "-o", tmp_path / "x", match="cannot open pack")
    fails("pack", "-i", tmp_path / "missing", "-o", tmp_path / "x", match="cannot open metadata")
    (tmp_path / "tiny").write_bytes(b"x" * 4095)
    fails("pack", "-i", tmp_path / "tiny", "-o", tmp_path / "x", match="smaller than one metadata block")
    assert sorted(os.listdir(tmp_path)) == ["link", "m.pack", "meta", "mlink", "tiny"]


def test_existing_metadata_needs_force(kernel_image, tmp_path: Path) -> None:
    """Like the Rust tools: an output holding thin metadata is overwritten only with -f."""
    packed = KERNEL_PACKS / "tmeta_with_empty_roots.pack"
    out = tmp_path / "meta"
    shutil.copyfile(kernel_image("tmeta_with_shared_internal_root"), out)
    out.chmod(0o640)
    fails("unpack", "-i", packed, "-o", out, match="already holds thin metadata (use --force")
    assert out.read_bytes() == kernel_image("tmeta_with_shared_internal_root").read_bytes()
    ok("unpack", "-i", packed, "-o", out, "-f")
    assert out.read_bytes() == kernel_image("tmeta_with_empty_roots").read_bytes()
    assert out.stat().st_mode & 0o777 == 0o640  # the replaced file keeps its permissions
    fails("pack", "-i", kernel_image("tmeta"), "-o", out, match="already holds thin metadata")
    ok("pack", "-i", kernel_image("tmeta"), "-o", out, "--force")
    assert records(out) == records(KERNEL_PACKS / "tmeta.pack")


# -- block devices -------------------------------------------------------------------------------
@pytest.fixture
def loop_device(tmp_path: Path):
    """A 6 MiB loop device over a file of random bytes (skipped where loop devices are unavailable)."""
    backing = tmp_path / "backing"
    backing.write_bytes(np.random.default_rng(1).bytes(6 << 20))
    if os.geteuid() != 0 or shutil.which("losetup") is None:
        pytest.skip("loop devices need root and losetup")
    r = subprocess.run(["losetup", "-f", "--show", str(backing)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"no loop device available: {r.stderr.strip()}")
    dev = r.stdout.strip()
    try:
        yield Path(dev)
    finally:
        subprocess.run(["losetup", "-d", dev], check=True)


def test_unpack_onto_a_block_device(loop_device: Path, kernel_image, tmp_path: Path) -> None:
    """The image range of a device is zeroed and written; a too-small device is left alone."""
    name = "tmeta_with_shared_internals_and_leaves"  # 4 MiB image, 6 MiB device
    image = kernel_image(name).read_bytes()
    with open(loop_device, "rb") as f:
        tail_before = f.read()[len(image):]
    ok("unpack", "-i", KERNEL_PACKS / f"{name}.pack", "-o", loop_device)
    with open(loop_device, "rb") as f:
        device = f.read()
    assert device[:len(image)] == image and device[len(image):] == tail_before
    assert_thin_check_clean(loop_device)
    fails("unpack", "-i", KERNEL_PACKS / f"{name}.pack", "-o", loop_device, match="already holds")
    ok("pack", "-i", loop_device, "-o", tmp_path / "dev.pack")  # 1536 blocks: the image + tail
    assert records(tmp_path / "dev.pack") == records(KERNEL_PACKS / f"{name}.pack")
    fails("pack", "-i", kernel_image(name), "-o", loop_device, match="is a block device")
    fails("unpack", "-i", KERNEL_PACKS / "tmeta.pack", "-o", loop_device, "-f",
          match="the image needs 67108864")
    with open(loop_device, "rb") as f:
        assert f.read() == device
