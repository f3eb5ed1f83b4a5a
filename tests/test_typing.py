"""The package is typed (py.typed): mypy must accept it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "thinpool"


def test_mypy_clean() -> None:
    r = subprocess.run([sys.executable, "-m", "mypy", "--ignore-missing-imports", str(SRC)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
