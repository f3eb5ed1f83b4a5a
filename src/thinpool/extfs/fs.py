"""Reading an ext2/3/4 filesystem from its blocks: inodes, file data, directories, xattrs.

``Filesystem(source)`` reads from any ``BlockSource`` (``readinto(offset,
memoryview)`` at device byte offsets, and ``size``).  Nothing is trusted:
every block number is checked against the filesystem, extent trees against
their headers, depth, order and loops, directory records against their block,
xattr entries against their region; a violation is a ``CorruptFilesystem``
naming the inode.  Work and memory per call are bounded by the filesystem's
size (a file cannot map more blocks than the filesystem has), never by a size
field alone.

What it presents is what a read-only kernel mount (``ro,noload``) of the same
filesystem shows through stat(2), readlink(2), getdents(2) and
listxattr(2)/getxattr(2) as root in the initial user namespace; the inline
comments name the kernel behaviour each rule follows.  Checksums other than
the superblock's are not verified (bounds are).
"""

from __future__ import annotations

import stat
import struct
from dataclasses import dataclass
from typing import Iterator, Protocol

import numpy as np

from .errors import CorruptFilesystem
from .superblock import SUPERBLOCK_OFFSET, Superblock
from .xattr import parse_entries, kernel_view

ROOT_INO = 2

_EXTENTS_FL = 0x80000
_HUGE_FILE_FL = 0x40000
_ENCRYPT_FL = 0x800
_INLINE_DATA_FL = 0x10000000
_CASEFOLD_FL = 0x40000000
_EA_INODE_FL = 0x200000

_INODE = struct.Struct("<HHI8xi4xHHII4x60s4xII4xHHHH4x")
_EXT_HEADER = struct.Struct("<HHHH4x")
_EXT_MAGIC = 0xF30A
_EXT_INDEX = struct.Struct("<IIH")
_EXT_LEAF = struct.Struct("<IHHI")
_MAX_DEPTH = 5
_UNINIT = 32768
_DIRENT = struct.Struct("<IHBB")
_INODE_CHUNK = 128 * 1024          # inode table bytes read at once
_INODE_CACHE = 64 * 1024 * 1024   # inode table bytes kept
CHUNK = 1 << 20                    # file data yielded at once
_KNOWN_TYPES = (stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK, stat.S_IFCHR, stat.S_IFBLK, stat.S_IFIFO, stat.S_IFSOCK)


class BlockSource(Protocol):
    """A read-only device: ``size`` bytes; ``readinto`` fills ``buf`` from byte ``offset``."""

    size: int

    def readinto(self, offset: int, buf: memoryview) -> None: ...


@dataclass(slots=True)
class Inode:
    """One inode as stat(2) on a kernel mount reports it, plus what reading it needs."""

    ino: int
    mode: int
    uid: int
    gid: int
    size: int
    nlink: int
    mtime_ns: int
    flags: int
    blocks512: int       # i_blocks in 512-byte units
    file_acl: int        # the external xattr block (0: none)
    i_block: bytes       # the 60-byte block map / extent root / fast symlink / device numbers
    extra: bytes         # the in-inode xattr area ("" when there is none)

    @property
    def rdev(self) -> tuple[int, int]:
        """(major, minor) of a device inode, decoded as the kernel does (old or new encoding)."""
        old = int.from_bytes(self.i_block[0:4], "little")
        if old:
            return (old >> 8) & 0xFF, old & 0xFF
        new = int.from_bytes(self.i_block[4:8], "little")
        return (new & 0xFFF00) >> 8, (new & 0xFF) | ((new >> 12) & 0xFFF00)


@dataclass(slots=True)
class Run:
    """``length`` blocks of a file from logical block ``logical`` at filesystem block ``physical``;
    an uninitialised run reads as zeros."""

    logical: int
    physical: int
    length: int
    initialized: bool = True


class Filesystem:
    """A read-only ext2/3/4 filesystem on a block source (see the module docstring)."""

    def __init__(self, source: BlockSource) -> None:
        self.source = source
        raw = self._read(SUPERBLOCK_OFFSET, 1024, "the superblock") if source.size >= 2048 else b""
        self.sb = Superblock.parse(raw, source.size)
        self.block_size = self.sb.block_size
        offset, length = self.sb.descriptor_table
        self._tables = self.sb.inode_tables(self._read(offset, length, "the group descriptors"))
        self._per_chunk = max(1, _INODE_CHUNK // self.sb.inode_size)
        self._chunks: dict[tuple[int, int], bytes] = {}
        self._cached = 0
        self._max_blocks = self._file_block_limit()

    # -- raw reads ---------------------------------------------------------------------------
    def _read(self, offset: int, length: int, what: str) -> bytes:
        if offset < 0 or offset + length > self.source.size:
            raise CorruptFilesystem(f"ext: {what} lies outside the device")
        buf = bytearray(length)
        self.source.readinto(offset, memoryview(buf))
        return bytes(buf)

    def read_blocks(self, block: int, count: int) -> bytearray:
        """``count`` filesystem blocks from ``block`` (the caller has checked the range)."""
        buf = bytearray(count * self.block_size)
        self.source.readinto(block * self.block_size, memoryview(buf))
        return buf

    def _check_range(self, ino: int, physical: int, length: int, what: str) -> None:
        if physical < self.sb.first_data_block or length <= 0 or physical + length > self.sb.blocks_count:
            raise CorruptFilesystem(f"ext inode {ino}: {what} at block {physical} (+{length}) is outside "
                                    f"the filesystem ({self.sb.blocks_count} blocks)")

    def _file_block_limit(self) -> int:
        """Logical blocks a block-mapped file can address (extent files: 2^32)."""
        p = self.block_size // 4
        return 12 + p + p * p + p * p * p

    # -- inodes ------------------------------------------------------------------------------
    def inode(self, ino: int) -> Inode:
        """Inode ``ino``; CorruptFilesystem if it is out of range, unused or malformed."""
        sb = self.sb
        if not 1 <= ino <= sb.inodes_count:
            raise CorruptFilesystem(f"ext: inode number {ino} is out of range (1-{sb.inodes_count})")
        group, index = divmod(ino - 1, sb.inodes_per_group)
        chunk, within = divmod(index, self._per_chunk)
        data = self._chunks.get((group, chunk))
        if data is None:
            count = min(self._per_chunk, sb.inodes_per_group - chunk * self._per_chunk)
            if self._cached > _INODE_CACHE:
                self._chunks.clear()
                self._cached = 0
            data = self._read(self._tables[group] * self.block_size + chunk * self._per_chunk * sb.inode_size,
                              count * sb.inode_size, f"the inode table of group {group}")
            self._chunks[(group, chunk)] = data
            self._cached += len(data)
        at = within * sb.inode_size
        (mode, uid, size, mtime, gid, links, blocks_lo, flags, i_block, acl_lo, size_high, blocks_high,
         acl_high, uid_high, gid_high) = _INODE.unpack_from(data, at)
        if links == 0 or mode == 0:  # the kernel's iget: a deleted or unallocated inode (ESTALE)
            raise CorruptFilesystem(f"ext inode {ino}: a directory entry names a deleted inode")
        kind = stat.S_IFMT(mode)
        if kind not in _KNOWN_TYPES:
            raise CorruptFilesystem(f"ext inode {ino}: bogus mode {mode:#o}")
        if flags & (_ENCRYPT_FL | _INLINE_DATA_FL | _CASEFOLD_FL | _EA_INODE_FL):
            # the filesystem has none of these features (Superblock.parse refuses them)
            raise CorruptFilesystem(f"ext inode {ino}: flags {flags:#x} name a feature the filesystem lacks")
        if not sb.uid16:
            uid |= uid_high << 16
            gid |= gid_high << 16
        if sb.largedir or kind == stat.S_IFREG:
            size |= size_high << 32
        if size >= 1 << 63:
            raise CorruptFilesystem(f"ext inode {ino}: bad size {size}")
        blocks = blocks_lo
        if sb.huge_file:
            blocks |= blocks_high << 32
            if flags & _HUGE_FILE_FL:
                blocks <<= (self.block_size.bit_length() - 1) - 9
        file_acl = acl_lo | (acl_high << 32 if sb.is_64bit else 0)
        sec, nsec, extra = mtime, 0, b""
        if sb.inode_size > 128:
            extra_isize = int.from_bytes(data[at + 128:at + 130], "little")
            if extra_isize & 3 or 128 + extra_isize > sb.inode_size:
                raise CorruptFilesystem(f"ext inode {ino}: bad extra inode size {extra_isize}")
            if extra_isize >= 12:  # i_mtime_extra fits: epoch bits and nanoseconds
                word = int.from_bytes(data[at + 0x88:at + 0x8C], "little")
                sec += (word & 3) << 32
                nsec = word >> 2
            if 128 + extra_isize + 4 <= sb.inode_size:
                extra = data[at + 128 + extra_isize:at + sb.inode_size]
        return Inode(ino, mode, uid, gid, size, links, sec * 1_000_000_000 + nsec, flags, blocks, file_acl,
                     i_block, extra)

    # -- block maps --------------------------------------------------------------------------
    def runs(self, inode: Inode) -> list[Run]:
        """The file's mapped blocks in logical order (extent tree or indirect block map),
        each range checked to lie in the filesystem; together at most the filesystem's blocks."""
        if inode.flags & _EXTENTS_FL:
            out = self._extent_runs(inode)
        else:
            out = self._indirect_runs(inode)
        total = 0
        for r in out:
            total += r.length
        if total > self.sb.blocks_count:
            raise CorruptFilesystem(f"ext inode {inode.ino}: maps {total} blocks, more than the filesystem has")
        return out

    def _extent_runs(self, inode: Inode) -> list[Run]:
        out: list[Run] = []
        self._extent_node(inode, inode.i_block, "in the inode", None, out, set())
        return out

    def _extent_node(self, inode: Inode, node: bytes, where: str, want: int | None, out: list[Run],
                     seen: set[int]) -> None:
        """Append the extents under ``node`` (depth ``want``; None: the root) to ``out``, checking
        that they come in logical order without overlap; recursion is bounded by the depth."""
        magic, entries, maximum, depth = _EXT_HEADER.unpack_from(node, 0)
        if magic != _EXT_MAGIC:
            raise CorruptFilesystem(f"ext inode {inode.ino}: bad extent header {where}")
        if (depth > _MAX_DEPTH or (want is not None and depth != want) or entries > maximum
                or 12 + 12 * maximum > len(node)):
            raise CorruptFilesystem(f"ext inode {inode.ino}: bad extent header {where} (depth {depth}, "
                                    f"{entries}/{maximum} entries)")
        if depth > 0:
            for i in range(entries):
                _logical, leaf_lo, leaf_hi = _EXT_INDEX.unpack_from(node, 12 + 12 * i)
                block = leaf_lo | (leaf_hi << 32)
                self._check_range(inode.ino, block, 1, "an extent tree block")
                if block in seen:
                    raise CorruptFilesystem(f"ext inode {inode.ino}: extent tree block {block} is referenced "
                                            "twice (a loop)")
                seen.add(block)
                self._extent_node(inode, bytes(self.read_blocks(block, 1)), f"in block {block}", depth - 1,
                                  out, seen)
            return
        end = out[-1].logical + out[-1].length if out else 0
        for i in range(entries):
            logical, length, start_hi, start_lo = _EXT_LEAF.unpack_from(node, 12 + 12 * i)
            initialized = length <= _UNINIT
            if not initialized:
                length -= _UNINIT
            physical = start_lo | (start_hi << 32)
            if length == 0 or logical < end or logical + length > 1 << 32:
                raise CorruptFilesystem(f"ext inode {inode.ino}: extent {logical}+{length} {where} "
                                        "overlaps another or is out of order")
            self._check_range(inode.ino, physical, length, "an extent")
            end = logical + length
            last = out[-1] if out else None
            if (last is not None and initialized and last.initialized and last.logical + last.length == logical
                    and last.physical + last.length == physical):
                last.length += length  # contiguous on disk too: one read
            else:
                out.append(Run(logical, physical, length, initialized))

    def _indirect_runs(self, inode: Inode) -> list[Run]:
        nblocks = min(-(-inode.size // self.block_size), self._max_blocks)
        if nblocks == 0:
            return []
        per = self.block_size // 4
        logical_parts: list[np.ndarray] = []
        physical_parts: list[np.ndarray] = []
        roots = np.frombuffer(inode.i_block, dtype="<u4").astype(np.int64)
        direct = roots[:12][:nblocks]
        logical_parts.append(np.arange(len(direct), dtype=np.int64))
        physical_parts.append(direct)
        seen: set[int] = set()
        span, start = per, 12
        for level in range(1, 4):
            if start >= nblocks:
                break
            self._indirect(inode, int(roots[11 + level]), level, start, nblocks, per, seen, logical_parts,
                           physical_parts)
            start += span
            span *= per
        logical = np.concatenate(logical_parts)
        physical = np.concatenate(physical_parts)
        keep = physical != 0
        logical, physical = logical[keep], physical[keep]
        if len(physical) == 0:
            return []
        bad = (physical < self.sb.first_data_block) | (physical >= self.sb.blocks_count)
        if bad.any():
            raise CorruptFilesystem(f"ext inode {inode.ino}: block {int(physical[bad][0])} is outside the "
                                    f"filesystem ({self.sb.blocks_count} blocks)")
        # runs where both logical and physical advance by one
        breaks = np.flatnonzero((np.diff(logical) != 1) | (np.diff(physical) != 1)) + 1
        starts = np.concatenate(([0], breaks))
        ends = np.concatenate((breaks, [len(logical)]))
        return [Run(int(logical[s]), int(physical[s]), int(e - s)) for s, e in zip(starts, ends)]

    def _indirect(self, inode: Inode, block: int, level: int, first: int, nblocks: int, per: int,
                  seen: set[int], logical_parts: list[np.ndarray], physical_parts: list[np.ndarray]) -> None:
        """Pointers of an indirect block of ``level`` (1: to data) covering logical blocks from ``first``."""
        if block == 0:
            return
        self._check_range(inode.ino, block, 1, "an indirect block")
        if block in seen:
            raise CorruptFilesystem(f"ext inode {inode.ino}: indirect block {block} is referenced twice")
        seen.add(block)
        pointers = np.frombuffer(self.read_blocks(block, 1), dtype="<u4").astype(np.int64)
        step = per ** (level - 1)
        count = min(per, -(-(nblocks - first) // step))
        if level == 1:
            logical_parts.append(np.arange(first, first + count, dtype=np.int64))
            physical_parts.append(pointers[:count])
            return
        for i in np.flatnonzero(pointers[:count]):
            self._indirect(inode, int(pointers[i]), level - 1, first + int(i) * step, nblocks, per, seen,
                           logical_parts, physical_parts)

    # -- contents ----------------------------------------------------------------------------
    def data(self, inode: Inode, size: int | None = None) -> Iterator[bytes]:
        """The first ``size`` bytes (default: the whole file) in chunks of at most ``CHUNK`` bytes;
        holes, uninitialised extents and anything past the mapped blocks read as zeros."""
        size = inode.size if size is None else size
        if size > self._max_size(inode):
            raise CorruptFilesystem(f"ext inode {inode.ino}: size {size} is larger than a file can be")
        if size == 0:
            return
        runs = [r for r in self.runs(inode) if r.initialized]
        bs = self.block_size
        pos, i = 0, 0
        while pos < size:
            n = min(CHUNK, size - pos)
            buf = bytearray(n)
            view = memoryview(buf)
            end = pos + n
            while i < len(runs) and (runs[i].logical + runs[i].length) * bs <= pos:
                i += 1
            j = i
            while j < len(runs) and runs[j].logical * bs < end:
                r = runs[j]
                lo = max(pos, r.logical * bs)
                hi = min(end, (r.logical + r.length) * bs)
                self.source.readinto(r.physical * bs + (lo - r.logical * bs), view[lo - pos:hi - pos])
                j += 1
            yield bytes(buf)
            pos = end

    def _max_size(self, inode: Inode) -> int:
        blocks = 1 << 32 if inode.flags & _EXTENTS_FL else self._max_blocks
        return blocks * self.block_size

    def readlink(self, inode: Inode) -> bytes:
        """A symlink's target, as readlink(2) on a kernel mount returns it."""
        size = inode.size
        ea_blocks = (self.block_size >> 9) if inode.file_acl else 0
        if inode.blocks512 - ea_blocks == 0:  # a fast symlink: the target is in i_block
            target = inode.i_block[:size]
            if size == 0 or size >= 60 or inode.i_block[size] != 0 or 0 in target:
                raise CorruptFilesystem(f"ext inode {inode.ino}: bad fast symlink length {size}")
            return target
        runs = self.runs(inode)
        if not runs or runs[0].logical != 0:
            raise CorruptFilesystem(f"ext inode {inode.ino}: a symlink without its block")
        first = runs[0]
        raw = bytes(self.read_blocks(first.physical, 1)) if first.initialized else bytes(self.block_size)
        raw = raw[:min(size, self.block_size - 1)]
        return raw.split(b"\0", 1)[0]

    def entries(self, inode: Inode) -> Iterator[tuple[bytes, int]]:
        """(name, inode number) of every entry of a directory but "." and "..", in disk order."""
        bs = self.block_size
        nblocks = -(-inode.size // bs)
        for r in self.runs(inode):
            if r.logical >= nblocks:
                break
            if not r.initialized:
                continue
            count = min(r.length, nblocks - r.logical)
            done = 0
            while done < count:
                n = min(count - done, max(1, CHUNK // bs))
                buf = self.read_blocks(r.physical + done, n)
                for b in range(n):
                    yield from self._dirents(inode, buf, b * bs, r.logical + done + b)
                done += n

    def _dirents(self, inode: Inode, buf: bytearray, base: int, logical: int) -> Iterator[tuple[bytes, int]]:
        bs = self.block_size
        limit, first = self.sb.inodes_count, self.sb.first_ino
        off = 0
        while off < bs:
            if off + 8 > bs:
                raise CorruptFilesystem(f"ext inode {inode.ino}: directory block {logical}: record at "
                                        f"{off} crosses the block end")
            # the kernel reads an 8-bit name length whatever the filetype feature says
            ino, rec_len, name_len, _type = _DIRENT.unpack_from(buf, base + off)
            if bs == 65536 and rec_len in (0, 65535):
                rec_len = 65536
            else:
                rec_len = (rec_len & 65532) | ((rec_len & 3) << 16)
            if (rec_len < 12 or rec_len % 4 or rec_len < 8 + name_len or off + rec_len > bs or ino > limit
                    or (0 < ino < first and ino != ROOT_INO)):  # a reserved inode: the kernel refuses it
                raise CorruptFilesystem(f"ext inode {inode.ino}: directory block {logical}: bad record at "
                                        f"{off} (length {rec_len}, name length {name_len}, inode {ino})")
            if ino:
                name = bytes(buf[base + off + 8:base + off + 8 + name_len])
                if name != b"." and name != b"..":
                    if not name or b"/" in name or b"\0" in name:
                        raise CorruptFilesystem(f"ext inode {inode.ino}: directory block {logical}: bad name "
                                                f"{name!r}")
                    yield name, ino
            off += rec_len

    def xattrs(self, inode: Inode) -> dict[str, bytes]:
        """The inode's xattrs as listxattr(2)/getxattr(2) on a kernel mount show them to root
        (see ``xattr.kernel_view``); in-inode ones first, as the kernel looks them up."""
        found: list[tuple[int, bytes, bytes]] = []
        if len(inode.extra) >= 4 and inode.extra[:4] == b"\0\0\x02\xea":
            found += parse_entries(inode.extra, 4, 4, f"ext inode {inode.ino}: in-inode xattrs")
        if inode.file_acl:
            self._check_range(inode.ino, inode.file_acl, 1, "the xattr block")
            block = bytes(self.read_blocks(inode.file_acl, 1))
            where = f"ext inode {inode.ino}: xattr block {inode.file_acl}"
            if block[:4] != b"\0\0\x02\xea" or int.from_bytes(block[8:12], "little") != 1:
                raise CorruptFilesystem(f"{where}: bad header")
            found += parse_entries(block, 32, 0, where)
        return kernel_view(found, stat.S_IFMT(inode.mode))
