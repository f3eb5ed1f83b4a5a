"""Exception hierarchy shared by every layer.

Every error a user can provoke (bad input, corrupt metadata, a wrong device id)
is a ThinpoolError whose str() is one clear line; the CLI prints that line and
exits non-zero, so no traceback ever reaches a user.
"""

from __future__ import annotations


class ThinpoolError(Exception):
    """Base class: a clear, one-line, user-facing problem."""


class MetadataError(ThinpoolError):
    """The metadata cannot be read or is inconsistent."""


class ChecksumError(MetadataError):
    """A block's stored checksum does not match its contents."""

    def __init__(self, block: int, kind: str, stored: int, computed: int) -> None:
        super().__init__(
            f"bad checksum in {kind} (block {block}): stored {stored:#010x}, computed {computed:#010x}"
        )
        self.block = block
        self.kind = kind


class BadBlockError(MetadataError):
    """A block decodes but violates its format (wrong blocknr, flags, sizes...)."""

    def __init__(self, block: int, kind: str, problem: str) -> None:
        super().__init__(f"{kind} (block {block}): {problem}")
        self.block = block
        self.kind = kind


class NoSpaceError(ThinpoolError):
    """A space map has no free block left."""


class NoMetadataSpaceError(NoSpaceError):
    """The metadata device is full."""


class NoDataSpaceError(NoSpaceError):
    """The data device is full."""


class DeviceError(ThinpoolError):
    """A thin-device level error carrying the kernel's errno name."""

    def __init__(self, errno_name: str, message: str) -> None:
        super().__init__(f"{message} ({errno_name})")
        self.errno_name = errno_name


class XmlFormatError(ThinpoolError):
    """thin_dump-style XML that cannot be restored."""


class DataPathError(ThinpoolError, OSError):
    """A failed read, write, discard, zeroing or flush of a volume's data.

    ``errno`` is what a block client is told (EIO, ENOSPC, EINVAL, EPERM,
    EOPNOTSUPP, ...): NBD replies and FUSE answers are built from it.  It is
    an ``OSError`` too, so code that handles I/O errors handles it; ``str``
    is the message alone.
    """

    def __init__(self, err: int, message: str) -> None:
        OSError.__init__(self, err, message)
        self.message = message

    def __str__(self) -> str:
        return self.message
