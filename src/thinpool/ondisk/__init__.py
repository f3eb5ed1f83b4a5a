"""Pure codecs for dm-thin's on-disk structures: no I/O, no state.

Every layout here follows ../shared/dm-thin-format.md (the kernel's format):
4 KiB metadata blocks, little-endian integers, CRC32C checksums with a salt
per block type.
"""
