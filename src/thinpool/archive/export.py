"""Producing layer tars from directory trees (Docker's ExportChanges and TarWithOptions).

Each function returns an iterator of ``bytes`` chunks that together form one
uncompressed tar; the tree is read lazily as the iterator is consumed, and
any problem (a missing root, a listed path that vanished, a file that shrank
while being read) is an ArchiveError raised from the iteration.

Every entry carries its type, permission bits including setuid/setgid/sticky,
uid, gid, mtime in whole seconds (as Docker writes it; atime and ctime are not
stored), the symlink target, device numbers, and its xattrs as
``SCHILY.xattr.*`` PAX records, except the ``trusted.overlay.*`` /
``user.overlay.*`` namespaces (overlayfs internals) and ``security.selinux``
(a host label). A ``security.capability`` in the v3 (namespaced) format is
written as v2, as Docker does. Directory names end in "/". Names are
relative, without "./". A non-directory with more than one link is written
once with its data; later paths to the same inode become hard-link entries to
the first. Sockets are skipped (tar cannot hold them). Nothing is followed:
the trees are read through directory fds with O_NOFOLLOW.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Iterable, Iterator

from .apply import OPAQUE_XATTR, OVERLAY_XATTR_PREFIXES, WHITEOUT_OPAQUE, WHITEOUT_PREFIX
from .changes import Change, ChangeKind, change_parts
from .errors import ArchiveError
from .fsroot import RootDir, proc_path
from .tarformat import (BLOCKDEV, CHAR, DIR, END_OF_ARCHIVE, FIFO, LINK, REG, SYMLINK, encode_header,
                        padding)

_SKIPPED_XATTRS = ("security.selinux",)
_CAPS_V2_SIZE = 20
_CHUNK = 1 << 20
_READ_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY


def _type_of(mode: int) -> str | None:
    if stat.S_ISREG(mode):
        return REG
    if stat.S_ISDIR(mode):
        return DIR
    if stat.S_ISLNK(mode):
        return SYMLINK
    if stat.S_ISCHR(mode):
        return CHAR
    if stat.S_ISBLK(mode):
        return BLOCKDEV
    if stat.S_ISFIFO(mode):
        return FIFO
    return None  # socket


def _xattrs(dir_fd: int, name: str) -> dict[str, bytes]:
    path = proc_path(dir_fd, name)
    try:
        keys = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return {}  # no xattr support on this filesystem
    out = {}
    for key in keys:
        try:
            out[key] = os.getxattr(path, key, follow_symlinks=False)
        except OSError:
            continue  # removed meanwhile
    return out


def _tar_xattrs(xattrs: dict[str, bytes]) -> dict[str, bytes]:
    """What of a file's xattrs goes into its tar entry (see the module docstring)."""
    out = {}
    for key, value in xattrs.items():
        if key.startswith(OVERLAY_XATTR_PREFIXES) or key in _SKIPPED_XATTRS:
            continue
        if key == "security.capability" and len(value) > 3 and value[3] == 3:
            value = value[:3] + b"\x02" + value[4:_CAPS_V2_SIZE]
        out[key] = value
    return out


@dataclass(slots=True)
class Entry:
    """One file of a tree as a walker found it, for ``TarWriter.entry``.

    ``mode`` is the whole st_mode; ``mtime`` whole seconds (floor of the
    nanosecond time); ``identity`` is the same for every path of one inode
    (hard links: a non-directory with ``nlink`` > 1 is written once with its
    data, later paths as links to the first); ``xattrs`` are what getxattr(2)
    returns (the writer leaves out and translates what the module docstring
    says); ``content`` yields a regular file's ``size`` bytes, exactly, in
    chunks (fewer is an ArchiveError: the file shrank).
    """

    arcname: str
    mode: int
    uid: int
    gid: int
    mtime: int
    nlink: int = 1
    identity: Hashable = None
    size: int = 0
    linkname: str = ""
    devmajor: int = 0
    devminor: int = 0
    xattrs: dict[str, bytes] = field(default_factory=dict)
    content: Callable[[], Iterator[bytes]] | None = None


class TarWriter:
    """Tar entries of one archive, from ``Entry`` descriptions (any walker's)."""

    def __init__(self) -> None:
        self.links: dict[Hashable, str] = {}

    def whiteout(self, arcname: str, st: os.stat_result | None = None) -> bytes:
        """An empty regular-file entry ``arcname`` (a ``.wh.`` or opaque marker)."""
        if st is None:
            return encode_header(arcname, REG)
        return encode_header(arcname, REG, mode=0o600, uid=st.st_uid, gid=st.st_gid,
                             mtime=st.st_mtime_ns // 1_000_000_000)

    def entry(self, e: Entry) -> Iterator[bytes]:
        """The header (and data) of one file; nothing for a socket."""
        kind = _type_of(e.mode)
        if kind is None:
            return
        xattrs = _tar_xattrs(e.xattrs) if e.xattrs else None

        def header(typeflag: str, **extra: Any) -> bytes:
            return encode_header(e.arcname + ("/" if typeflag == DIR else ""), typeflag,
                                 mode=stat.S_IMODE(e.mode), uid=e.uid, gid=e.gid, mtime=e.mtime, xattrs=xattrs,
                                 **extra)

        if kind == DIR:
            yield header(DIR)
            return
        if e.nlink > 1:
            first = self.links.get(e.identity)
            if first is not None:
                yield header(LINK, linkname=first)
                return
            self.links[e.identity] = e.arcname
        if kind == SYMLINK:
            yield header(SYMLINK, linkname=e.linkname)
        elif kind in (CHAR, BLOCKDEV):
            yield header(kind, devmajor=e.devmajor, devminor=e.devminor)
        elif kind == FIFO:
            yield header(FIFO)
        else:
            yield from self._file(e, header(REG, size=e.size))

    @staticmethod
    def _file(e: Entry, header: bytes) -> Iterator[bytes]:
        assert e.content is not None
        chunks = e.content()
        if e.size <= _CHUNK:
            data = b"".join(chunks)
            if len(data) != e.size:
                raise ArchiveError(f"{e.arcname!r} shrank while being exported")
            yield header + data + padding(e.size)
            return
        yield header
        left = e.size
        for data in chunks:
            left -= len(data)
            if left < 0:
                raise ArchiveError(f"{e.arcname!r} grew while being exported")
            yield data
        if left:
            raise ArchiveError(f"{e.arcname!r} shrank while being exported")
        yield padding(e.size)


def _dir_entry(dir_fd: int, name: str, arcname: str, st: os.stat_result) -> Entry:
    """The ``Entry`` of ``name`` in the directory ``dir_fd`` (lstat result ``st``)."""
    mode = st.st_mode
    e = Entry(arcname, mode, st.st_uid, st.st_gid, st.st_mtime_ns // 1_000_000_000, st.st_nlink,
              (st.st_dev, st.st_ino), xattrs=_xattrs(dir_fd, name))
    if stat.S_ISREG(mode):
        e.size = st.st_size
        e.content = lambda: _file_content(dir_fd, name, arcname, st)
    elif stat.S_ISLNK(mode):
        e.linkname = os.readlink(name, dir_fd=dir_fd)
    elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        e.devmajor, e.devminor = os.major(st.st_rdev), os.minor(st.st_rdev)
    return e


def _file_content(dir_fd: int, name: str, arcname: str, st: os.stat_result) -> Iterator[bytes]:
    """A regular file's ``st.st_size`` bytes (one chunk up to _CHUNK); the file must still be ``st``."""
    fd = os.open(name, _READ_FILE, dir_fd=dir_fd)
    try:
        now = os.fstat(fd)
        if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
            raise ArchiveError(f"{arcname!r} was replaced while being exported")
        left = st.st_size
        if left <= _CHUNK:
            data = os.read(fd, left) if left else b""
            if len(data) < left:
                data += _rest(fd, left - len(data), arcname)
            yield data
            return
        while left:
            data = os.read(fd, min(left, _CHUNK))
            if not data:
                return  # the writer says it shrank
            left -= len(data)
            yield data
    finally:
        os.close(fd)


def _rest(fd: int, n: int, arcname: str) -> bytes:
    parts = []
    while n:
        data = os.read(fd, n)
        if not data:
            raise ArchiveError(f"{arcname!r} shrank while being exported")
        parts.append(data)
        n -= len(data)
    return b"".join(parts)


def _sorted_entries(dir_fd: int) -> list[os.DirEntry[str]]:
    with os.scandir(dir_fd) as it:
        return sorted(it, key=lambda e: os.fsencode(e.name))


def _walk(writer: TarWriter, rd: RootDir, dir_fd: int, prefix: str, opaque_xattr: str | None) -> Iterator[bytes]:
    """Pre-order, names sorted at each level (Go's filepath.WalkDir order)."""
    for entry in _sorted_entries(dir_fd):
        st = entry.stat(follow_symlinks=False)
        arcname = prefix + entry.name
        if opaque_xattr is not None and stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
            yield writer.whiteout(prefix + WHITEOUT_PREFIX + entry.name, st)
            continue
        yield from writer.entry(_dir_entry(dir_fd, entry.name, arcname, st))
        if stat.S_ISDIR(st.st_mode):
            child = rd.open_dir(dir_fd, entry.name)
            try:
                if opaque_xattr is not None and _is_opaque(child, opaque_xattr):
                    yield encode_header(arcname + "/" + WHITEOUT_OPAQUE, REG, mode=stat.S_IMODE(st.st_mode) & 0o777,
                                        uid=st.st_uid, gid=st.st_gid)
                yield from _walk(writer, rd, child, arcname + "/", opaque_xattr)
            finally:
                os.close(child)


def _is_opaque(dir_fd: int, opaque_xattr: str) -> bool:
    try:
        return os.getxattr(dir_fd, opaque_xattr) == b"y"
    except OSError:
        return False


def _guarded(root: str, chunks: Iterator[bytes]) -> Iterator[bytes]:
    try:
        yield from chunks
    except OSError as e:
        where = f" ({e.filename})" if isinstance(e.filename, str) else ""
        raise ArchiveError(f"cannot export {root}: {e.strerror or e}{where}") from None


def export_tree(root: str) -> Iterator[bytes]:
    """A tar of everything below ``root`` (not the root itself): a layer with no parent."""
    def gen() -> Iterator[bytes]:
        with RootDir(root) as rd:
            top = rd.open_dir(rd.fd)
            try:
                yield from _walk(TarWriter(), rd, top, "", None)
            finally:
                os.close(top)
        yield END_OF_ARCHIVE
    return _guarded(root, gen())


def export_overlay(upper: str, *, opaque_xattr: str = OPAQUE_XATTR) -> Iterator[bytes]:
    """A layer tar of an overlayfs upper directory (overlay2's native Diff).

    Like export_tree, except that a 0:0 character device NAME becomes an empty
    ``.wh.NAME`` entry (mode 0600, its owner and mtime kept) and a directory
    whose ``opaque_xattr`` is "y" is followed by an empty ``DIR/.wh..wh..opq``
    entry (the directory's permission bits and owner). Overlayfs
    redirect_dir / metacopy upper directories are not supported (Docker turns
    native diff off for them).
    """
    def gen() -> Iterator[bytes]:
        with RootDir(upper) as rd:
            top = rd.open_dir(rd.fd)
            try:
                if _is_opaque(top, opaque_xattr):
                    st = os.fstat(top)
                    yield encode_header(WHITEOUT_OPAQUE, REG, mode=stat.S_IMODE(st.st_mode) & 0o777,
                                        uid=st.st_uid, gid=st.st_gid)
                yield from _walk(TarWriter(), rd, top, "", opaque_xattr)
            finally:
                os.close(top)
        yield END_OF_ARCHIVE
    return _guarded(upper, gen())


def export_changes(root: str, changes: Iterable[Change]) -> Iterator[bytes]:
    """A layer tar of ``changes`` (from ``changes()``) read from the tree ``root``.

    Entries are sorted by path; a Delete becomes an empty ``.wh.<basename>``
    entry (mode 0, mtime 0); an Add or Modify of a directory writes only the
    directory's own header (its changed contents are changes of their own).
    A listed path that no longer exists is an ArchiveError.
    """
    ordered = sorted(changes, key=lambda c: os.fsencode(c.path))

    def gen() -> Iterator[bytes]:
        writer = TarWriter()
        with RootDir(root) as rd:
            for change in ordered:
                parts = change_parts(change.path)
                if change.kind == ChangeKind.DELETE:
                    yield writer.whiteout("/".join(parts[:-1] + [WHITEOUT_PREFIX + parts[-1]]))
                    continue
                try:
                    pfd, _ = rd.parent(parts, follow=False)
                    st = os.stat(parts[-1], dir_fd=pfd, follow_symlinks=False)
                except FileNotFoundError:
                    raise ArchiveError(f"cannot export {change.path}: it no longer exists under {root}") from None
                yield from writer.entry(_dir_entry(pfd, parts[-1], "/".join(parts), st))
        yield END_OF_ARCHIVE
    return _guarded(root, gen())
