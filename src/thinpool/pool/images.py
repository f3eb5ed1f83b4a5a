"""Sparse-aware copies between a thin volume and a raw image.

Export writes only provisioned blocks (and external-origin data), so the
image stays as sparse as the volume; it refuses an output that is one of the
pool's own files or a volume's external origin.  Import takes a regular file
(only its data extents are read, SEEK_DATA/SEEK_HOLE), a block device (by its
real size) or a pipe (as a stream); it skips all-zero blocks and unmaps the
rest, so a sparse image provisions only the blocks that hold data.
"""

from __future__ import annotations

import errno
import os
import stat

from ..errors import ThinpoolError
from ..outputs import claim_output, refuse_input
from ..pdata.blockio import device_size
from .engine import Pool

CHUNK_BLOCKS = 16


def export_image(pool: Pool, dev_id: int, out_fd: int, name: str) -> int:
    """Write volume ``dev_id`` into ``out_fd`` (opened without truncation); returns bytes of
    data copied.

    The output is refused if it is one of the pool's own files or a volume's
    external origin, before anything is written; then a regular file is
    truncated to the volume's size and stays sparse where the volume is.
    """
    with pool.volume(dev_id) as vol:
        claim_output(out_fd, name, pool.files())
        regular = stat.S_ISREG(os.fstat(out_fd).st_mode)
        if regular:
            os.ftruncate(out_fd, vol.size)
        copied = vol.copy_out(out_fd)
        if regular or stat.S_ISBLK(os.fstat(out_fd).st_mode):
            os.fsync(out_fd)
        return copied


def _data_extents(fd: int, size: int):
    """(start, end) of the data regions of a file (the whole rest if SEEK_DATA is unsupported)."""
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # only a hole up to the end
                return
            yield pos, size
            return
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        yield start, end
        pos = end


def import_image(pool: Pool, dev_id: int, in_fd: int, name: str) -> int:
    """Make volume ``dev_id`` hold exactly the image read from ``in_fd``; returns bytes written.

    A file or block device larger than the volume is refused before anything
    is written.  A pipe's length is known only at its end: if it turns out
    longer than the volume, the volume holds its first bytes and the error says so.
    """
    refuse_input(in_fd, name, pool.files())
    st = os.fstat(in_fd)
    with pool.volume(dev_id) as vol:
        if stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode):
            size = device_size(in_fd)
            if size > vol.size:
                raise ThinpoolError(f"image {name} ({size} bytes) is larger than volume "
                                    f"{dev_id} ({vol.size} bytes); nothing was written")
            extents = _data_extents(in_fd, size) if stat.S_ISREG(st.st_mode) else [(0, size)]
            written, pos = _import_extents(vol, in_fd, size, extents)
        else:
            written, pos = _import_stream(vol, in_fd, name)
        if pos < vol.size:
            vol.write_zeroes(pos, vol.size - pos)
        vol.flush()
        return written


def _import_extents(vol, fd: int, size: int, extents) -> tuple[int, int]:
    """Copy the data extents of a seekable source; (bytes written, end position)."""
    bs = vol.bs
    chunk = bs * CHUNK_BLOCKS
    written, pos = 0, 0
    for start, end in extents:
        start = start // bs * bs
        if start > pos:
            vol.write_zeroes(pos, start - pos)
        pos = max(pos, start)
        while pos < end:
            data = os.pread(fd, min(chunk, size - pos), pos)
            if not data:
                raise ThinpoolError(f"image shrank while it was read (at byte {pos})")
            written += _write_nonzero(vol, pos, data)
            pos += len(data)
    return written, pos


def _import_stream(vol, fd: int, path: str) -> tuple[int, int]:
    """Copy a pipe (or other unseekable source) from its current position to its end."""
    chunk = vol.bs * CHUNK_BLOCKS
    buf = bytearray(chunk)
    written, pos = 0, 0
    while True:
        n = _read_full(fd, memoryview(buf))
        if n == 0:
            return written, pos
        if pos + n > vol.size:
            if pos < vol.size:
                written += _write_nonzero(vol, pos, bytes(buf[:vol.size - pos]))
                vol.flush()
            raise ThinpoolError(f"{path} is longer than volume {vol.dev_id} ({vol.size} bytes): "
                                f"the volume now holds its first {vol.size} bytes")
        written += _write_nonzero(vol, pos, bytes(buf[:n]))
        pos += n


def _read_full(fd: int, buf: memoryview) -> int:
    """Fill ``buf`` from a stream; fewer bytes only at its end."""
    got = 0
    while got < len(buf):
        n = os.readv(fd, [buf[got:]])
        if n == 0:
            break
        got += n
    return got


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
