"""Test kit for tests that need a real Docker daemon (Debian's ``docker.io``).

* ``build_busybox_image(dest)``: a runnable ``docker save`` tarball made
  offline from Debian's static busybox: layer 1 is ``/bin/busybox`` with its
  applet symlinks and a small ``/etc``; layer 2 changes, adds and deletes
  files (a whiteout, an opaque directory, a hard link, a symlink), so that
  layering is exercised.  ``manifest.json`` and the config follow the
  docker-save format; ``rootfs.diff_ids`` are the sha256 of the uncompressed
  layer tars.
* ``Dockerd(base, storage_driver)``: a private dockerd (its own data root,
  exec root, pidfile and API socket under ``base``; networking off).
  ``docker(...)`` runs ``/usr/bin/docker`` against it.  ``stop`` ends it and
  ``cleanup`` unmounts whatever is left under its roots and deletes them.
* ``PluginProcess(name, driver)``: ``thinpool docker-plugin`` serving
  ``/run/docker/plugins/NAME.sock`` (or any socket, optionally announced by
  ``/etc/docker/plugins/NAME.spec``), with a unique NAME from
  ``unique_plugin_name()``; ``stop`` / ``kill`` / ``cleanup`` (socket, state
  file and spec file removed).
* ``docker_env(...)`` (a context manager) yields a started plugin and a
  dockerd on it and always cleans both up, also when the test fails.

Everything here needs root and the packages ``docker.io`` and
``busybox-static`` (see .ci/run); a missing tool fails the test.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Sequence

import imagekit

if TYPE_CHECKING:
    import pytest

DOCKERD = "/usr/sbin/dockerd"
DOCKER = "/usr/bin/docker"   # not /usr/local/bin/docker: a newer client may live there
BUSYBOX = "/bin/busybox"
PLUGIN_SOCKETS = Path("/run/docker/plugins")
PLUGIN_SPECS = Path("/etc/docker/plugins")
THINPOOL = [sys.executable, "-m", "thinpool.cli"]
MTIME = 1_700_000_000
SERVING = "thinpool docker-plugin: serving "   # the plugin's line once its socket listens


def require_docker() -> None:
    """Fail (not skip) when the real tools are missing: CI installs them."""
    import pytest

    for tool in (DOCKERD, DOCKER, BUSYBOX):
        if not os.access(tool, os.X_OK):
            pytest.fail(f"required tool {tool} is not installed (apt-get install docker.io "
                        "busybox-static; see .ci/run)")
    if os.geteuid() != 0:
        pytest.fail("the Docker tests need root")


# -- the test image ---------------------------------------------------------------------------
@dataclass
class TestImage:
    """A docker-save tarball and what ``docker save`` must give back."""

    __test__ = False  # not a pytest test class

    path: Path
    tag: str
    diff_ids: list[str]           # "sha256:..." of each uncompressed layer tar, bottom up
    layers: list[bytes]           # the layer tars themselves
    config: dict = field(default_factory=dict)


def _tar_add(tar: tarfile.TarFile, name: str, *, kind: bytes = tarfile.REGTYPE, data: bytes = b"",
             mode: int = 0o644, linkname: str = "") -> None:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.mtime = MTIME
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    info.linkname = linkname
    if kind == tarfile.REGTYPE:
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    else:
        tar.addfile(info)


def _layer(entries: Sequence[tuple]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, kind, data, mode, linkname in entries:
            _tar_add(tar, name, kind=kind, data=data, mode=mode, linkname=linkname)
    return buf.getvalue()


def _d(name: str, mode: int = 0o755) -> tuple:
    return (name, tarfile.DIRTYPE, b"", mode, "")


def _f(name: str, data: bytes, mode: int = 0o644) -> tuple:
    return (name, tarfile.REGTYPE, data, mode, "")


def _l(name: str, target: str) -> tuple:
    return (name, tarfile.SYMTYPE, b"", 0o777, target)


def _h(name: str, target: str) -> tuple:
    return (name, tarfile.LNKTYPE, b"", 0o644, target)


def busybox_layers() -> list[bytes]:
    """The two layer tars of the test image (deterministic: same bytes every time)."""
    applets = subprocess.run([BUSYBOX, "--list-full"], capture_output=True, text=True,
                             check=True).stdout.split()
    dirs = {"bin", "etc", "etc/opaque", "root", "tmp", "usr", "usr/bin", "usr/sbin", "sbin",
            "var", "home"}
    for applet in applets:
        parent = os.path.dirname(applet)
        while parent:
            dirs.add(parent)
            parent = os.path.dirname(parent)
    base: list[tuple] = [_d(d + "/", 0o1777 if d == "tmp" else 0o755) for d in sorted(dirs)]
    base.append(_f("bin/busybox", Path(BUSYBOX).read_bytes(), 0o755))
    base += [_l(a, "/bin/busybox") for a in sorted(set(applets)) if a != "bin/busybox"]
    base += [
        _f("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n"),
        _f("etc/group", b"root:x:0:\nnogroup:x:65534:\n"),
        _f("etc/motd", b"layer one\n"),
        _f("etc/doomed", b"deleted by layer two\n"),
        _f("etc/opaque/old-a", b"hidden by the opaque marker\n"),
        _f("etc/opaque/old-b", b"hidden too\n"),
        _f("etc/linked", b"two names, one inode\n"),
        _h("etc/linked-too", "etc/linked"),
    ]
    top: list[tuple] = [
        _d("etc/"),
        _f("etc/motd", b"layer two changed this\n"),
        _f("etc/added", b"added by layer two\n", 0o600),
        _f("etc/.wh.doomed", b""),
        _d("etc/opaque/"),
        _f("etc/opaque/.wh..wh..opq", b""),
        _f("etc/opaque/new", b"the only file left here\n"),
        _l("etc/motd-link", "motd"),
        _d("srv/"),
        _f("srv/big", bytes(range(256)) * 4096, 0o640),
    ]
    return [_layer(base), _layer(top)]


def build_busybox_image(dest: Path, tag: str = "thinpool-test/busybox:1") -> TestImage:
    """Write ``dest`` (a docker-save tar) holding the two-layer busybox image."""
    layers = busybox_layers()
    diff_ids = ["sha256:" + hashlib.sha256(layer).hexdigest() for layer in layers]
    config = {
        "architecture": "amd64", "os": "linux",
        "created": "2023-11-14T22:13:20Z",
        "config": {"Env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"], "Cmd": ["/bin/sh"],
                   "WorkingDir": "/"},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [{"created": "2023-11-14T22:13:20Z", "created_by": "busybox-static"},
                    {"created": "2023-11-14T22:13:20Z", "created_by": "changes"}],
    }
    config_bytes = json.dumps(config, sort_keys=True).encode()
    config_name = hashlib.sha256(config_bytes).hexdigest() + ".json"
    layer_names = [f"{d.split(':')[1]}/layer.tar" for d in diff_ids]
    manifest = [{"Config": config_name, "RepoTags": [tag], "Layers": layer_names}]
    with tarfile.open(dest, "w") as out:
        for name, data in [(config_name, config_bytes),
                           *zip(layer_names, layers),
                           ("manifest.json", json.dumps(manifest).encode())]:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), MTIME, 0o644
            out.addfile(info, io.BytesIO(data))
    return TestImage(dest, tag, diff_ids, layers, config)


def saved_layers(save_tar: Path) -> tuple[list[str], list[bytes]]:
    """(diff ids from the config, layer tars) of a ``docker save`` output file."""
    return imagekit.saved_layers(save_tar.read_bytes())


def tar_listing(data: bytes) -> dict[str, tuple]:
    """name -> (type, permission bits, uid, gid, size, link target, content sha256) of a tar.

    Times are left out, and so are file-type bits in the mode field (Go's tar
    writer sets them, thinpool's archive export does not; the type is there).
    """
    out: dict[str, tuple] = {}
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for m in tar.getmembers():
            digest = ""
            if m.isreg():
                f = tar.extractfile(m)
                assert f is not None
                digest = hashlib.sha256(f.read()).hexdigest()
            out[m.name.rstrip("/")] = (m.type, m.mode & 0o7777, m.uid, m.gid, m.size, m.linkname, digest)
    return out


# -- mounts and processes ---------------------------------------------------------------------
def mounts_under(*roots: Path) -> list[str]:
    """Mount points below any of ``roots`` (deepest first), from /proc/self/mountinfo."""
    prefixes = [os.path.realpath(r) for r in roots]
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = line.split()[4].encode().decode("unicode_escape")
            if any(point == p or point.startswith(p + "/") for p in prefixes):
                found.append(point)
    return sorted(found, key=lambda p: (-p.count("/"), p))


def unmount_under(*roots: Path) -> None:
    """Lazily unmount everything below ``roots`` (leftovers of a failed run)."""
    for _ in range(5):
        points = mounts_under(*roots)
        if not points:
            return
        for point in points:
            subprocess.run(["umount", "-l", point], capture_output=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead for our purposes
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def _descendants(pid: int) -> list[int]:
    out = []
    for child in _children(pid):
        out.append(child)
        out += _descendants(child)
    return out


def _processes_mentioning(text: str) -> list[int]:
    """Pids whose command line contains ``text``."""
    found = []
    needle = text.encode()
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if needle in f.read():
                        found.append(int(entry))
            except OSError:
                pass
    return found


def _processes_in_cgroups(names: Sequence[str]) -> list[int]:
    """Pids in a cgroup whose path ends with one of ``names`` (container ids)."""
    if not names:
        return []
    wanted = {f"/{n}" for n in names}
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cgroup") as f:
                    paths = {line.rstrip("\n").split(":", 2)[2] for line in f}
            except (OSError, IndexError):
                continue
            if any(path.endswith(w) for path in paths for w in wanted):
                found.append(int(entry))
    return found


def stop_pool_servers(base: Path) -> None:
    """Stop the thinpool pool servers (the devicemapper driver's) running under ``base``, and
    clean up what a dead one left there (its mounts, loop devices, FUSE mount)."""
    dirs: set[str] = set()
    for pid in _processes_mentioning(str(base)):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().decode(errors="replace").split("\0")
        except OSError:
            continue
        if "thinpool.cli" in argv and "serve" in argv and argv.index("serve") + 1 < len(argv):
            dirs.add(argv[argv.index("serve") + 1])
    for root, subdirs, files in os.walk(base):
        subdirs[:] = [d for d in subdirs if not os.path.ismount(os.path.join(root, d))]
        if "server.json" in files:
            dirs.add(root)
    for directory in sorted(dirs):
        subprocess.run([*THINPOOL, "stop", "--force", directory], capture_output=True, timeout=180)


def unique_plugin_name(prefix: str = "thinpool-test") -> str:
    """A plugin name no other test (or test run) uses at the same time."""
    return f"{prefix}-{os.getpid()}-{secrets.token_hex(3)}"


def short_tmp(prefix: str = "dk") -> Path:
    """A fresh directory with a short path (unix socket paths are limited to 107 bytes)."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


@contextlib.contextmanager
def scratch(prefix: str) -> Iterator[Path]:
    """A ``short_tmp`` directory; afterwards the pool servers under it are stopped, its
    mounts undone and it is deleted (also when the test fails)."""
    path = short_tmp(prefix)
    try:
        yield path
    finally:
        stop_pool_servers(path)
        unmount_under(path)
        shutil.rmtree(path, ignore_errors=True)


def busybox_image_for(tmp_path_factory: pytest.TempPathFactory) -> TestImage:
    """The test busybox image for a module (skips without a docker client)."""
    require_docker()
    return build_busybox_image(tmp_path_factory.mktemp("image") / "busybox.tar")


def unix_http(path: str | os.PathLike[str], request: bytes, timeout: float = 10.0) -> bytes:
    """Send raw bytes on a unix socket and read until the peer closes (or the timeout).

    A peer that answers and closes before the request is sent (a server refusing a
    connection over its limit) is not an error: its answer is still read."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(timeout)
        s.connect(str(path))
        with contextlib.suppress(BrokenPipeError):
            s.sendall(request)
        chunks = []
        with contextlib.suppress(socket.timeout, ConnectionResetError):
            while True:
                data = s.recv(65536)
                if not data:
                    break
                chunks.append(data)
        return b"".join(chunks)


# -- thinpool docker-plugin -------------------------------------------------------------------
class PluginProcess:
    """``thinpool docker-plugin`` in the background for plugin NAME.

    By default it serves ``/run/docker/plugins/NAME.sock`` (dockerd's own
    discovery); with ``socket_path`` it serves there and, with ``spec=True``,
    writes ``/etc/docker/plugins/NAME.spec`` pointing at it.
    """

    def __init__(self, name: str, driver: str, *storage_opts: str, log_dir: Path,
                 socket_path: Path | None = None, spec: bool = False,
                 extra_args: Sequence[str] = ()) -> None:
        self.name = name
        self.driver = driver
        self.storage_opts = list(storage_opts)
        self.socket = socket_path or PLUGIN_SOCKETS / f"{name}.sock"
        self.spec = PLUGIN_SPECS / f"{name}.spec" if spec else None
        self.log = log_dir / f"plugin-{name}.log"
        self.extra_args = list(extra_args)
        self.driver_args = ["--driver", driver]   # [] to test the default
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def state_file(self) -> Path:
        return Path(str(self.socket) + ".state.json")

    def start(self, timeout: float = 30.0) -> "PluginProcess":
        if self.spec is not None:
            self.spec.parent.mkdir(parents=True, exist_ok=True)
            self.spec.write_text(f"unix://{self.socket}\n")
        args = [*THINPOOL, "docker-plugin", "--socket", str(self.socket), *self.driver_args,
                *[a for opt in self.storage_opts for a in ("--storage-opt", opt)],
                *self.extra_args]
        served_before = self.output().count(SERVING)
        self.proc = subprocess.Popen(args, stdout=open(self.log, "ab"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"docker-plugin exited with {self.proc.returncode}: "
                                     f"{self.output()}")
            if self.output().count(SERVING) > served_before:
                return self
            time.sleep(0.05)
        self.kill()
        raise AssertionError(f"docker-plugin did not come up: {self.output()}")

    def call(self, method: str, body: dict | None = None, timeout: float = 30.0) -> dict:
        """One JSON call, as dockerd makes it; the decoded answer."""
        payload = json.dumps(body or {}).encode()
        raw = unix_http(self.socket, (
            f"POST /{method} HTTP/1.1\r\nHost: plugin\r\nConnection: close\r\n"
            f"Accept: application/vnd.docker.plugins.v1.2+json\r\n"
            f"Content-Length: {len(payload)}\r\n\r\n").encode() + payload, timeout)
        head, _, data = raw.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 "), raw[:200]
        return json.loads(data)

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM, as an init system would; the exit status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)

    def output(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def cleanup(self) -> None:
        """Stop the process; remove its socket, state file and spec file."""
        self.stop()
        for path in (self.socket, self.state_file, self.spec):
            if path is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)


# -- a private dockerd ----------------------------------------------------------------------------
class DockerError(AssertionError):
    pass


class Dockerd:
    """A dockerd of its own under ``base`` (data root, exec root, pidfile, API socket, log)."""

    def __init__(self, base: Path, storage_driver: str, storage_opts: Sequence[str] = (),
                 env: dict[str, str] | None = None) -> None:
        self.base = base
        self.storage_driver = storage_driver
        self.storage_opts = list(storage_opts)
        self.env = env or {}
        self.data_root = base / "root"
        self.exec_root = base / "exec"
        self.pidfile = base / "dockerd.pid"
        self.sock = base / "docker.sock"
        self.log = base / "dockerd.log"
        self.config_file = base / "daemon.json"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def host(self) -> str:
        return f"unix://{self.sock}"

    def start(self, timeout: float = 60.0) -> "Dockerd":
        self.base.mkdir(parents=True, exist_ok=True)
        self.config_file.write_text("{}\n")
        args = [DOCKERD, "--config-file", str(self.config_file),
                "--data-root", str(self.data_root), "--exec-root", str(self.exec_root),
                "--pidfile", str(self.pidfile), "-H", self.host,
                "--iptables=false", "--ip6tables=false", "--ip-forward=false",
                "--ip-masq=false", "--bridge=none", "--userland-proxy=false",
                "--experimental", "--storage-driver", self.storage_driver,
                *[a for opt in self.storage_opts for a in ("--storage-opt", opt)]]
        env = dict(os.environ, **self.env)
        env.pop("DOCKER_HOST", None)
        self.proc = subprocess.Popen(args, stdout=open(self.log, "ab"), stderr=subprocess.STDOUT,
                                     env=env, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise DockerError(f"dockerd exited with {self.proc.returncode}:\n{self.tail()}")
            if self._ping():
                return self
            time.sleep(0.1)
        self.stop()
        raise DockerError(f"dockerd did not come up in {timeout:g} s:\n{self.tail()}")

    def _ping(self) -> bool:
        try:
            reply = unix_http(self.sock, b"GET /_ping HTTP/1.1\r\nHost: docker\r\n"
                                         b"Connection: close\r\n\r\n", timeout=2.0)
        except OSError:
            return False
        return reply.startswith(b"HTTP/1.1 200")

    def docker(self, *args: str, check: bool = True, input: bytes | None = None,
               timeout: float = 180.0) -> subprocess.CompletedProcess[bytes]:
        """``docker ARGS`` against this daemon; raises DockerError when ``check`` and it fails."""
        env = dict(os.environ, DOCKER_HOST=self.host, DOCKER_CONFIG=str(self.base / "client"))
        r = subprocess.run([DOCKER, *args], capture_output=True, input=input, env=env,
                           timeout=timeout)
        if check and r.returncode != 0:
            raise DockerError(f"docker {' '.join(args)} failed ({r.returncode}): "
                              f"{r.stderr.decode(errors='replace').strip()}\n--- dockerd log:\n"
                              f"{self.tail()}")
        return r

    def out(self, *args: str, **kw: object) -> str:
        return self.docker(*args, **kw).stdout.decode()  # type: ignore[arg-type]

    def stop(self, timeout: float = 60.0) -> None:
        """SIGTERM and wait (dockerd stops its containers and its containerd)."""
        if self.proc is None:
            return
        family = [self.proc.pid, *_descendants(self.proc.pid)]
        try:
            containers = os.listdir(self.data_root / "containers")
        except OSError:
            containers = []
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)
        # dockerd's containerd, the container shims (daemonized, so found by the exec root in
        # their command line) and the containers' processes (by their cgroup) must not
        # outlive it: a container's mount namespace would keep its layer mounted.
        deadline = time.monotonic() + 10
        for pid in family[1:] + _processes_mentioning(str(self.exec_root)) \
                + _processes_in_cgroups(containers):
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if _alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        self.proc = None

    def tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""

    def cleanup(self) -> None:
        """Stop; stop pool servers and unmount what is left under the roots; delete them."""
        self.stop()
        stop_pool_servers(self.base)
        unmount_under(self.base)
        shutil.rmtree(self.base, ignore_errors=True)


@contextlib.contextmanager
def docker_env(base: Path, driver: str, *storage_opts: str, name: str | None = None,
               dockerd_opts: Sequence[str] = (), dockerd_base: Path | None = None
               ) -> Iterator[tuple[Dockerd, PluginProcess]]:
    """A thinpool plugin (backed by ``driver``) and a dockerd on it; always cleaned up.

    dockerd's roots are under ``dockerd_base`` (default ``base/d``): the
    plugin stores layers under dockerd's data root, so a driver that needs a
    particular filesystem (btrfs) needs ``dockerd_base`` on it.
    """
    plugin = PluginProcess(name or unique_plugin_name(), driver, *storage_opts, log_dir=base)
    daemon = Dockerd(dockerd_base or base / "d", plugin.name, dockerd_opts)
    try:
        plugin.start()
        daemon.start()
        yield daemon, plugin
    finally:
        try:
            daemon.cleanup()
        finally:
            plugin.cleanup()
            unmount_under(base)
