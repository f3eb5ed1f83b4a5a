"""``thinpool graph``: every command through the real CLI, in fresh processes (mounts outlive them)."""

from __future__ import annotations

import gzip
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Iterator

import pytest

from archivetools import needs_root
from graphkit import base_layer, child_layer, driver_root, tar_names, tree, unmount_tree
from thinpool.graph import registry
from thinpool.linux import mounts

pytestmark = needs_root


class Cli:
    def __init__(self, root: Path, driver: str) -> None:
        self.root = root
        self.driver = driver

    def run(self, *args: str, input: bytes | None = None, driver: bool = True) -> subprocess.CompletedProcess[bytes]:
        pre = ["--root", str(self.root)] + (["--driver", self.driver] if driver else [])
        return subprocess.run([sys.executable, "-m", "thinpool.cli", "graph", *pre, *args], input=input,
                              capture_output=True)

    def ok(self, *args: str, input: bytes | None = None) -> str:
        r = self.run(*args, input=input)
        assert r.returncode == 0, r.stderr.decode()
        return r.stdout.decode()

    def fails(self, code: int, *args: str, input: bytes | None = None) -> str:
        r = self.run(*args, input=input)
        assert r.returncode == code, (r.returncode, r.stdout, r.stderr)
        err = r.stderr.decode()
        assert "Traceback" not in err
        return err


# The CLI is the same for every driver (the contract tests cover the drivers); a driver that mounts
# shows what the CLI adds: mounts outliving the command that made them. Each command is a fresh Python
# process, so the tests keep their number down.
CLI_DRIVERS = [n for n in ("overlay2",) if n in registry.registered()] or ["vfs"]


@pytest.fixture(params=CLI_DRIVERS)
def cli(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Cli]:
    root = driver_root(request.param, request, tmp_path)
    c = Cli(root, request.param)
    r = c.run("status")
    if r.returncode and b"not supported" in r.stderr:
        pytest.skip(f"{request.param} cannot run here: {r.stderr.decode().strip()}")
    try:
        yield c
    finally:
        c.run("cleanup")
        unmount_tree(root)


def test_layers_through_the_cli(cli: Cli, tmp_path: Path) -> None:
    base, child = base_layer(), child_layer()
    cli.ok("create", "base")
    (tmp_path / "base.tar.gz").write_bytes(gzip.compress(base))
    size = int(cli.ok("apply-diff", "base", "-i", str(tmp_path / "base.tar.gz")))
    assert size == sum(m.size for m in tarfile.open(fileobj=io.BytesIO(base)).getmembers())
    cli.ok("create", "child", "--parent", "base")
    cli.ok("apply-diff", "child", "--parent", "base", input=child)  # from standard input
    assert cli.run("exists", "child").returncode == 0
    assert cli.run("exists", "nothing").returncode == 1
    assert cli.run("exists", "nothing").stdout == b""
    # get leaves the layer mounted after the command; put (another process) releases it
    cli.ok("create-rw", "ctr", "--parent", "child")
    path = cli.ok("get", "ctr").strip()
    assert os.path.isabs(path) and (Path(path) / "etc" / "passwd").exists()
    mounted = mounts.is_mountpoint(path)
    assert cli.ok("get", "ctr").strip() == path  # the mount counts once
    (Path(path) / "etc" / "added").write_text("added\n")
    if mounted:  # a new process sees the mount: the layer is in use
        assert "in use" in cli.fails(1, "remove", "ctr")
    cli.ok("put", "ctr")
    assert not mounts.is_mountpoint(path)
    # changes, diff, diff-size
    assert cli.ok("changes", "ctr", "--parent", "child").splitlines() == ["C /etc", "A /etc/added"]
    assert json.loads(cli.ok("changes", "ctr", "--parent", "child", "--json")) == [
        {"Path": "/etc", "Kind": 0}, {"Path": "/etc/added", "Kind": 1}]
    assert int(cli.ok("diff-size", "ctr", "--parent", "child")) == len("added\n")
    out = tmp_path / "ctr.tar"
    assert cli.ok("diff", "ctr", "--parent", "child", "-o", str(out)) == ""
    assert tar_names(out.read_bytes()) == ["etc", "etc/added"]
    stdout = cli.run("diff", "ctr", "--parent", "child").stdout
    assert stdout == out.read_bytes()
    whole = cli.run("diff", "child").stdout
    rebuilt = tmp_path / "rebuilt"
    rebuilt.mkdir()
    subprocess.run(["tar", "-x", "-C", str(rebuilt)], input=whole, check=True)
    path = cli.ok("get", "child").strip()
    try:
        assert tree(rebuilt)["etc/passwd"] == tree(path)["etc/passwd"]
    finally:
        cli.ok("put", "child")
    # status and metadata
    status = json.loads(cli.ok("status", "--json"))
    assert status["Driver"] == cli.driver and status["Home"] == str(cli.root / cli.driver)
    assert cli.ok("status").splitlines()[0] == f"Storage Driver: {cli.driver}"
    meta = json.loads(cli.ok("metadata", "ctr", "--json"))
    assert isinstance(meta, dict)
    # removal
    assert "child" in cli.fails(1, "remove", "base")
    cli.ok("remove", "ctr")
    cli.ok("remove", "ctr")
    assert cli.run("exists", "ctr").returncode == 1


def test_cleanup_unmounts_what_get_left(cli: Cli) -> None:
    cli.ok("create", "base")
    cli.ok("apply-diff", "base", input=base_layer())
    cli.ok("create-rw", "a", "--parent", "base")
    cli.ok("create-rw", "b", "--parent", "base")
    paths = [cli.ok("get", x).strip() for x in ("a", "b")]
    cli.ok("cleanup")
    assert not any(mounts.is_mountpoint(p) for p in paths)
    cli.ok("remove", "a")


def test_errors_are_one_line(tmp_path: Path) -> None:
    cli = Cli(tmp_path / "root", "vfs")
    for args in (("get", "nope"), ("put", "nope"), ("metadata", "nope"), ("diff-size", "nope"),
                 ("changes", "nope"), ("create", "x", "--parent", "nope")):
        err = cli.fails(1, *args)
        assert err.count("\n") == 1 and "nope does not exist" in err
    err = cli.fails(1, "create", "../x")
    assert "invalid layer id" in err
    cli.ok("create", "x")
    assert "already exists" in cli.fails(1, "create", "x")
    # a corrupt tar: a clean error, and the layer is gone
    err = cli.fails(1, "apply-diff", "x", input=gzip.compress(base_layer())[:200])
    assert err.count("\n") == 1 and "removed" in err
    assert cli.run("exists", "x").returncode == 1
    err = cli.fails(1, "apply-diff", "x", input=b"garbage" * 100)
    assert "does not exist" in err or "not a layer" in err
    assert "unable to parse key/value option" in cli.fails(1, "create-rw", "y", "--storage-opt", "size")
    # usage errors
    assert "Missing argument" in cli.fails(2, "create")
    assert "No such option" in cli.fails(2, "create", "z", "--bogus")
    r = cli.run("--driver", "nosuch", "status", driver=False)
    assert r.returncode == 2 and b"unknown driver 'nosuch'" in r.stderr
    cli.ok("create", "w")
    home = cli.root / cli.driver
    assert "inside the driver's home" in cli.fails(2, "diff", "w", "-o", str(home / "w.tar"))
    assert "No such file" in cli.fails(1, "apply-diff", "w", "-i", str(tmp_path / "missing.tar"))


def test_default_selection_through_the_cli(tmp_path: Path) -> None:
    c = Cli(tmp_path / "root", "")
    r = c.run("create", "x", driver=False)
    assert r.returncode == 0, r.stderr
    chosen = json.loads(c.run("status", "--json", driver=False).stdout)["Driver"]
    assert chosen == registry.new_driver(str(tmp_path / "probe")).name  # found again by its prior state
    assert (tmp_path / "root" / chosen).is_dir()


def test_default_root_is_documented() -> None:
    r = subprocess.run([sys.executable, "-m", "thinpool.cli", "graph", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "/var/lib/thinpool/graph" in r.stdout
