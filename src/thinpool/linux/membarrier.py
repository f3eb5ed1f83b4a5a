"""membarrier(2): one process makes every thread of the registered processes pass a full
memory barrier, so readers on the fast path need no fence of their own.

Only the commands thinpool uses, on x86-64 (the system call number is
the x86-64 one; callers check the architecture):

* ``supported()``: whether the kernel offers ``MEMBARRIER_CMD_GLOBAL_EXPEDITED``
  (Linux 4.16, and not filtered by a seccomp profile);
* ``register()``: the calling process asks to take part
  (``MEMBARRIER_CMD_REGISTER_GLOBAL_EXPEDITED``; inherited by none, kept across threads);
* ``barrier()``: when it returns, every running thread of every registered
  process has executed a full memory barrier after the caller's earlier
  loads and stores, and every such thread not running will do so before it
  runs again (a context switch is a barrier).  Costs an interprocessor
  interrupt per CPU running such a thread: a few microseconds here.
"""

from __future__ import annotations

import ctypes
import errno
import os

from ..errors import ThinpoolError
from . import libc

_SYS_MEMBARRIER = 324  # x86-64
_CMD_QUERY = 0
_CMD_GLOBAL_EXPEDITED = 1 << 1
_CMD_REGISTER_GLOBAL_EXPEDITED = 1 << 2

_syscall = libc.function("syscall", ctypes.c_long)


class MembarrierError(ThinpoolError):
    """membarrier(2) failed."""


def _call(cmd: int) -> int:
    ret = _syscall(_SYS_MEMBARRIER, ctypes.c_int(cmd), ctypes.c_uint(0), ctypes.c_int(0))
    if ret < 0:
        err = libc.last_errno()
        raise MembarrierError(f"membarrier: {errno.errorcode.get(err, err)} "
                              f"({os.strerror(err)})")
    return int(ret)


def supported() -> bool:
    """Whether global expedited barriers are available."""
    try:
        return bool(_call(_CMD_QUERY) & _CMD_GLOBAL_EXPEDITED)
    except MembarrierError:
        return False


def register() -> None:
    """Make the calling process a target of ``barrier``."""
    _call(_CMD_REGISTER_GLOBAL_EXPEDITED)


def barrier() -> None:
    """A full memory barrier in every thread of every registered process (module docstring)."""
    _call(_CMD_GLOBAL_EXPEDITED)
