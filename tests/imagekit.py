"""Helpers for the image tests: image archives built by hand (docker save, OCI layout), tree checksums.

``docker_save(path, layers, tag)`` and ``oci_layout(path, layers, tag, compress)`` write archives
whose configs name the layers' real diff ids; ``tamper`` options make them wrong on purpose.
``tree_digest(root)`` is a checksum of every file under a root (names, modes, sizes, mtimes and
contents; sparse files read by their data extents only) for "was this never written" checks.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import stat
import tarfile
from pathlib import Path

import zstandard

MTIME = 1_700_000_000


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def config_for(layers: list[bytes], diff_ids: list[str] | None = None) -> bytes:
    return json.dumps({
        "architecture": "amd64", "os": "linux", "created": "2023-11-14T22:13:20Z",
        "config": {"Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids or [sha(x) for x in layers]},
        "history": [{"created": "2023-11-14T22:13:20Z", "created_by": f"layer {i}"} for i in range(len(layers))],
    }, sort_keys=True).encode()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), MTIME, 0o644
    tar.addfile(info, io.BytesIO(data))


def docker_save(path: Path, layers: list[bytes], tag: str | None = "imgtest/app:1", *,
                diff_ids: list[str] | None = None, layer_data: list[bytes] | None = None,
                layer_names: list[str] | None = None) -> bytes:
    """A docker-save archive; its config bytes.  ``layer_data`` replaces what is stored (tampering)."""
    config = config_for(layers, diff_ids)
    config_name = hashlib.sha256(config).hexdigest() + ".json"
    names = layer_names or [f"{hashlib.sha256(x).hexdigest()}/layer.tar" for x in layers]
    with tarfile.open(path, "w") as out:
        _add(out, config_name, config)
        for name, data in zip(names, layer_data or layers):
            _add(out, name, data)
        _add(out, "manifest.json", json.dumps([{"Config": config_name, "RepoTags": [tag] if tag else None,
                                                "Layers": names}]).encode())
    return config


def compress(data: bytes, how: str) -> bytes:
    if how == "gzip":
        return gzip.compress(data, mtime=0)
    if how == "zstd":
        return zstandard.ZstdCompressor().compress(data)
    return data


MEDIA = {"gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
         "zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
         "none": "application/vnd.oci.image.layer.v1.tar"}


def oci_layout(path: Path, layers: list[bytes], tag: str = "imgtest/oci:1",
               how: list[str] | None = None, *, corrupt_blob: int | None = None) -> bytes:
    """An OCI image layout archive (layers compressed per ``how``); its config bytes."""
    how = how or ["gzip"] * len(layers)
    config = config_for(layers)
    blobs: dict[str, bytes] = {sha(config): config}
    descs = []
    for i, (layer, h) in enumerate(zip(layers, how)):
        blob = compress(layer, h)
        digest = sha(blob)
        if i == corrupt_blob:
            blob = blob[:-1] + bytes([blob[-1] ^ 1])  # stored bytes no longer match the digest
        blobs[digest] = blob
        descs.append({"mediaType": MEDIA[h], "digest": digest, "size": len(blob)})
    manifest = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                           "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                                      "digest": sha(config), "size": len(config)},
                           "layers": descs}).encode()
    blobs[sha(manifest)] = manifest
    index = {"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": sha(manifest),
        "size": len(manifest), "platform": {"os": "linux", "architecture": "amd64"},
        "annotations": {"io.containerd.image.name": tag, "org.opencontainers.image.ref.name": tag.split(":")[-1]}}]}
    with tarfile.open(path, "w") as out:
        _add(out, "oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
        _add(out, "index.json", json.dumps(index).encode())
        for digest, blob in blobs.items():
            _add(out, f"blobs/sha256/{digest.split(':')[1]}", blob)
    return config


def tree_digest(root: str | os.PathLike[str]) -> dict[str, str]:
    """path -> digest of type, mode, owner, size, mtime and content (data extents of sparse files)."""
    out: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            h = hashlib.sha256(f"{st.st_mode} {st.st_uid} {st.st_gid} {st.st_size} {st.st_mtime_ns}".encode())
            if stat.S_ISREG(st.st_mode):
                with open(path, "rb") as f:
                    fd = f.fileno()
                    pos = 0
                    while pos < st.st_size:
                        try:
                            start = os.lseek(fd, pos, os.SEEK_DATA)
                        except OSError:
                            break
                        end = os.lseek(fd, start, os.SEEK_HOLE)
                        h.update(f"@{start}".encode())
                        os.lseek(fd, start, os.SEEK_SET)
                        left = end - start
                        while left:
                            chunk = f.read(min(left, 1 << 20))
                            if not chunk:
                                break
                            h.update(chunk)
                            left -= len(chunk)
                        pos = end
            elif stat.S_ISLNK(st.st_mode):
                h.update(os.readlink(path).encode())
            out[os.path.relpath(path, root)] = h.hexdigest()
    return out


def saved_layers(data: bytes) -> tuple[list[str], list[bytes]]:
    """(diff ids from the config, layer tars) of a ``docker save`` archive given as bytes."""
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        def member(name: str) -> bytes:
            f = tar.extractfile(name)
            assert f is not None, name
            return f.read()
        manifest = json.loads(member("manifest.json"))
        config = json.loads(member(manifest[0]["Config"]))
        return config["rootfs"]["diff_ids"], [member(name) for name in manifest[0]["Layers"]]
