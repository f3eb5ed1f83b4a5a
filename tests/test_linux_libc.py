"""linux.libc: the C library's functions through ctypes, errno as OSError."""

from __future__ import annotations

import ctypes
import errno
import os
from pathlib import Path

import pytest

from thinpool.linux import libc


def test_each_caller_gets_its_own_function_object() -> None:
    a = libc.function("statfs", ctypes.c_int, [ctypes.c_char_p, ctypes.c_void_p])
    b = libc.function("statfs", ctypes.c_long)
    assert a is not b
    assert a.argtypes == [ctypes.c_char_p, ctypes.c_void_p] and a.restype is ctypes.c_int
    assert b.argtypes is None and b.restype is ctypes.c_long  # declaring b left a alone


def test_a_failed_call_becomes_the_oserror_python_would_raise(tmp_path: Path) -> None:
    rmdir = libc.function("rmdir", ctypes.c_int, [ctypes.c_char_p])
    missing = str(tmp_path / "missing")
    assert rmdir(os.fsencode(missing)) == -1
    err = libc.os_error(missing)
    assert isinstance(err, FileNotFoundError) and err.filename == missing
    with pytest.raises(FileNotFoundError):
        os.rmdir(missing)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "f").write_bytes(b"")
    assert rmdir(os.fsencode(str(tmp_path / "full"))) == -1
    assert libc.last_errno() == libc.os_error().errno == errno.ENOTEMPTY
    assert rmdir(os.fsencode(str(tmp_path / "full" / "f"))) == -1  # ENOTDIR
    assert isinstance(libc.os_error(), NotADirectoryError)
