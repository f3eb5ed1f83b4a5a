"""Copy-on-write B+tree over 4 KiB nodes, parameterised by a value type.

Every change shadows the nodes on its path through the transaction manager,
so the tree of the last commit stays intact.  When a shared node (count > 1)
is shadowed, the copy takes a new reference on everything the node points
to: child nodes for internal nodes, ``ValueType.inc`` for leaf values.  That
is what makes snapshots O(1): a snapshot shares a root and pays for the
sharing lazily, one path at a time.

Shape rules (checked by thin_check): all leaves at one depth; every non-root
node keeps at least max_entries // 3 entries; internal key i is a lower bound
of child i's keys.  Inserts split an overfull node in two halves; removes
merge a child that fell below a third with a sibling, or even the two out.

Complexities: lookup, insert and remove are O(log n) node visits; ``release``
of a whole unshared tree is O(n) and belongs off the I/O path.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from typing import Any, Iterator, Protocol, Sequence

from ..errors import BadBlockError
from ..ondisk.checksum import Salt
from ..ondisk.node import U64, Node, NodeView, ValueCodec, check_header
from .transaction import TransactionManager


class ValueType(Protocol):
    """Leaf values of one tree: their codec and what a reference to one means."""

    codec: ValueCodec

    def inc(self, value: Any) -> None: ...

    def inc_all(self, values: list[Any]) -> None:
        """``inc`` of each of ``values`` (a shadowed shared leaf's)."""

    def dec(self, value: Any) -> None: ...


class PlainValue:
    """Values that reference nothing (details, index entries, counts)."""

    def __init__(self, codec: ValueCodec) -> None:
        self.codec = codec

    def inc(self, value: Any) -> None:
        pass

    def inc_all(self, values: list[Any]) -> None:
        pass

    def dec(self, value: Any) -> None:
        pass


class BTree:
    def __init__(self, tm: TransactionManager, vt: ValueType, name: str = "btree") -> None:
        self.tm = tm
        self.vt = vt
        self.codec = vt.codec
        self.name = name
        self.min_entries = self.codec.max_entries // 3
        self._new_keys = 0  # counted by _insert_many

    # -- reading ------------------------------------------------------------------
    def view(self, b: int) -> Node | NodeView:
        node = self.tm.dirty_nodes.get(b)
        if node is not None:
            return node
        raw = self.tm.bm.read(b, Salt.NODE)
        check_header(raw, b, self.codec.size)
        return NodeView(raw)

    def read_node(self, b: int) -> Node:
        node = self.tm.dirty_nodes.get(b)
        if node is not None:
            return node
        raw = self.tm.bm.read(b, Salt.NODE)
        check_header(raw, b, self.codec.size)
        return Node.decode(raw, b, self.codec)

    def lookup(self, root: int, key: int) -> Any:
        """The value at ``key``, or None."""
        b = root
        for _depth in range(64):
            node = self.view(b)
            if isinstance(node, Node):
                keys = node.keys
                if node.leaf:
                    i = bisect_left(keys, key)
                    return node.values[i] if i < len(keys) and keys[i] == key else None
                i = bisect_right(keys, key) - 1
                if i < 0:
                    return None
                b = node.values[i]
            else:
                keys_v = node.keys()
                if node.is_leaf:
                    i = bisect_left(keys_v, key)
                    if i < len(keys_v) and keys_v[i] == key:
                        return self.codec.unpack_one(
                            node.raw, 32 + 8 * node.max_entries + self.codec.size * i)
                    return None
                i = bisect_right(keys_v, key) - 1
                if i < 0:
                    return None
                b = node.u64_at(i)
        raise BadBlockError(root, self.name, "tree deeper than 64 levels (cycle?)")

    def last_key(self, root: int) -> int | None:
        """The largest key in the tree, or None if it is empty."""
        b = root
        for _depth in range(64):
            node = self.read_node(b)
            if not node.keys:
                return None
            if node.leaf:
                return node.keys[-1]
            b = node.values[-1]
        raise BadBlockError(root, self.name, "tree deeper than 64 levels (cycle?)")

    def range_u64(self, root: int, lo: int, hi: int) -> tuple[list[int], list[int]]:
        """Keys in [lo, hi) and their u64 values, without decoding whole nodes (read path)."""
        keys_out: list[int] = []
        values_out: list[int] = []
        self._range_u64(root, lo, hi, keys_out, values_out, 0)
        return keys_out, values_out

    def _range_u64(self, b: int, lo: int, hi: int, keys_out: list[int], values_out: list[int],
                   depth: int) -> None:
        if depth > 64:
            raise BadBlockError(b, self.name, "tree deeper than 64 levels (cycle?)")
        node = self.view(b)
        keys: Sequence[int]
        values: Sequence[int]
        if isinstance(node, Node):
            keys, values, leaf = node.keys, node.values, node.leaf
        else:
            keys, leaf = node.keys(), node.is_leaf
            values = node.values_raw().cast("Q")
        if leaf:
            i, j = bisect_left(keys, lo), bisect_left(keys, hi)
            keys_out.extend(keys[i:j])
            values_out.extend(values[i:j])
            return
        for k in range(max(bisect_right(keys, lo) - 1, 0), bisect_left(keys, hi)):
            self._range_u64(values[k], lo, hi, keys_out, values_out, depth + 1)

    def items(self, root: int, lo: int = 0, hi: int | None = None) -> Iterator[tuple[int, Any]]:
        """(key, value) pairs with lo <= key < hi, in key order."""
        for node in self.leaves(root, lo, hi):
            for k, v in zip(node.keys, node.values):
                if k >= lo and (hi is None or k < hi):
                    yield k, v

    def leaves(self, root: int, lo: int = 0, hi: int | None = None) -> Iterator[Node]:
        """Decoded leaves that may hold keys in [lo, hi), in key order."""
        node = self.read_node(root)
        if node.leaf:
            yield node
            return
        start = max(bisect_right(node.keys, lo) - 1, 0)
        for i in range(start, len(node.keys)):
            if hi is not None and node.keys[i] >= hi:
                break
            yield from self.leaves(node.values[i], lo, hi)

    # -- writing ------------------------------------------------------------------
    def create(self) -> int:
        """A new empty tree (one empty leaf); returns its root."""
        b = self.tm.new_block()
        self.tm.put_node(Node(b, True, [], [], self.codec))
        return b

    def _shadow(self, b: int) -> Node:
        node = self.read_node(b)
        new, shared = self.tm.shadow(b)
        if new != b:
            node = Node(new, node.leaf, list(node.keys), list(node.values), node.codec)
            if shared:
                self._inc_children(node)
            self.tm.put_node(node)
        return node

    def _inc_children(self, node: Node) -> None:
        if node.leaf:
            self.vt.inc_all(node.values)
        else:
            sm_inc = self.tm.sm.inc
            for child in node.values:
                sm_inc(child)

    def insert(self, root: int, key: int, value: Any) -> tuple[int, bool]:
        """Insert or overwrite; returns (new root, whether the key is new).

        A new key takes over the caller's reference to ``value``; overwriting
        drops the old value's reference unless it is equal.
        """
        root, new = self.insert_many(root, ((key, value),))
        return root, new == 1

    def insert_many(self, root: int, items: Sequence[tuple[int, Any]]) -> tuple[int, int]:
        """Insert or overwrite sorted, distinct keys; returns (new root, number of new keys).

        The same reference rules as ``insert``; each node on the way is shadowed
        once for the whole batch (a run of a write's new blocks), and an
        overfull node splits into as many balanced nodes as it needs.
        """
        self._new_keys = 0
        if not items:
            return root, 0
        b, extra = self._insert_many(root, items, [k for k, _ in items])
        level = [(self.read_node(b).keys[0] if extra else 0, b), *extra]
        while len(level) > 1:  # the root split: build internal levels above it
            level = [(group[0][0], self._new_internal(group)) for group in
                     _balanced_parts(level, U64.max_entries)]
        return level[0][1], self._new_keys

    def _new_internal(self, children: list[tuple[int, int]]) -> int:
        b = self.tm.new_block()
        self.tm.put_node(Node(b, False, [k for k, _ in children], [c for _, c in children], U64))
        return b

    def _insert_many(self, b: int, items: Sequence[tuple[int, Any]], item_keys: list[int]
                     ) -> tuple[int, list[tuple[int, int]]]:
        """Insert ``items`` below node b; (its new block, [(first key, block)] of new siblings)."""
        node = self._shadow(b)
        keys, values = node.keys, node.values
        if node.leaf:
            lo = 0
            for key, value in items:
                i = bisect_left(keys, key, lo)
                if i < len(keys) and keys[i] == key:
                    old = values[i]
                    values[i] = value
                    if old != value:
                        self.vt.dec(old)
                else:
                    keys.insert(i, key)
                    values.insert(i, value)
                    self._new_keys += 1
                lo = i + 1
        else:
            if item_keys[0] < keys[0]:
                keys[0] = item_keys[0]
            start = 0
            while start < len(items):
                i = bisect_right(keys, item_keys[start]) - 1
                end = (bisect_left(item_keys, keys[i + 1], start) if i + 1 < len(keys)
                       else len(items))
                if start == 0 and end == len(items):  # the usual case: one child takes all
                    child, extra = self._insert_many(values[i], items, item_keys)
                else:
                    child, extra = self._insert_many(values[i], items[start:end],
                                                     item_keys[start:end])
                values[i] = child
                if extra:
                    keys[i + 1:i + 1] = [k for k, _ in extra]
                    values[i + 1:i + 1] = [c for _, c in extra]
                start = end
        self.tm.put_node(node)
        if len(keys) <= node.max_entries:
            return node.blocknr, []
        parts = _balanced_parts(list(zip(keys, values)), node.max_entries)
        first = parts[0]
        del keys[len(first):], values[len(first):]
        siblings = []
        for part in parts[1:]:
            sib = Node(self.tm.new_block(), node.leaf, [k for k, _ in part], [v for _, v in part],
                       node.codec)
            self.tm.put_node(sib)
            siblings.append((sib.keys[0], sib.blocknr))
        return node.blocknr, siblings

    def update(self, root: int, key: int, value: Any) -> int:
        """Overwrite an existing key's value with no reference-count effect.

        Used when the caller moved the reference itself (a device's subtree
        root that its own shadowing replaced).
        """
        b = root
        path: list[tuple[Node, int]] = []
        while True:
            node = self._shadow(b)
            if path:
                parent, idx = path[-1]
                parent.values[idx] = node.blocknr
                self.tm.put_node(parent)
            if node.leaf:
                i = bisect_left(node.keys, key)
                if i >= len(node.keys) or node.keys[i] != key:
                    raise KeyError(key)
                node.values[i] = value
                self.tm.put_node(node)
                break
            i = bisect_right(node.keys, key) - 1
            if i < 0:
                raise KeyError(key)
            path.append((node, i))
            b = node.values[i]
        return path[0][0].blocknr if path else node.blocknr

    def remove(self, root: int, key: int) -> tuple[int, Any]:
        """Remove ``key`` (dropping its value's reference); (new root, old value or None)."""
        if self.lookup(root, key) is None:
            return root, None
        b, value = self._remove(root, key)
        node = self.read_node(b)
        if not node.leaf and len(node.keys) == 1:
            child = node.values[0]
            self._free_fresh(b)  # the child's reference moves from the old root to the caller
            b = child
        return b, value

    def _free_fresh(self, b: int) -> None:
        self.tm.sm.dec(b)
        self.tm.forget(b)

    def _remove(self, b: int, key: int) -> tuple[int, Any]:
        node = self._shadow(b)
        keys = node.keys
        if node.leaf:
            i = bisect_left(keys, key)
            value = node.values.pop(i)
            keys.pop(i)
            self.vt.dec(value)
            self.tm.put_node(node)
            return node.blocknr, value
        i = bisect_right(keys, key) - 1
        child, value = self._remove(node.values[i], key)
        node.values[i] = child
        if len(self.read_node(child).keys) < self.min_entries and len(keys) > 1:
            self._rebalance(node, i)
        self.tm.put_node(node)
        return node.blocknr, value

    def _rebalance(self, parent: Node, i: int) -> None:
        """Child i is under a third full: merge it with a sibling or share entries."""
        a = i if i + 1 < len(parent.keys) else i - 1
        left = self._shadow(parent.values[a])
        right = self._shadow(parent.values[a + 1])
        parent.values[a], parent.values[a + 1] = left.blocknr, right.blocknr
        total = len(left.keys) + len(right.keys)
        if total <= left.max_entries:
            left.keys.extend(right.keys)
            left.values.extend(right.values)
            self._free_fresh(right.blocknr)
            del parent.keys[a + 1], parent.values[a + 1]
        else:
            keys = left.keys + right.keys
            values = left.values + right.values
            half = total // 2
            left.keys, left.values = keys[:half], values[:half]
            right.keys, right.values = keys[half:], values[half:]
            parent.keys[a + 1] = right.keys[0]
            self.tm.put_node(right)
        self.tm.put_node(left)

    def release(self, root: int) -> None:
        """Drop one reference to the tree at ``root``, freeing what nobody else shares."""
        sm = self.tm.sm
        if sm.get(root) > 1:
            sm.dec(root)
            return
        node = self.read_node(root)
        if node.leaf:
            dec = self.vt.dec
            for v in node.values:
                dec(v)
        else:
            for child in node.values:
                self.release(child)
        self._free_fresh(root)


def _balanced_parts(entries: list[Any], max_entries: int) -> list[list[Any]]:
    """Split entries into the fewest runs of <= max_entries, sizes differing by at most one."""
    nr_parts = -(-len(entries) // max_entries)
    base, extra = divmod(len(entries), nr_parts)
    parts, pos = [], 0
    for i in range(nr_parts):
        size = base + (i < extra)
        parts.append(entries[pos:pos + size])
        pos += size
    return parts
