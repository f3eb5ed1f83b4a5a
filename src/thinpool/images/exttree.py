"""A Docker device's tree read in userspace from its ext2/3/4 blocks, as a tar.

``ExtTree(source)`` opens the filesystem on a thin device (any ``extfs``
block source) and finds the layer's tree the way ``DockerRoot.mounted`` does
on a kernel mount: ``rootfs/`` when it is a directory, else the whole
filesystem.  ``export()`` writes the tar ``archive.export_tree`` writes of a
read-only kernel mount of the same device, byte for byte: pre-order, names
sorted as bytes at each level, the same ``TarWriter`` for headers, hard links,
xattrs and data.

``read(parts, size)`` gives one regular file's contents by path (a
``tarsplit.FileSource``, for rebuilding a layer's tar): found as
``tarsplit.DirSource`` finds it on the mounted tree, with the same reasons
when there is no regular file at the path.

Damage is a ``CorruptFilesystem`` naming the path (directory loops and
directories reached twice included); a filesystem the reader does not handle,
or a ``rootfs`` that is a symlink (a kernel mount follows it), is
``UnsupportedFilesystem`` from the constructor, before any output.
"""

from __future__ import annotations

import errno
import os
import stat
from typing import Iterator

from ..archive import Entry, TarWriter
from ..archive.fsroot import MAX_SYMLINKS
from ..archive.tarformat import END_OF_ARCHIVE
from ..extfs import ROOT_INO, BlockSource, CorruptFilesystem, Filesystem, Inode, UnsupportedFilesystem
from .tarsplit import NOT_REGULAR, Unreadable

_DIR_CACHE = 1 << 20    # directory entries kept for lookups
_PARENT_CACHE = 4096     # resolved directory paths kept for lookups


class ExtTree:
    """The layer tree of a device holding ext2/3/4 (see the module docstring)."""

    def __init__(self, source: BlockSource) -> None:
        self.fs = Filesystem(source)
        root = self.fs.inode(ROOT_INO)
        if not stat.S_ISDIR(root.mode):
            raise CorruptFilesystem("ext: the root inode is not a directory")
        self.top = root
        self._dirs: dict[int, dict[bytes, int]] = {}
        self._cached = 0
        self._parents: dict[str, Inode] = {}
        for name, ino in self.fs.entries(root):
            if name == b"rootfs":
                node = self.fs.inode(ino)
                if stat.S_ISDIR(node.mode):
                    self.top = node
                elif stat.S_ISLNK(node.mode):
                    raise UnsupportedFilesystem("rootfs is a symlink")
                break

    def _children(self, inode: Inode, where: str) -> list[tuple[bytes, int]]:
        out = sorted(self.fs.entries(inode))
        for a, b in zip(out, out[1:]):
            if a[0] == b[0]:
                raise CorruptFilesystem(f"ext inode {inode.ino}: the name {a[0]!r} appears twice in {where}")
        return out

    def _entry(self, inode: Inode, arcname: str) -> Entry:
        mode = inode.mode
        e = Entry(arcname, mode, inode.uid, inode.gid, inode.mtime_ns // 1_000_000_000, inode.nlink, inode.ino,
                  xattrs=self.fs.xattrs(inode))
        if stat.S_ISREG(mode):
            e.size = inode.size
            e.content = lambda: self.fs.data(inode)
        elif stat.S_ISLNK(mode):
            e.linkname = os.fsdecode(self.fs.readlink(inode))
        elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
            e.devmajor, e.devminor = inode.rdev
        return e

    def export(self) -> Iterator[bytes]:
        """The tar of everything below the tree's top (not the top itself), then the end marker."""
        writer = TarWriter()
        seen = {self.top.ino}
        stack = [(iter(self._children(self.top, "the top directory")), "")]
        while stack:
            children, prefix = stack[-1]
            child = next(children, None)
            if child is None:
                stack.pop()
                continue
            name, ino = child
            arcname = prefix + os.fsdecode(name)
            try:
                inode = self.fs.inode(ino)
                yield from writer.entry(self._entry(inode, arcname))
                if stat.S_ISDIR(inode.mode):
                    if ino in seen:
                        raise CorruptFilesystem(f"directory inode {ino} is reached twice (a loop)")
                    seen.add(ino)
                    stack.append((iter(self._children(inode, arcname)), arcname + "/"))
            except CorruptFilesystem as e:
                raise CorruptFilesystem(f"{arcname}: {e}") from None
        yield END_OF_ARCHIVE

    def _lookup_dir(self, inode: Inode) -> dict[bytes, int]:
        """Name -> inode number of a directory's entries (kept for the next lookups)."""
        found = self._dirs.get(inode.ino)
        if found is None:
            pairs = list(self.fs.entries(inode))
            found = dict(pairs)
            if len(found) < len(pairs):
                self._children(inode, f"directory inode {inode.ino}")  # names the duplicate
            if self._cached + len(found) > _DIR_CACHE:
                self._dirs.clear()
                self._cached = 0
            self._dirs[inode.ino] = found
            self._cached += len(found)
        return found

    def _parent(self, dirs: list[str]) -> Inode:
        """The directory at ``dirs`` below the top, symlinks resolved as in a chroot at the top
        (``archive.fsroot.RootDir`` with ``follow=True``); kept for the next lookups."""
        key = "/".join(dirs)
        found = self._parents.get(key)
        if found is not None:
            return found
        real: list[tuple[str, Inode]] = []  # the directories walked into, from the top
        todo = list(reversed(dirs))
        links = 0
        while todo:
            comp = todo.pop()
            if comp in ("", "."):
                continue
            if comp == "..":
                real = real[:-1]
                continue
            ino = self._lookup_dir(real[-1][1] if real else self.top).get(os.fsencode(comp))
            if ino is None:
                raise Unreadable(os.strerror(errno.ENOENT))
            node = self.fs.inode(ino)
            if stat.S_ISLNK(node.mode):
                links += 1
                if links > MAX_SYMLINKS:
                    raise Unreadable(f"too many levels of symlinks resolving {key!r}")
                target = os.fsdecode(self.fs.readlink(node))
                if not target:
                    raise Unreadable(f"{'/'.join([n for n, _ in real] + [comp])!r} is an empty symlink")
                if target.startswith("/"):
                    real = []
                todo.extend(reversed(target.split("/")))
                continue
            if not stat.S_ISDIR(node.mode):
                raise Unreadable(f"{'/'.join([n for n, _ in real] + [comp])!r} is not a directory")
            real.append((comp, node))
        found = real[-1][1] if real else self.top
        if len(self._parents) >= _PARENT_CACHE:
            self._parents.clear()
        self._parents[key] = found
        return found

    def _lookup(self, parts: list[str]) -> Inode:
        """The regular file at ``parts`` below the top (the last component never followed)."""
        ino = self._lookup_dir(self._parent(parts[:-1])).get(os.fsencode(parts[-1]))
        if ino is None:
            raise Unreadable(os.strerror(errno.ENOENT))
        node = self.fs.inode(ino)
        if not stat.S_ISREG(node.mode):
            raise Unreadable(NOT_REGULAR)
        return node

    def read(self, parts: list[str], size: int) -> Iterator[bytes]:
        """The first ``size`` bytes of the regular file at ``parts`` (fewer when it is shorter), in
        chunks (``tarsplit.FileSource``); damage on the way is a ``CorruptFilesystem`` naming the path."""
        try:
            inode = self._lookup(parts)
            yield from self.fs.data(inode, min(size, inode.size))
        except CorruptFilesystem as e:
            raise CorruptFilesystem(f"{'/'.join(parts)}: {e}") from None
