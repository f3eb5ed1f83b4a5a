"""``thinpool demo``: the dm-thin seed walkthrough, in userspace, on real filesystems.

Two sparse files become a pool.  Thin volume 0 gets an ext4 filesystem,
mounted through the pool server (a FUSE file on a loop device), with
``id.txt``; snapshot 1 of the mounted volume is mounted beside it and gets
another line and ``snap1.txt`` while volume 0 stays unchanged; snapshot 2 of
the snapshot holds both.  Each step is printed like the original shell
session, followed by the pool and thin status lines, the server's stop
(unmount, detach, commit) and the real ``thin_check``.  The demo cleans up
(unmount, detach, stop) on success, on error and on Ctrl-C.

Where loop devices, /dev/fuse or root are missing it says so and walks
through the same steps at block level (``thinpool read``/``write``),
followed by a metadata check and the thin_dump XML.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import tempfile
from typing import Any, Callable

from .errors import ThinpoolError
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


def _ls(path: str, echo: Echo) -> None:
    """``ls -lsh``-like lines: allocated and apparent sizes of a pool's files."""
    echo(f"$ ls -lsh {os.path.basename(path)}")
    for name in sorted(os.listdir(path)):
        full = os.path.join(path, name)
        if not os.path.isfile(full) or name.startswith("."):
            continue
        st = os.stat(full)
        echo(f"    {_human(st.st_blocks * 512):>6} {_human(st.st_size):>6}  {name}")


def _human(n: int) -> str:
    for unit in ("", "K", "M", "G", "T"):
        if n < 1024 or unit == "T":
            return f"{n:.0f}{unit}" if unit == "" or n >= 10 else f"{n:.1f}{unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def filesystems_unavailable() -> str | None:
    """Why the walkthrough cannot use real filesystems here, or None."""
    if os.geteuid() != 0:
        return "it needs root (FUSE mounts, loop devices and mount)"
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing"
    if not os.path.exists("/dev/loop-control"):
        return "there are no loop devices (/dev/loop-control is missing)"
    for tool in ("mkfs.ext4",):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    return None


def run_demo(workdir: str | None, echo: Echo) -> None:
    """The walkthrough on real filesystems, or at block level where that is impossible."""
    why = filesystems_unavailable()
    if why is None:
        try:
            _run(workdir, echo, _filesystem_walkthrough)
            return
        except _NoKernelDevices as e:
            why = str(e)
    echo(f"# real filesystems are not possible here: {why}; walking through at block level")
    _run(workdir, echo, _block_walkthrough)


class _NoKernelDevices(Exception):
    """Attaching the first volume failed (before anything was shown as done)."""


def _run(workdir: str | None, echo: Echo, walk: Callable[[str, Echo], None]) -> None:
    own_dir = workdir is None
    root = tempfile.mkdtemp(prefix="thinpool-demo-") if workdir is None else workdir
    os.makedirs(root, exist_ok=True)
    try:
        echo(f"# working in {root}")
        walk(root, echo)
    finally:
        if own_dir:
            shutil.rmtree(root, ignore_errors=True)


def _filesystem_walkthrough(root: str, echo: Echo) -> None:
    from .server.control import request
    from .server.daemon import PoolServer, control_path

    pool_dir = os.path.join(root, "pool")
    if os.path.exists(pool_dir):
        raise ThinpoolError(f"{pool_dir} already exists: give the demo an empty directory")
    echo("$ thinpool pool create pool --data-size 1G --metadata-size 16M")
    Pool.create(pool_dir, "1G", "16M")
    _ls(pool_dir, echo)
    server = PoolServer(pool_dir)
    server.start()
    ctl = control_path(pool_dir)

    def call(command: str, **args: Any) -> dict[str, Any]:
        return request(ctl, command, args)

    try:
        echo('$ thinpool message pool "create_thin 0"')
        call("message", text="create_thin 0")
        mnt = [os.path.join(root, f"mnt{i}") for i in range(3)]
        for m in mnt:
            os.makedirs(m, exist_ok=True)
        echo("$ thinpool mount pool 0 mnt0 --mkfs ext4")
        try:
            out = call("mount", id=0, mountpoint=mnt[0], mkfs="ext4")
        except ThinpoolError as e:
            server.stop()
            for path in [pool_dir, *mnt]:  # all made by this run: start over at block level
                shutil.rmtree(path, ignore_errors=True)
            raise _NoKernelDevices(f"attaching volume 0 failed: {e}") from None
        echo(f"    mounted volume 0 ({out['device']}, ext4) at mnt0")
        echo(f'$ echo "{BASE.decode().strip()}" > mnt0/id.txt')
        _write(os.path.join(mnt[0], "id.txt"), BASE)
        echo('$ thinpool message pool "create_snap 1 0"     # mnt0 is frozen meanwhile')
        call("message", text="create_snap 1 0")
        echo("$ thinpool mount pool 1 mnt1                  # the snapshot, beside its origin")
        call("mount", id=1, mountpoint=mnt[1])
        echo(f'$ echo "{SNAP1.decode().strip()}" >> mnt1/id.txt')
        with open(os.path.join(mnt[1], "id.txt"), "ab") as f:
            f.write(SNAP1)
        echo('$ echo "only in snap1" > mnt1/snap1.txt')
        _write(os.path.join(mnt[1], "snap1.txt"), b"only in snap1\n")
        for i in (0, 1):
            _cat(os.path.join(mnt[i], "id.txt"), f"mnt{i}/id.txt", echo)
        echo("    (volume 0 is unchanged: the snapshot's writes went to copies of shared blocks)")
        echo('$ thinpool message pool "create_snap 2 1"     # a snapshot of a snapshot')
        call("message", text="create_snap 2 1")
        echo("$ thinpool mount pool 2 mnt2")
        call("mount", id=2, mountpoint=mnt[2])
        echo("$ ls mnt2")
        echo("    " + "  ".join(sorted(os.listdir(mnt[2]))))
        _cat(os.path.join(mnt[2], "id.txt"), "mnt2/id.txt", echo)
        echo("$ thinpool status pool")
        echo(f"    {call('status')['line']}")
        for dev in (0, 1, 2):
            echo(f"$ thinpool status pool --thin {dev}")
            echo(f"    {call('status', thin=dev)['line']}")
        echo("$ thinpool list pool --tree")
        for node in _flatten(call("list", tree=True)["tree"]):
            echo("    " + node)
    finally:
        if not server.stopped.is_set():
            echo("$ thinpool stop pool                          # unmount, detach, commit")
            server.stop()
    meta = os.path.join(pool_dir, "metadata")
    if shutil.which("thin_check"):
        rc = subprocess.run(["thin_check", "-q", meta]).returncode
        echo(f"$ thin_check pool/metadata     # the kernel project's own checker\n    exit {rc}")
    _ls(pool_dir, echo)


def _write(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def _cat(path: str, label: str, echo: Echo) -> None:
    echo(f"$ cat {label}")
    with open(path, encoding="utf-8") as f:
        for line in f.read().splitlines():
            echo(f"    {line}")


def _flatten(nodes: list[dict[str, Any]], depth: int = 0) -> list[str]:
    out = []
    for n in nodes:
        out.append(f"{'   ' * depth}{n['id']}: mapped {n['mapped_bytes'] >> 10} KiB, exclusive "
                   f"{n['exclusive_bytes'] >> 10} KiB, shared {n['shared_bytes'] >> 10} KiB")
        out += _flatten(n["snapshots"], depth + 1)
    return out


def _block_walkthrough(root: str, echo: Echo) -> None:
    pool_dir = os.path.join(root, "pool")
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
