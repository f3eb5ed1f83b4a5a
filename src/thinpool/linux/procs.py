"""Processes: whether a process id is in use."""

from __future__ import annotations

import os


def process_exists(pid: int) -> bool:
    """True while a process ``pid`` exists (also one this process may not signal)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
