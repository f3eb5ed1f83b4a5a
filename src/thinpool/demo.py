"""``thinpool demo``: a guided walk through thin metadata, step by step.

Creates a sparse metadata file, formats it as the kernel would, creates a
thin device, maps blocks, snapshots it, breaks sharing with a copy-on-write
remap, snapshots the snapshot, then checks and dumps the result with
thinpool's own tools (and with thin-provisioning-tools when installed).
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import tempfile
from typing import Callable

from .thin.builder import format_metadata
from .thin.metadata import PoolMetadata
from .tools.check import check
from .tools.dump import dump
from .tools.ls import DEFAULT_FIELDS, format_ls, list_devices

Echo = Callable[[str], None]
BLOCK_SECTORS = 128  # 64 KiB data blocks, Docker's default


def _map(md: PoolMetadata, dev: int, vblocks: range, echo: Echo) -> None:
    for v in vblocks:
        old = md.lookup(dev, v)
        new = md.alloc_data_block()
        md.insert(dev, v, new)
        how = "copy-on-write of shared" if old and old.shared else "provisioned"
        echo(f"    dev {dev} block {v} -> data block {new} ({how})")


def run_demo(workdir: str | None, echo: Echo) -> None:
    own_dir = workdir is None
    root = tempfile.mkdtemp(prefix="thinpool-demo-") if own_dir else workdir
    os.makedirs(root, exist_ok=True)
    meta = os.path.join(root, "metadata")
    try:
        echo(f"# working in {root}")
        echo("$ truncate -s 16M metadata      # a sparse file becomes the metadata device")
        with open(meta, "wb") as f:
            f.truncate(16 << 20)
        echo("$ thinpool: format metadata (64 KiB data blocks, 1 GiB of data = 16384 blocks)")
        format_metadata(meta, BLOCK_SECTORS, 16384)
        st = os.stat(meta)
        echo(f"    apparent size {st.st_size} bytes, allocated {st.st_blocks * 512} bytes")

        with PoolMetadata(meta) as md:
            echo("$ message: create_thin 0")
            md.create_thin(0)
            _map(md, 0, range(4), echo)
            md.commit()
            echo(f"    committed: transaction {md.trans_id}, time {md.time}")

            echo("$ message: create_snap 1 0    # O(1): shares device 0's whole mapping tree")
            md.create_snap(1, 0)
            echo("  write to block 1 of snapshot 1 breaks sharing:")
            _map(md, 1, range(1, 2), echo)
            echo("$ message: create_snap 2 1    # a snapshot of a snapshot")
            md.create_snap(2, 1)
            _map(md, 2, range(4, 5), echo)
            echo("$ message: set_transaction_id 0 1")
            md.set_transaction_id(0, 1)
            md.commit()
            for dev in md.device_ids():
                d = md.details(dev)
                echo(f"    device {dev}: mapped {d.mapped_blocks}, created at time "
                     f"{d.creation_time}, snapshotted at time {d.snapshotted_time}")

        echo("$ thinpool check metadata")
        report = check(meta)
        echo("    clean" if report.clean else "    " + "\n    ".join(report.errors + report.leaks))
        if shutil.which("thin_check"):
            rc = subprocess.run(["thin_check", "-q", meta]).returncode
            echo(f"$ thin_check metadata   -> exit {rc} (the real thin-provisioning-tools)")
        echo("$ thinpool ls metadata")
        echo(format_ls(list_devices(meta), list(DEFAULT_FIELDS), headers=True,
                       data_block_size=BLOCK_SECTORS).rstrip("\n"))
        echo("$ thinpool dump metadata")
        out = io.StringIO()
        dump(meta, out)
        echo(out.getvalue().rstrip("\n"))
    finally:
        if own_dir:
            shutil.rmtree(root, ignore_errors=True)
