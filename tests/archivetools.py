"""Helpers for the archive tests: building tars with tarfile, and tree snapshots."""

from __future__ import annotations

import hashlib
import io
import os
import stat
import tarfile
from pathlib import Path

import pytest

needs_root = pytest.mark.skipif(os.geteuid() != 0,
                                reason="needs root: device nodes, chown, trusted.* xattrs")


def ti(name: str, kind: bytes = tarfile.REGTYPE, *, mode: int = 0o644, uid: int = 0, gid: int = 0,
       mtime: int = 1_600_000_000, linkname: str = "", devmajor: int = 0, devminor: int = 0,
       pax: dict[str, str] | None = None) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.uid, info.gid = uid, gid
    info.mtime = mtime
    info.linkname = linkname
    info.devmajor, info.devminor = devmajor, devminor
    if pax:
        info.pax_headers = dict(pax)
    return info


def build_tar(*entries: tuple[tarfile.TarInfo, bytes | None] | tarfile.TarInfo,
              fmt: int = tarfile.PAX_FORMAT) -> bytes:
    """A tar of (TarInfo, data) pairs (data None or a bare TarInfo: no data)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        for item in entries:
            info, data = item if isinstance(item, tuple) else (item, None)
            if data is not None:
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
            else:
                tf.addfile(info)
    return buf.getvalue()


def reg(name: str, data: bytes = b"", **kw: object) -> tuple[tarfile.TarInfo, bytes]:
    return ti(name, tarfile.REGTYPE, **kw), data  # type: ignore[arg-type]


def dir_(name: str, mode: int = 0o755, **kw: object) -> tarfile.TarInfo:
    return ti(name, tarfile.DIRTYPE, mode=mode, **kw)  # type: ignore[arg-type]


def sym(name: str, target: str, **kw: object) -> tarfile.TarInfo:
    return ti(name, tarfile.SYMTYPE, mode=0o777, linkname=target, **kw)  # type: ignore[arg-type]


def hard(name: str, target: str, **kw: object) -> tarfile.TarInfo:
    return ti(name, tarfile.LNKTYPE, linkname=target, **kw)  # type: ignore[arg-type]


def snapshot(root: str | Path, *, atime: bool = False, skip: str | Path | None = None) -> dict[str, tuple]:
    """path -> every piece of metadata a layer carries (content as a digest), never following links."""
    root = str(root)
    skip_s = str(skip) if skip is not None else None
    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        if skip_s is not None:
            dirnames[:] = [d for d in dirnames if os.path.join(dirpath, d) != skip_s]
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            rel = os.path.relpath(path, root)
            kind = stat.S_IFMT(st.st_mode)
            content: object = None
            if stat.S_ISREG(st.st_mode):
                with open(path, "rb") as f:
                    content = hashlib.sha256(f.read()).hexdigest()
            elif stat.S_ISLNK(st.st_mode):
                content = os.readlink(path)
            try:
                xattrs = {k: os.getxattr(path, k, follow_symlinks=False)
                          for k in sorted(os.listxattr(path, follow_symlinks=False))}
            except OSError:
                xattrs = {}
            mtime = st.st_mtime_ns
            out[rel] = (kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid,
                        st.st_size if not stat.S_ISDIR(st.st_mode) else None,
                        mtime, st.st_rdev, content, xattrs) + ((st.st_atime_ns,) if atime else ())
    return out


def outside_state(base: str | Path, root: str | Path) -> dict[str, tuple]:
    """Snapshot of everything under ``base`` except the layer root (plus link counts)."""
    snap = snapshot(base, skip=root)
    for rel in list(snap):
        snap[rel] = snap[rel] + (os.lstat(os.path.join(base, rel)).st_nlink,)
    return snap
