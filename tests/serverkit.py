"""Test helpers: a pool server in a subprocess, started and always stopped."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

THINPOOL = [sys.executable, "-m", "thinpool.cli"]


class ServerProcess:
    """``thinpool serve DIR ...`` in the background; ``stop`` (or ``kill``) ends it."""

    def __init__(self, directory: Path, *args: str) -> None:
        self.directory = directory
        self.log = directory.parent / f"{directory.name}-serve.log"
        self.proc = subprocess.Popen([*THINPOOL, "serve", str(directory), *args],
                                     stdout=open(self.log, "ab"), stderr=subprocess.STDOUT)
        self._wait_ready()

    @property
    def nbd_socket(self) -> Path:
        return self.directory / "nbd.sock"

    def uri(self, export: str | int) -> str:
        return f"nbd+unix:///{export}?socket={self.nbd_socket}"

    def _wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        control = self.directory / "control.sock"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"thinpool serve exited with {self.proc.returncode}: "
                                     f"{self.log.read_text()}")
            if control.exists():
                try:
                    with socket.socket(socket.AF_UNIX) as s:
                        s.connect(str(control))
                    return
                except OSError:
                    pass
            time.sleep(0.05)
        self.kill()
        raise AssertionError(f"thinpool serve did not come up: {self.log.read_text()}")

    def stop(self, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)

    def output(self) -> str:
        return self.log.read_text()


def short_tmp(prefix: str = "tp") -> Path:
    """A fresh directory with a short path (unix socket paths are limited to 107 bytes)."""
    import tempfile

    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


def nbd_env() -> dict[str, str]:
    return dict(os.environ, LIBNBD_DEBUG="0")
