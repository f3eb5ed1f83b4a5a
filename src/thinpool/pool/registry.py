"""Volume registry: what dm-thin does not store (virtual size, name, origin).

The registry is a JSON file committed together with the pool transaction,
using the pool's transaction id as the commit point (as Docker's devmapper
driver does):

1. write ``volumes.json.pending`` stamped with transaction T+1 and sync it;
2. in the metadata: ``set_transaction_id T T+1`` plus the device change, commit;
3. rename the pending file over ``volumes.json``.

On open, a pending file whose stamp equals the metadata's transaction id is
rolled forward (the crash came after step 2); any other pending file is
discarded (the crash came before the metadata commit, which never happened).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

from ..errors import ThinpoolError

REGISTRY = "volumes.json"
PENDING = REGISTRY + ".pending"


@dataclass
class VolumeRecord:
    size: int
    name: str | None = None
    origin: str | None = None  # external origin file (read-only)
    created: float = 0.0


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: str, payload: object) -> None:
    """Write, sync, rename over ``path``, sync the directory."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(path) or ".")


class Registry:
    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.path = os.path.join(directory, REGISTRY)
        self.pending_path = os.path.join(directory, PENDING)
        self.volumes: dict[int, VolumeRecord] = {}
        self.transaction_id = 0

    def load(self, metadata_transaction: int, writable: bool) -> None:
        """Read the registry, resolving a half-finished commit against the metadata."""
        if os.path.exists(self.pending_path):
            stamp, volumes = self._read(self.pending_path)
            if not writable:  # read-only: resolve in memory, leave the files alone
                if stamp == metadata_transaction:
                    self.transaction_id, self.volumes = stamp, volumes
                    return
            else:
                if stamp == metadata_transaction:
                    os.replace(self.pending_path, self.path)
                else:
                    os.unlink(self.pending_path)
                _fsync_dir(self.directory)
        if os.path.exists(self.path):
            self.transaction_id, self.volumes = self._read(self.path)
        else:
            self.transaction_id, self.volumes = metadata_transaction, {}

    def _read(self, path: str) -> tuple[int, dict[int, VolumeRecord]]:
        try:
            with open(path, encoding="utf-8") as f:
                raw = json.load(f)
            vols = {int(k): VolumeRecord(**v) for k, v in raw["volumes"].items()}
            return int(raw["transaction_id"]), vols
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ThinpoolError(f"volume registry {path} is unreadable: {e}") from None

    def _payload(self, transaction_id: int) -> dict[str, object]:
        return {"transaction_id": transaction_id,
                "volumes": {str(k): asdict(v) for k, v in sorted(self.volumes.items())}}

    def prepare(self, transaction_id: int) -> None:
        """Step 1: the pending registry for ``transaction_id``."""
        write_json_atomic(self.pending_path, self._payload(transaction_id))

    def finish(self, transaction_id: int) -> None:
        """Step 3: make the pending registry the current one."""
        os.replace(self.pending_path, self.path)
        _fsync_dir(self.directory)
        self.transaction_id = transaction_id

