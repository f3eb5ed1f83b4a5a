"""Raw 4 KiB block I/O on a metadata file or block device."""

from __future__ import annotations

import os
import stat

from ..errors import MetadataError
from ..ondisk.checksum import BLOCK_SIZE


def device_size(fd: int) -> int:
    """Size in bytes of a regular file or block device."""
    st = os.fstat(fd)
    if stat.S_ISBLK(st.st_mode):
        return os.lseek(fd, 0, os.SEEK_END)
    return st.st_size


class FileBlockIO:
    """pread/pwrite of whole blocks; ``sync`` makes earlier writes durable."""

    def __init__(self, path: str | os.PathLike[str], writable: bool) -> None:
        self.path = os.fspath(path)
        self.writable = writable
        try:
            self.fd = os.open(self.path, (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC)
        except OSError as e:
            raise MetadataError(f"cannot open metadata {self.path}: {e.strerror}") from None
        self.nr_blocks = device_size(self.fd) // BLOCK_SIZE

    def refresh_size(self) -> None:
        """Pick up a grown file or device."""
        self.nr_blocks = device_size(self.fd) // BLOCK_SIZE

    def read(self, block: int) -> bytes:
        if block >= self.nr_blocks:
            raise MetadataError(f"block {block} is beyond the end of the metadata device "
                                f"({self.nr_blocks} blocks)")
        data = os.pread(self.fd, BLOCK_SIZE, block * BLOCK_SIZE)
        if len(data) != BLOCK_SIZE:
            raise MetadataError(f"short read of block {block} from {self.path}")
        return data

    def write(self, block: int, data: bytes | bytearray) -> None:
        if block >= self.nr_blocks:
            raise MetadataError(f"write of block {block} beyond the metadata device")
        os.pwrite(self.fd, data, block * BLOCK_SIZE)

    def sync(self) -> None:
        os.fsync(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
