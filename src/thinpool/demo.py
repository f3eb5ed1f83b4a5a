"""``thinpool demo``: the dm-thin seed walkthrough, at block level, in userspace.

Two sparse files become a pool; thin volume 0 gets a line of text; snapshot
1 of it gets another line while volume 0 stays unchanged; snapshot 2 of the
snapshot holds both.  Each step is printed like the original shell session,
followed by the pool and thin status lines, a metadata check (thinpool's and,
when installed, the real thin_check) and the thin_dump XML.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import tempfile
from typing import Callable

from .pool.engine import Pool
from .tools.check import check
from .tools.dump import dump

Echo = Callable[[str], None]
BASE = b"hello world, I am a base\n"
SNAP1 = b"I am snap1\n"


def _sizes(path: str) -> str:
    st = os.stat(path)
    return f"apparent {st.st_size:>11,} bytes, allocated {st.st_blocks * 512:>9,} bytes"


def _show(pool: Pool, dev: int, echo: Echo) -> None:
    with pool.volume(dev) as vol:
        text = bytes(vol.read(0, 64)).rstrip(b"\0").decode()
    echo(f"$ thinpool read pool {dev} --length 64")
    for line in text.splitlines():
        echo(f"    {line}")


def run_demo(workdir: str | None, echo: Echo) -> None:
    own_dir = workdir is None
    root = tempfile.mkdtemp(prefix="thinpool-demo-") if workdir is None else workdir
    os.makedirs(root, exist_ok=True)
    pool_dir = os.path.join(root, "pool")
    try:
        echo(f"# working in {root}")
        echo("$ thinpool pool create pool --data-size 1G --metadata-size 16M --block-size 64K")
        Pool.create(pool_dir, "1G", "16M")
        for name in ("data", "metadata"):
            echo(f"    pool/{name:<9} {_sizes(os.path.join(pool_dir, name))}")
        with Pool(pool_dir) as pool:
            echo('$ thinpool message pool "create_thin 0"')
            pool.message("create_thin 0")
            echo(f'$ echo "{BASE.decode().strip()}" | thinpool write pool 0')
            with pool.volume(0) as vol:
                vol.write(0, BASE)
            echo('$ thinpool message pool "create_snap 1 0"     # O(1): shares volume 0\'s tree')
            pool.message("create_snap 1 0")
            echo(f'$ echo "{SNAP1.decode().strip()}" | thinpool write pool 1 --offset {len(BASE)}')
            with pool.volume(1) as vol:
                vol.write(len(BASE), SNAP1)  # copy-on-write: block 0 is shared with volume 0
            _show(pool, 0, echo)
            echo("    (volume 0 is unchanged: the write to the snapshot copied the shared block)")
            _show(pool, 1, echo)
            echo('$ thinpool message pool "create_snap 2 1"     # a snapshot of a snapshot')
            pool.message("create_snap 2 1")
            _show(pool, 2, echo)
            echo("$ thinpool status pool")
            echo(f"    {pool.status().line()}")
            for dev in (0, 1, 2):
                echo(f"$ thinpool status pool --thin {dev}")
                echo(f"    {pool.thin_status(dev).line()}")
        echo("# after the walkthrough: three volumes share two 64 KiB data blocks")
        for name in ("data", "metadata"):
            echo(f"    pool/{name:<9} {_sizes(os.path.join(pool_dir, name))}")
        meta = os.path.join(pool_dir, "metadata")
        echo("$ thinpool check pool/metadata")
        report = check(meta)
        echo("    clean" if report.clean else "    " + "\n    ".join(report.errors + report.leaks))
        if shutil.which("thin_check"):
            rc = subprocess.run(["thin_check", "-q", meta]).returncode
            echo(f"$ thin_check pool/metadata     # the kernel project's own checker\n    exit {rc}")
        echo("$ thinpool dump pool/metadata")
        out = io.StringIO()
        dump(meta, out)
        echo(out.getvalue().rstrip("\n"))
    finally:
        if own_dir:
            shutil.rmtree(root, ignore_errors=True)
