"""``ImageRoot``: images and containers of one data root on one graph driver, as Docker keeps them.

A data root ``ROOT`` holds the driver's home ``ROOT/<driver>`` (the graph
registry's layout), ``ROOT/image/<driver>/`` (``layers.LayerStore``,
``imagedb.ImageStore``) and ``ROOT/containers/`` - the directories of a
Docker ``--data-root``.

Loading is one transaction: ``image/<driver>/layerdb/tmp/load-*.json``
lists the layers (chain ids) and images the load may create, written
before each of them is made; when the load fails, or at the next open after
a crash, whatever of them no other image or container uses is removed
again, so a load leaves its images whole or nothing.  Writers hold an
exclusive ``flock`` on ``image/<driver>/.thinpool.lock``; recovery runs at
open when no other process holds it.

``close()`` releases the driver (``cleanup``: for devicemapper that stops
its pool server) unless a container is mounted (``mount`` keeps it until
``umount``).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from ..archive import Change, export_tree
from ..graph.driver import GraphDriver
from ..graph.naive import LayerStream
from . import tarsplit
from .archives import (ImageArchive, SaveImage, SaveLayer, docker_save_stream, write_atomically)
from .containers import Container, ContainerStore, check_name, setup_init_layer
from .digest import chain_ids, hex_of, sha256_of
from .errors import Conflict, ImageError, NotFound
from .imagedb import Image, ImageStore, parse_reference
from .layers import Layer, LayerStore, atomic_write, layer_tar, new_id
from .progress import NO_PROGRESS, Progress

MOUNT_MARK = "thinpool-mount"


@dataclass
class ImageSummary:
    id: str
    tags: list[str]
    layers: int
    size: int
    created: str

    def to_json(self) -> dict[str, Any]:
        return {"Id": self.id, "RepoTags": self.tags, "Layers": self.layers, "Size": self.size,
                "Created": self.created}


@dataclass
class ContainerSummary:
    id: str
    name: str
    image: str
    image_id: str
    mount_id: str
    mounted: str | None
    created: str

    def to_json(self) -> dict[str, Any]:
        return {"Id": self.id, "Name": self.name, "Image": self.image, "ImageID": self.image_id,
                "MountID": self.mount_id, "Mounted": self.mounted, "Created": self.created}


class IterReader:
    """``read(n)`` over an iterator of byte chunks (closing it closes the iterator)."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._buf = b""

    def read(self, n: int = -1) -> bytes:
        while (n < 0 or len(self._buf) < n):
            try:
                self._buf += next(self._chunks)
            except StopIteration:
                break
        if n < 0:
            out, self._buf = self._buf, b""
        else:
            out, self._buf = self._buf[:n], self._buf[n:]
        return out

    def close(self) -> None:
        close = getattr(self._chunks, "close", None)
        if close is not None:
            close()


def tar_size(split: list[tarsplit.Entry]) -> int:
    """Bytes of the tar a tar-split rebuilds."""
    return sum(len(e.payload) if e.type == tarsplit.SEGMENT else e.size for e in split)


class ImageRoot:
    """Images and containers on ``driver`` under the data root ``root`` (see the module docstring)."""

    def __init__(self, root: str, driver: GraphDriver) -> None:
        self.root = os.path.abspath(root)
        self.driver = driver
        self.layers = LayerStore(self.root, driver)
        self.images = ImageStore(self.root, driver.name)
        self.containers = ContainerStore(self.root)
        self._lock_path = os.path.join(self.images.dir, ".thinpool.lock")
        self._lock_fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self._depth = 0
        self.recovered: list[str] = []
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return  # another process is at work: its leftovers are not leftovers
        try:
            self.recovered = self.layers.recover() + self._recover()
        finally:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    # -- lifetime ------------------------------------------------------------------------------
    def __enter__(self) -> ImageRoot:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Release the driver unless a container is mounted (see the module docstring)."""
        if self._lock_fd < 0:
            return
        os.close(self._lock_fd)
        self._lock_fd = -1
        if not self.held_mounts():
            self.driver.cleanup()

    def held_mounts(self) -> list[str]:
        """Paths of containers mounted with ``mount`` and not yet unmounted."""
        held = []
        for c in self.containers.all():
            mark = self._mark(c.id)
            if os.path.exists(mark):
                with open(mark, encoding="utf-8") as f:
                    held.append(f.read().strip())
        return held

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        if self._depth == 0:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
            if self._depth == 0:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    # -- references ----------------------------------------------------------------------------
    def image_chain(self, image: Image) -> list[str]:
        return chain_ids(image.diff_ids)

    def used_chains(self) -> set[str]:
        """Every layer an image or a container uses (with the layers under them)."""
        used: set[str] = set()
        for image_id in self.images.ids():
            used.update(self.image_chain(self.images.get(image_id)))
        for m in self.layers.mounts().values():
            if m.parent is not None:
                used.update(layer.chain_id for layer in self.layers.stack(m.parent))
        return used

    def _release(self, chains: list[str]) -> list[str]:
        """Delete those of ``chains`` nobody uses, top layers first; the ones deleted."""
        used = self.used_chains()
        gone = []
        parents = {c: layer.parent for c, layer in self.layers.all().items()}
        for chain in reversed(chains):
            if chain in used or not self.layers.exists(chain):
                continue
            if any(p == chain for c, p in parents.items() if c not in gone):
                continue  # a layer nobody named still sits on it
            self.layers.delete(chain)
            gone.append(chain)
        return gone

    # -- load transactions -----------------------------------------------------------------------
    def _txn_path(self) -> str:
        return os.path.join(self.layers.tmp_dir, f"load-{secrets.token_hex(8)}.json")

    def _txn_write(self, path: str, chains: list[str], images: list[str]) -> None:
        atomic_write(path, json.dumps({"layers": chains, "images": images}).encode(), 0o600)

    def _rollback(self, chains: list[str], images: list[str]) -> list[str]:
        tagged = set(self.images.tags().values())
        for image_id in images:
            if image_id not in tagged:
                self.images.delete(image_id)
        return self._release(chains)

    def _recover(self) -> list[str]:
        done = []
        for name in sorted(os.listdir(self.layers.tmp_dir)):
            if not (name.startswith("load-") and name.endswith(".json")):
                continue
            path = os.path.join(self.layers.tmp_dir, name)
            try:
                with open(path, encoding="utf-8") as f:
                    doc = json.load(f)
                gone = self._rollback(list(doc.get("layers", [])), list(doc.get("images", [])))
            except (OSError, ValueError) as e:
                done.append(f"unreadable load record {name}: {e}")
                gone = []
            os.unlink(path)
            done.append(f"rolled back an interrupted load ({len(gone)} layers removed)")
        containers = {c.id for c in self.containers.all()}
        for cid in self.layers.mounts():
            if cid not in containers:
                self.layers.delete_rw(cid)
                done.append(f"removed the layers of half-made container {cid[:12]}")
        return done

    # -- images ----------------------------------------------------------------------------------
    def load(self, path: str, progress: Progress = NO_PROGRESS) -> list[tuple[str, list[str]]]:
        """Load every image of an archive; [(image id, tags)].  All or nothing (module docstring)."""
        with ImageArchive(path) as archive:
            found = archive.images()
            for image in found:  # bad tags fail before anything is made
                for tag in image.repo_tags:
                    parse_reference(tag)
            with self._locked():
                txn = self._txn_path()
                chains: list[str] = []
                new_images: list[str] = []
                try:
                    for image in found:
                        parent: str | None = None
                        for i, (ref, diff_id, chain) in enumerate(
                                zip(image.layers, image.diff_ids, chain_ids(image.diff_ids))):
                            if not self.layers.exists(chain):
                                chains.append(chain)
                                self._txn_write(txn, chains, new_images)
                                what = f"layer {i + 1}/{len(image.layers)} ({hex_of(diff_id)[:12]})"
                                task = progress.task(f"loading {what}", ref.size or None)
                                blob = archive.open_layer(ref, f"{path}: {ref.member}")
                                counter = _CountingBlob(blob, task.advance)
                                try:
                                    self.layers.register(counter, parent, diff_id)  # type: ignore[arg-type]
                                except ImageError as e:
                                    raise type(e)(f"{path}: {what}: {e}") from None
                                blob.verify()
                                task.finish()
                            parent = chain
                    ids = []
                    known = set(self.images.ids())
                    for image in found:
                        image_id = sha256_of(image.config)
                        if image_id not in known and image_id not in new_images:
                            new_images.append(image_id)
                            self._txn_write(txn, chains, new_images)
                        self.images.put(image.config)
                        ids.append(image_id)
                    tags = self.images.tags()
                    for image, image_id in zip(found, ids):
                        for tag in image.repo_tags:
                            repo, t = parse_reference(tag)
                            tags[f"{repo}:{t}"] = image_id
                    self._set_tags(tags)
                except BaseException:
                    try:
                        self._rollback(chains, new_images)
                    finally:
                        if os.path.exists(txn):
                            os.unlink(txn)
                    raise
                if os.path.exists(txn):
                    os.unlink(txn)
                return [(i, [t for t in img.repo_tags]) for i, img in zip(ids, found)]

    def _set_tags(self, tags: dict[str, str]) -> None:
        current = self.images.tags()
        for ref, image_id in tags.items():
            if current.get(ref) != image_id:
                self.images.tag(ref, image_id)

    def list_images(self) -> list[ImageSummary]:
        tags: dict[str, list[str]] = {}
        for ref, image_id in sorted(self.images.tags().items()):
            tags.setdefault(image_id, []).append(ref)
        out = []
        for image_id in self.images.ids():
            image = self.images.get(image_id)
            size = 0
            for chain in self.image_chain(image):
                try:
                    size += self.layers.get(chain).size
                except NotFound:
                    pass
            out.append(ImageSummary(image_id, tags.get(image_id, []), len(image.diff_ids), size,
                                    str(image.config.get("created", ""))))
        return out

    def image(self, ref: str) -> Image:
        return self.images.get(self.images.resolve(ref))

    def remove_image(self, ref: str, force: bool = False) -> list[str]:
        """Docker's ``rmi``: untag, and delete the image and its unused layers when no tag is left.

        Refused (``Conflict``) while a container uses the image, for an id
        with several tags unless ``force``, and for the id of an image others
        were committed from (by tag it is only untagged).

        Lines of what was done (``Untagged: ...``, ``Deleted: ...``).
        """
        with self._locked():
            image_id = self.images.resolve(ref)
            tags = [t for t, i in self.images.tags().items() if i == image_id]
            done = []
            by_tag = False
            try:
                repo, tag = parse_reference(ref)
                by_tag = f"{repo}:{tag}" in tags
            except ImageError:
                pass
            if by_tag and len(tags) > 1:
                repo, tag = parse_reference(ref)
                self.images.untag(f"{repo}:{tag}")
                return [f"Untagged: {repo}:{tag}"]
            if not by_tag and len(tags) > 1 and not force:
                raise Conflict(f"unable to delete {hex_of(image_id)[:12]} (must be forced) - image is "
                               f"referenced in multiple repositories ({', '.join(sorted(tags))})")
            users = [c for c in self.containers.all() if c.image == image_id]
            if users:
                raise Conflict(f"unable to remove image {hex_of(image_id)[:12]}: container "
                               f"{users[0].id[:12]} ({users[0].name}) uses it; remove the container first")
            if by_tag:
                repo, tag = parse_reference(ref)
                tags = [f"{repo}:{tag}"]
            children = [i for i in self.images.ids() if self.images.parent(i) == image_id]
            if children and not by_tag:
                raise Conflict(f"unable to delete {hex_of(image_id)[:12]} (cannot be forced) - image has "
                               "dependent child images")
            for t in tags:
                self.images.untag(t)
                done.append(f"Untagged: {t}")
            if children:
                return done  # kept, untagged, for the images committed from it
            chains = self.image_chain(self.images.get(image_id))
            self.images.delete(image_id)
            done.append(f"Deleted: {image_id}")
            for chain in self._release(chains):
                done.append(f"Deleted: {chain}")
            return done

    def save_stream(self, refs: list[str], progress: Progress = NO_PROGRESS) -> Iterator[bytes]:
        """The ``docker save`` tar of ``refs`` (every layer verified against its diff id as it goes).

        An image named by a tag is saved with that tag, one named by id with all its tags.
        """
        images: list[SaveImage] = []
        total = 0
        for ref in refs:
            image_id = self.images.resolve(ref)
            image = self.images.get(image_id)
            tags = self.images.tags()
            try:
                repo, tag = parse_reference(ref)
                tagged = [f"{repo}:{tag}"] if tags.get(f"{repo}:{tag}") == image_id else []
            except ImageError:
                tagged = []
            if not tagged:
                tagged = sorted(t for t, i in tags.items() if i == image_id)
            layers = []
            for chain in self.image_chain(image):
                layer = self.layers.get(chain)
                split = self.layers.tar_split(chain)
                if split is None:
                    raise ImageError(f"layer {chain} has no tar-split record: its tar cannot be rebuilt")
                size = tar_size(split)
                total += size
                layers.append(SaveLayer(chain, size, _tar_of(self.layers, layer)))
            images.append(SaveImage(image.raw, tagged, layers))
        task = progress.task(f"saving {', '.join(refs)}", total)
        yield from docker_save_stream(images, task.advance)
        task.finish()

    def save(self, refs: list[str], output: str, progress: Progress = NO_PROGRESS) -> int:
        """``docker save`` of ``refs`` into ``output`` (complete or untouched); its size in bytes."""
        home = os.path.realpath(self.root)
        out_real = os.path.realpath(output)
        if out_real == home or out_real.startswith(home + "/"):
            raise ImageError(f"refusing to write {output}: it is inside the data root {self.root}")
        for ref in refs:
            self.images.resolve(ref)  # unknown names fail before any file is made
        return write_atomically(output, self.save_stream(refs, progress))

    # -- containers ------------------------------------------------------------------------------
    def _mark(self, cid: str) -> str:
        return os.path.join(self.containers.dir, cid, MOUNT_MARK)

    def create_container(self, image_ref: str, name: str | None = None,
                         storage_opt: dict[str, str] | None = None) -> Container:
        """A new container: the init layer with Docker's placeholders, the read-write layer on it."""
        with self._locked():
            image_id = self.images.resolve(image_ref)
            image = self.images.get(image_id)
            chains = self.image_chain(image)
            for chain in chains:
                if not self.layers.exists(chain):
                    raise NotFound(f"image {image_ref}: layer {chain} is missing from the layer store")
            cid = new_id()
            name = check_name(name or f"thinpool_{cid[:12]}")  # before any layer is made
            if any(c.name == name for c in self.containers.all()):
                raise Conflict(f"the container name {name!r} is already in use")
            self.layers.create_rw(cid, chains[-1] if chains else None, storage_opt or {},
                                  setup_init_layer)
            try:
                return self.containers.create(cid, name, image_id, image_ref, self.driver.name)
            except BaseException:
                self.layers.delete_rw(cid)
                raise

    def list_containers(self) -> list[ContainerSummary]:
        out = []
        for c in self.containers.all():
            try:
                mount_id = self.layers.get_mount(c.id).mount_id
            except NotFound:
                mount_id = ""
            mark = self._mark(c.id)
            mounted = None
            if os.path.exists(mark):
                with open(mark, encoding="utf-8") as f:
                    mounted = f.read().strip()
            tags = [t for t, i in self.images.tags().items() if i == c.image]
            out.append(ContainerSummary(c.id, c.name, c.image_ref or (tags[0] if tags else c.image),
                                        c.image, mount_id, mounted, c.created))
        return out

    def container(self, ref: str) -> Container:
        return self.containers.resolve(ref)

    def mount(self, ref: str) -> str:
        """Mount the container's filesystem (until ``umount``); its path."""
        with self._locked():
            c = self.containers.resolve(ref)
            mark = self._mark(c.id)
            if os.path.exists(mark):
                with open(mark, encoding="utf-8") as f:
                    return f.read().strip()
            path = self.driver.get(self.layers.get_mount(c.id).mount_id)
            atomic_write(mark, path.encode(), 0o600)
            return path

    def umount(self, ref: str) -> None:
        with self._locked():
            c = self.containers.resolve(ref)
            mark = self._mark(c.id)
            if not os.path.exists(mark):
                raise ImageError(f"container {c.name} is not mounted")
            self.driver.put(self.layers.get_mount(c.id).mount_id)
            os.unlink(mark)

    def export(self, ref: str) -> LayerStream:
        """The container's whole filesystem as a tar (``docker export``)."""
        c = self.containers.resolve(ref)
        mount_id = self.layers.get_mount(c.id).mount_id
        path = self.driver.get(mount_id)
        try:
            chunks = export_tree(path)
        except BaseException:
            self.driver.put(mount_id)
            raise
        return LayerStream(chunks, lambda: self.driver.put(mount_id))

    def export_image(self, ref: str) -> LayerStream:
        """An image's whole filesystem as a tar."""
        image = self.image(ref)
        chains = self.image_chain(image)
        if not chains:
            raise ImageError(f"image {ref} has no layers")
        cache = self.layers.get(chains[-1]).cache_id
        path = self.driver.get(cache)
        try:
            chunks = export_tree(path)
        except BaseException:
            self.driver.put(cache)
            raise
        return LayerStream(chunks, lambda: self.driver.put(cache))

    def changes(self, ref: str) -> list[Change]:
        """What the container changed (``docker diff``): against its init layer."""
        m = self.layers.get_mount(self.containers.resolve(ref).id)
        return self.driver.changes(m.mount_id, m.init_id)

    def diff(self, ref: str) -> Iterator[bytes]:
        m = self.layers.get_mount(self.containers.resolve(ref).id)
        return self.driver.diff(m.mount_id, m.init_id)

    def commit(self, ref: str, new_ref: str | None = None, progress: Progress = NO_PROGRESS,
               comment: str = "") -> str:
        """A new image: the container's image plus a layer of its changes; the image id."""
        if new_ref is not None:
            parse_reference(new_ref)
        with self._locked():
            c = self.containers.resolve(ref)
            m = self.layers.get_mount(c.id)
            base = self.images.get(c.image)
            task = progress.task(f"committing {c.name}", None)
            stream = self.driver.diff(m.mount_id, m.init_id)
            reader = IterReader(stream)
            try:
                layer, new = self.layers.register(reader, m.parent, None, task.advance)  # type: ignore[arg-type]
            finally:
                reader.close()
            task.finish()
            try:
                config = dict(base.config)
                now = time.strftime("%Y-%m-%dT%H:%M:%S.000000000Z", time.gmtime())
                config["created"] = now
                config["container"] = c.id
                config["rootfs"] = {"type": "layers", "diff_ids": base.diff_ids + [layer.diff_id]}
                history = list(config.get("history") or [])
                history.append({"created": now, "created_by": "thinpool container commit",
                                **({"comment": comment} if comment else {})})
                config["history"] = history
                raw = json.dumps(config, separators=(",", ":")).encode()
                image_id = self.images.put(raw, parent=c.image)
                if new_ref is not None:
                    self.images.tag(new_ref, image_id)
            except BaseException:
                if new:
                    self._release([layer.chain_id])
                raise
            return image_id

    def remove_container(self, ref: str, force: bool = False) -> str:
        with self._locked():
            c = self.containers.resolve(ref)
            mark = self._mark(c.id)
            if os.path.exists(mark):
                if not force:
                    raise Conflict(f"container {c.name} is mounted: umount it first (or force)")
                self.driver.put(self.layers.get_mount(c.id).mount_id)
                os.unlink(mark)
            try:
                self.layers.delete_rw(c.id)
            except NotFound:
                pass
            self.containers.delete(c.id)
            return c.id


class _CountingBlob:
    def __init__(self, blob: Any, advance: Callable[[int], None]) -> None:
        self.blob = blob
        self.advance = advance

    def read(self, n: int = -1) -> bytes:
        data: bytes = self.blob.read(n)
        if data:
            self.advance(len(data))
        return data


def _tar_of(store: LayerStore, layer: Layer) -> Callable[[], Iterator[bytes]]:
    return lambda: layer_tar(store, layer)


__all__ = ["ContainerSummary", "ImageRoot", "ImageSummary", "IterReader", "tar_size"]
