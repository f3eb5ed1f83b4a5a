"""Shared test fixtures: kernel-written metadata images and tool helpers."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Any, Iterator

import pytest

import leakguard
from thinpool.tools.pack import unpack

KERNEL_PACKS = Path(__file__).resolve().parent / "fixtures" / "kernel-metadata"
"""The kernel-written packs (see its README.md); their images are unpacked on demand."""
KERNEL_FIXTURES = KERNEL_PACKS / "expected"
"""thin-provisioning-tools 0.9.0 results for each image, and index.json."""
KERNEL_IMAGES = [
    "tmeta",
    "tmeta_with_metadata_snap",
    "tmeta_with_corrupted_metadata_snap",
    "corrupted_tmeta_with_metadata_snap",
    "tmeta_device_id_reuse",
    "tmeta_device_id_reuse_with_corrupted_thins",
    "tmeta_with_deleted_snapshot",
    "tmeta_with_empty_roots",
    "tmeta_with_shared_internal_root",
    "tmeta_with_shared_internals_and_leaves",
]


def require_tool(name: str) -> str:
    """Path of an external tool; a missing tool fails the test (CI installs them all)."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"required tool {name!r} is not installed (see .ci/run)")
    return path


def run_tool(*args: str | os.PathLike[str], check: bool = False) -> subprocess.CompletedProcess[str]:
    require_tool(str(args[0]))
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, check=check)


@pytest.fixture(scope="session")
def kernel_index() -> dict:
    path = KERNEL_FIXTURES / "index.json"
    if not path.exists():
        pytest.fail(f"kernel metadata fixtures missing at {KERNEL_FIXTURES}")
    return json.loads(path.read_text())["images"]


@pytest.fixture(scope="session")
def kernel_image(tmp_path_factory: pytest.TempPathFactory, kernel_index: dict):
    """Function NAME -> path of the (read-only) kernel metadata image.

    The image is unpacked from NAME.pack by thinpool's own unpacker and must
    have the sha256 that index.json records for it, else the test fails.
    """
    root = tmp_path_factory.mktemp("kernel-metadata")

    def get(name: str) -> Path:
        out = root / f"{name}.bin"
        if not out.exists():
            unpack(KERNEL_PACKS / f"{name}.pack", out)
            digest = hashlib.sha256(out.read_bytes()).hexdigest()
            if digest != kernel_index[name]["image_sha256"]:
                out.unlink()
                pytest.fail(f"{name}.pack unpacks to an image with sha256 {digest}, "
                            f"index.json expects {kernel_index[name]['image_sha256']}")
            out.chmod(0o444)
        return out

    return get


_module_state: dict[str, leakguard.KernelState] = {}
_leaks: list[str] = []


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):
    """Compare mounts, loop devices and servers before a module's first test and after its
    last (leakguard.py)."""
    if leakguard.MODE == "off":
        yield
        return
    module = item.nodeid.split("::")[0]
    _module_state.setdefault(module, leakguard.KernelState.now())
    yield
    if nextitem is not None and nextitem.nodeid.split("::")[0] == module:
        return
    leaks = leakguard.KernelState.now().leaked_since(_module_state.pop(module))
    if not leaks:
        return
    _leaks.append(f"{module} left {leaks}")
    if leakguard.MODE == "fail":
        leakguard.clear(leaks)


def pytest_terminal_summary(terminalreporter) -> None:
    if _leaks:
        terminalreporter.section("leaked mounts, loop devices and servers")
        for line in _leaks:
            terminalreporter.write_line(line)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _leaks and leakguard.MODE == "fail" and exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def _terminate(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def pytest_configure(config: pytest.Config) -> None:
    """SIGTERM (a CI timeout, ``timeout``, ``kill``) stops the run like Ctrl-C does, so that
    fixtures still tear down: stop servers, unmount, detach loop devices."""
    signal.signal(signal.SIGTERM, _terminate)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Each phase's report as ``item.rep_setup`` / ``rep_call`` / ``rep_teardown``, for fixtures
    whose teardown depends on how the test went."""
    outcome: Any = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)
