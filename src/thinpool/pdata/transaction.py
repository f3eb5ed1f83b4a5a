"""Transaction manager: the only way to obtain a writable metadata block.

Rules (after the kernel's dm-transaction-manager):

* ``new_block()`` allocates a block (count 0 -> 1) and remembers it as fresh.
* ``shadow(b)`` returns a location that may be written instead of ``b``: ``b``
  itself if it was allocated in this transaction and is not shared, else a new
  block; the old block loses one reference.  The caller learns whether ``b``
  was shared, in which case everything it points to gains a reference.
* Decoded btree nodes of the open transaction live in ``dirty_nodes`` and are
  encoded (checksummed) once, when flushed.
* ``commit(sb)``: persist the space maps, flush every block, sync, then write
  the superblock and sync again.  A crash before the superblock write leaves
  the previous transaction intact, because no block reachable from it was
  written (the space maps never hand out a block in use at the last commit).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..ondisk.checksum import Salt
from ..ondisk.node import Node
from .block_manager import BlockManager

if TYPE_CHECKING:
    from .space_map import MetadataSpaceMap


class TransactionManager:
    def __init__(self, bm: BlockManager, max_dirty_nodes: int = 4096) -> None:
        self.bm = bm
        self.sm: MetadataSpaceMap  # tied after construction (the space map needs a tm too)
        self._fresh: set[int] = set()
        self.dirty_nodes: dict[int, Node] = {}
        self.max_dirty_nodes = max_dirty_nodes

    def is_fresh(self, b: int) -> bool:
        return b in self._fresh

    def new_block(self) -> int:
        b = self.sm.new_block()
        self._fresh.add(b)
        return b

    def shadow(self, b: int) -> tuple[int, bool]:
        """(writable location, whether ``b`` was shared)."""
        count = self.sm.get(b)
        if b in self._fresh and count == 1:
            return b, False
        new = self.new_block()
        self.sm.dec(b)
        return new, count > 1

    def put_node(self, node: Node) -> None:
        """Record a modified node; it is encoded at flush time."""
        self.dirty_nodes[node.blocknr] = node
        if len(self.dirty_nodes) > self.max_dirty_nodes:
            self.flush_nodes()

    def forget(self, b: int) -> None:
        """``b`` was freed in this transaction: never write it."""
        self.dirty_nodes.pop(b, None)

    def flush_nodes(self) -> None:
        for node in self.dirty_nodes.values():
            self.bm.write(node.blocknr, node.encode(), Salt.NODE)
        self.dirty_nodes.clear()

    def begin(self) -> None:
        self._fresh.clear()
        self.dirty_nodes.clear()

    def abort(self) -> None:
        self.dirty_nodes.clear()
        self._fresh.clear()
        self.bm.discard_dirty()
