"""Opening outputs without destroying inputs.

Every command that writes a file takes its inputs first; an output that is
the same file as one of them (the same inode, whatever the path, symlinks and
hard links included; the same device for block devices) is refused before a
byte of it changes.  Outputs are truncated only after that check.
"""

from __future__ import annotations

import os
import stat
from typing import Iterable

from .errors import ThinpoolError

PathLike = str | os.PathLike[str]


class SameFileError(ThinpoolError):
    """An output names the same file or device as an input."""


def _identity(st: os.stat_result) -> tuple[int, int]:
    if stat.S_ISBLK(st.st_mode) or stat.S_ISCHR(st.st_mode):
        return (-1, st.st_rdev)
    return (st.st_dev, st.st_ino)


def same_file(a: os.stat_result, b: os.stat_result) -> bool:
    """Whether two stats name the same file (same inode) or the same device."""
    return _identity(a) == _identity(b)


def same_path(a: PathLike, b: PathLike) -> bool:
    """Whether two paths name the same file or device (equal paths if either is missing)."""
    try:
        return same_file(os.stat(a), os.stat(b))
    except OSError:
        return os.path.abspath(a) == os.path.abspath(b)


def _identities(inputs: Iterable[PathLike]) -> dict[tuple[int, int], str]:
    out = {}
    for path in inputs:
        try:
            out[_identity(os.stat(path))] = os.fspath(path)
        except OSError:
            continue  # an input that does not exist cannot be overwritten
    return out


def refuse_same_file(output: PathLike, inputs: Iterable[PathLike]) -> None:
    """Raise ``SameFileError`` if ``output`` exists and is one of ``inputs``."""
    try:
        st = os.stat(output)
    except OSError:
        return
    _refuse(output, _identity(st), _identities(inputs))


def _refuse(output: PathLike, ident: tuple[int, int], inputs: dict[tuple[int, int], str]) -> None:
    if ident in inputs:
        same = inputs[ident]
        what = "this command reads it" if os.fspath(output) == same else f"it is {same}, which this command reads"
        raise SameFileError(f"refusing to write to {os.fspath(output)}: {what}")


def claim_output(fd: int, name: str, inputs: Iterable[PathLike], truncate: bool = True) -> None:
    """Check an output opened elsewhere (no ``O_TRUNC``) against ``inputs``, then truncate it.

    For outputs whose descriptor crossed a process boundary (the pool
    server's control socket): the check is on the open file itself.
    """
    st = os.fstat(fd)
    _refuse(name, _identity(st), _identities(inputs))
    if truncate and stat.S_ISREG(st.st_mode):
        os.ftruncate(fd, 0)


def refuse_input(fd: int, name: str, outputs: Iterable[PathLike]) -> None:
    """Refuse an input (an open fd) that is one of the files a command writes."""
    ident = _identity(os.fstat(fd))
    for out in outputs:
        try:
            if _identity(os.stat(out)) == ident:
                raise SameFileError(f"refusing to read {name}: it is {os.fspath(out)}, which "
                                    "this command writes")
        except OSError:
            continue


def open_output(path: PathLike, inputs: Iterable[PathLike], truncate: bool = True,
                create: bool = True) -> int:
    """A writable fd for ``path``, checked against ``inputs`` before anything changes.

    A regular file is created if missing (``create``) and truncated after the
    check (``truncate``); a device is used as it is.  The caller closes the fd.
    """
    flags = os.O_WRONLY | os.O_CLOEXEC | (os.O_CREAT if create else 0)
    fd = os.open(path, flags, 0o644)
    try:
        st = os.fstat(fd)
        _refuse(path, _identity(st), _identities(inputs))
        if truncate and stat.S_ISREG(st.st_mode):
            os.ftruncate(fd, 0)
    except OSError as e:
        os.close(fd)
        raise OSError(e.errno, e.strerror, os.fspath(path)) from None
    except BaseException:
        os.close(fd)
        raise
    return fd
