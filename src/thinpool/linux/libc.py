"""C library functions that Python's ``os`` module does not wrap, through ctypes.

``function(name, restype, argtypes)`` returns a new function object of the C
library the interpreter runs on, with errno kept (``use_errno``), so modules
that declare their own argument types for a function never change each
other's. ``os_error(filename)`` turns the errno of the last failed call into
the ``OSError`` Python's own wrappers would raise (``FileNotFoundError`` and
the like).

Thread safe: ctypes keeps errno per thread.
"""

from __future__ import annotations

import ctypes
import os
from typing import Any, Callable

_LIBC = ctypes.CDLL(None, use_errno=True)  # the C library the interpreter runs on


def function(name: str, restype: Any = ctypes.c_int,
             argtypes: list[Any] | None = None) -> Callable[..., Any]:
    """The C library's ``name``: a new function object (``CDLL[name]`` is never shared)."""
    fn = _LIBC[name]
    fn.restype = restype
    if argtypes is not None:
        fn.argtypes = argtypes
    return fn


def last_errno() -> int:
    """errno after the calling thread's last call through ``function``."""
    return ctypes.get_errno()


def os_error(filename: str | None = None) -> OSError:
    """The ``OSError`` for errno after the calling thread's last call through ``function``."""
    err = last_errno()
    if filename is None:
        return OSError(err, os.strerror(err))
    return OSError(err, os.strerror(err), filename)
