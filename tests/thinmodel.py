"""Test helpers: read thin_dump XML into a plain model, run the real tools."""

from __future__ import annotations

import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

Model = dict[int, dict[int, tuple[int, int]]]  # dev -> vblock -> (data block, time)


def parse_dump(xml_text: str) -> tuple[dict[str, str], Model, dict[int, dict[str, int]]]:
    root = ET.fromstring(xml_text)
    devices: Model = {}
    details: dict[int, dict[str, int]] = {}
    for dev in root.findall("device"):
        dev_id = int(dev.get("dev_id"))
        maps: dict[int, tuple[int, int]] = {}
        for m in dev:
            t = int(m.get("time"))
            if m.tag == "single_mapping":
                maps[int(m.get("origin_block"))] = (int(m.get("data_block")), t)
            else:
                o, d, n = int(m.get("origin_begin")), int(m.get("data_begin")), int(m.get("length"))
                for i in range(n):
                    maps[o + i] = (d + i, t)
        devices[dev_id] = maps
        details[dev_id] = {k: int(v) for k, v in dev.attrib.items()}
    return dict(root.attrib), devices, details


def thin_dump(meta: Path | str, *args: str) -> str:
    r = subprocess.run(["thin_dump", *args, str(meta)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return r.stdout


def thin_check(meta: Path | str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["thin_check", *args, str(meta)], capture_output=True, text=True)


def assert_thin_check_clean(meta: Path | str, *args: str) -> None:
    r = thin_check(meta, *args)
    assert r.returncode == 0, f"thin_check {args} failed:\n{r.stdout}\n{r.stderr}"
