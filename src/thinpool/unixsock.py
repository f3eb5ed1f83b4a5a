"""Unix stream sockets the way thinpool's servers need them.

* Paths of any length: ``sockaddr_un`` holds 107 bytes, pool directories can
  be deeper; a long path is reached through ``/proc/self/fd/N/NAME`` of its
  directory (``addressable``), for binding and connecting alike.
* ``bind_private``: a listening socket that exists at its path only with
  mode 0600 (made in a private directory, chmod-ed, renamed into place); a
  stale socket file (nobody listening) is replaced, a live one or a file
  that is not a socket is refused.
* ``sendmsg_all``: every byte of several buffers, in as few ``sendmsg``
  calls as the socket takes.
"""

from __future__ import annotations

import os
import socket
import stat
import tempfile
from contextlib import contextmanager
from typing import Iterator, Sequence

from .errors import ThinpoolError

SUN_PATH_MAX = 107  # bytes in sockaddr_un.sun_path, less the terminating NUL


class UnixSocketError(ThinpoolError):
    """A socket path cannot be bound: in use, not a socket, or unusable."""


@contextmanager
def addressable(path: str | os.PathLike[str]) -> Iterator[str]:
    """An address for ``path`` that fits ``sun_path`` (valid inside the ``with``)."""
    path = os.fspath(path)
    if len(os.fsencode(path)) <= SUN_PATH_MAX:
        yield path
        return
    directory, name = os.path.split(os.path.abspath(path))
    fd = os.open(directory, os.O_PATH | os.O_CLOEXEC)
    try:
        yield f"/proc/self/fd/{fd}/{name}"
    finally:
        os.close(fd)


def connect(path: str | os.PathLike[str]) -> socket.socket:
    """A stream socket connected to ``path`` (raises ``OSError`` as ``connect`` does)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        with addressable(path) as address:
            sock.connect(address)
    except BaseException:
        sock.close()
        raise
    return sock


def bind_private(path: str | os.PathLike[str], backlog: int = 64) -> socket.socket:
    """A listening socket at ``path``, mode 0600 from the moment it exists there."""
    path = os.fspath(path)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    except OSError as e:
        raise UnixSocketError(f"unix socket {path}: {e.strerror}") from None
    if st is not None:
        if not stat.S_ISSOCK(st.st_mode):
            raise UnixSocketError(f"unix socket {path}: exists and is not a socket")
        try:
            connect(path).close()
        except (ConnectionRefusedError, FileNotFoundError):
            pass  # stale: replaced by the rename below
        except OSError as e:
            raise UnixSocketError(f"unix socket {path}: {e.strerror}") from None
        else:
            raise UnixSocketError(f"unix socket {path}: another server is listening on it")
    try:
        tmpdir = tempfile.mkdtemp(prefix=".sock-", dir=os.path.dirname(os.path.abspath(path)))
    except OSError as e:
        raise UnixSocketError(f"unix socket {path}: {e.strerror}") from None
    tmp = os.path.join(tmpdir, "s")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        with addressable(tmp) as address:
            sock.bind(address)
        os.chmod(tmp, 0o600)
        sock.listen(backlog)
        os.rename(tmp, path)
    except OSError as e:
        sock.close()
        raise UnixSocketError(f"unix socket {path}: {e.strerror or e}") from None
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        os.rmdir(tmpdir)
    return sock


def sendmsg_all(sock: socket.socket, bufs: Sequence[bytes | memoryview]) -> None:
    """Send all of ``bufs`` (one ``sendmsg`` in the common case; again for what is left)."""
    sent = sock.sendmsg(bufs)
    total = sum(map(len, bufs))
    if sent == total:
        return
    views = [memoryview(b) for b in bufs]
    while True:
        while sent >= len(views[0]):
            sent -= len(views[0])
            views.pop(0)
        views[0] = views[0][sent:]
        total = sum(map(len, views))
        sent = sock.sendmsg(views)
        if sent == total:
            return
