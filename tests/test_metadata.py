"""PoolMetadata against the real thin-provisioning-tools and an in-memory model."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from thinpool.errors import DeviceError, NoDataSpaceError
from thinpool.ondisk.values import MAX_DEVICE_ID
from thinpool.thin.builder import format_metadata
from thinpool.thin.metadata import PoolMetadata
from thinpool.tools.check import check

from conftest import require_tool
from thinmodel import assert_thin_check_clean, parse_dump, thin_dump


def new_pool(tmp_path: Path, size: int = 16 << 20, nr_data_blocks: int = 1 << 20) -> Path:
    meta = tmp_path / "metadata"
    with open(meta, "wb") as f:
        f.truncate(size)
    format_metadata(meta, 128, nr_data_blocks)
    return meta


def verify(meta: Path, model: dict[int, dict[int, int]] | None = None) -> None:
    """thin_check and thinpool check are clean; thin_dump matches the model."""
    require_tool("thin_check")
    assert_thin_check_clean(meta)
    report = check(meta)
    assert report.clean, report.errors + report.leaks
    if model is not None:
        _, devices, details = parse_dump(thin_dump(meta))
        got = {d: {v: b for v, (b, _t) in maps.items()} for d, maps in devices.items()}
        assert got == model
        for d, maps in devices.items():
            assert details[d]["mapped_blocks"] == len(maps)


def test_format_is_clean(tmp_path: Path) -> None:
    meta = new_pool(tmp_path)
    verify(meta, {})
    sb, _, _ = parse_dump(thin_dump(meta))
    assert sb["nr_data_blocks"] == str(1 << 20) and sb["data_block_size"] == "128"


def test_snapshot_shares_and_breaks_sharing(tmp_path: Path) -> None:
    meta = new_pool(tmp_path)
    with PoolMetadata(meta) as md:
        md.create_thin(0)
        blocks = {}
        for v in range(10):
            blocks[v] = md.alloc_data_block()
            md.insert(0, v, blocks[v])
        md.create_snap(1, 0)
        assert md.lookup(1, 3).shared and md.lookup(0, 3).shared
        new = md.alloc_data_block()
        md.insert(1, 3, new)
        assert md.lookup(1, 3) == (new, 1, False)
        assert md.lookup(0, 3).data_block == blocks[3]
        # The snapshot's leaf was shadowed: origin's data blocks now count in two leaves.
        assert md.data_block_count(blocks[0]) == 2 and md.data_block_count(blocks[3]) == 1
        md.commit()
        d0, d1 = md.details(0), md.details(1)
        assert (d0.snapshotted_time, d1.creation_time, d1.snapshotted_time) == (1, 1, 1)
    model = {0: dict(blocks), 1: {**blocks, 3: new}}
    verify(meta, model)


def test_big_device_three_levels_and_merging_deletes(tmp_path: Path) -> None:
    meta = new_pool(tmp_path, size=64 << 20)
    n = 100_000
    with PoolMetadata(meta) as md:
        md.create_thin(7)
        for v in range(n):
            md.insert(7, v * 3, md.alloc_data_block())
        md.commit()
        root = md._require(7).root
        depth, b = 1, root
        node = md.bottom.read_node(b)
        while not node.leaf:
            depth += 1
            node = md.bottom.read_node(node.values[0])
        assert depth >= 3
    verify(meta)
    with PoolMetadata(meta) as md:
        model = {v * 3: md.lookup(7, v * 3).data_block for v in range(0, n, 1)}
        for v in list(model):
            if v % 10:  # delete 90%: forces merges and rebalancing everywhere
                assert md.remove(7, v)
                del model[v]
        md.commit()
        assert md.details(7).mapped_blocks == len(model)
    verify(meta, {7: model})


def test_insert_many_splits_grows_and_shares(tmp_path: Path) -> None:
    """Batches: 70,000 keys at once into an empty tree (a three-level tree built in one
    call), interleaved batches into full leaves, remaps of a snapshot's shared keys."""
    meta = new_pool(tmp_path, size=64 << 20)
    with PoolMetadata(meta) as md:
        md.create_thin(0)
        first = [(v * 4, md.alloc_data_block()) for v in range(70_000)]
        md.insert_many(0, first)
        model = dict(first)
        node, depth = md.bottom.read_node(md._require(0).root), 1
        while not node.leaf:
            node, depth = md.bottom.read_node(node.values[0]), depth + 1
        assert depth == 3
        md.commit()
        md.create_snap(1, 0)
        for start in (1, 2, 3):  # fill the gaps: every leaf overflows, several times
            batch = [(v * 4 + start, md.alloc_data_block()) for v in range(0, 70_000, 2)]
            md.insert_many(0, batch)
            model.update(batch)
        remap = [(v * 4, md.alloc_data_block()) for v in range(1000, 3000)]
        md.insert_many(1, remap)  # breaks sharing with device 0 over 2000 blocks
        snap = dict(first)
        snap.update(remap)
        assert md.details(0).mapped_blocks == len(model)
        assert md.details(1).mapped_blocks == len(snap)
        md.commit()
    verify(meta, {0: model, 1: snap})


def test_fifty_deep_snapshot_chain(tmp_path: Path) -> None:
    meta = new_pool(tmp_path)
    model: dict[int, dict[int, int]] = {}
    with PoolMetadata(meta) as md:
        md.create_thin(0)
        current: dict[int, int] = {}
        for v in range(300):
            current[v] = md.alloc_data_block()
            md.insert(0, v, current[v])
        model[0] = dict(current)
        for depth in range(1, 51):
            md.create_snap(depth, depth - 1)
            for v in (depth, depth * 5 % 300, 299 - depth):
                current[v] = md.alloc_data_block()
                md.insert(depth, v, current[v])
            model[depth] = dict(current)
            if depth % 10 == 0:
                md.commit()
        md.commit()
        assert md.time == 50
        for v, b in model[0].items():
            assert md.lookup(0, v).data_block == b
    verify(meta, model)


def test_overflow_counts_rise_and_fall_in_one_commit(tmp_path: Path) -> None:
    """Data blocks whose counts pass 2 live in the overflow tree: a commit that raises some
    counts above 2 (new snapshots breaking shared leaves) and drops others below 3 (deleted
    snapshots) edits that tree both ways in one go; the counts thin_check recomputes agree."""
    meta = new_pool(tmp_path)
    model: dict[int, dict[int, int]] = {}
    with PoolMetadata(meta) as md:
        md.create_thin(0)
        base = {v: md.alloc_data_block() for v in range(700)}
        for v, b in base.items():
            md.insert(0, v, b)
        model[0] = dict(base)
        md.commit()
        next_id = 1
        for round_ in range(4):
            for dev in [d for d in model if d != 0][:5]:  # counts fall (some below 3)
                md.delete(dev)
                del model[dev]
            for _ in range(6):  # counts rise: each snapshot breaks the sharing of 3 leaves
                md.create_snap(next_id, 0)
                mapping = dict(base)
                for v in (round_ * 7 + 1, 250 + next_id, 600 - next_id):
                    mapping[v] = md.alloc_data_block()
                    md.insert(next_id, v, mapping[v])
                model[next_id] = mapping
                next_id += 1
            md.commit()
            assert max(md.data_block_count(b) for b in base.values()) >= 3
            assert_thin_check_clean(meta)  # the committed counts, overflow tree included
    verify(meta, model)


def test_held_metadata_snapshot(tmp_path: Path) -> None:
    meta = new_pool(tmp_path)
    with PoolMetadata(meta) as md:
        md.create_thin(1)
        for v in range(500):
            md.insert(1, v, md.alloc_data_block())
        md.commit()
        before = thin_dump(meta)
        held = md.reserve_metadata_snap()
        with pytest.raises(DeviceError, match="EBUSY"):
            md.reserve_metadata_snap()
        md.create_snap(2, 1)
        for v in range(0, 500, 7):
            md.insert(1, v, md.alloc_data_block())
        md.delete(2)
        md.create_thin(3)
        md.commit()
        verify(meta)
        assert_thin_check_clean(meta, "-m")
        snap_xml = thin_dump(meta, f"--metadata-snap={held}")
        assert snap_xml.replace('nr_data_blocks="0"', "") == before.replace(
            f'nr_data_blocks="{1 << 20}"', "")
        md.release_metadata_snap()
        with pytest.raises(DeviceError, match="EINVAL"):
            md.release_metadata_snap()
        md.commit()
    verify(meta)


def test_device_id_limits_and_errors(tmp_path: Path) -> None:
    meta = new_pool(tmp_path)
    with PoolMetadata(meta) as md:
        md.create_thin(MAX_DEVICE_ID)
        md.create_snap(0, MAX_DEVICE_ID)
        for bad in (-1, MAX_DEVICE_ID + 1, "3"):
            with pytest.raises(DeviceError, match="EINVAL"):
                md.create_thin(bad)  # type: ignore[arg-type]
        with pytest.raises(DeviceError, match="EEXIST"):
            md.create_thin(0)
        with pytest.raises(DeviceError, match="ENODATA"):
            md.create_snap(5, 6)
        with pytest.raises(DeviceError, match="ENODATA"):
            md.delete(6)
        with pytest.raises(DeviceError, match="EINVAL"):
            md.set_transaction_id(1, 2)
        md.set_transaction_id(0, 2)
        md.commit()
        assert md.device_ids() == [0, MAX_DEVICE_ID]
    verify(meta, {0: {}, MAX_DEVICE_ID: {}})


def test_abort_returns_to_last_commit(tmp_path: Path) -> None:
    meta = new_pool(tmp_path)
    with PoolMetadata(meta) as md:
        md.create_thin(0)
        md.insert(0, 0, md.alloc_data_block())
        md.commit()
        digest = hashlib.sha256(meta.read_bytes()).hexdigest()
        md.insert(0, 1, md.alloc_data_block())
        md.create_snap(1, 0)
        md.delete(0)
        md.abort()
        assert md.device_ids() == [0] and md.lookup(0, 1) is None
        assert hashlib.sha256(meta.read_bytes()).hexdigest() == digest
        md.insert(0, 2, md.alloc_data_block())
        md.commit()
    verify(meta)


def test_data_space_exhaustion_and_resize(tmp_path: Path) -> None:
    meta = new_pool(tmp_path, nr_data_blocks=100)
    with PoolMetadata(meta) as md:
        md.create_thin(0)
        for v in range(100):
            md.insert(0, v, md.alloc_data_block())
        with pytest.raises(NoDataSpaceError):
            md.alloc_data_block()
        md.commit()
        md.resize_data(40_000)  # crosses into a third bitmap
        for v in range(100, 200):
            md.insert(0, v, md.alloc_data_block())
        md.commit()
        assert md.nr_data_blocks == 40_000
    verify(meta)


class MetadataMachine(RuleBasedStateMachine):
    """Random create/snap/delete/map/remap/unmap/commit/abort against a model."""

    def __init__(self) -> None:
        super().__init__()
        import tempfile

        self.dir = Path(tempfile.mkdtemp(prefix="tp-hyp-"))
        self.meta = new_pool(self.dir, size=8 << 20, nr_data_blocks=5000)
        self.md = PoolMetadata(self.meta)
        self.model: dict[int, dict[int, int]] = {}
        self.committed: dict[int, dict[int, int]] = {}

    def teardown(self) -> None:
        self.md.close()
        import shutil

        shutil.rmtree(self.dir, ignore_errors=True)

    ids = st.integers(0, 7)
    vblocks = st.integers(0, 600)

    @rule(dev=ids)
    def create_thin(self, dev: int) -> None:
        if dev in self.model:
            with pytest.raises(DeviceError):
                self.md.create_thin(dev)
        else:
            self.md.create_thin(dev)
            self.model[dev] = {}

    @rule(dev=ids, origin=ids)
    def create_snap(self, dev: int, origin: int) -> None:
        if dev in self.model or origin not in self.model:
            with pytest.raises(DeviceError):
                self.md.create_snap(dev, origin)
        else:
            self.md.create_snap(dev, origin)
            self.model[dev] = dict(self.model[origin])

    @rule(dev=ids)
    def delete(self, dev: int) -> None:
        if dev not in self.model:
            with pytest.raises(DeviceError):
                self.md.delete(dev)
        else:
            self.md.delete(dev)
            del self.model[dev]

    @precondition(lambda self: self.model)
    @rule(data=st.data(), start=vblocks, count=st.integers(1, 300))
    def map_range(self, data: st.DataObject, start: int, count: int) -> None:
        dev = data.draw(st.sampled_from(sorted(self.model)))
        for v in range(start, start + count):
            try:
                b = self.md.alloc_data_block()
            except NoDataSpaceError:
                return
            self.md.insert(dev, v, b)
            self.model[dev][v] = b

    @precondition(lambda self: self.model)
    @rule(data=st.data(), start=vblocks, count=st.integers(1, 800), step=st.integers(1, 3))
    def map_batch(self, data: st.DataObject, start: int, count: int, step: int) -> None:
        """insert_many: one batch, possibly splitting a leaf several ways and growing the root."""
        dev = data.draw(st.sampled_from(sorted(self.model)))
        pairs = []
        try:
            for v in range(start, start + count * step, step):
                pairs.append((v, self.md.alloc_data_block()))
        except NoDataSpaceError:
            for _, b in pairs:
                self.md.data_sm.dec(b)
            return
        self.md.insert_many(dev, pairs)
        self.model[dev].update(pairs)

    @precondition(lambda self: self.model)
    @rule(data=st.data(), start=vblocks, count=st.integers(1, 300))
    def unmap_range(self, data: st.DataObject, start: int, count: int) -> None:
        dev = data.draw(st.sampled_from(sorted(self.model)))
        for v in range(start, start + count):
            assert self.md.remove(dev, v) == (v in self.model[dev])
            self.model[dev].pop(v, None)

    @rule()
    def commit(self) -> None:
        self.md.commit()
        self.committed = {d: dict(m) for d, m in self.model.items()}
        verify(self.meta, self.model)

    @rule()
    def abort(self) -> None:
        self.md.abort()
        self.model = {d: dict(m) for d, m in self.committed.items()}

    @invariant()
    def lookups_match(self) -> None:
        for dev, maps in self.model.items():
            for v in list(maps)[:5]:
                assert self.md.lookup(dev, v).data_block == maps[v]


MetadataMachine.TestCase.settings = settings(
    max_examples=25, stateful_step_count=25, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
test_metadata_state_machine = MetadataMachine.TestCase


def test_changes_under_a_held_snapshot_keep_counts(tmp_path: Path) -> None:
    """Regression: a device changed while only the top level is shared by a metadata snapshot."""
    meta = new_pool(tmp_path)
    with PoolMetadata(meta) as md:
        md.create_thin(1)
        for v in range(20):
            md.insert(1, v, md.alloc_data_block())
        md.commit()
        md.reserve_metadata_snap()
        md.commit()
        for v in range(3):
            md.remove(1, v)
        md.insert(1, 5, md.alloc_data_block())
        md.commit()
        verify(meta)
        assert_thin_check_clean(meta, "-m")
        md.release_metadata_snap()
        md.commit()
    verify(meta)
