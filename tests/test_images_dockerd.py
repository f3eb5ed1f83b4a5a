"""Roots the real dockerd (Debian's 20.10) wrote, read by thinpool offline; roots thinpool wrote, run by dockerd.

* dockerd on ``thinpool docker-plugin --driver devicemapper`` loads the test image and runs a
  container that changes files; after the daemon and the plugin stop, ``thinpool docker`` reads
  the root (the plugin's naming, then Docker's own after renaming): ``ls`` must show what ``docker
  inspect`` showed, ``export`` must equal ``docker export``, ``mount`` must show the changed files,
  and ``migrate --to overlay2`` must give a root on which dockerd's built-in overlay2 driver shows
  the same image (``docker save`` byte for byte), the same container (``docker diff``, ``docker
  export``) and can start it again.  The source root is checked unchanged throughout.
* ``thinpool image load`` / ``container create`` on overlay2, then dockerd's built-in overlay2 on that
  root: ``docker save`` gives back the loaded layers (tar-split with CRCs as Docker writes them) and
  the image runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

import dockerkit as K
from imagekit import tree_digest
from thinpool.graph import registry

pytestmark = [pytest.mark.slow, pytest.mark.skipif("devicemapper" not in registry.registered(),
                                                   reason="no devicemapper driver in this build")]
WORKLOAD = ("echo changed > /etc/motd; rm /etc/passwd; mkdir -p /data/sub; echo payload > /data/sub/file; "
            "ln -s /etc/added /data/link; rm -r /etc/opaque; echo more >> /srv/big")


def thinpool(*args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run([sys.executable, "-m", "thinpool.cli", *args], capture_output=True, text=True)
    assert (r.returncode == 0) == ok, (args, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    return r


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> K.TestImage:
    return K.busybox_image_for(tmp_path_factory)


@pytest.fixture
def base() -> Iterator[Path]:
    with K.scratch("di") as path:
        yield path


def test_dockerd_devicemapper_root_read_offline_and_migrated(image: K.TestImage, base: Path) -> None:
    ref: dict = {}
    with K.docker_env(base, "devicemapper", "dm.basesize=1G", "dm.loopdatasize=8G",
                      "dm.loopmetadatasize=128M") as (d, plugin):
        d.out("load", "-i", str(image.path))
        cid = d.out("create", "--network", "none", "--name", "work", image.tag, "sh", "-c", WORKLOAD).strip()
        d.out("start", "-a", cid)
        d.out("export", "-o", str(base / "export.tar"), cid)
        ref["export"] = K.tar_listing((base / "export.tar").read_bytes())
        ref["diff"] = sorted(d.out("diff", cid).splitlines())
        ref["device"] = int(d.out("inspect", "-f", "{{.GraphDriver.Data.DeviceId}}", cid).strip())
        d.out("save", "-o", str(base / "saved.tar"), image.tag)
        ref["saved"] = K.saved_layers(base / "saved.tar")
        d.stop()
        plugin.stop()
        root = d.data_root
        before = tree_digest(root)

        # -- the plugin's naming: <root>/<plugin>/devicemapper, image/<plugin> -------------------------
        rep = json.loads(thinpool("docker", "ls", str(root), "--json").stdout)
        assert rep["Driver"] == plugin.name and rep["Problems"] == []
        assert [i["RepoTags"] for i in rep["Images"]] == [[image.tag]]
        [c] = rep["Containers"]
        assert (c["Id"], c["Name"], c["Device"]["DeviceId"]) == (cid, "work", ref["device"])
        thinpool("docker", "export", str(root), "work", "-o", str(base / "offline.tar"))
        assert K.tar_listing((base / "offline.tar").read_bytes()) == ref["export"]
        mp = base / "mnt"
        mp.mkdir()
        thinpool("docker", "mount", str(root), cid[:12], str(mp))
        try:
            assert (mp / "etc/motd").read_text() == "changed\n" and not (mp / "etc/passwd").exists()
        finally:
            thinpool("docker", "umount", str(mp))
        assert tree_digest(root) == before

        # -- migrated to overlay2, run by dockerd's own overlay2 driver --------------------------------
        new = K.Dockerd(base / "new", "overlay2")
        thinpool("docker", "migrate", str(root), "--to", "overlay2", "--dest", str(new.data_root))
        assert tree_digest(root) == before
        try:
            new.start()
            new.out("save", "-o", str(base / "saved-new.tar"), image.tag)
            assert K.saved_layers(base / "saved-new.tar") == ref["saved"] == (image.diff_ids, image.layers)
            assert sorted(new.out("diff", "work").splitlines()) == ref["diff"]
            new.out("export", "-o", str(base / "export-new.tar"), "work")
            assert K.tar_listing((base / "export-new.tar").read_bytes()) == ref["export"]
            new.out("start", "-a", "work")  # the migrated container runs again
            assert new.out("run", "--rm", "--network", "none", image.tag, "cat", "/etc/motd") == \
                "layer two changed this\n"
        finally:
            new.cleanup()

        # -- Docker's own naming: <root>/devicemapper, image/devicemapper ------------------------------
        os.rename(root / plugin.name / "devicemapper", root / "devicemapper")
        os.rename(root / "image" / plugin.name, root / "image" / "devicemapper")
        rep = json.loads(thinpool("docker", "ls", str(root), "--json").stdout)
        assert rep["Driver"] == "devicemapper" and rep["Containers"][0]["Device"]["DeviceId"] == ref["device"]
        out = subprocess.run([sys.executable, "-m", "thinpool.cli", "docker", "export", str(root), "work"],
                             capture_output=True)
        assert out.returncode == 0 and K.tar_listing(out.stdout) == ref["export"]


def test_dockerd_runs_a_root_thinpool_loaded(image: K.TestImage, base: Path) -> None:
    daemon = K.Dockerd(base / "d", "overlay2")
    root = str(daemon.data_root)
    thinpool("image", "--root", root, "--driver", "overlay2", "load", str(image.path))
    try:
        daemon.start()
        assert image.tag in daemon.out("images", "--format", "{{.Repository}}:{{.Tag}}")
        daemon.out("save", "-o", str(base / "saved.tar"), image.tag)
        assert K.saved_layers(base / "saved.tar") == (image.diff_ids, image.layers)
        assert daemon.out("run", "--rm", "--network", "none", image.tag, "cat", "/etc/motd") == \
            "layer two changed this\n"
    finally:
        daemon.cleanup()
