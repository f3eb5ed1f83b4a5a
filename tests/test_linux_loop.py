"""linux/loop against real loop devices (root and /dev/loop-control)."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from thinpool.linux import loop

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/loop-control"),
                                reason="needs root and loop devices")


def test_a_device_being_detached_reads_as_not_attached(tmp_path: Path) -> None:
    """While a detach is under way the device's sysfs files exist but reading them fails
    (ENODEV): backing_file, direct_io and find answer "not attached", never raise."""
    image = tmp_path / "img"
    image.write_bytes(b"")
    os.truncate(image, 1 << 20)
    current: list[str] = []
    errors: list[BaseException] = []
    answers: set[str | None] = set()
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            for dev in current[-1:]:
                try:
                    answers.add(loop.backing_file(dev))
                    loop.direct_io(dev)
                    loop.find(image)
                except BaseException as e:  # noqa: BLE001  # reported by the test
                    errors.append(e)
                    return

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        for _ in range(200):
            dev = loop.attach(image)
            current.append(dev)
            try:
                assert loop.backing_file(dev) == str(image)
            finally:
                loop.detach(dev)
            if errors:
                break
    finally:
        done.set()
        watcher.join()
    assert errors == []
    assert str(image) in answers  # the watcher saw attached devices too
    assert loop.find(image) == []
