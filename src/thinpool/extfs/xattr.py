"""ext4 extended attributes: the on-disk entries, and what the kernel shows of them.

``parse_entries`` decodes the entry table of the in-inode xattr area or of an
xattr block, every entry, name and value checked to lie in its region.

``kernel_view`` turns the entries into what listxattr(2) + getxattr(2) on a
kernel mount return to root in the initial user namespace (ext4 with its
default ``user_xattr`` and ``acl``, the capability LSM):

* names get the prefix of their name index (1 ``user.``, 2/3
  ``system.posix_acl_access``/``_default``, 4 ``trusted.``, 6 ``security.``,
  10 ``gnu.``); other indexes (``system.data``, rich ACLs, encryption
  contexts) are not listed;
* ``user.*`` reads as absent on anything but regular files and directories;
* POSIX ACLs are converted from ext4's compact format to the xattr format
  (version 2, 8-byte entries, undefined ids -1); a malformed or empty ACL
  reads as absent;
* ``security.capability``: v2 as stored; v3 with root id 0 as v2 (effective
  flag kept), with another valid root id as stored; anything else absent;
* the same name twice: the first (in-inode) value, as the kernel looks it up.
"""

from __future__ import annotations

import os
import stat
import struct

from .errors import CorruptFilesystem

_ENTRY = struct.Struct("<BBHIII")
_PREFIXES = {1: "user.", 2: "system.posix_acl_access", 3: "system.posix_acl_default", 4: "trusted.",
             6: "security.", 10: "gnu."}
_ACL_INDEXES = (2, 3)
_SHORT_TAGS = (0x01, 0x04, 0x10, 0x20)   # USER_OBJ, GROUP_OBJ, MASK, OTHER
_ID_TAGS = (0x02, 0x08)                  # USER, GROUP
_UNDEFINED_ID = 0xFFFFFFFF


def parse_entries(region: bytes, start: int, value_base: int, where: str) -> list[tuple[int, bytes, bytes]]:
    """(name index, name, value) of each entry from ``start`` up to the 4-byte zero terminator;
    value offsets count from ``value_base``."""
    out: list[tuple[int, bytes, bytes]] = []
    off = start
    end = len(region)
    while True:
        if off + 4 > end:
            raise CorruptFilesystem(f"{where}: entry table runs past its end")
        if region[off:off + 4] == b"\0\0\0\0":
            return out
        if off + 16 > end:
            raise CorruptFilesystem(f"{where}: entry at {off} runs past its end")
        name_len, index, value_offs, value_inum, value_size, _hash = _ENTRY.unpack_from(region, off)
        if off + 16 + name_len > end:
            raise CorruptFilesystem(f"{where}: name of the entry at {off} runs past its end")
        if value_inum:
            raise CorruptFilesystem(f"{where}: a value in an xattr inode, without the ea_inode feature")
        lo = value_base + value_offs
        if value_size and (lo < start or lo + value_size > end):
            raise CorruptFilesystem(f"{where}: value of the entry at {off} ({value_offs}+{value_size}) lies "
                                    "outside its region")
        out.append((index, region[off + 16:off + 16 + name_len], region[lo:lo + value_size]))
        off += (name_len + 16 + 3) & ~3


def kernel_view(entries: list[tuple[int, bytes, bytes]], kind: int) -> dict[str, bytes]:
    """name -> value as getxattr(2) returns them (see the module docstring); ``kind`` is S_IFMT."""
    out: dict[str, bytes] = {}
    for index, name, value in entries:
        prefix = _PREFIXES.get(index)
        if prefix is None:
            continue
        if index in _ACL_INDEXES:
            if name:
                continue  # listed, but no handler takes the longer name
            key = prefix
        elif not name:
            continue  # "user." alone: EINVAL
        else:
            key = prefix + os.fsdecode(name)
        if key in out:
            continue
        if index == 1 and kind not in (stat.S_IFREG, stat.S_IFDIR):
            continue
        shown: bytes | None = value
        if index in _ACL_INDEXES:
            shown = _acl(value)
        elif key == "security.capability":
            shown = _capability(value)
        if shown is not None:
            out[key] = shown
    return out


def _acl(value: bytes) -> bytes | None:
    """ext4's ACL format to the xattr format; None where the kernel fails or finds no ACL."""
    if len(value) < 4 or int.from_bytes(value[:4], "little") != 1:
        return None
    size = len(value) - 4
    rest = size - 4 * 4
    if rest < 0:
        if size % 4:
            return None
        count = size // 4
    else:
        if rest % 8:
            return None
        count = rest // 8 + 4
    if count == 0:
        return None
    parts = [struct.pack("<I", 2)]
    pos = 4
    for _ in range(count):
        if pos + 4 > len(value):
            return None
        tag, perm = struct.unpack_from("<HH", value, pos)
        if tag in _SHORT_TAGS:
            ident = _UNDEFINED_ID
            pos += 4
        elif tag in _ID_TAGS:
            if pos + 8 > len(value):
                return None
            ident = int.from_bytes(value[pos + 4:pos + 8], "little")
            pos += 8
        else:
            return None
        parts.append(struct.pack("<HHI", tag, perm, ident))
    if pos != len(value):
        return None
    return b"".join(parts)


def _capability(value: bytes) -> bytes | None:
    """security.capability as the capability LSM returns it in the initial user namespace."""
    if len(value) < 4:
        return None
    magic = int.from_bytes(value[:4], "little")
    if len(value) == 20 and magic & 0xFF000000 == 0x02000000:
        return value
    if len(value) == 24 and magic & 0xFF000000 == 0x03000000:
        root = int.from_bytes(value[20:24], "little")
        if root == _UNDEFINED_ID:
            return None  # no valid root id: EOVERFLOW
        if root:
            return value
        return struct.pack("<I", 0x02000000 | (magic & 1)) + value[4:20]
    return None
