"""thin_repair: salvage what can still be read from damaged metadata into fresh metadata.

``repair(input, output)`` is a walk of the input with the damage-tolerant
walks of ``thin.reader`` feeding IR events into a ``MetadataBuilder`` on the
output, so the result is written exactly as ``restore`` writes it (fresh
trees, every device with its own tree, exact space maps) and is accepted by
``thin_check``.  What could not be salvaged is returned in a ``RepairReport``.

Where the device trees come from:

* the roots the live superblock names, when both the details tree and the
  top-level mapping tree read without damage (below that, a damaged device
  subtree only costs the mappings under the unreadable nodes);
* otherwise a ``RootScan`` of every metadata block proposes candidate trees
  (older copy-on-write versions, the metadata snapshot's) and the newest
  pair of a details tree and a top-level tree listing the same devices is
  used; a live tree that did read cleanly is always kept;
* with no such pair, whatever the live trees still give (with an unreadable
  superblock: the newest readable tree of each kind).

Per device: a device with a mapping tree but no details is kept, with
details that cannot cause harm (transaction 0, creation time 0, snapshot
time = the superblock's time, so every older mapping is treated as shared and
copied before it is overwritten).  A device with details but no mapping tree
gets the device tree nothing references (found by the scan) if exactly one
such tree holds the number of mappings its details record and no other such
device records that number; it is kept empty if it recorded no mappings;
otherwise it is dropped, as thin_repair drops it.  ``mapped_blocks`` is
recounted; mappings to data blocks beyond the data device are dropped.

The superblock's time and transaction id are kept (``transaction_id``,
``data_block_size`` and ``nr_data_blocks`` override them, as with
thin_repair; they are required when the superblock is unreadable, and the
time is then the newest time stamp found, one more if a device's details
had to be recreated).  The needs_check flag is cleared and no metadata
snapshot is carried over.

No data loss: the input is opened read-only; an output that is the input
itself (same inode, or same block device) is refused; the superblock, the
roots and the device list are settled before the output is opened, so a
refused repair never touches the output, and one that fails while writing
leaves it without a valid superblock (``MetadataBuilder`` zeroes block 0
first and writes the superblock last).  The output must be an existing file
(at least 32 KiB) or block device, as with thin_restore and thin_repair.
"""

from __future__ import annotations

import os
import stat
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterator, TypeVar

import numpy as np

from ..errors import MetadataError, ThinpoolError
from ..ondisk.superblock import VERSION, Superblock
from ..ondisk.values import DeviceDetails
from ..outputs import same_file
from ..thin.builder import MetadataBuilder, validate_data_block_size
from ..thin.ir import DeviceInfo, MappingChunk, SuperblockInfo
from ..thin.reader import SalvageLog, TreeReader, read_superblock
from ..thin.scan import Kind, RootScan
from ..thin.xml import CHUNK_SIZE

MIN_OUTPUT_SIZE = 32 * 1024  # thin_restore's minimum for a regular file
MAX_LISTED = 3  # problems listed per device in the summary
_READ_ERRORS = (ThinpoolError, OSError)
V = TypeVar("V")
_Tree = tuple[int, dict[int, V]]  # a tree's root and its entries


@dataclass
class DeviceOutcome:
    """What became of one device."""

    dev_id: int
    expected: int | None = None  # mapped_blocks its details recorded (None: no details)
    salvaged: int = 0  # mappings written
    beyond_data: int = 0  # mappings to data blocks >= nr_data_blocks, dropped
    unreachable: int = 0  # readable mappings no lookup reaches (key order), dropped
    problems: list[str] = field(default_factory=list)  # unreadable nodes below its root
    note: str | None = None  # details recreated, root matched or lost (why dropped)
    dropped: bool = False

    @property
    def damaged(self) -> bool:
        return bool(self.dropped or self.note or self.problems or self.beyond_data
                    or self.unreachable or (self.expected is not None
                                            and self.expected != self.salvaged))

    def line(self) -> str:
        """One line saying what was lost."""
        if self.dropped:
            return f"device {self.dev_id}: dropped, {self.note}"
        parts = []
        if self.expected is not None and self.expected != self.salvaged:
            if self.expected > self.salvaged:
                parts.append(f"{self.expected - self.salvaged} of {self.expected} mappings lost")
            else:
                parts.append(f"{self.salvaged} mappings found where the details recorded "
                             f"{self.expected}")
        else:
            parts.append(f"{self.salvaged} mappings salvaged")
        if self.beyond_data:
            parts.append(f"{self.beyond_data} beyond the end of the data device dropped")
        if self.unreachable:
            parts.append(f"{self.unreachable} out of key order dropped")
        if self.note:
            parts.append(self.note)
        if self.problems:
            shown = "; ".join(self.problems[:MAX_LISTED])
            more = len(self.problems) - MAX_LISTED
            parts.append(f"unreadable: {shown}" + (f" (and {more} more)" if more > 0 else ""))
        return f"device {self.dev_id}: " + ", ".join(parts)


@dataclass
class RepairReport:
    """Outcome of ``repair``: what was written and what was lost."""

    input_path: str
    output_path: str
    time: int = 0
    transaction_id: int = 0
    data_block_size: int = 0
    nr_data_blocks: int = 0
    source: str = ""  # where the device trees came from
    notes: list[str] = field(default_factory=list)  # problems outside the devices
    devices: list[DeviceOutcome] = field(default_factory=list)

    @property
    def nr_mappings(self) -> int:
        return sum(d.salvaged for d in self.devices)

    @property
    def lossless(self) -> bool:
        return not self.notes and not any(d.damaged for d in self.devices)

    def summary(self) -> list[str]:
        """A few lines for the user: totals, then every loss."""
        kept = [d for d in self.devices if not d.dropped]
        lines = [f"repaired {self.input_path} -> {self.output_path}: {len(kept)} devices, "
                 f"{self.nr_mappings} mappings (device trees {self.source})"]
        lines += self.notes
        lines += [d.line() for d in self.devices if d.damaged]
        if self.lossless:
            lines.append("nothing was lost")
        return lines


@dataclass
class _Trees:
    """The device trees chosen for the output."""

    source: str
    details: dict[int, DeviceDetails]
    roots: dict[int, int]  # device -> mapping subtree root
    age: int = 0  # newest time stamp found in them (scan only)
    adopted: dict[int, int] = field(default_factory=dict)  # device -> orphan root matched


def repair(input_path: str | os.PathLike[str], output_path: str | os.PathLike[str],
           transaction_id: int | None = None, data_block_size: int | None = None,
           nr_data_blocks: int | None = None) -> RepairReport:
    """Salvage ``input_path`` into ``output_path`` (an existing file or block device)."""
    report = RepairReport(os.fspath(input_path), os.fspath(output_path))
    _check_paths(report.input_path, report.output_path)
    with TreeReader(input_path) as reader:
        info, trees = _plan(reader, report, transaction_id, data_block_size, nr_data_blocks)
        builder = MetadataBuilder(output_path)
        try:
            builder.begin_superblock(info)
            _write_devices(reader, builder, info, trees, report)
            builder.end_superblock()
        finally:
            builder.close()
    return report


# -- inputs and outputs ------------------------------------------------------------------------

def _check_paths(input_path: str, output_path: str) -> None:
    """The input must be readable metadata, the output an existing, different file or device."""
    try:
        ist = os.stat(input_path)
    except OSError as e:
        raise MetadataError(f"cannot open metadata {input_path}: {e.strerror}") from None
    if not (stat.S_ISREG(ist.st_mode) or stat.S_ISBLK(ist.st_mode)):
        raise MetadataError(f"{input_path} is not a metadata file or block device")
    try:
        ost = os.stat(output_path)
    except OSError as e:
        raise MetadataError(f"output {output_path}: {e.strerror}; it must be an existing file "
                            f"or block device large enough for the metadata") from None
    if stat.S_ISREG(ost.st_mode):
        if ost.st_size < MIN_OUTPUT_SIZE:
            raise MetadataError(f"output {output_path} is too small ({ost.st_size} bytes; "
                                f"at least {MIN_OUTPUT_SIZE})")
    elif not stat.S_ISBLK(ost.st_mode):
        raise MetadataError(f"output {output_path} is not a regular file or block device")
    if same_file(ist, ost):
        raise MetadataError(f"output {output_path} is the input metadata itself; repair writes "
                            f"a new copy and never changes its input")


# -- planning: superblock, trees, devices ---------------------------------------------------------

def _plan(reader: TreeReader, report: RepairReport, transaction_id: int | None,
          data_block_size: int | None, nr_data_blocks: int | None
          ) -> tuple[SuperblockInfo, _Trees]:
    """Superblock values and device trees for the output; raises if nothing is salvageable."""
    try:
        live: Superblock | None = read_superblock(reader.bm, 0)
    except _READ_ERRORS as e:
        live, sb_problem = None, str(e)
    if live is None:
        missing = [opt for opt, value in (("--transaction-id", transaction_id),
                                          ("--data-block-size", data_block_size),
                                          ("--nr-data-blocks", nr_data_blocks)) if value is None]
        if missing:
            raise MetadataError(f"superblock unreadable ({sb_problem}): give "
                                f"{', '.join(missing)} to repair without it")
        report.notes.append(f"superblock unreadable: {sb_problem}")
    if live is not None and live.held_root:
        report.notes.append(f"the metadata snapshot (block {live.held_root}) is not carried over")
    trees = _choose_trees(reader, live, report)
    if live is None and not trees.roots:
        raise MetadataError("nothing can be salvaged: the superblock is unreadable and no "
                            "device mapping tree was found")
    if live is not None:
        time, version = live.time, live.version
    else:  # a device recreated below must see every mapping found as older than its snap_time
        time, version = trees.age + (1 if trees.roots.keys() - trees.details.keys() else 0), VERSION
    info = SuperblockInfo(
        uuid="", time=time, flags=0, version=version,
        transaction=transaction_id if transaction_id is not None else _known(live).trans_id,
        data_block_size=(data_block_size if data_block_size is not None
                         else _known(live).data_block_size),
        nr_data_blocks=(nr_data_blocks if nr_data_blocks is not None
                        else _known(live).data_sm.nr_blocks))
    try:
        validate_data_block_size(info.data_block_size)
    except ThinpoolError as e:
        if data_block_size is not None:
            raise
        raise MetadataError(f"superblock: {e} (give --data-block-size)") from None
    report.time, report.transaction_id = info.time, info.transaction
    report.data_block_size, report.nr_data_blocks = info.data_block_size, info.nr_data_blocks
    report.source = trees.source
    return info, trees


def _known(sb: Superblock | None) -> Superblock:
    assert sb is not None, "overrides are required without a superblock"
    return sb


def _choose_trees(reader: TreeReader, live: Superblock | None, report: RepairReport) -> _Trees:
    """The live trees when they read cleanly, else the best a scan finds (module docstring)."""
    live_d: list[_Tree[DeviceDetails]] = []
    live_t: list[_Tree[int]] = []
    fallback = None
    if live is not None:
        d_log, t_log = SalvageLog(), SalvageLog()
        details = reader.salvage_details(live.device_details_root, d_log)
        roots = reader.salvage_mapping_roots(live.data_mapping_root, t_log)
        if d_log.complete and t_log.complete:
            return _Trees("from the superblock", details, roots)
        fallback = _Trees("from the superblock, damaged", details, roots)
        for name, log in (("device details tree", d_log), ("top-level mapping tree", t_log)):
            if not log.complete:
                report.notes.append(f"{name} damaged: {_log_text(log)}")
        if d_log.complete:
            live_d.append((live.device_details_root, details))
        if t_log.complete:
            live_t.append((live.data_mapping_root, roots))
    scan = RootScan(reader)
    d_cands = live_d or _complete(scan.details_roots, reader.salvage_details)
    t_cands = live_t or _complete(scan.top_roots, reader.salvage_mapping_roots)

    def age(*trees: _Tree[DeviceDetails] | _Tree[int] | None) -> int:
        return max((int(scan.age[t[0]]) for t in trees if t is not None), default=0)

    def rank(pair: tuple[_Tree[DeviceDetails], _Tree[int]]) -> tuple[float, ...]:
        """Newest time stamp first; then the share of the readable device subtrees whose
        mapping count the details record (trees of one transaction agree); then the
        newest device (each new device gets the pool's transaction id); then the fewest
        devices (what is left to tell two states apart is a deletion)."""
        (d, details), (t, roots) = pair
        counted = [int(scan.count[sub]) == details[dev].mapped_blocks
                   for dev, sub in roots.items()
                   if sub < scan.nr_blocks and scan.kind[sub] in (Kind.BOTTOM, Kind.EMPTY)]
        agree = sum(counted) / len(counted) if counted else 1.0
        newest = max((v.transaction_id for v in details.values()), default=0)
        return age(*pair), agree, newest, -len(details), d, t

    pairs = [(d, t) for d in d_cands for t in t_cands if d[1].keys() == t[1].keys()]
    if pairs:
        d, t = max(pairs, key=rank)
        return _Trees(_source(d[0], t[0], live), d[1], t[1], age(d, t))
    if fallback is None:
        best_d = max(d_cands, key=lambda c: (age(c), c[0]), default=None)
        best_t = max(t_cands, key=lambda c: (age(c), c[0]), default=None)
        fallback = _Trees(_source(best_d[0] if best_d else None, best_t[0] if best_t else None,
                                  live),
                          best_d[1] if best_d else {}, best_t[1] if best_t else {},
                          age(best_d, best_t))
    _adopt_orphans(scan, fallback)
    return fallback


def _adopt_orphans(scan: RootScan, trees: _Trees) -> None:
    """Give devices whose mapping root is lost the device tree nothing references, when
    exactly one such tree holds the number of mappings its details record and no other
    device records that number."""
    missing = {dev: d.mapped_blocks for dev, d in trees.details.items()
               if dev not in trees.roots and d.mapped_blocks}
    used = set(trees.roots.values())
    orphans: dict[int, list[int]] = {}
    for b in scan.bottom_roots:
        if b not in used:
            orphans.setdefault(int(scan.count[b]), []).append(b)
    wanted = Counter(missing.values())
    for dev, n in missing.items():
        if wanted[n] == 1 and len(orphans.get(n, ())) == 1:
            trees.roots[dev] = trees.adopted[dev] = orphans[n][0]


def _source(details_root: int | None, mapping_root: int | None, live: Superblock | None) -> str:
    """Where the chosen trees come from, for the report."""
    if live is not None and (details_root, mapping_root) == (live.device_details_root,
                                                             live.data_mapping_root):
        return "from the superblock"
    parts = []
    for name, root, live_root in (
            ("details root", details_root, live.device_details_root if live else None),
            ("mapping root", mapping_root, live.data_mapping_root if live else None)):
        if root is None:
            parts.append(f"no {name} found")
        else:
            parts.append(f"{name} {root}" + (" (the superblock's)" if root == live_root
                                             else " (found by scanning)"))
    return ", ".join(parts)


def _complete(candidates: list[int], walk: Callable[[int, SalvageLog], dict[int, V]]
              ) -> list[_Tree[V]]:
    """(root, entries) of the candidate trees that read without any damage."""
    out = []
    for root in candidates:
        log = SalvageLog()
        entries = walk(root, log)
        if log.complete:
            out.append((root, entries))
    return out


def _log_text(log: SalvageLog) -> str:
    parts = [problem for _b, problem in log.bad_nodes[:MAX_LISTED]]
    if len(log.bad_nodes) > MAX_LISTED:
        parts.append(f"and {len(log.bad_nodes) - MAX_LISTED} more unreadable nodes")
    if log.dropped:
        parts.append(f"{log.dropped} entries out of key order")
    return "; ".join(parts)


# -- writing ---------------------------------------------------------------------------------------

def _write_devices(reader: TreeReader, builder: MetadataBuilder, info: SuperblockInfo,
                   trees: _Trees, report: RepairReport) -> None:
    limit = np.uint64(info.nr_data_blocks)
    for dev in sorted(trees.details.keys() | trees.roots.keys()):
        known = trees.details.get(dev)
        root = trees.roots.get(dev)
        out = DeviceOutcome(dev, expected=known.mapped_blocks if known else None)
        report.devices.append(out)
        if known is None:
            known = DeviceDetails(0, 0, 0, info.time)
            out.note = (f"details lost, recreated with transaction 0, creation_time 0 and "
                        f"snap_time {info.time}")
        elif root is None and known.mapped_blocks:
            out.dropped = True
            out.note = f"its mapping tree root is lost ({known.mapped_blocks} mappings)"
            continue
        elif root is None:
            out.note = "mapping tree root lost; it recorded no mappings, so it is kept empty"
        elif dev in trees.adopted:
            out.note = (f"mapping tree root lost; using the unreferenced device tree at block "
                        f"{root}, the only one holding the {known.mapped_blocks} mappings its "
                        f"details record")
        builder.begin_device(DeviceInfo(dev, 0, known.transaction_id, known.creation_time,
                                        known.snapshotted_time))
        if root is not None:
            log = SalvageLog()
            for chunk in _chunks(reader.salvage_mappings(root, log)):
                inside = chunk.data_blocks < limit
                if not inside.all():
                    out.beyond_data += int(np.count_nonzero(~inside))
                    chunk = MappingChunk(chunk.vblocks[inside], chunk.data_blocks[inside],
                                         chunk.times[inside])
                builder.mappings(chunk)
                out.salvaged += len(chunk)
            out.unreachable = log.dropped
            out.problems = [problem for _b, problem in log.bad_nodes]
        builder.end_device()


def _chunks(leaves: Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> Iterator[MappingChunk]:
    """Leaves batched into chunks of about CHUNK_SIZE mappings (numpy per-call overhead)."""
    parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    size = 0
    for leaf in leaves:
        parts.append(leaf)
        size += leaf[0].size
        if size >= CHUNK_SIZE:
            yield MappingChunk(*(np.concatenate(col) for col in zip(*parts)))
            parts, size = [], 0
    if parts:
        yield MappingChunk(*(np.concatenate(col) for col in zip(*parts)))
