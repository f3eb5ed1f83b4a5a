"""Sparse-aware copies between a thin volume and a raw image file.

Export writes only provisioned blocks (and external-origin data), so the
image stays as sparse as the volume; import reads only the data extents of
the source (SEEK_DATA/SEEK_HOLE), skips all-zero blocks, and unmaps the rest,
so a sparse image provisions only the blocks that hold data.
"""

from __future__ import annotations

import os

from ..errors import ThinpoolError
from .engine import Pool

CHUNK_BLOCKS = 16


def export_image(pool: Pool, dev_id: int, path: str) -> int:
    """Write volume ``dev_id`` to ``path`` (created or truncated); returns bytes of data copied."""
    with pool.volume(dev_id) as vol:
        bs, size = vol.bs, vol.size
        with pool.lock:
            mapped = [(v, m.data_block) for v, m in pool.md.mappings(dev_id)]
        copied = 0
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            os.ftruncate(fd, size)
            if vol.origin_fd >= 0:
                copied += _export_origin(vol, fd, {v for v, _ in mapped})
            with pool.io.shared():
                for v, d in mapped:
                    n = min(bs, size - v * bs)
                    if n <= 0:
                        continue
                    _copy_between(pool.data_fd, d * bs, fd, v * bs, n)
                    copied += n
            os.fsync(fd)
        finally:
            os.close(fd)
        return copied


def _export_origin(vol, fd: int, mapped: set[int]) -> int:
    bs, copied = vol.bs, 0
    limit = min(vol.origin_size, vol.size)
    for v in range(-(-limit // bs)):
        if v in mapped:
            continue
        n = min(bs, limit - v * bs)
        data = os.pread(vol.origin_fd, n, v * bs)
        if data.count(0) != len(data):
            os.pwrite(fd, data, v * bs)
            copied += len(data)
    return copied


def _copy_between(src: int, src_off: int, dst: int, dst_off: int, length: int) -> None:
    while length:
        n = os.copy_file_range(src, dst, length, src_off, dst_off)
        if n <= 0:
            data = os.pread(src, length, src_off).ljust(length, b"\0")
            os.pwrite(dst, data, dst_off)
            return
        src_off, dst_off, length = src_off + n, dst_off + n, length - n


def _data_extents(fd: int, size: int):
    """(start, end) of the data regions of a file (the whole file if unsupported)."""
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:
            return
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        yield start, end
        pos = end


def import_image(pool: Pool, dev_id: int, path: str) -> int:
    """Make volume ``dev_id`` hold exactly the image at ``path``; returns bytes written."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        with pool.volume(dev_id) as vol:
            if size > vol.size:
                raise ThinpoolError(f"image {path} ({size} bytes) is larger than volume "
                                    f"{dev_id} ({vol.size} bytes)")
            bs = vol.bs
            chunk = bs * CHUNK_BLOCKS
            written, pos = 0, 0
            for start, end in _data_extents(fd, size):
                start = start // bs * bs
                if start > pos:
                    vol.write_zeroes(pos, start - pos)
                pos = max(pos, start)
                while pos < end:
                    data = os.pread(fd, min(chunk, size - pos), pos)
                    written += _write_nonzero(vol, pos, data)
                    pos += len(data)
            if pos < vol.size:
                vol.write_zeroes(pos, vol.size - pos)
            vol.flush()
            return written
    finally:
        os.close(fd)


def _write_nonzero(vol, offset: int, data: bytes) -> int:
    """Write ``data`` block by block, unmapping all-zero blocks instead of storing them."""
    bs, written, mv = vol.bs, 0, memoryview(data)
    start = 0
    while start < len(data):
        end = min(start + bs - (offset + start) % bs, len(data))
        piece = mv[start:end]
        if data.count(0, start, end) == end - start:
            vol.write_zeroes(offset + start, end - start)
        else:
            vol.write(offset + start, piece)
            written += end - start
        start = end
    return written
