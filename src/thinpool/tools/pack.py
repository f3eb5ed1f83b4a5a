"""thin_metadata_pack / thin_metadata_unpack: the pack format of thin-provisioning-tools 1.x.

A pack keeps only the blocks of a metadata device that carry a valid
persistent-data checksum, each as a short program for a byte-code machine,
inside zlib-compressed frames.  All integers are little-endian::

    header  4 x u64: MAGIC, VERSION (3), BLOCK_SIZE (4096), nr_blocks of the image
    frames  to the end of the file: u64 length, then that many bytes holding
            exactly one complete zlib stream
    stream  records: u64 block number, then the program that emits the 4096
            bytes of that block

The machine has one u64 register, ``base``, zero at the start of every block;
"emit" appends ``base`` as a u64.  An instruction's first byte holds the
opcode in its high nibble and an argument ``n`` in its low nibble; ``W(n)`` is
an operand of n bytes, n being 1, 2, 4 or 8::

    0 SET     base = W(n), emit               6 CONST8   emit (n << 8 | u8) times
    1 POS     base += n, emit                 7 COUNT    repeat := n
    2 POS_W   base += W(n), emit              8 COUNT8   repeat := n << 8 | u8
    3 NEG     base -= n, emit                 9 LIT      copy n bytes
    4 NEG_W   base -= W(n), emit              A LIT_W    copy W(n) bytes
    5 CONST   emit n times                    B SHIFTED  len = n << 8 | u8; two sub-
                                                         programs follow, "high" and
                                                         "low", each emitting len u64s;
                                                         emits high << 24 | low & 0xFFFFFF

A COUNT/COUNT8 prefix runs the next SET/POS*/NEG* ``repeat`` times (a second
prefix replaces the first); CONST*/LIT* accept only a repeat of 1 and SHIFTED
ignores it.  Arithmetic wraps modulo 2**64.  A sub-program runs until it has
emitted at least its len u64s (any excess is dropped); a block's program must
emit exactly 4096 bytes.

The writer codes btree nodes as thin-provisioning-tools does: the 32-byte
header as a literal, the ``max_entries`` keys with the delta code (SET, then
one instruction per maximal run of equal differences), u64 values the same way
(internal nodes) or as a SHIFTED pair (leaves with 8-byte values: block<<24 |
time mappings, subtree roots), other leaf values and the slack at the end of
the block as literals.  Every other stored block is one literal.  Records go
out in block order, 1024 per frame, at zlib level 6.

Stored blocks are those whose checksum is valid for one of the four
persistent-data block types dm-thin uses (``thinpool.ondisk.checksum.Salt``);
the Rust tools also know cache/era superblocks and array blocks, which thin
metadata never holds and which ``unpack`` rejects like any block that does not
regenerate with a valid checksum.
"""

from __future__ import annotations

import errno
import fcntl
import os
import secrets
import stat
import struct
import sys
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np

from ..errors import ThinpoolError
from ..ondisk import checksum
from ..ondisk.checksum import BLOCK_SIZE, Salt
from ..ondisk.node import HEADER, HEADER_SIZE, LEAF
from ..outputs import same_file
from ..pdata.blockio import device_size

MAGIC = 0xA537A0AA6309EF77
VERSION = 3
RECORDS_PER_FRAME = 1024
"""Records per zlib frame when packing (what thin_metadata_pack writes)."""
ZLIB_LEVEL = 6
MAX_PROGRAM = 1 << 20
"""Longest byte-code accepted for one block; real programs stay under 10 KiB."""
MAX_NESTING = 8
"""Deepest SHIFTED-inside-SHIFTED nesting accepted (writers never nest)."""

_HEADER = struct.Struct("<4Q")
_U64 = struct.Struct("<Q")
_M64 = (1 << 64) - 1
_LOW24 = np.uint64((1 << 24) - 1)
_SHIFT24 = np.uint64(24)
_MAX_REPEAT = 4095        # largest COUNT8 / CONST8 argument
_INFLATE_STEP = 1 << 20   # decompressed bytes produced per step
_READ_BLOCKS = 256        # blocks per read when packing (1 MiB)
_RUN_BLOCKS = 256         # consecutive blocks gathered into one write when unpacking
_BLKZEROOUT = 0x127F      # _IO(0x12, 127): zero a byte range of a block device

(_SET, _POS, _POS_W, _NEG, _NEG_W, _CONST, _CONST8, _COUNT, _COUNT8,
 _LIT, _LIT_W, _SHIFTED) = range(12)
_NAMES = ("SET", "POS", "POS_W", "NEG", "NEG_W", "CONST", "CONST8", "COUNT", "COUNT8",
          "LIT", "LIT_W", "SHIFTED")


class PackError(ThinpoolError):
    """A pack file that cannot be read, or an output that must not be written."""


@dataclass(frozen=True, slots=True)
class PackRecord:
    """One stored block: its number, its 4096 bytes and the byte-code that made them."""

    block: int
    data: bytes
    program: bytes


@dataclass(frozen=True, slots=True)
class PackSummary:
    nr_blocks: int       # blocks in the image
    stored_blocks: int   # blocks held by the pack


# -- the byte-code writer ------------------------------------------------------------------------
def encode_block(block: bytes, node: bool) -> bytes:
    """The program that regenerates ``block`` (4096 bytes).

    ``node`` selects the btree-node coding; a node whose header does not
    describe arrays that fit the block is coded as one literal (the Rust tool
    gives up on such a node), which decodes to the same bytes.
    """
    out = bytearray()
    if node:
        _csum, flags, _nr, _n, max_entries, value_size, _pad = HEADER.unpack_from(block, 0)
        leaf = flags == LEAF
        u64_values = not leaf or value_size == 8
        keys_end = HEADER_SIZE + 8 * max_entries
        values_end = keys_end + (8 * max_entries if u64_values else 0)
        if values_end <= BLOCK_SIZE:
            _put_literal(out, block[:HEADER_SIZE])
            _put_u64s(out, np.frombuffer(block, "<u8", max_entries, HEADER_SIZE))
            if u64_values:
                values = np.frombuffer(block, "<u8", max_entries, keys_end)
                if leaf:
                    _put_shifted(out, values)
                else:
                    _put_u64s(out, values)
            if values_end < BLOCK_SIZE:
                _put_literal(out, block[values_end:])
            return bytes(out)
    _put_literal(out, block)
    return bytes(out)


def _put_wide(out: bytearray, op: int, value: int) -> None:
    """``op`` with the narrowest operand width that holds ``value``."""
    width = 1 if value < 1 << 8 else 2 if value < 1 << 16 else 4 if value < 1 << 32 else 8
    out.append(op << 4 | width)
    out += value.to_bytes(width, "little")


def _put_literal(out: bytearray, data: bytes) -> None:
    if len(data) < 16:
        out.append(_LIT << 4 | len(data))
    else:
        _put_wide(out, _LIT_W, len(data))
    out += data


def _put_u64s(out: bytearray, values: np.ndarray) -> None:
    """Delta code of a u64 array: SET of the first, then one run per stretch of equal steps."""
    if values.size == 0:
        return
    ns = values.tolist()
    _put_wide(out, _SET, ns[0])
    if len(ns) == 1:
        return
    steps = np.diff(values)  # uint64: wraps modulo 2**64 like the machine
    cuts = (np.flatnonzero(steps[1:] != steps[:-1]) + 1).tolist()
    for start, stop in zip([0, *cuts], [*cuts, len(ns) - 1]):
        while start < stop:
            count = min(stop - start, _MAX_REPEAT)
            prev, cur = ns[start], ns[start + 1]
            if cur == prev:
                if count < 16:
                    out.append(_CONST << 4 | count)
                else:
                    out += bytes((_CONST8 << 4 | count >> 8, count & 0xFF))
            else:
                if count >= 16:
                    out += bytes((_COUNT8 << 4 | count >> 8, count & 0xFF))
                elif count > 1:
                    out.append(_COUNT << 4 | count)
                up = cur > prev
                step = cur - prev if up else prev - cur
                if step < 16:
                    out.append((_POS if up else _NEG) << 4 | step)
                else:
                    _put_wide(out, _POS_W if up else _NEG_W, step)
            start += count


def _put_shifted(out: bytearray, values: np.ndarray) -> None:
    """SHIFTED: the high 40 bits and the low 24 bits of each value as two delta-coded arrays."""
    n = int(values.size)
    out += bytes((_SHIFTED << 4 | n >> 8, n & 0xFF))
    _put_u64s(out, values >> _SHIFT24)
    _put_u64s(out, values & _LOW24)


# -- the byte-code machine -----------------------------------------------------------------------
class _Truncated(Exception):
    """The program needs bytes beyond the end of the buffer it was given."""


class _BadCode(Exception):
    """The program is invalid; str() says why."""


def decode_block(program: bytes) -> bytes:
    """Run one block's program; it must emit exactly 4096 bytes and be consumed entirely."""
    out = bytearray()
    try:
        end, _base = _run(program, 0, out, BLOCK_SIZE, BLOCK_SIZE, 0, 0)
    except _Truncated:
        raise PackError("byte-code ends before its block is complete") from None
    except _BadCode as e:
        raise PackError(f"bad byte-code: {e}") from None
    if end != len(program):
        raise PackError(f"{len(program) - end} bytes of byte-code left after the block")
    return bytes(out)


def _operand(buf: bytes, pos: int, width: int) -> tuple[int, int]:
    if width not in (1, 2, 4, 8):
        raise _BadCode(f"operand width {width}")
    end = pos + width
    if end > len(buf):
        raise _Truncated
    return int.from_bytes(buf[pos:end], "little"), end


def _run(buf: bytes, pos: int, out: bytearray, goal: int, limit: int, base: int,
         depth: int) -> tuple[int, int]:
    """Execute from ``buf[pos]`` until ``out`` holds ``goal`` bytes; returns (pos, base).

    Output past ``limit`` is invalid (raised before it is produced).  Raises
    ``_Truncated`` when ``buf`` ends first and ``_BadCode`` on an invalid
    instruction.
    """
    size = len(buf)
    while len(out) < goal:
        if pos >= size:
            raise _Truncated
        op = buf[pos]
        pos += 1
        tag, n = op >> 4, op & 15
        repeat = 1
        while tag == _COUNT or tag == _COUNT8:
            if tag == _COUNT:
                repeat = n
            else:
                if pos >= size:
                    raise _Truncated
                repeat = n << 8 | buf[pos]
                pos += 1
            if pos >= size:
                raise _Truncated
            op = buf[pos]
            pos += 1
            tag, n = op >> 4, op & 15
        if tag <= _NEG_W:
            if tag == _SET:
                base, pos = _operand(buf, pos, n)
                step = 0
            elif tag == _POS:
                step = n
            elif tag == _NEG:
                step = -n
            else:
                step, pos = _operand(buf, pos, n)
                if tag == _NEG_W:
                    step = -step
            if len(out) + 8 * repeat > limit:
                raise _BadCode(f"{_NAMES[tag]} runs past the end of the block")
            if repeat == 1:
                base = (base + step) & _M64
                out += _U64.pack(base)
            elif step == 0:
                out += _U64.pack(base) * repeat
            elif repeat:
                values = [(base + step * k) & _M64 for k in range(1, repeat + 1)]
                out += struct.pack(f"<{repeat}Q", *values)
                base = values[-1]
        elif tag <= _LIT_W:  # CONST, CONST8, LIT, LIT_W (COUNT* were consumed above)
            if repeat != 1:
                raise _BadCode(f"repeat count {repeat} before {_NAMES[tag]}")
            if tag == _CONST or tag == _CONST8:
                times = n
                if tag == _CONST8:
                    if pos >= size:
                        raise _Truncated
                    times = n << 8 | buf[pos]
                    pos += 1
                if len(out) + 8 * times > limit:
                    raise _BadCode(f"{_NAMES[tag]} runs past the end of the block")
                out += _U64.pack(base) * times
            else:
                length = n
                if tag == _LIT_W:
                    length, pos = _operand(buf, pos, n)
                if len(out) + length > limit:
                    raise _BadCode(f"{_NAMES[tag]} of {length} bytes runs past the end of the block")
                if pos + length > size:
                    raise _Truncated
                out += buf[pos:pos + length]
                pos += length
        elif tag == _SHIFTED:
            if depth >= MAX_NESTING:
                raise _BadCode("SHIFTED nested too deeply")
            if pos >= size:
                raise _Truncated
            count = n << 8 | buf[pos]
            pos += 1
            if len(out) + 8 * count > limit:
                raise _BadCode("SHIFTED runs past the end of the block")
            high, low = bytearray(), bytearray()
            pos, base = _run(buf, pos, high, 8 * count, sys.maxsize, base, depth + 1)
            pos, base = _run(buf, pos, low, 8 * count, sys.maxsize, base, depth + 1)
            h = np.frombuffer(high, "<u8", count)
            lo = np.frombuffer(low, "<u8", count)
            out += ((h << _SHIFT24) | (lo & _LOW24)).tobytes()
        else:
            raise _BadCode(f"unknown opcode {tag:#x}")
    return pos, base


# -- reading pack files --------------------------------------------------------------------------
class _Inflater:
    """The decompressed bytes of one frame, produced a step at a time."""

    def __init__(self, compressed: bytes) -> None:
        self._z = zlib.decompressobj()
        self._pending = compressed
        self.buf = b""
        self.done = False

    def refill(self, keep_from: int, at_least: int) -> None:
        """Drop ``buf[:keep_from]`` and append ``at_least`` more bytes (fewer at the stream's end).

        Raises ``PackError`` for a corrupt or truncated zlib stream or for
        bytes after its end.
        """
        pieces = [self.buf[keep_from:]]
        got = 0
        while got < at_least and not self.done:
            try:
                if self._pending:
                    piece = self._z.decompress(self._pending, _INFLATE_STEP)
                    self._pending = self._z.unconsumed_tail
                else:
                    piece = self._z.flush()
            except zlib.error as e:
                raise PackError(f"corrupt zlib stream ({e})") from None
            pieces.append(piece)
            got += len(piece)
            if self._z.eof:
                self.done = True
                if self._z.unused_data or self._pending:
                    raise PackError("bytes after the end of the zlib stream")
            elif not self._pending and not piece:
                raise PackError("zlib stream is truncated")
        self.buf = b"".join(pieces)


class PackReader:
    """A pack file, opened and its header checked; ``records()`` validates the rest.

    The header must have the right magic, version 3, block size 4096 and at
    least one block; ``PackError`` otherwise.  Use as a context manager.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        try:
            self._file: BinaryIO = open(self.path, "rb")
        except OSError as e:
            raise PackError(f"cannot open pack {self.path}: {e.strerror}") from None
        try:
            self.stat = os.fstat(self._file.fileno())
            self.nr_blocks = self._read_header()
        except BaseException:
            self._file.close()
            raise

    def __enter__(self) -> PackReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self._file.close()

    def _fail(self, problem: str) -> PackError:
        return PackError(f"{self.path}: {problem}")

    def _read_header(self) -> int:
        raw = self._file.read(_HEADER.size)
        if len(raw) < 8 or _U64.unpack_from(raw)[0] != MAGIC:
            raise self._fail("not a thin_metadata_pack file (bad magic)")
        if len(raw) < _HEADER.size:
            raise self._fail("truncated header")
        _magic, version, block_size, nr_blocks = _HEADER.unpack(raw)
        if version != VERSION:
            raise self._fail(f"unsupported pack version {version} (only {VERSION} is known)")
        if block_size != BLOCK_SIZE:
            raise self._fail(f"block size {block_size}, expected {BLOCK_SIZE}")
        if not 0 < nr_blocks <= ((1 << 63) - 1) // BLOCK_SIZE:  # sizes must fit an off_t
            raise self._fail(f"impossible image size of {nr_blocks} blocks")
        return int(nr_blocks)

    def records(self) -> Iterator[PackRecord]:
        """Every record, validated, in file order.

        Raises ``PackError`` (naming the frame's offset) for a truncated frame,
        a corrupt zlib stream, invalid byte-code, a block number outside the
        image, a block stored twice, or a block that does not regenerate with
        a valid metadata checksum.
        """
        f = self._file
        f.seek(_HEADER.size)
        offset = _HEADER.size
        size = device_size(f.fileno())
        seen: set[int] = set()
        while offset < size:
            raw = f.read(8)
            if len(raw) < 8:
                raise self._fail(f"truncated frame length at byte {offset}")
            length = _U64.unpack(raw)[0]
            if length > size - offset - 8:
                raise self._fail(f"frame at byte {offset} holds {length} bytes but only "
                                 f"{size - offset - 8} remain (truncated)")
            compressed = f.read(length)
            if len(compressed) != length:
                raise self._fail(f"short read of the frame at byte {offset}")
            yield from self._frame_records(compressed, offset, seen)
            offset += 8 + length

    def _frame_records(self, compressed: bytes, offset: int, seen: set[int]) -> Iterator[PackRecord]:
        inflater = _Inflater(compressed)
        start = 0
        block = -1
        try:
            while True:
                buf = inflater.buf
                if start == len(buf):
                    if inflater.done:
                        return
                    inflater.refill(start, _INFLATE_STEP)
                    start = 0
                    continue
                try:
                    if start + 8 > len(buf):
                        raise _Truncated
                    block = _U64.unpack_from(buf, start)[0]
                    out = bytearray()
                    end, _base = _run(buf, start + 8, out, BLOCK_SIZE, BLOCK_SIZE, 0, 0)
                except _Truncated:
                    if inflater.done:
                        raise PackError("record ends before its block is complete") from None
                    if len(buf) - start > MAX_PROGRAM + 8:
                        raise PackError(f"byte-code longer than {MAX_PROGRAM} bytes") from None
                    inflater.refill(start, max(_INFLATE_STEP, len(buf) - start))
                    start = 0
                    continue
                if block >= self.nr_blocks:
                    raise PackError(f"beyond the end of the image ({self.nr_blocks} blocks)")
                if block in seen:
                    raise PackError("stored twice")
                if checksum.classify(out) is None:
                    raise PackError("does not regenerate with a valid metadata checksum")
                seen.add(block)
                yield PackRecord(block, bytes(out), buf[start + 8:end])
                start, block = end, -1
        except _BadCode as e:
            raise self._fail(f"frame at byte {offset}, block {block}: bad byte-code ({e})") from None
        except PackError as e:
            where = f", block {block}" if block >= 0 else ""
            raise self._fail(f"frame at byte {offset}{where}: {e}") from None


# -- outputs -------------------------------------------------------------------------------------
def _holds_metadata(path: str) -> bool:
    """Whether block 0 of ``path`` is a valid thin superblock (unreadable counts as no)."""
    try:
        with open(path, "rb") as f:
            first = f.read(BLOCK_SIZE)
    except OSError:
        return False
    return len(first) == BLOCK_SIZE and checksum.classify(first) == Salt.SUPERBLOCK


def _check_output(path: str | os.PathLike[str], source: os.stat_result, force: bool,
                  device_ok: bool) -> tuple[str, bool]:
    """(resolved output path, whether it is a block device), or ``PackError``.

    Refuses the input itself (also through symlinks or other device nodes), a
    directory or other special file, a block device unless ``device_ok``, and,
    unless ``force``, an output whose block 0 is a thin superblock.
    """
    name = os.fspath(path)
    real = os.path.realpath(name)
    try:
        st = os.stat(real)
    except FileNotFoundError:
        if not os.path.isdir(os.path.dirname(real)):
            raise PackError(f"cannot create {name}: its directory does not exist") from None
        return real, False
    if same_file(st, source):
        raise PackError(f"output {name} is the input file")
    device = stat.S_ISBLK(st.st_mode)
    if not (stat.S_ISREG(st.st_mode) or (device and device_ok)):
        kind = "a block device" if device else "not a regular file"
        raise PackError(f"output {name} is {kind}")
    if not force and _holds_metadata(real):
        raise PackError(f"output {name} already holds thin metadata (use --force to overwrite it)")
    return real, device


@contextmanager
def _replacing(real: str) -> Iterator[int]:
    """A new file beside ``real`` that replaces it (rename) only if the block succeeds.

    Yields its descriptor.  The new file keeps the old one's permission bits
    (umask-based ones when there was none), is fsynced before the rename and
    the directory after it; on any error it is removed and ``real`` is untouched.
    """
    directory, base = os.path.split(real)
    tmp = os.path.join(directory, f".{base}.{secrets.token_hex(6)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
    except OSError as e:
        raise PackError(f"cannot create a file in {directory}: {e.strerror}") from None
    try:
        try:
            os.fchmod(fd, stat.S_IMODE(os.stat(real).st_mode))
        except FileNotFoundError:
            pass
        yield fd
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.replace(tmp, real)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        os.unlink(tmp)
        raise
    dfd = os.open(directory, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _write_records(fd: int, records: Iterator[PackRecord]) -> int:
    """pwrite every record's block, consecutive blocks gathered; returns the count."""
    count = 0
    first, run = -1, list[bytes]()
    for rec in records:
        count += 1
        if run and rec.block == first + len(run) and len(run) < _RUN_BLOCKS:
            run.append(rec.data)
            continue
        if run:
            _pwrite_all(fd, b"".join(run), first * BLOCK_SIZE)
        first, run = rec.block, [rec.data]
    if run:
        _pwrite_all(fd, b"".join(run), first * BLOCK_SIZE)
    return count


# -- unpack --------------------------------------------------------------------------------------
def unpack(pack_path: str | os.PathLike[str], out_path: str | os.PathLike[str],
           force: bool = False) -> PackSummary:
    """Regenerate the metadata image of a pack into ``out_path``.

    A regular file (new or replaced) becomes exactly the image: the stored
    blocks written, every other block a hole.  It is built beside the output
    and renamed over it only once the whole pack has decoded, so bad input
    (``PackError``) leaves the output untouched.  An existing block device, at
    least as large as the image, is written only after a first pass has
    validated the whole pack: its image range is zeroed, then the stored
    blocks are written.  Refuses the pack file itself as output and, unless
    ``force``, an output that already holds thin metadata.
    """
    with PackReader(pack_path) as reader:
        size = reader.nr_blocks * BLOCK_SIZE
        real, device = _check_output(out_path, reader.stat, force, device_ok=True)
        if not device:
            with _replacing(real) as fd:
                try:
                    os.ftruncate(fd, size)
                except OSError as e:
                    raise PackError(f"cannot make {os.fspath(out_path)} {size} bytes long: "
                                    f"{e.strerror}") from None
                stored = _write_records(fd, reader.records())
            return PackSummary(reader.nr_blocks, stored)
        for _rec in reader.records():
            pass
        fd = os.open(real, os.O_WRONLY | os.O_CLOEXEC)
        try:
            if device_size(fd) < size:
                raise PackError(f"{os.fspath(out_path)} has {device_size(fd)} bytes, "
                                f"the image needs {size}")
            fcntl.ioctl(fd, _BLKZEROOUT, struct.pack("=QQ", 0, size))
            stored = _write_records(fd, reader.records())
            os.fsync(fd)
        finally:
            os.close(fd)
        return PackSummary(reader.nr_blocks, stored)


# -- pack ----------------------------------------------------------------------------------------
def _data_extents(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """Byte ranges of ``fd`` that may hold data: SEEK_DATA/SEEK_HOLE, or everything."""
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:     # only a hole from pos to the end
                return
            if e.errno in (errno.EINVAL, errno.EOPNOTSUPP) and pos == 0:
                yield 0, size              # no hole support: read everything
                return
            raise
        if start >= size:
            return
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        yield start, end
        pos = end


def _stored_blocks(fd: int, nr_blocks: int, path: str) -> Iterator[tuple[int, bytes, Salt]]:
    """(block number, data, kind) of every block with a valid checksum, in block order."""
    done = 0  # blocks below this were examined
    for start, end in _data_extents(fd, nr_blocks * BLOCK_SIZE):
        first = max(start // BLOCK_SIZE, done)
        last = min(-(-end // BLOCK_SIZE), nr_blocks)
        for chunk_first in range(first, last, _READ_BLOCKS):
            n = min(_READ_BLOCKS, last - chunk_first)
            data = os.pread(fd, n * BLOCK_SIZE, chunk_first * BLOCK_SIZE)
            if len(data) != n * BLOCK_SIZE:
                raise PackError(f"short read from {path} at block {chunk_first}")
            used = np.flatnonzero(np.frombuffer(data, np.uint64).reshape(n, -1).any(axis=1))
            for i in used.tolist():
                block = data[i * BLOCK_SIZE:(i + 1) * BLOCK_SIZE]
                kind = checksum.classify(block)
                if kind is not None:
                    yield chunk_first + i, block, kind
        done = max(done, last)


def pack(metadata_path: str | os.PathLike[str], pack_path: str | os.PathLike[str],
         force: bool = False) -> PackSummary:
    """Write a pack of the metadata file or device at ``metadata_path``.

    Only blocks with a valid checksum are stored (holes of a sparse file are
    skipped without reading them); a trailing partial block is ignored, as
    thin_metadata_pack does.  The pack is built beside ``pack_path`` and
    renamed over it when complete.  Refuses the input itself as output, a
    device or special file as output, and, unless ``force``, an output that
    holds thin metadata.
    """
    name = os.fspath(metadata_path)
    try:
        fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise PackError(f"cannot open metadata {name}: {e.strerror}") from None
    try:
        source = os.fstat(fd)
        nr_blocks = device_size(fd) // BLOCK_SIZE
        if nr_blocks == 0:
            raise PackError(f"{name} is smaller than one metadata block")
        real, _device = _check_output(pack_path, source, force, device_ok=False)
        stored = 0
        with _replacing(real) as out_fd, open(out_fd, "wb", closefd=False) as out:
            out.write(_HEADER.pack(MAGIC, VERSION, BLOCK_SIZE, nr_blocks))
            z = zlib.compressobj(ZLIB_LEVEL)
            pieces: list[bytes] = []
            for block, data, kind in _stored_blocks(fd, nr_blocks, name):
                pieces.append(z.compress(_U64.pack(block) + encode_block(data, kind == Salt.NODE)))
                stored += 1
                if stored % RECORDS_PER_FRAME == 0:
                    _write_frame(out, pieces, z)
                    z, pieces = zlib.compressobj(ZLIB_LEVEL), []
            if stored % RECORDS_PER_FRAME:
                _write_frame(out, pieces, z)
        return PackSummary(nr_blocks, stored)
    finally:
        os.close(fd)


def _write_frame(out: BinaryIO, pieces: list[bytes], z: zlib._Compress) -> None:
    pieces.append(z.flush())
    frame = b"".join(pieces)
    out.write(_U64.pack(len(frame)))
    out.write(frame)
