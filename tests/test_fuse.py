"""FuseMount through the real kernel: /dev/fuse, loop devices, ext4.

Needs root, /dev/fuse and losetup (util-linux), mkfs.ext4/e2fsck (e2fsprogs),
fstrim, dd; skipped with the reason otherwise. Every test cleans up its
mounts and loop devices also when it fails (the ``kit`` fixture), lazily
unmounting as the last resort.
"""

from __future__ import annotations

import errno
import hashlib
import mmap
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest

from thinpool.errors import DataPathError
from thinpool.fuse import FileBusyError, FuseError, FuseMount, is_mounted
from thinpool.linux import loop

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fuse_file_export import FileExport  # noqa: E402

MiB = 1 << 20


def _missing() -> str | None:
    if os.geteuid() != 0:
        return "FUSE mounts and loop devices need root"
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing (no FUSE in this kernel or container)"
    for tool in ("losetup", "mkfs.ext4", "e2fsck", "fstrim", "dd", "mount", "umount"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (util-linux, e2fsprogs, coreutils)"
    if not os.path.exists("/dev/loop-control") and not os.path.exists("/dev/loop0"):
        return "no loop devices in this kernel or container"
    return None


pytestmark = pytest.mark.skipif(_missing() is not None, reason=_missing() or "")


def run(*args: str | os.PathLike[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run([str(a) for a in args], capture_output=True, text=True)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, args))} -> {r.returncode}: {r.stderr.strip()}")
    return r


def sparse(path: Path, size: int) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def mounted_at(path: Path | str) -> bool:
    want = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == want for line in f)


def fuse_threads(mount: FuseMount) -> list[str]:
    prefix = f"fuse-{os.path.basename(mount.mountpoint)}-"
    return [t.name for t in threading.enumerate() if t.name.startswith(prefix)]


def dev_fuse_fds() -> list[int]:
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == "/dev/fuse":
                out.append(int(fd))
        except OSError:
            pass
    return out


class Kit:
    """One test's mounts and loop devices, torn down in reverse order."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.fuse: list[FuseMount] = []
        self.loops: list[str] = []
        self.fs_mounts: list[Path] = []

    def mount(self, name: str = "fuse", **kw: object) -> FuseMount:
        mp = self.tmp / name
        mp.mkdir(exist_ok=True)
        m = FuseMount(mp, **kw)  # type: ignore[arg-type]
        self.fuse.append(m)
        m.start()
        return m

    def attach(self, path: str) -> str:
        dev = loop.attach(path)
        self.loops.append(dev)
        return dev

    def mount_fs(self, dev: str, name: str = "fs") -> Path:
        mp = self.tmp / name
        mp.mkdir(exist_ok=True)
        run("mount", dev, mp)
        self.fs_mounts.append(mp)
        return mp

    def umount_fs(self, mp: Path) -> None:
        run("umount", mp)
        self.fs_mounts.remove(mp)

    def detach(self, dev: str) -> None:
        loop.detach(dev)
        self.loops.remove(dev)

    def teardown(self) -> None:
        for mp in reversed(self.fs_mounts):
            if run("umount", mp, check=False).returncode != 0:
                run("umount", "-l", mp, check=False)
        for m in self.fuse:  # loop devices still on our files, even ones a test did not record
            for name in list(m.session.files()):
                for dev in loop.find(m.path(name)):
                    if dev not in self.loops:
                        self.loops.append(dev)
        for dev in reversed(self.loops):
            if loop.backing_file(dev) is not None:
                run("losetup", "-d", dev, check=False)
        for m in reversed(self.fuse):
            m.stop()
            if mounted_at(m.mountpoint):
                run("umount", "-l", m.mountpoint, check=False)


@pytest.fixture
def kit(tmp_path: Path) -> Iterator[Kit]:
    k = Kit(tmp_path)
    try:
        yield k
    finally:
        k.teardown()


def sha256_tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and "lost+found" not in p.parts}


def losetup_dio(dev: str) -> str:
    return run("losetup", "-l", "-n", "-O", "DIO", dev).stdout.strip()


# ---------------------------------------------------------------------------


def test_ext4_on_loop_survives_remount(kit: Kit) -> None:
    back = sparse(kit.tmp / "vol.img", 256 * MiB)
    export = FileExport(back)
    m = kit.mount()
    m.add_file("vol", export)
    assert os.stat(m.path("vol")).st_size == 256 * MiB
    assert oct(os.stat(m.path("vol")).st_mode) == oct(0o100600)
    dev = kit.attach(m.path("vol"))
    assert losetup_dio(dev) == "1"
    assert loop.direct_io(dev) and loop.find(m.path("vol")) == [dev]
    assert loop.backing_file(dev) == m.path("vol")
    run("mkfs.ext4", "-q", "-F", dev)
    fs = kit.mount_fs(dev)
    (fs / "d").mkdir()
    for i, size in enumerate((1, 4095, 3 * MiB + 17, 9 * MiB)):
        (fs / "d" / f"f{i}").write_bytes(os.urandom(size))
    before = sha256_tree(fs)
    run("sync")
    flushes = export.counts["flush"]
    assert flushes > 0  # sync -> loop flush -> FUSE fsync -> export.flush
    kit.umount_fs(fs)
    run("e2fsck", "-fn", dev)
    fs = kit.mount_fs(dev)
    assert sha256_tree(fs) == before
    assert export.counts["write"] > 0
    kit.umount_fs(fs)
    kit.detach(dev)
    m.remove_file("vol", wait=5)
    assert export.closed == 1
    # The data lives in the backing file: check it once more without FUSE.
    run("e2fsck", "-fn", back)


def test_discard_reaches_export_and_frees_space(kit: Kit) -> None:
    back = sparse(kit.tmp / "vol.img", 512 * MiB)
    export = FileExport(back)
    m = kit.mount()
    m.add_file("vol", export)
    dev = kit.attach(m.path("vol"))
    run("mkfs.ext4", "-q", "-F", dev)  # mke2fs discards the whole device first
    assert export.counts["zero_trim"] >= 1
    assert export.counts["bytes_zero_trim"] >= 512 * MiB
    fs = kit.mount_fs(dev)
    (fs / "big").write_bytes(os.urandom(64 * MiB))
    run("sync")
    full = allocated(back)
    assert full >= 64 * MiB
    (fs / "big").unlink()
    run("sync")  # fstrim skips blocks freed in the uncommitted transaction
    trims = export.counts["zero_trim"]
    out = run("fstrim", "-v", fs).stdout
    assert "trimmed" in out
    assert export.counts["zero_trim"] > trims
    assert allocated(back) < full - 48 * MiB


def test_fsync_flush_and_fua(kit: Kit) -> None:
    export = FileExport(sparse(kit.tmp / "vol.img", 16 * MiB))
    m = kit.mount()
    m.add_file("vol", export)
    path = m.path("vol")
    buf = mmap.mmap(-1, 4096)
    buf.write(b"x" * 4096)

    fd = os.open(path, os.O_RDWR | os.O_DIRECT)
    os.pwrite(fd, buf, 0)
    assert export.counts["flush"] == 0
    os.fsync(fd)
    assert export.counts["flush"] == 1
    os.fdatasync(fd)
    assert export.counts["flush"] == 2
    os.pwrite(fd, buf, 4096)
    os.close(fd)  # a handle that wrote since its last flush flushes on close
    assert export.counts["flush"] == 3

    fd = os.open(path, os.O_RDONLY)
    os.pread(fd, 4096, 0)
    os.close(fd)  # a reader's close costs nothing
    assert export.counts["flush"] == 3

    fd = os.open(path, os.O_WRONLY | os.O_DSYNC)
    os.pwrite(fd, buf, 8192)
    assert export.counts["write_fua"] == 1
    os.close(fd)
    fd = os.open(path, os.O_WRONLY)
    os.pwritev(fd, [buf], 8192, os.RWF_DSYNC)
    assert export.counts["write_fua"] == 2
    os.close(fd)
    fd = os.open(path, os.O_RDONLY)
    assert os.pread(fd, 4, 8192) == b"xxxx"
    os.close(fd)


def test_one_mib_requests_and_byte_ranges(kit: Kit) -> None:
    back = sparse(kit.tmp / "vol.img", 8 * MiB)
    export = FileExport(back)
    m = kit.mount()
    m.add_file("vol", export)
    run("dd", "if=/dev/urandom", f"of={m.path('vol')}", "bs=1M", "count=4", "oflag=direct",
        "conv=notrunc")
    assert export.counts["write"] == 4  # max_write 1 MiB: one request per dd block
    assert Path(m.path("vol")).read_bytes() == back.read_bytes()
    fd = os.open(m.path("vol"), os.O_RDWR)
    try:
        assert os.pwrite(fd, b"hello", 12345) == 5
        assert os.pread(fd, 7, 12344) == back.read_bytes()[12344:12351]
        assert back.read_bytes()[12345:12350] == b"hello"
        # At the end: reads come back short, writes fail like a full block device.
        assert os.pread(fd, 100, 8 * MiB - 10) == back.read_bytes()[-10:]
        assert os.pread(fd, 100, 8 * MiB) == b""
        assert os.pwrite(fd, b"abcdefgh", 8 * MiB - 4) == 4
        with pytest.raises(OSError) as e:
            os.pwrite(fd, b"x", 8 * MiB)
        assert e.value.errno == errno.ENOSPC
    finally:
        os.close(fd)
    assert back.stat().st_size == 8 * MiB


def test_size_mode_and_names_are_fixed(kit: Kit) -> None:
    back = sparse(kit.tmp / "vol.img", MiB)
    m = kit.mount()
    m.add_file("vol", FileExport(back))
    ro = sparse(kit.tmp / "ro.img", MiB)
    m.add_file("ro", FileExport(ro, read_only=True))
    for call in (lambda: os.truncate(m.path("vol"), 0), lambda: os.truncate(m.path("vol"), 2 * MiB),
                 lambda: os.chmod(m.path("vol"), 0o644), lambda: os.chown(m.path("vol"), 1, 1)):
        with pytest.raises(OSError) as e:
            call()
        assert e.value.errno == errno.EPERM
    r = run("dd", "if=/dev/zero", f"of={m.path('vol')}", "bs=4k", "count=1", check=False)
    assert r.returncode != 0 and "Operation not permitted" in r.stderr  # O_TRUNC
    os.truncate(m.path("vol"), MiB)  # no change: fine
    os.utime(m.path("vol"))  # times are accepted and ignored
    assert os.stat(m.path("ro")).st_mode & 0o777 == 0o400
    with pytest.raises(OSError) as e:
        os.open(m.path("ro"), os.O_RDWR)
    assert e.value.errno in (errno.EROFS, errno.EACCES)
    for call in (lambda: os.mkdir(m.path("d")), lambda: os.unlink(m.path("vol")),
                 lambda: os.rename(m.path("vol"), m.path("v2")),
                 lambda: open(m.path("new"), "wb")):
        with pytest.raises(OSError) as e:
            call()
        assert e.value.errno in (errno.ENOSYS, errno.EPERM)
    assert sorted(os.listdir(m.mountpoint)) == ["ro", "vol"]
    assert back.stat().st_size == MiB
    st = os.statvfs(m.mountpoint)
    assert st.f_bsize == 4096 and st.f_blocks == 2 * MiB // 4096


def test_many_files_listed_and_removed(kit: Kit) -> None:
    m = kit.mount()
    exports = {}
    for i in range(300):
        exports[f"volume-{i:03d}-{'x' * 40}"] = e = FileExport(sparse(kit.tmp / f"{i}.img", 4096),
                                                               count=False)
        m.add_file(f"volume-{i:03d}-{'x' * 40}", e)
    assert sorted(os.listdir(m.mountpoint)) == sorted(exports)  # several READDIRPLUS pages
    for name in list(exports)[:150]:
        m.remove_file(name)
        assert exports[name].closed == 1
    assert sorted(os.listdir(m.mountpoint)) == sorted(exports)[150:]
    assert not os.path.exists(m.path(list(exports)[0]))
    with pytest.raises(FuseError, match="no file named"):
        m.remove_file(list(exports)[0])
    with pytest.raises(FuseError, match="already exists"):
        m.add_file(list(exports)[200], FileExport(kit.tmp / "0.img"))
    for bad in ("", ".", "..", "a/b", "a\0b", "x" * 256):
        with pytest.raises(FuseError, match="bad file name"):
            m.add_file(bad, exports[list(exports)[200]])
    # The name can come back as a new file.
    again = FileExport(sparse(kit.tmp / "again.img", 8192))
    m.add_file(list(exports)[0], again)
    assert os.stat(m.path(list(exports)[0])).st_size == 8192


def test_remove_refused_while_loop_device_holds_file(kit: Kit) -> None:
    export = FileExport(sparse(kit.tmp / "vol.img", 32 * MiB))
    m = kit.mount()
    m.add_file("vol", export)
    dev = kit.attach(m.path("vol"))
    assert m.open_handles("vol") >= 1
    with pytest.raises(FileBusyError, match="'vol' is open .*loop device"):
        m.remove_file("vol")
    with pytest.raises(FileBusyError):
        m.remove_file("vol", wait=0.3)
    assert os.path.exists(m.path("vol")) and export.closed == 0
    run("dd", "if=/dev/urandom", f"of={dev}", "bs=64k", "count=4", "oflag=direct")
    kit.detach(dev)
    m.remove_file("vol", wait=5)
    assert export.closed == 1 and export.counts["flush"] >= 1  # written, so flushed by the end
    assert not os.path.exists(m.path("vol"))


def test_concurrent_readers_and_writers_on_two_files(kit: Kit) -> None:
    backs = [sparse(kit.tmp / f"v{i}.img", 64 * MiB) for i in range(2)]
    m = kit.mount(threads=4)
    for i, b in enumerate(backs):
        m.add_file(f"v{i}", FileExport(b, count=False))
    errors: list[BaseException] = []
    chunk = 256 * 1024

    def writer(f: int, part: int) -> None:
        try:
            buf = mmap.mmap(-1, chunk)
            fd = os.open(m.path(f"v{f}"), os.O_RDWR | os.O_DIRECT)
            try:
                for k in range(32):
                    off = (part * 32 + k) * chunk
                    buf.seek(0)
                    buf.write(hashlib.sha256(b"%d:%d" % (f, off)).digest() * (chunk // 32))
                    assert os.pwrite(fd, buf, off) == chunk
                    back = mmap.mmap(-1, chunk)
                    assert os.preadv(fd, [back], off) == chunk
                    assert back[:] == buf[:]
            finally:
                os.close(fd)
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(f, p)) for f in range(2) for p in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    for f, b in enumerate(backs):
        data = b.read_bytes()
        for off in range(0, 4 * 32 * chunk, chunk):
            assert data[off:off + 32] == hashlib.sha256(b"%d:%d" % (f, off)).digest()


class SlowExport(FileExport):
    """Reads take 50 ms and record how many ran at once."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.running = self.peak = 0
        self._mu = threading.Lock()

    def readinto(self, offset: int, buf: memoryview) -> None:
        with self._mu:
            self.running += 1
            self.peak = max(self.peak, self.running)
        time.sleep(0.05)
        super().readinto(offset, buf)
        with self._mu:
            self.running -= 1


def test_requests_run_in_parallel(kit: Kit) -> None:
    export = SlowExport(sparse(kit.tmp / "vol.img", 16 * MiB))
    m = kit.mount(threads=4)
    m.add_file("vol", export)

    def reader(i: int) -> None:
        fd = os.open(m.path("vol"), os.O_RDONLY)
        try:
            for k in range(5):
                os.pread(fd, 4096, (i * 5 + k) * 4096)
        finally:
            os.close(fd)

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(4)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert export.peak >= 3
    assert time.monotonic() - t0 < 20 * 0.05  # 20 reads of 50 ms, not one after another


def test_export_errors_reach_the_process(kit: Kit, caplog: pytest.LogCaptureFixture) -> None:
    export = FileExport(sparse(kit.tmp / "vol.img", 4 * MiB))
    m = kit.mount()
    m.add_file("vol", export)
    vol = m.path("vol")

    def dd_write() -> subprocess.CompletedProcess[str]:
        return run("dd", "if=/dev/zero", f"of={vol}", "bs=64k", "count=2", "oflag=direct",
                   "conv=notrunc", check=False)

    def dd_read() -> subprocess.CompletedProcess[str]:
        return run("dd", f"if={vol}", "of=/dev/null", "bs=64k", "count=2", "iflag=direct",
                   check=False)

    export.fail["write"] = DataPathError(errno.ENOSPC, "pool is out of data space")
    r = dd_write()
    assert r.returncode != 0 and "No space left on device" in r.stderr
    export.fail["write"] = DataPathError(errno.EROFS, "pool is read-only")
    r = dd_write()
    assert r.returncode != 0 and "Read-only file system" in r.stderr
    export.fail.clear()
    assert dd_write().returncode == 0

    export.fail["read"] = DataPathError(errno.EIO, "metadata checksum mismatch")
    r = dd_read()
    assert r.returncode != 0 and "Input/output error" in r.stderr
    export.fail["read"] = RuntimeError("a bug")  # type: ignore[assignment]
    r = dd_read()
    assert r.returncode != 0 and "Input/output error" in r.stderr
    assert "internal error in READ" in caplog.text and "a bug" in caplog.text
    export.fail.clear()
    assert dd_read().returncode == 0

    export.fail["flush"] = DataPathError(errno.EIO, "disk gone")
    fd = os.open(vol, os.O_RDWR)
    with pytest.raises(OSError) as e:
        os.fsync(fd)
    assert e.value.errno == errno.EIO
    export.fail.clear()
    os.fsync(fd)
    os.close(fd)
    assert dd_write().returncode == 0 and dd_read().returncode == 0


def test_stop_leaves_no_mount_loop_thread_or_fd(kit: Kit) -> None:
    exports = [FileExport(sparse(kit.tmp / f"{i}.img", 16 * MiB)) for i in range(2)]
    fds_before = dev_fuse_fds()
    m = kit.mount(threads=3)
    m.add_file("a", exports[0])
    m.add_file("b", exports[1])
    assert is_mounted(m.mountpoint) and len(fuse_threads(m)) == 3
    assert len(dev_fuse_fds()) == len(fds_before) + 3
    dev = loop.attach(m.path("a"))  # stop() detaches it; the kit would otherwise
    kit.loops.append(dev)
    m.stop()
    assert not mounted_at(m.mountpoint) and not is_mounted(m.mountpoint)
    assert loop.backing_file(dev) is None
    assert fuse_threads(m) == []
    assert dev_fuse_fds() == fds_before
    assert [e.closed for e in exports] == [1, 1]
    m.stop()  # idempotent
    with pytest.raises(FuseError, match="stopped"):
        m.add_file("c", FileExport(kit.tmp / "0.img"))
    with pytest.raises(FuseError, match="already started"):
        m.start()


def test_stop_while_the_filesystem_on_the_loop_is_mounted(kit: Kit) -> None:
    export = FileExport(sparse(kit.tmp / "vol.img", 64 * MiB))
    m = kit.mount()
    m.add_file("vol", export)
    dev = kit.attach(m.path("vol"))
    run("mkfs.ext4", "-q", "-F", dev)
    fs = kit.mount_fs(dev)
    (fs / "f").write_bytes(b"data")
    run("sync")
    m.grace = 0.5
    t0 = time.monotonic()
    m.stop()  # cannot unmount cleanly: lazy unmount + abort
    assert time.monotonic() - t0 < 10
    assert not mounted_at(m.mountpoint)
    assert fuse_threads(m) == [] and export.closed == 1
    kit.umount_fs(fs)  # the broken filesystem can still be unmounted; autoclear frees the loop
    deadline = time.monotonic() + 10
    while loop.backing_file(dev) is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert loop.backing_file(dev) is None


def test_mount_errors(kit: Kit, tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(FuseError, match="not a directory"):
        FuseMount(tmp_path / "file").start()
    with pytest.raises(FuseError, match="not a directory"):
        FuseMount(tmp_path / "missing").start()
    with pytest.raises(FuseError, match="threads"):
        FuseMount(tmp_path, threads=0)
    m = kit.mount()
    with pytest.raises(FuseError, match="already started"):
        m.start()
    with pytest.raises(FuseError, match="no valid size"):
        m.add_file("x", object())  # type: ignore[arg-type]
    with pytest.raises(loop.LoopError, match="missing: No such file"):
        loop.attach(tmp_path / "missing")
    with pytest.raises(loop.LoopError, match="not a loop device"):
        loop.detach("/dev/sda")


SIGTERM_CHILD = textwrap.dedent("""
    import os, signal, sys, time
    sys.path.insert(0, {tests!r})
    from fuse_file_export import FileExport
    from thinpool.fuse import FuseMount
    m = FuseMount({mp!r}, grace=1.0)
    done = []
    def on_term(signum, frame):
        m.stop()
        done.append(1)
    signal.signal(signal.SIGTERM, on_term)
    m.start()
    m.add_file("vol", FileExport({back!r}))
    fd = os.open({mp!r} + "/vol", os.O_RDONLY)  # a reader is busy when SIGTERM comes
    print("ready", flush=True)
    while not done:
        try:
            os.pread(fd, 4096, 0)
        except OSError:
            pass
        time.sleep(0.001)
    print("stopped", flush=True)
""")


def test_sigterm_handler_can_stop(kit: Kit) -> None:
    mp = kit.tmp / "child"
    mp.mkdir()
    back = sparse(kit.tmp / "vol.img", MiB)
    code = SIGTERM_CHILD.format(tests=str(Path(__file__).resolve().parent), mp=str(mp),
                                back=str(back))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert p.stdout is not None
        assert p.stdout.readline().strip() == "ready"
        assert mounted_at(mp)
        time.sleep(0.2)
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=30)
        assert p.returncode == 0, err
        assert out.strip() == "stopped"
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        if mounted_at(mp):
            run("umount", "-l", mp, check=False)
    assert not mounted_at(mp)


def test_add_file_racing_stop_closes_each_taken_export_once(kit: Kit) -> None:
    back = sparse(kit.tmp / "vol.img", MiB)
    m = kit.mount()
    taken: list[FileExport] = []
    refused: list[FileExport] = []
    go = threading.Event()

    def adder() -> None:
        go.set()
        for i in range(100000):
            e = FileExport(back, count=False)
            try:
                m.add_file(f"f{i}", e)
            except FuseError:
                refused.append(e)
                e.close()  # not taken: ours to close
                return
            taken.append(e)

    t = threading.Thread(target=adder)
    t.start()
    go.wait()
    time.sleep(0.05)
    m.stop()
    t.join(30)
    assert taken and len(refused) == 1
    assert all(e.closed == 1 for e in taken + refused)
    assert not mounted_at(m.mountpoint)
