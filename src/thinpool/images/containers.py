"""Containers' own pieces: Docker's init layer and ``ROOT/containers/<id>/config.v2.json``.

``setup_init_layer(path)`` does what Docker's ``initlayer.Setup`` does to a
new container's ``-init`` layer: for each mount-point placeholder it first
unlinks every existing component of the path that is not a directory (so a
symlink in the image cannot redirect it), then creates what is missing:
directories ``/dev/pts``, ``/dev/shm``, ``/proc``, ``/sys`` (0755), empty
files ``/.dockerenv``, ``/etc/resolv.conf``, ``/etc/hosts``,
``/etc/hostname``, ``/dev/console`` (0755, as Docker creates them), and the
symlink ``/etc/mtab`` -> ``/proc/mounts``; missing parent directories are
made 0755.  Everything belongs to root.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from typing import Any

from .errors import ImageError, NotFound, note_or_raise
from .layers import atomic_write

PLACEHOLDERS: tuple[tuple[str, str], ...] = (
    ("/dev/pts", "dir"), ("/dev/shm", "dir"), ("/proc", "dir"), ("/sys", "dir"),
    ("/.dockerenv", "file"), ("/etc/resolv.conf", "file"), ("/etc/hosts", "file"),
    ("/etc/hostname", "file"), ("/dev/console", "file"), ("/etc/mtab", "/proc/mounts"),
)
_NAME = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.-]+")


def _open_dir(root_fd: int, parts: list[str]) -> int:
    """A directory fd for ``parts`` under ``root_fd``, made (0755) where missing; never follows links."""
    fd = os.dup(root_fd)
    try:
        for part in parts:
            try:
                os.mkdir(part, 0o755, dir_fd=fd)
                os.chmod(part, 0o755, dir_fd=fd, follow_symlinks=False)
            except FileExistsError:
                pass
            nfd = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            os.close(fd)
            fd = nfd
    except BaseException:
        os.close(fd)
        raise
    return fd


def setup_init_layer(path: str) -> None:
    """Create Docker's placeholders in the tree at ``path`` (see the module docstring)."""
    root = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for target, kind in PLACEHOLDERS:
            parts = target.strip("/").split("/")
            # unlink every non-directory component (Docker's unix.Unlink of each prefix)
            for i in range(1, len(parts) + 1):
                try:
                    pfd = _open_dir(root, parts[:i - 1])
                except OSError:
                    break
                try:
                    os.unlink(parts[i - 1], dir_fd=pfd)
                except OSError as e:
                    if e.errno not in (errno.ENOENT, errno.EISDIR, errno.EPERM, errno.ENOTDIR):
                        raise
                finally:
                    os.close(pfd)
            pfd = _open_dir(root, parts[:-1])
            try:
                name = parts[-1]
                try:
                    os.stat(name, dir_fd=pfd, follow_symlinks=False)
                    continue  # a directory that is already there
                except FileNotFoundError:
                    pass
                if kind == "dir":
                    os.mkdir(name, 0o755, dir_fd=pfd)
                    os.chmod(name, 0o755, dir_fd=pfd, follow_symlinks=False)
                elif kind == "file":
                    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                                 0o755, dir_fd=pfd)
                    os.fchmod(fd, 0o755)
                    os.close(fd)
                else:
                    os.symlink(kind, name, dir_fd=pfd)
            finally:
                os.close(pfd)
    except OSError as e:
        raise ImageError(f"cannot set up the container's init layer: {e.strerror}: {e.filename or ''}") \
            from None
    finally:
        os.close(root)


def check_name(name: str) -> str:
    """``name`` if Docker accepts it as a container name (two or more of [a-zA-Z0-9_.-], not
    starting with ``_.-``), else ``ImageError``."""
    if not _NAME.fullmatch(name):
        raise ImageError(f"invalid container name {name!r}: only [a-zA-Z0-9][a-zA-Z0-9_.-] are "
                         "allowed (at least two characters)")
    return name


@dataclass
class Container:
    """A container as Docker records it (the fields thinpool reads and writes)."""

    id: str
    name: str
    image: str          # image id
    image_ref: str      # what the user asked for
    created: str
    driver: str
    raw: dict[str, Any]


class ContainerStore:
    """``ROOT/containers/<id>/config.v2.json`` records."""

    def __init__(self, root: str, create: bool = True) -> None:
        """``create=False`` reads the records without making the directory."""
        self.dir = os.path.join(root, "containers")
        if create:
            os.makedirs(self.dir, mode=0o710, exist_ok=True)

    def all(self, problems: list[str] | None = None) -> list[Container]:
        """Every container record.  An unreadable one is an ``ImageError``, or, with
        ``problems``, noted there (one line) and left out."""
        out = []
        try:
            names = os.listdir(self.dir)
        except FileNotFoundError:
            return []
        for cid in sorted(names):
            if not re.fullmatch(r"[0-9a-f]{64}", cid):
                continue
            try:
                c = self.load(cid)
            except ImageError as e:
                note_or_raise(e, problems)
                continue
            if c is not None:
                out.append(c)
        return out

    def load(self, cid: str) -> Container | None:
        try:
            with open(os.path.join(self.dir, cid, "config.v2.json"), encoding="utf-8") as f:
                raw = json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            raise ImageError(f"container {cid}: config.v2.json is unreadable: {e}") from None
        if not isinstance(raw, dict):
            raise ImageError(f"container {cid}: config.v2.json is not a JSON object")
        return Container(cid, str(raw.get("Name", "")).lstrip("/"), str(raw.get("Image", "")),
                         str((raw.get("Config") or {}).get("Image", "")), str(raw.get("Created", "")),
                         str(raw.get("Driver", "")), raw)

    def resolve(self, ref: str, problems: list[str] | None = None) -> Container:
        """A container by name, full id or unique id prefix (``problems``: as for ``all``)."""
        everything = self.all(problems)
        for c in everything:
            if c.name == ref.lstrip("/") or c.id == ref:
                return c
        if re.fullmatch(r"[0-9a-f]{1,64}", ref):
            found = [c for c in everything if c.id.startswith(ref)]
            if len(found) == 1:
                return found[0]
            if len(found) > 1:
                raise ImageError(f"container id prefix {ref!r} is ambiguous ({len(found)} containers)")
        raise NotFound(f"No such container: {ref}")

    def create(self, cid: str, name: str, image_id: str, image_ref: str, driver: str) -> Container:
        check_name(name)
        if any(c.name == name for c in self.all()):
            raise ImageError(f"the container name {name!r} is already in use")
        created = time.strftime("%Y-%m-%dT%H:%M:%S.000000000Z", time.gmtime())
        raw = {"ID": cid, "Created": created, "Name": "/" + name, "Image": image_id,
               "Driver": driver, "OS": "linux", "Path": "", "Args": [],
               "Config": {"Image": image_ref, "Hostname": cid[:12]},
               "State": {"Running": False, "Status": "created"}}
        path = os.path.join(self.dir, cid)
        os.makedirs(path, mode=0o700)
        atomic_write(os.path.join(path, "config.v2.json"), json.dumps(raw).encode(), 0o600)
        return Container(cid, name, image_id, image_ref, created, driver, raw)

    def delete(self, cid: str) -> None:
        shutil.rmtree(os.path.join(self.dir, cid), ignore_errors=True)
