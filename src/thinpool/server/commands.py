"""Pool commands that run the same with or without a pool server.

Every ``thinpool`` command that works on a pool directory is a function here
taking an open ``Pool``, JSON-able arguments, the file descriptors it reads
or writes, and a ``cancelled`` callback; it returns a JSON-able result that
the CLI formats.  Without a server the CLI opens the pool and calls the
function itself; with a server running, the CLI sends the same call over the
control socket (``control``) and the server calls the same function on its
pool.  So outputs and errors are the same either way.

File descriptors are the caller's own (the CLI's stdin, stdout, or a file it
opened without truncating it): the server reads and writes them directly, so
pipes, ``<(...)`` and relative paths work, and outputs are checked against
the pool's files before they are truncated (``outputs.claim_output``).

Errors are ``ThinpoolError``s (``DataPathError`` for data-path failures),
one line each.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import stat
from dataclasses import dataclass
from typing import Any, Callable

from ..errors import DataPathError, DeviceError, ThinpoolError
from ..outputs import claim_output, refuse_input
from ..pdata.blockio import device_size
from ..pool.engine import Pool
from ..pool.images import export_image, import_image

CHUNK = 1 << 20
LOOKAHEAD = 64 << 20  # bytes of a pipe read before writing, to check the range first

Args = dict[str, Any]
Cancelled = Callable[[], bool]


class CommandError(ThinpoolError):
    """A command's arguments do not fit the pool (a range, an unknown command)."""


class Interrupted(ThinpoolError):
    """The caller went away while the command ran."""


@dataclass(frozen=True)
class Command:
    fn: Callable[[Pool, Args, list[int], Cancelled], dict[str, Any]]
    writes: bool  # needs the pool read-write (else a read-only open will do)
    fds: int  # file descriptors it takes


def _never() -> bool:
    return False


def _check_cancelled(cancelled: Cancelled) -> None:
    if cancelled():
        raise Interrupted("interrupted: the caller went away")


# -- pool-level commands ----------------------------------------------------------------------
def message(pool: Pool, args: Args, fds: list[int], cancelled: Cancelled) -> dict[str, Any]:
    pool.message(args["text"])
    return {}


def status(pool: Pool, args: Args, fds: list[int], cancelled: Cancelled) -> dict[str, Any]:
    dev = args.get("thin")
    st = pool.status() if dev is None else pool.thin_status(dev)
    return {"line": st.line(), "status": dataclasses.asdict(st)}


def list_volumes(pool: Pool, args: Args, fds: list[int], cancelled: Cancelled) -> dict[str, Any]:
    vols = pool.list_volumes()
    out: dict[str, Any] = {"block_size": pool.block_size,
                           "volumes": [dataclasses.asdict(v) for v in vols]}
    if args.get("tree"):
        out["tree"] = family_tree(pool)
    return out


def family_tree(pool: Pool) -> list[dict[str, Any]]:
    """Volumes nested under the volume each was snapshotted from (roots by id).

    Mapped, exclusive and shared space are counted from the committed
    mappings as thin_ls counts them.  A snapshot whose parent was deleted, or
    was made before thinpool recorded parents, is a root.
    """
    from ..tools.ls import list_devices

    if pool.read_only:
        usage = {u.dev_id: u for u in list_devices(pool.meta_path)}
    else:
        with pool.dp.quiesced():  # no commit rewrites blocks while they are read
            pool.dp.commit_gated()
            usage = {u.dev_id: u for u in list_devices(pool.meta_path)}
    vols = pool.list_volumes()
    bs = pool.block_size
    ids = {v.dev_id for v in vols}
    nodes: dict[int, dict[str, Any]] = {}
    for v in vols:
        u = usage[v.dev_id]
        nodes[v.dev_id] = {
            "id": v.dev_id, "name": v.name, "size": v.size, "snapshot_of": v.snapshot_of,
            "mapped_bytes": u.mapped_blocks * bs, "exclusive_bytes": u.exclusive_blocks * bs,
            "shared_bytes": u.shared_blocks * bs, "snapshots": []}
    roots = []
    for v in vols:
        if v.snapshot_of is not None and v.snapshot_of in ids:
            nodes[v.snapshot_of]["snapshots"].append(nodes[v.dev_id])
        else:
            roots.append(nodes[v.dev_id])
    return roots


def layer_usage(pool: Pool, args: Args, fds: list[int], cancelled: Cancelled) -> dict[str, Any]:
    """Blocks each ``[dev, parent]`` of ``args["layers"]`` maps that its parent (or null)
    does not map to the same data block, counted on a fresh commit."""
    from ..tools.delta import own_blocks

    pairs = [(int(dev), None if parent is None else int(parent))
             for dev, parent in args["layers"]]
    with pool.dp.quiesced():  # nothing commits while the committed trees are read
        pool.dp.commit_gated()
        counts = own_blocks(pool.meta_path, pairs)
    return {"block_size": pool.block_size, "blocks": counts}


def create_thin(pool: Pool, args: Args, fds: list[int], cancelled: Cancelled) -> dict[str, Any]:
    pool.create_thin(args["id"], size=args.get("size"), name=args.get("name"),
                     origin=args.get("origin"))
    return {}


def _transaction(args: Args) -> tuple[int, int] | None:
    """The optional ``transaction: [old, new]`` swap of a device change."""
    t = args.get("transaction")
    if t is None:
        return None
    if not (isinstance(t, list) and len(t) == 2 and all(type(x) is int and x >= 0 for x in t)):
        raise CommandError(f"transaction must be [old, new] transaction ids, not {t!r}")
    return t[0], t[1]


def _require_free(pool: Pool, args: Args) -> None:
    """``min_free_percent``: refuse (ENOSPC) unless that share of the pool's data and of its
    metadata blocks is free (Docker's and containerd's ``dm.min_free_space``)."""
    pct = args.get("min_free_percent")
    if pct is None:
        return
    if type(pct) is not int or not 0 <= pct <= 99:
        raise CommandError(f"min_free_percent must be an integer 0..99, not {pct!r}")
    st = pool.status()
    for what, used, total in (("data", st.used_data, st.total_data),
                              ("metadata", st.used_metadata, st.total_metadata)):
        free, need = total - used, total * pct // 100
        if free < need:
            raise DeviceError("ENOSPC", f"the pool has {free} free {what} blocks which is less "
                                        f"than minimum required {need} free {what} blocks "
                                        f"({pct}%)")


def create_snap(pool: Pool, args: Args, fds: list[int], cancelled: Cancelled) -> dict[str, Any]:
    """Snapshot a volume; ``min_free_percent`` refuses it on a pool short of space first."""
    _require_free(pool, args)
    pool.create_snap(args["id"], args["origin_id"], name=args.get("name"),
                     transaction=_transaction(args))
    return {}


def delete(pool: Pool, args: Args, fds: list[int], cancelled: Cancelled) -> dict[str, Any]:
    """Delete a volume; ``discard: true`` also discards the data blocks only it held."""
    discard = args.get("discard", False)
    if not isinstance(discard, bool):
        raise CommandError(f"discard must be true or false, not {discard!r}")
    pool.delete(args["id"], transaction=_transaction(args), discard=discard)
    return {}


def resize_volume(pool: Pool, args: Args, fds: list[int], cancelled: Cancelled
                  ) -> dict[str, Any]:
    pool.resize_volume(args["id"], args["size"])
    return {}


def resize(pool: Pool, args: Args, fds: list[int], cancelled: Cancelled) -> dict[str, Any]:
    pool.resize(data_size=args.get("data_size"), metadata_size=args.get("metadata_size"))
    return {"line": pool.status().line()}


# -- volume I/O -------------------------------------------------------------------------------
def read(pool: Pool, args: Args, fds: list[int], cancelled: Cancelled) -> dict[str, Any]:
    """Bytes of a volume into ``fds[0]``; the range is checked before anything is written."""
    out_fd = fds[0]
    offset, length = args.get("offset", 0), args.get("length")
    with pool.volume(args["id"]) as vol:
        end = vol.size if length is None else offset + length
        if offset > vol.size or end > vol.size:
            raise CommandError(f"range {offset}+{end - offset} is beyond the end of volume "
                               f"{vol.dev_id} ({vol.size} bytes)")
        if args.get("output"):
            claim_output(out_fd, args["output"], pool.files())
        pos = offset
        while pos < end:
            _check_cancelled(cancelled)
            data = memoryview(vol.read(pos, min(CHUNK, end - pos)))
            pos += len(data)
            try:
                while data:
                    data = data[os.write(out_fd, data):]
            except BrokenPipeError:
                raise
            except OSError as e:
                raise CommandError(f"cannot write to {args.get('output') or 'the output'}: "
                                   f"{e.strerror}") from None
    return {}


def _read_ahead(fd: int, limit: int) -> tuple[bytes, bool]:
    """Up to ``limit`` bytes of a stream, and whether its end was reached."""
    parts: list[bytes] = []
    got = 0
    while got < limit:
        b = os.read(fd, min(CHUNK, limit - got))
        if not b:
            return b"".join(parts), True
        parts.append(b)
        got += len(b)
    return b"".join(parts), False


def write(pool: Pool, args: Args, fds: list[int], cancelled: Cancelled) -> dict[str, Any]:
    """Write what ``fds[0]`` holds into a volume at ``offset``.

    The range is checked before anything is written when the input's length
    is known: a file, a device, or a pipe that ends within 64 MiB (read
    ahead).  A longer pipe that outgrows the volume stops with an error that
    says which bytes were written.
    """
    in_fd, offset, name = fds[0], args.get("offset", 0), args.get("source", "the input")
    refuse_input(in_fd, name, pool.files())
    with pool.volume(args["id"]) as vol:
        room = max(vol.size - offset, 0)
        st = os.fstat(in_fd)
        head, ended = b"", False
        length: int | None
        if stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode):
            length = device_size(in_fd) - os.lseek(in_fd, 0, os.SEEK_CUR)
        else:
            head, ended = _read_ahead(in_fd, min(room + 1, LOOKAHEAD))
            length = len(head) if ended else None
        if offset > vol.size or len(head) > room or \
                (length is not None and offset + length > vol.size):
            what = f"{length} bytes" if length is not None else "the input"
            raise CommandError(f"{what} at offset {offset} would go beyond the end of volume "
                               f"{vol.dev_id} ({vol.size} bytes); nothing was written")
        pos = offset
        if head:
            vol.write(pos, head)
            pos += len(head)
        while not ended:
            _check_cancelled(cancelled)
            chunk = os.read(in_fd, CHUNK)
            if not chunk:
                break
            if pos + len(chunk) > vol.size:
                vol.flush()
                raise CommandError(f"the input continues beyond the end of volume "
                                   f"{vol.dev_id} ({vol.size} bytes): bytes {offset}..{pos} "
                                   "were written, the rest was not")
            vol.write(pos, chunk)
            pos += len(chunk)
        vol.flush()
        return {"written": pos - offset}


def discard(pool: Pool, args: Args, fds: list[int], cancelled: Cancelled) -> dict[str, Any]:
    """Unmap the whole blocks of a range; durable on return unless ``sync`` is false (then
    the next commit carries it: for a caller whose next step commits anyway, such as
    Docker's discard before a delete)."""
    sync = args.get("sync", True)
    if not isinstance(sync, bool):
        raise CommandError(f"sync must be true or false, not {sync!r}")
    with pool.volume(args["id"]) as vol:
        vol.trim(args["offset"], args["length"])
        if sync:
            vol.flush()
    return {}


def export(pool: Pool, args: Args, fds: list[int], cancelled: Cancelled) -> dict[str, Any]:
    return {"copied": export_image(pool, args["id"], fds[0], args["path"])}


def import_(pool: Pool, args: Args, fds: list[int], cancelled: Cancelled) -> dict[str, Any]:
    return {"written": import_image(pool, args["id"], fds[0], args["path"])}


COMMANDS: dict[str, Command] = {
    "message": Command(message, True, 0),
    "status": Command(status, False, 0),
    "list": Command(list_volumes, False, 0),
    "layer-usage": Command(layer_usage, False, 0),
    "create-thin": Command(create_thin, True, 0),
    "create-snap": Command(create_snap, True, 0),
    "delete": Command(delete, True, 0),
    "resize": Command(resize, True, 0),
    "resize-volume": Command(resize_volume, True, 0),
    "read": Command(read, False, 1),
    "write": Command(write, True, 1),
    "discard": Command(discard, True, 0),
    "export-image": Command(export, False, 1),
    "import-image": Command(import_, True, 1),
}


def run(pool: Pool, command: str, args: Args, fds: list[int],
        cancelled: Cancelled = _never) -> dict[str, Any]:
    """Run one command on an open pool."""
    cmd = COMMANDS.get(command)
    if cmd is None:
        raise CommandError(f"unknown command {command!r}")
    if len(fds) != cmd.fds:
        raise CommandError(f"{command} takes {cmd.fds} file descriptor(s), got {len(fds)}")
    if cmd.writes and pool.read_only:
        raise CommandError(f"{command} needs the pool read-write, and it is open read-only")
    try:
        return cmd.fn(pool, args, fds, cancelled)
    except KeyError as e:
        raise CommandError(f"{command}: missing argument {e}") from None
    except BrokenPipeError:
        raise DataPathError(errno.EPIPE, "the reader of the output went away") from None
