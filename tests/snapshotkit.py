"""Helpers for the snapshotter tests: a snapshotter process, a gRPC client, containerd, images.

* ``Snapshotter``: ``thinpool snapshotter serve`` as a real process on a
  root (start, wait for its socket, SIGTERM or SIGKILL, restart), with a
  gRPC stub of containerd's snapshots API.
* ``busybox_image``: a ``docker save`` archive built here from Debian's
  static busybox (``/bin/busybox``, package busybox-static), no registry.
* ``Containerd``: Debian's containerd with thinpool as a proxy snapshotter
  plugin, on a private root, state and socket, driven with ``ctr``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import grpc

from thinpool.snapshotter.proto import snapshots_pb2 as pb
from thinpool.snapshotter.proto import snapshots_pb2_grpc as pb_grpc

BUSYBOX = "/bin/busybox"
REPO = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO / "src") + (os.pathsep + env["PYTHONPATH"]
                                             if env.get("PYTHONPATH") else "")
    return env


def have_root_and_fuse() -> bool:
    return os.geteuid() == 0 and os.path.exists("/dev/fuse")


class Snapshotter:
    """A ``thinpool snapshotter serve`` process on ``root`` (see the module docstring)."""

    def __init__(self, root: Path, driver: str = "devicemapper",
                 options: tuple[str, ...] = ("dm.basesize=256M",), socket: Path | None = None
                 ) -> None:
        self.root = root
        self.driver = driver
        self.options = options if driver == "devicemapper" else ()
        self.socket = socket or root.parent / f"{root.name}.sock"
        self.log = root.parent / f"{root.name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.channel: grpc.Channel | None = None
        self.stub: Any = None

    def start(self, timeout: float = 120) -> Snapshotter:
        cmd = [sys.executable, "-m", "thinpool.cli", "snapshotter", "serve", "--verbose",
               "--socket", str(self.socket), "--root", str(self.root), "--driver", self.driver]
        for opt in self.options:
            cmd += ["--storage-opt", opt]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                         env=_env())
        deadline = time.monotonic() + timeout
        while not self.socket.is_socket() or not self._answers():
            if self.proc.poll() is not None:
                raise RuntimeError(f"snapshotter exited {self.proc.returncode}:\n"
                                   + self.log.read_text()[-3000:])
            if time.monotonic() > deadline:
                self.proc.kill()
                raise RuntimeError("snapshotter did not come up:\n" + self.log.read_text()[-3000:])
            time.sleep(0.02)
        self.channel = grpc.insecure_channel(f"unix:{self.socket}")
        self.stub = pb_grpc.SnapshotsStub(self.channel)
        return self

    def _answers(self) -> bool:
        import socket as so

        s = so.socket(so.AF_UNIX, so.SOCK_STREAM)
        try:
            s.connect(str(self.socket))
            return True
        except OSError:
            return False
        finally:
            s.close()

    def stop(self, timeout: float = 120) -> int:
        """SIGTERM and wait; the exit status."""
        if self.channel is not None:
            self.channel.close()
            self.channel = None
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGUSR1)  # thinpool dumps its threads' stacks
            time.sleep(2)
            raise RuntimeError(f"the snapshotter did not stop within {timeout:g} s:\n"
                               + self.log.read_text(errors="replace")[-8000:]) from None

    def kill(self) -> None:
        """SIGKILL, as a crash."""
        if self.channel is not None:
            self.channel.close()
            self.channel = None
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    # -- calls ---------------------------------------------------------------------------------
    def prepare(self, key: str, parent: str = "", labels: dict[str, str] | None = None) -> Any:
        return self.stub.Prepare(pb.PrepareSnapshotRequest(key=key, parent=parent,
                                                           labels=labels or {})).mounts

    def view(self, key: str, parent: str = "", labels: dict[str, str] | None = None) -> Any:
        return self.stub.View(pb.ViewSnapshotRequest(key=key, parent=parent,
                                                     labels=labels or {})).mounts

    def mounts(self, key: str) -> Any:
        return self.stub.Mounts(pb.MountsRequest(key=key)).mounts

    def commit(self, name: str, key: str, labels: dict[str, str] | None = None) -> None:
        self.stub.Commit(pb.CommitSnapshotRequest(name=name, key=key, labels=labels or {}))

    def remove(self, key: str) -> None:
        self.stub.Remove(pb.RemoveSnapshotRequest(key=key))

    def stat(self, key: str) -> Any:
        return self.stub.Stat(pb.StatSnapshotRequest(key=key)).info

    def usage(self, key: str) -> Any:
        return self.stub.Usage(pb.UsageRequest(key=key))

    def cleanup(self) -> None:
        self.stub.Cleanup(pb.CleanupRequest())

    def list(self, *filters: str) -> list[Any]:
        return [i for r in self.stub.List(pb.ListSnapshotsRequest(filters=list(filters)))
                for i in r.info]

    def names(self, *filters: str) -> list[str]:
        return sorted(i.name for i in self.list(*filters))


def mount_all(mounts: Any, target: Path) -> None:
    """Mount what the snapshotter returned, as containerd does (``mount -t TYPE -o OPTS``)."""
    for m in mounts:
        opts = list(m.options)
        cmd = ["mount", "-t", m.type, m.source, str(target)]
        if m.type == "bind":
            cmd = ["mount", "--bind" if "rbind" not in opts else "--rbind", m.source, str(target)]
            opts = [o for o in opts if o not in ("rbind", "bind")]
            subprocess.run(cmd, check=True)
            if "ro" in opts:
                subprocess.run(["mount", "-o", "remount,bind,ro", str(target)], check=True)
            continue
        if opts:
            cmd[3:3] = ["-o", ",".join(opts)]
        subprocess.run(cmd, check=True)


def umount(target: Path) -> None:
    subprocess.run(["umount", str(target)], check=True)


# -- images -------------------------------------------------------------------------------------
def _tar_bytes(entries: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in entries:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def _entry(name: str, kind: bytes = tarfile.REGTYPE, data: bytes | None = None,
           mode: int = 0o644, link: str = "") -> tuple[tarfile.TarInfo, bytes | None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.mtime = 1_700_000_000
    info.linkname = link
    if data is not None:
        info.size = len(data)
    return info, data


def _tree_layer(tree: str) -> bytes:
    """A layer tar of the directory ``tree`` under /opt/tree (owners root, no caches)."""
    def keep(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
        if os.path.basename(info.name) in ("site-packages", "__pycache__"):
            return None
        info.uid = info.gid = 0
        info.uname = info.gname = "root"
        return info
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        tar.add(tree, arcname="opt/tree", filter=keep)
    return buf.getvalue()


def busybox_image(path: Path, ref: str = "thinpool.test/busybox:1", extra_layers: int = 1,
                  payload: int = 0, tree: str | None = None) -> dict[str, Any]:
    """Write a ``docker save`` archive of a busybox image to ``path``; what it holds.

    Layer 1: ``/bin/busybox`` with ``sh``, ``cat``, ``ls``, ``echo`` links and
    the usual directories.  Each extra layer adds ``/layerN.txt`` (plus
    ``payload`` random bytes in ``/blobN``); the last one deletes
    ``/etc/motd`` from layer 1 with a whiteout.  ``tree`` adds a last layer
    holding that directory under ``/opt/tree``.
    """
    with open(BUSYBOX, "rb") as f:
        busybox = f.read()
    base = [_entry(d, tarfile.DIRTYPE, mode=0o755) for d in
            ("bin/", "etc/", "tmp/", "proc/", "sys/", "dev/", "root/")]
    base.append(_entry("bin/busybox", data=busybox, mode=0o755))
    for tool in ("sh", "cat", "ls", "echo", "sleep", "df", "stat", "true"):
        base.append(_entry(f"bin/{tool}", tarfile.SYMTYPE, link="busybox", mode=0o777))
    base.append(_entry("etc/motd", data=b"from layer 1\n"))
    layers = [_tar_bytes(base)]
    for n in range(2, extra_layers + 2):
        entries = [_entry(f"layer{n}.txt", data=f"layer {n}\n".encode())]
        if payload:
            entries.append(_entry(f"blob{n}", data=os.urandom(payload)))
        if n == extra_layers + 1:
            entries += [_entry("etc/", tarfile.DIRTYPE, mode=0o755),
                        _entry("etc/.wh.motd", data=b"")]
        layers.append(_tar_bytes(entries))
    if tree is not None:
        layers.append(_tree_layer(tree))
    diff_ids = ["sha256:" + hashlib.sha256(layer).hexdigest() for layer in layers]
    config = json.dumps({
        "architecture": "amd64", "os": "linux", "created": "2024-01-01T00:00:00Z",
        "config": {"Cmd": ["/bin/sh"], "Env": ["PATH=/bin"], "WorkingDir": "/"},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [{"created": "2024-01-01T00:00:00Z", "created_by": "thinpool test"}
                    for _ in layers]}).encode()
    config_name = hashlib.sha256(config).hexdigest() + ".json"
    files: list[tuple[tarfile.TarInfo, bytes | None]] = []
    layer_names = []
    for layer, diff in zip(layers, diff_ids):
        d = diff.split(":")[1]
        files.append(_entry(f"{d}/", tarfile.DIRTYPE, mode=0o755))
        files.append(_entry(f"{d}/VERSION", data=b"1.0"))
        files.append(_entry(f"{d}/layer.tar", data=layer))
        layer_names.append(f"{d}/layer.tar")
    files.append(_entry(config_name, data=config))
    manifest = [{"Config": config_name, "RepoTags": [ref], "Layers": layer_names}]
    files.append(_entry("manifest.json", data=json.dumps(manifest).encode()))
    path.write_bytes(_tar_bytes(files))
    return {"ref": ref, "diff_ids": diff_ids, "layers": len(layers)}


# -- containerd -----------------------------------------------------------------------------------
class Containerd:
    """Debian's containerd with a ``thinpool`` proxy snapshotter at ``snapshot_socket``."""

    def __init__(self, base: Path, snapshot_socket: Path) -> None:
        self.base = base
        self.address = base / "containerd.sock"
        base.mkdir(parents=True, exist_ok=True)
        self.config = base / "config.toml"
        self.log = base / "containerd.log"
        self.config.write_text(f"""version = 2
root = "{base}/root"
state = "{base}/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "{self.address}"
[proxy_plugins]
  [proxy_plugins.thinpool]
    type = "snapshot"
    address = "{snapshot_socket}"
""")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Containerd:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(["containerd", "--config", str(self.config)],
                                         stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                         start_new_session=True)
        deadline = time.monotonic() + 30
        while True:
            if self.address.is_socket() and self.ctr("version", check=False).returncode == 0:
                return self
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("containerd did not start:\n" + self.log.read_text()[-3000:])
            time.sleep(0.05)

    def ctr(self, *args: str, check: bool = True, timeout: float = 300
            ) -> subprocess.CompletedProcess[str]:
        r = subprocess.run(["ctr", "--address", str(self.address), "-n", "thinpool-test", *args],
                           capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise RuntimeError(f"ctr {' '.join(args)} failed ({r.returncode}): "
                               f"{r.stderr.strip()}\n--- containerd log:\n"
                               + self.log.read_text()[-2000:])
        return r

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def containerd_available() -> bool:
    return all(shutil.which(t) for t in ("containerd", "ctr", "runc"))


# -- scratch directories and what tests leave in them ---------------------------------------------
OWNER = ".thinpool-test-owner"  # "PID STARTTIME" of the pytest that made the directory
SCRATCH_PREFIXES = ("tps-", "tpc-", "ts-")
_stale_swept = False


def _start_time(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def scratch_dir(prefix: str) -> Path:
    """A fresh short directory in /tmp (unix socket paths are limited to 107 bytes), marked
    as this process's; the first call also cleans up the scratch directories of test runs
    that were killed (their owner is gone) before they could clean up themselves."""
    global _stale_swept
    if not _stale_swept:
        _stale_swept = True
        for d in Path("/tmp").iterdir():
            if d.name.startswith(SCRATCH_PREFIXES) and (d / OWNER).is_file():
                try:
                    pid, started = (d / OWNER).read_text().split()
                except (OSError, ValueError):
                    continue
                if _start_time(int(pid)) != started:
                    clean_tree(d)
    d = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    (d / OWNER).write_text(f"{os.getpid()} {_start_time(os.getpid())}\n")
    return d


def scratch(request: Any, prefix: str) -> Iterator[Path]:
    """The body of a test's scratch-directory fixture (``yield from scratch(request, "p-")``):
    ``scratch_dir``, then ``clean_tree``; a test that passed but left anything behind fails
    (at teardown, with the list of what had to be cleaned up)."""
    d = scratch_dir(prefix)
    yield d
    report = getattr(request.node, "rep_call", None)  # set by conftest's makereport hook
    if report is not None and report.failed:
        for log in sorted(d.glob("*.log")) + sorted(d.glob("*/*.log")):
            print(f"--- {log} (last 6000 bytes):\n{log.read_text(errors='replace')[-6000:]}")
    done = clean_tree(d)
    if done and report is not None and report.passed:
        raise AssertionError("the test passed but left this behind (now cleaned up):\n"
                             + "\n".join(done))


def _under(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix + "/")


def _processes_using(path: str) -> dict[int, list[str]]:
    """pid -> argv of the processes (not this one) that name ``path`` (or below it) in their
    command line, or have their working directory or root there."""
    found: dict[int, list[str]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().decode(errors="replace").split("\0")
        except OSError:
            continue
        hit = any(_under(part, path) for arg in argv for part in
                  [arg, *(x for sep in "=:," for x in arg.split(sep)[1:])])
        for link in ("cwd", "root"):
            try:
                hit = hit or _under(os.readlink(f"/proc/{entry}/{link}"), path)
            except OSError:
                pass
        if hit:
            found[int(entry)] = argv
    return found


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    state = None
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state in ("Z", "X")  # a zombie (say, a child of this process) is gone enough


def _kill(pids: list[int], timeout: float = 30) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    while any(not _gone(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)


def _is_pool_server(argv: list[str]) -> bool:
    """``python -m thinpool.cli serve DIR`` (not ``snapshotter serve``)."""
    return "thinpool.cli" in argv and argv.index("thinpool.cli") + 1 < len(argv) - 1 and \
        argv[argv.index("thinpool.cli") + 1] == "serve"


def _loops_backed_under(path: str) -> list[str]:
    out = []
    for sysdir in sorted(Path("/sys/block").glob("loop*/loop")):
        try:
            backing = (sysdir / "backing_file").read_text().rstrip("\n")
        except OSError:
            continue
        if _under(backing.removesuffix(" (deleted)"), path):
            out.append(f"/dev/{sysdir.parent.name}")
    return out


def clean_tree(path: Path) -> list[str]:
    """Take down whatever a test left running or mounted below ``path``, then remove it; one
    line per thing that had to be done (nothing, after a test that cleaned up after itself).

    In order: processes that use the tree other than pool servers (snapshotter servers,
    containerd and its shims, containers, containerd's suite) are killed; each pool server
    below is stopped (``thinpool stop --force``: its mounts undone, loop devices detached, FUSE
    unmounted), killed if it will not stop, and what it left cleaned up; anything still mounted
    below is unmounted (lazily, deepest first) and loop devices backed by files below are
    detached.  The tree is removed only once nothing is mounted in it.
    """
    root = str(path)
    done: list[str] = []
    procs = _processes_using(root)
    others = [p for p, argv in procs.items() if not _is_pool_server(argv)]
    for pid in others:
        done.append(f"killed pid {pid}: {' '.join(procs[pid])[:200]}")
    _kill(others)
    pools = {argv[argv.index("serve") + 1] for argv in procs.values() if _is_pool_server(argv)}
    for top, subdirs, files in os.walk(root):
        subdirs[:] = [d for d in subdirs if not os.path.ismount(os.path.join(top, d))]
        if "server.json" in files or ("pool.json" in files and ".fuse" in subdirs):
            pools.add(top)
    stop = [sys.executable, "-m", "thinpool.cli", "stop", "--force", "--timeout", "60"]
    for directory in sorted(pools):
        servers = [p for p, argv in _processes_using(directory).items() if _is_pool_server(argv)]
        r = subprocess.run([*stop, directory], capture_output=True, text=True, env=_env(),
                           timeout=180)
        if servers or r.stderr.strip():
            done.append(f"stopped the pool server of {directory}: {r.stderr.strip()}")
        servers = [p for p in servers if not _gone(p)]
        if servers:
            done.append(f"killed pool server(s) {servers} of {directory}")
            _kill(servers)
            r = subprocess.run([*stop, directory], capture_output=True, text=True, env=_env(),
                               timeout=180)
            done.append(f"cleaned up after it: {r.stderr.strip()}")
    for _ in range(5):
        points = sorted(mounts_under(path), key=len, reverse=True)
        if not points:
            break
        for mp in points:
            subprocess.run(["umount", "-l", mp], capture_output=True)
            done.append(f"unmounted {mp}")
    for device in _loops_backed_under(root):
        subprocess.run(["losetup", "-d", device], capture_output=True)
        done.append(f"detached {device}")
    if list(mounts_under(path)):
        done.append(f"left {path} in place: still mounted there: {list(mounts_under(path))}")
    else:
        shutil.rmtree(path, ignore_errors=True)
    return done


def mounts_under(path: Path) -> Iterator[str]:
    prefix = str(path)
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        for line in f:
            mp = line.split()[4]
            if mp == prefix or mp.startswith(prefix + "/"):
                yield mp
