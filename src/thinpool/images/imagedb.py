"""Docker's image store and tags: ``ROOT/image/<driver>/imagedb`` and ``repositories.json``.

* ``imagedb/content/sha256/<id hex>``: the image config, byte for byte (the
  image id is its sha256);
* ``imagedb/metadata/sha256/<id hex>/parent``: the image it was committed
  from, ``lastUpdated``: an RFC 3339 time;
* ``repositories.json``: ``{"Repositories": {"<repo>": {"<repo>:<tag>": "sha256:<id>"}}}``
  with Docker's familiar names (``busybox``, ``busybox:latest``).

Every file is replaced atomically; a config is written before any tag
points at it, and removed only after the last tag that named it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from typing import Any

from .digest import check_digest, hex_of, sha256_of
from .errors import ImageError, NotFound
from .layers import atomic_write

_NAME = re.compile(r"(?:[a-zA-Z0-9.-]+(?::[0-9]+)?/)?[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
                   r"(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*")
_TAG = re.compile(r"[\w][\w.-]{0,127}")


def parse_reference(ref: str) -> tuple[str, str]:
    """(repository, tag) of ``name[:tag]`` (tag ``latest`` when none; ``ImageError`` if invalid)."""
    name, tag = ref, "latest"
    slash = ref.rfind("/")
    colon = ref.rfind(":")
    if colon > slash:
        name, tag = ref[:colon], ref[colon + 1:]
    if name.startswith("docker.io/library/"):
        name = name[len("docker.io/library/"):]
    elif name.startswith("docker.io/"):
        name = name[len("docker.io/"):]
    if not _NAME.fullmatch(name) or not _TAG.fullmatch(tag) or len(name) > 255:
        raise ImageError(f"invalid reference format: {ref!r} (repository[:tag], lowercase)")
    return name, tag


@dataclass(frozen=True)
class Image:
    id: str
    config: dict[str, Any]
    raw: bytes

    @property
    def diff_ids(self) -> list[str]:
        return list(self.config.get("rootfs", {}).get("diff_ids", []))


def decode_config(raw: bytes, what: str) -> dict[str, Any]:
    """An image config's JSON, checked for what thinpool relies on (``rootfs.diff_ids``)."""
    try:
        config = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise ImageError(f"{what}: image config is not JSON: {e}") from None
    if not isinstance(config, dict):
        raise ImageError(f"{what}: image config is not a JSON object")
    rootfs = config.get("rootfs")
    if not isinstance(rootfs, dict) or rootfs.get("type") != "layers" \
            or not isinstance(rootfs.get("diff_ids"), list):
        raise ImageError(f"{what}: image config has no rootfs.diff_ids layer list")
    for d in rootfs["diff_ids"]:
        check_digest(d, f"{what}: diff id")
    return config


class ImageStore:
    """Configs, parents and tags of one data root and driver."""

    def __init__(self, root: str, driver_name: str, create: bool = True) -> None:
        """``create=False`` reads a store without making any of its directories."""
        self.dir = os.path.join(root, "image", driver_name)
        self.content = os.path.join(self.dir, "imagedb", "content", "sha256")
        self.metadata = os.path.join(self.dir, "imagedb", "metadata", "sha256")
        self.repos_path = os.path.join(self.dir, "repositories.json")
        for d in (self.content, self.metadata) if create else ():
            os.makedirs(d, mode=0o700, exist_ok=True)

    # -- configs -------------------------------------------------------------------------------
    def put(self, raw: bytes, parent: str | None = None) -> str:
        """Store a config; its image id."""
        image_id = sha256_of(raw)
        decode_config(raw, image_id)
        path = os.path.join(self.content, hex_of(image_id))
        if not os.path.exists(path):
            atomic_write(path, raw, 0o600)
        meta = os.path.join(self.metadata, hex_of(image_id))
        os.makedirs(meta, mode=0o700, exist_ok=True)
        if parent is not None:
            atomic_write(os.path.join(meta, "parent"), parent.encode(), 0o600)
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S.000000000Z", time.gmtime())
        atomic_write(os.path.join(meta, "lastUpdated"), stamp.encode(), 0o600)
        return image_id

    def get(self, image_id: str) -> Image:
        try:
            with open(os.path.join(self.content, hex_of(image_id)), "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            raise NotFound(f"No such image: {image_id}") from None
        return Image(image_id, decode_config(raw, image_id), raw)

    def ids(self) -> list[str]:
        try:
            names = os.listdir(self.content)
        except FileNotFoundError:
            return []
        return ["sha256:" + n for n in sorted(names) if len(n) == 64 and not n.startswith(".")]

    def parent(self, image_id: str) -> str | None:
        try:
            with open(os.path.join(self.metadata, hex_of(image_id), "parent"), encoding="utf-8") as f:
                return f.read().strip() or None
        except FileNotFoundError:
            return None

    def delete(self, image_id: str) -> None:
        """Remove a config and its metadata (tags first: the caller removes them)."""
        path = os.path.join(self.content, hex_of(image_id))
        if os.path.exists(path):
            os.unlink(path)
        shutil.rmtree(os.path.join(self.metadata, hex_of(image_id)), ignore_errors=True)

    # -- tags ----------------------------------------------------------------------------------
    def tags(self) -> dict[str, str]:
        """``repo:tag`` -> image id."""
        try:
            with open(self.repos_path, encoding="utf-8") as f:
                doc = json.load(f)
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            raise ImageError(f"{self.repos_path} is unreadable: {e}") from None
        out: dict[str, str] = {}
        for refs in (doc.get("Repositories") or {}).values():
            for ref, image_id in refs.items():
                if "@" not in ref:
                    out[ref] = image_id
        return out

    def _write_tags(self, tags: dict[str, str]) -> None:
        repos: dict[str, dict[str, str]] = {}
        for ref, image_id in sorted(tags.items()):
            repo, _ = parse_reference(ref)
            repos.setdefault(repo, {})[ref] = image_id
        atomic_write(self.repos_path, json.dumps({"Repositories": repos}).encode(), 0o600)

    def tag(self, ref: str, image_id: str) -> str | None:
        """Point ``ref`` at ``image_id``; the image it pointed at before (if another)."""
        repo, tag = parse_reference(ref)
        key = f"{repo}:{tag}"
        tags = self.tags()
        before = tags.get(key)
        tags[key] = image_id
        self._write_tags(tags)
        return before if before != image_id else None

    def untag(self, ref: str) -> str:
        """Remove tag ``ref``; the image id it named."""
        repo, tag = parse_reference(ref)
        key = f"{repo}:{tag}"
        tags = self.tags()
        if key not in tags:
            raise NotFound(f"No such image: {ref}")
        image_id = tags.pop(key)
        self._write_tags(tags)
        return image_id

    def resolve(self, ref: str) -> str:
        """The image id ``ref`` names: a tag, a full id, or a unique prefix of an id.

        An id is found even when the tags are unreadable (their error is raised
        only for a name that is not an id).
        """
        unreadable: ImageError | None = None
        try:
            tags = self.tags()
        except ImageError as e:
            tags, unreadable = {}, e
        try:
            repo, tag = parse_reference(ref)
            if f"{repo}:{tag}" in tags:
                return tags[f"{repo}:{tag}"]
        except ImageError:
            pass
        want = ref.removeprefix("sha256:").lower()
        if re.fullmatch(r"[0-9a-f]{1,64}", want):
            found = [i for i in self.ids() if hex_of(i).startswith(want)]
            if len(found) == 1:
                return found[0]
            if len(found) > 1:
                raise ImageError(f"image id prefix {ref!r} is ambiguous ({len(found)} images)")
        if unreadable is not None:
            raise unreadable
        raise NotFound(f"No such image: {ref}")
