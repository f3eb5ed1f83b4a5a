"""Volumes as exports: what the NBD server (and the FUSE mount) serve.

``VolumeExport`` adapts a ``ThinDevice`` handle to the export interface of
``nbd.backend`` (FUSE uses the same methods).  ``PoolCatalog`` names every
volume by its id (decimal) and, if it has one, by its name.
"""

from __future__ import annotations

import errno
from typing import Sequence

from ..block.device import ThinDevice
from ..errors import DataPathError, DeviceError
from ..nbd.backend import ExportNotFound
from ..pool.engine import Pool

MAX_PAYLOAD = 32 << 20


class VolumeExport:
    """One opened volume (one per NBD connection); all share the volume's state.

    ``can_multi_conn`` is true: every handle of a volume shares the pool's
    data path, so a flush on one connection covers writes acknowledged on all.
    """

    def __init__(self, dev: ThinDevice, read_only: bool, description: str) -> None:
        self.dev = dev
        self.size = dev.size
        self.read_only = read_only
        self.can_trim = not read_only and dev.can_discard
        self.can_zero = not read_only
        self.can_fast_zero = not read_only and not dev.has_origin
        self.can_cache = True
        self.can_multi_conn = True
        self.block_sizes = (1, min(dev.bs, 64 << 10), MAX_PAYLOAD)
        self.description = description

    def _writable(self) -> None:
        if self.read_only:
            raise DataPathError(errno.EPERM, "the export is read-only")

    def readinto(self, offset: int, buf: memoryview) -> None:
        self.dev.readinto(offset, buf)

    def write(self, offset: int, data: memoryview, fua: bool) -> None:
        self._writable()
        self.dev.write(offset, data, fua)

    def write_many(self, writes: Sequence[tuple[int, memoryview]]) -> None:
        self._writable()
        self.dev.write_many(writes)

    def flush(self) -> None:
        if not self.read_only:
            self.dev.flush()

    def trim(self, offset: int, length: int, fua: bool) -> None:
        self._writable()
        self.dev.trim(offset, length, fua)

    def write_zeroes(self, offset: int, length: int, may_trim: bool, fast_only: bool,
                     fua: bool) -> None:
        self._writable()
        self.dev.write_zeroes(offset, length, may_trim, fast_only, fua)

    def extents(self, offset: int, length: int) -> list[tuple[int, int]]:
        return self.dev.extents(offset, length)

    def cache(self, offset: int, length: int) -> None:
        self.dev.cache(offset, length)

    def close(self) -> None:
        self.dev.close()


class PoolCatalog:
    """Every volume of a pool, by id and by name; ``read_only`` ids are served read-only."""

    def __init__(self, pool: Pool, read_only: set[int] = frozenset()) -> None:  # type: ignore[assignment]
        self.pool = pool
        self.read_only = set(read_only)

    def list_exports(self) -> list[tuple[str, str]]:
        out = []
        for v in self.pool.list_volumes():
            desc = f"thin volume {v.dev_id}" + (f" ({v.name})" if v.name else "") + \
                f", {v.size} bytes"
            out.append((str(v.dev_id), desc))
            if v.name:
                out.append((v.name, desc))
        return out

    def resolve(self, name: str) -> int:
        """The volume id an export name means (decimal id, or a volume name)."""
        if name.isascii() and name.isdigit():
            return int(name)
        for dev_id, rec in self.pool.registry.volumes.items():
            if rec.name == name:
                return dev_id
        raise ExportNotFound(f"no volume is called {name!r}")

    def open_export(self, name: str) -> VolumeExport:
        if not name:
            raise ExportNotFound("there is no default export: name a volume by id or name")
        dev_id = self.resolve(name)
        try:
            dev = self.pool.volume(dev_id)
        except DeviceError as e:
            raise ExportNotFound(str(e)) from None
        rec = self.pool.registry.volumes.get(dev_id)
        desc = f"thin volume {dev_id}" + (f" ({rec.name})" if rec and rec.name else "")
        return VolumeExport(dev, self.pool.read_only or dev_id in self.read_only, desc)
