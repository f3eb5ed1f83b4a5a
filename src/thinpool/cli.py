"""Command-line interface: the only module that reads argv or prints.

Exit status: 0 success, 1 an operation failed (one line on stderr, never a
traceback), 2 a usage error (bad option or argument), 130 interrupted
(Ctrl-C), 141 the reader of our output went away (``| head``), quietly.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import sys
from typing import Any, Callable

import click

from .errors import ThinpoolError

EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 128 + signal.SIGINT
EXIT_BROKEN_PIPE = 128 + signal.SIGPIPE


def _clean_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ThinpoolError as e:
            raise click.ClickException(str(e)) from None
        except BrokenPipeError:
            raise _OutputClosed() from None
        except OSError as e:
            where = f" ({e.filename})" if e.filename else ""
            raise click.ClickException(f"{e.strerror or e}{where}") from None
        except (MemoryError, OverflowError) as e:
            raise click.ClickException("out of memory" if isinstance(e, MemoryError)
                                       else f"number too large: {e}") from None
    return wrapper


class _OutputClosed(Exception):
    """Whoever reads our standard output went away (EPIPE)."""


class SizeType(click.ParamType):
    """Bytes: 4096, 64K, 1M, 100G (binary units), ASCII digits only."""

    name = "size"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        from .pool.config import parse_size

        if isinstance(value, int):
            return value
        try:
            return parse_size(value)
        except ThinpoolError as e:
            self.fail(str(e), param, ctx)


class DevIdType(click.ParamType):
    """A thin device id: decimal, 0..2^24-1."""

    name = "id"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        from .ondisk.values import MAX_DEVICE_ID

        if isinstance(value, int):
            return value
        if not (value.isascii() and value.isdigit()) or int(value) > MAX_DEVICE_ID:
            self.fail(f"invalid device id {value!r} (a decimal number 0..{MAX_DEVICE_ID})",
                      param, ctx)
        return int(value)


SIZE = SizeType()
DEV_ID = DevIdType()


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="thinpool")
def cli() -> None:
    """thinpool: userspace thin provisioning, compatible with Linux dm-thin."""


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the command and turn every outcome into an exit status."""
    logging.basicConfig(format="thinpool: %(levelname)s: %(message)s", level=logging.WARNING)
    try:
        cli.main(args=argv, prog_name="thinpool", standalone_mode=False)
    except click.exceptions.Exit as e:
        code = e.exit_code
    except click.UsageError as e:
        e.show()
        code = EXIT_USAGE
    except click.ClickException as e:
        e.show()
        code = EXIT_FAILURE
    except (KeyboardInterrupt, click.Abort):
        click.echo("thinpool: interrupted", err=True)
        code = EXIT_INTERRUPTED
    except (_OutputClosed, BrokenPipeError):
        code = EXIT_BROKEN_PIPE
    else:
        code = 0
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        code = EXIT_BROKEN_PIPE
    if code == EXIT_BROKEN_PIPE:
        # Nobody reads our output any more: end quietly, and keep Python from
        # complaining when it flushes stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    sys.exit(code)


@cli.command()
@click.argument("metadata", type=click.Path(dir_okay=False))
@click.option("-m", "--metadata-snap", "snapshot", is_flag=True,
              help="Check the held metadata snapshot instead of the live metadata.")
@click.option("-q", "--quiet", is_flag=True, help="Print nothing; only the exit code tells.")
@_clean_errors
def check(metadata: str, snapshot: bool, quiet: bool) -> None:
    """Verify metadata like thin_check (exit 0 when clean)."""
    from .tools.check import check as run_check

    report = run_check(metadata, snapshot=snapshot)
    if not quiet:
        for line in report.errors:
            click.echo(f"error: {line}", err=True)
        for line in report.leaks:
            click.echo(f"leak: {line}", err=True)
        if report.clean:
            click.echo(f"{metadata}: clean", err=True)
    sys.exit(0 if report.clean else 1)


@cli.command()
@click.argument("metadata", type=click.Path(dir_okay=False))
@click.option("-m", "--metadata-snap", "snapshot", is_flag=True,
              help="Dump the held metadata snapshot.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Write XML to FILE.")
@click.option("--dev-id", type=DEV_ID, help="Dump only this device.")
@_clean_errors
def dump(metadata: str, snapshot: bool, output: str | None, dev_id: int | None) -> None:
    """Print metadata as thin_dump XML."""
    from .tools.dump import dump as run_dump

    from .outputs import open_output

    if output is None:
        run_dump(metadata, sys.stdout, snapshot=snapshot, dev_id=dev_id)
        sys.stdout.flush()
    else:
        with open(open_output(output, [metadata]), "w", encoding="ascii") as out:
            run_dump(metadata, out, snapshot=snapshot, dev_id=dev_id)


@cli.command()
@click.option("-i", "--input", "xml", required=True, type=click.Path(dir_okay=False),
              help="thin_dump XML to restore.")
@click.option("-o", "--output", "metadata", required=True, type=click.Path(dir_okay=False),
              help="Existing metadata file or device to overwrite.")
@_clean_errors
def restore(xml: str, metadata: str) -> None:
    """Write fresh metadata from thin_dump XML (like thin_restore).

    The XML is read and validated in full before the output is touched.
    """
    from .tools.restore import restore as run_restore

    run_restore(xml, metadata)


@cli.command()
@click.option("-i", "--input", "input_path", required=True, type=click.Path(),
              help="Damaged metadata file or device (never modified).")
@click.option("-o", "--output", "output_path", required=True, type=click.Path(),
              help="Existing file or device to write the salvaged metadata to.")
@click.option("--transaction-id", type=click.IntRange(min=0),
              help="Transaction id to write (required if the superblock is unreadable).")
@click.option("--data-block-size", type=click.IntRange(min=1),
              help="Data block size in sectors (required if the superblock is unreadable).")
@click.option("--nr-data-blocks", type=click.IntRange(min=0),
              help="Data device size in blocks (required if the superblock is unreadable).")
@_clean_errors
def repair(input_path: str, output_path: str, transaction_id: int | None,
           data_block_size: int | None, nr_data_blocks: int | None) -> None:
    """Salvage damaged metadata into fresh metadata (like thin_repair)."""
    from .tools.repair import repair as run_repair

    report = run_repair(input_path, output_path, transaction_id=transaction_id,
                        data_block_size=data_block_size, nr_data_blocks=nr_data_blocks)
    for line in report.summary():
        click.echo(line, err=True)


@cli.command("ls")
@click.argument("metadata", type=click.Path(dir_okay=False))
@click.option("-m", "--metadata-snap", "snapshot", is_flag=True)
@click.option("--no-headers", is_flag=True)
@click.option("-o", "--format", "fields", help="Comma-separated fields (thin_ls names).")
@_clean_errors
def ls_cmd(metadata: str, snapshot: bool, no_headers: bool, fields: str | None) -> None:
    """List devices with mapped, exclusive and shared blocks (like thin_ls)."""
    from .tools.ls import DEFAULT_FIELDS, format_ls, list_devices, parse_fields

    chosen = parse_fields(fields) if fields is not None else list(DEFAULT_FIELDS)
    rows = list_devices(metadata, snapshot=snapshot)
    click.echo(format_ls(rows, chosen, headers=not no_headers), nl=False)


@cli.command()
@click.argument("metadata", type=click.Path(dir_okay=False))
@click.option("--snap1", "--thin1", "snap1", required=True, type=DEV_ID)
@click.option("--snap2", "--thin2", "snap2", required=True, type=DEV_ID)
@click.option("-m", "--metadata-snap", "snapshot", is_flag=True)
@click.option("--verbose", is_flag=True, help="Show data blocks of every range.")
@_clean_errors
def delta(metadata: str, snap1: int, snap2: int, snapshot: bool, verbose: bool) -> None:
    """Show how two devices' mappings differ (like thin_delta)."""
    from .tools.delta import write_delta

    write_delta(metadata, snap1, snap2, sys.stdout, snapshot=snapshot, verbose=verbose)
    sys.stdout.flush()


# -- pack / unpack ------------------------------------------------------------------------------
@cli.command("pack")
@click.option("-i", "--input", "metadata", required=True, type=click.Path(dir_okay=False),
              help="Metadata file or device to pack.")
@click.option("-o", "--output", "packed", required=True, type=click.Path(dir_okay=False),
              help="Pack file to write.")
@click.option("-f", "--force", is_flag=True, help="Overwrite an output that holds thin metadata.")
@_clean_errors
def pack_cmd(metadata: str, packed: str, force: bool) -> None:
    """Compress metadata into a pack file (like thin_metadata_pack)."""
    from .tools.pack import pack

    pack(metadata, packed, force=force)


@cli.command("unpack")
@click.option("-i", "--input", "packed", required=True, type=click.Path(dir_okay=False),
              help="Pack file to expand.")
@click.option("-o", "--output", "metadata", required=True, type=click.Path(dir_okay=False),
              help="Metadata file to create or replace, or an existing device.")
@click.option("-f", "--force", is_flag=True, help="Overwrite an output that holds thin metadata.")
@_clean_errors
def unpack_cmd(packed: str, metadata: str, force: bool) -> None:
    """Regenerate metadata from a pack file (like thin_metadata_unpack)."""
    from .tools.pack import unpack

    unpack(packed, metadata, force=force)


# -- pools ---------------------------------------------------------------------------------------
def _open_pool(directory: str, read_only: bool = False):
    from .pool.engine import Pool

    return Pool(directory, read_only=read_only)


def _open_pool_any(directory: str):
    """Read-write if nobody else has the pool open, else read-only (committed state)."""
    from .pool.locks import PoolBusyError

    try:
        return _open_pool(directory)
    except PoolBusyError:
        return _open_pool(directory, read_only=True)


@cli.group()
def pool() -> None:
    """Create and resize pools."""


TABLE_OVERRIDES = ("data_size", "block_size", "low_water_mark", "skip_block_zeroing",
                   "ignore_discard", "no_discard_passdown", "error_if_no_space", "read_only",
                   "data_dev", "metadata_dev")


@pool.command("create")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--data-size", default="100G", show_default=True, type=SIZE)
@click.option("--metadata-size", default="2G", show_default=True, type=SIZE)
@click.option("--block-size", default="64K", show_default=True, type=SIZE,
              help="Data block size: a multiple of 64K between 64K and 1G.")
@click.option("--low-water-mark", type=click.IntRange(min=0), default=0,
              help="Free data blocks at which a low-water event fires.")
@click.option("--low-water-hook", help="Command run once when the low-water mark is reached.")
@click.option("--no-space-timeout", type=click.FloatRange(min=0), default=60.0, show_default=True,
              help="Seconds a write waits for the pool to grow when out of data space.")
@click.option("--skip-block-zeroing", is_flag=True)
@click.option("--ignore-discard", is_flag=True)
@click.option("--no-discard-passdown", is_flag=True)
@click.option("--error-if-no-space", is_flag=True)
@click.option("--read-only", is_flag=True)
@click.option("--data-dev", type=click.Path(dir_okay=False),
              help="Use this existing file or block device for data.")
@click.option("--metadata-dev", type=click.Path(dir_okay=False),
              help="Use this existing file or block device for metadata: valid dm-thin "
                   "metadata on it is used as it is, a zeroed one is formatted.")
@click.option("--table", help='Kernel table line, e.g. "0 20971520 thin-pool META DATA 128 0 1 '
                              'skip_block_zeroing". Relative paths are taken from the current '
                              'directory; missing files are created sparse (META with '
                              '--metadata-size). The table sets the data size, block size, low '
                              'water mark and features, so those options cannot be combined '
                              'with it.')
@click.option("--format", "format_", is_flag=True,
              help="Format the metadata device even if it holds data (its volumes are lost).")
@click.pass_context
@_clean_errors
def pool_create(ctx: click.Context, directory: str, data_size: int, metadata_size: int,
                block_size: int, low_water_mark: int, low_water_hook: str | None,
                no_space_timeout: float, skip_block_zeroing: bool, ignore_discard: bool,
                no_discard_passdown: bool, error_if_no_space: bool, read_only: bool,
                data_dev: str | None, metadata_dev: str | None, table: str | None,
                format_: bool) -> None:
    """Create a pool in DIRECTORY (sparse DIR/data and DIR/metadata by default)."""
    from click.core import ParameterSource

    from .pool.config import PoolConfig, parse_table, validate_block_sectors
    from .pool.engine import Pool

    if table is not None:
        given = [f"--{name.replace('_', '-')}" for name in TABLE_OVERRIDES
                 if ctx.get_parameter_source(name) in (ParameterSource.COMMANDLINE,
                                                       ParameterSource.ENVIRONMENT)]
        if given:
            raise click.UsageError(f"{', '.join(given)} cannot be combined with --table "
                                   "(the table line sets them)")
        parsed = parse_table(table)
        config = parsed.config
        data_size = parsed.length_sectors * 512
        data_dev, metadata_dev = parsed.data_dev, parsed.metadata_dev
    else:
        if block_size % 512:
            raise click.BadParameter("block size must be a multiple of 64K",
                                     param_hint="--block-size")
        config = PoolConfig(data_block_sectors=validate_block_sectors(block_size // 512),
                            low_water_mark=low_water_mark, skip_block_zeroing=skip_block_zeroing,
                            ignore_discard=ignore_discard, no_discard_passdown=no_discard_passdown,
                            read_only=read_only, error_if_no_space=error_if_no_space)
    config.no_space_timeout = no_space_timeout
    config.low_water_hook = low_water_hook
    what = Pool.create(directory, data_size, metadata_size, config, data_dev=data_dev,
                       metadata_dev=metadata_dev, create_devices=table is not None,
                       format=format_)
    with _open_pool(directory, read_only=True) as p:
        st = p.status()
    click.echo(f"created pool {directory}: {st.total_data} data blocks of "
               f"{config.block_size // 1024} KiB, {st.total_metadata} metadata blocks; {what}")


@pool.command("resize")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--data-size", type=SIZE)
@click.option("--metadata-size", type=SIZE)
@_clean_errors
def pool_resize(directory: str, data_size: int | None, metadata_size: int | None) -> None:
    """Grow the data and/or metadata device (never shrinks)."""
    if data_size is None and metadata_size is None:
        raise click.UsageError("give --data-size and/or --metadata-size")
    with _open_pool(directory) as p:
        p.resize(data_size=data_size, metadata_size=metadata_size)
        click.echo(p.status().line())


@cli.command()
@click.argument("directory", type=click.Path(file_okay=False))
@click.argument("text")
@_clean_errors
def message(directory: str, text: str) -> None:
    """Send a kernel pool message, e.g. "create_thin 0" or "create_snap 1 0"."""
    with _open_pool(directory) as p:
        p.message(text)


@cli.command("create-thin")
@click.argument("directory", type=click.Path(file_okay=False))
@click.argument("dev_id", type=DEV_ID)
@click.option("--size", type=SIZE, help="Virtual size (default: the pool's data size).")
@click.option("--name", help="A unique name (NBD export name); not all digits.")
@click.option("--origin", type=click.Path(exists=True, dir_okay=False),
              help="Read-only external origin (e.g. a raw base image).")
@_clean_errors
def create_thin(directory: str, dev_id: int, size: int | None, name: str | None,
                origin: str | None) -> None:
    """Create a thin volume."""
    with _open_pool(directory) as p:
        p.create_thin(dev_id, size=size, name=name, origin=origin)


@cli.command("create-snap")
@click.argument("directory", type=click.Path(file_okay=False))
@click.argument("dev_id", type=DEV_ID)
@click.argument("origin_id", type=DEV_ID)
@click.option("--name", help="A unique name (NBD export name); not all digits.")
@_clean_errors
def create_snap(directory: str, dev_id: int, origin_id: int, name: str | None) -> None:
    """Snapshot volume ORIGIN_ID as DEV_ID."""
    with _open_pool(directory) as p:
        p.create_snap(dev_id, origin_id, name=name)


@cli.command("delete")
@click.argument("directory", type=click.Path(file_okay=False))
@click.argument("dev_id", type=DEV_ID)
@_clean_errors
def delete_cmd(directory: str, dev_id: int) -> None:
    """Delete a thin volume and release its blocks."""
    with _open_pool(directory) as p:
        p.delete(dev_id)


@cli.command("list")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--tree", is_flag=True,
              help="The snapshot family tree, with mapped, exclusive and shared space.")
@click.option("--json", "as_json", is_flag=True)
@_clean_errors
def list_cmd(directory: str, tree: bool, as_json: bool) -> None:
    """List volumes: id, size, mapped, origin, creation time."""
    import dataclasses
    import json

    with _open_pool(directory, read_only=True) as p:
        vols = p.list_volumes()
        bs = p.block_size
        if tree:
            from .tools.ls import list_devices

            usage = {u.dev_id: u for u in list_devices(p.meta_path)}
    if tree:
        roots = _family(vols, usage, bs)
        if as_json:
            click.echo(json.dumps(roots, indent=1))
        else:
            _print_tree(roots)
        return
    if as_json:
        click.echo(json.dumps([dataclasses.asdict(v) for v in vols], indent=1))
        return
    click.echo(f"{'ID':>8} {'SIZE':>14} {'MAPPED':>14} {'CTIME':>6} {'STIME':>6}  NAME / ORIGIN")
    for v in vols:
        extra = " ".join(x for x in (v.name or "", f"origin={v.origin}" if v.origin else "",
                                     "" if v.snapshot_of is None else f"snapshot-of={v.snapshot_of}")
                         if x)
        click.echo(f"{v.dev_id:>8} {v.size:>14} {v.mapped_blocks * bs:>14} {v.creation_time:>6} "
                   f"{v.snapshotted_time:>6}  {extra}")


def _family(vols: list, usage: dict, bs: int) -> list[dict[str, Any]]:
    """Volumes nested under the volume each was snapshotted from (roots first, by id)."""
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


def _print_tree(roots: list[dict[str, Any]]) -> None:
    from .tools.ls import format_disk_unit

    click.echo(f"{'VOLUME':<32} {'SIZE':>10} {'MAPPED':>10} {'EXCLUSIVE':>10} {'SHARED':>10}")

    def show(node: dict[str, Any], prefix: str, branch: str) -> None:
        label = f"{node['id']}" + (f" {node['name']}" if node["name"] else "")
        if node["snapshot_of"] is not None and not prefix and not branch:
            label += f" (snapshot of deleted {node['snapshot_of']})"
        cells = " ".join(f"{format_disk_unit(node[k]):>10}" for k in
                         ("size", "mapped_bytes", "exclusive_bytes", "shared_bytes"))
        click.echo(f"{(prefix + branch + label):<32} {cells}")
        kids = node["snapshots"]
        for i, kid in enumerate(kids):
            last = i == len(kids) - 1
            show(kid, prefix + ("" if not branch else ("   " if branch == "`- " else "|  ")),
                 "`- " if last else "|- ")

    for root in roots:
        show(root, "", "")


@cli.command()
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--thin", "dev_id", type=DEV_ID, help="Status of one thin volume instead of the pool.")
@click.option("--json", "as_json", is_flag=True)
@_clean_errors
def status(directory: str, dev_id: int | None, as_json: bool) -> None:
    """Kernel-style status line of the pool or of one thin volume."""
    import dataclasses
    import json

    with _open_pool_any(directory) as p:
        st = p.status() if dev_id is None else p.thin_status(dev_id)
    click.echo(json.dumps(dataclasses.asdict(st)) if as_json else st.line())


CHUNK = 1 << 20


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


@cli.command()
@click.argument("directory", type=click.Path(file_okay=False))
@click.argument("dev_id", type=DEV_ID)
@click.option("--offset", type=SIZE, default=0, help="Byte offset in the volume (units allowed).")
@click.argument("source", type=click.Path(dir_okay=False, allow_dash=True), default="-")
@_clean_errors
def write(directory: str, dev_id: int, offset: int, source: str) -> None:
    """Write SOURCE (a file, a device or - for stdin) into a volume at --offset.

    The range is checked before anything is written when SOURCE's length is
    known (a file, a device, or a pipe that ends within 64 MiB).
    """
    import stat

    from .pdata.blockio import device_size

    fd = sys.stdin.fileno() if source == "-" else os.open(source, os.O_RDONLY | os.O_CLOEXEC)
    try:
        with _open_pool(directory) as p:
            if source != "-":
                from .outputs import refuse_same_file

                refuse_same_file(source, p.files())
            with p.volume(dev_id) as vol:
                room = max(vol.size - offset, 0)
                st = os.fstat(fd)
                head, ended = b"", False
                if stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode):
                    length: int | None = device_size(fd) - os.lseek(fd, 0, os.SEEK_CUR)
                else:
                    head, ended = _read_ahead(fd, min(room + 1, 64 << 20))
                    length = len(head) if ended else None
                if offset > vol.size or len(head) > room or \
                        (length is not None and offset + length > vol.size):
                    what = f"{length} bytes" if length is not None else "the input"
                    raise click.ClickException(
                        f"{what} at offset {offset} would go beyond the end of volume {dev_id} "
                        f"({vol.size} bytes); nothing was written")
                pos = offset
                if head:
                    vol.write(pos, head)
                    pos += len(head)
                while not ended:
                    chunk = os.read(fd, CHUNK)
                    if not chunk:
                        break
                    if pos + len(chunk) > vol.size:
                        vol.flush()
                        raise click.ClickException(
                            f"the input continues beyond the end of volume {dev_id} "
                            f"({vol.size} bytes): bytes {offset}..{pos} were written, the rest "
                            "was not")
                    vol.write(pos, chunk)
                    pos += len(chunk)
                vol.flush()
    finally:
        if source != "-":
            os.close(fd)


@cli.command()
@click.argument("directory", type=click.Path(file_okay=False))
@click.argument("dev_id", type=DEV_ID)
@click.option("--offset", type=SIZE, default=0, help="Byte offset in the volume (units allowed).")
@click.option("--length", type=SIZE, help="Bytes to read (default: to the end).")
@click.option("-o", "--output", type=click.Path(dir_okay=False, allow_dash=True), default="-")
@_clean_errors
def read(directory: str, dev_id: int, offset: int, length: int | None, output: str) -> None:
    """Read bytes from a volume."""
    from .outputs import open_output

    with _open_pool_any(directory) as p, p.volume(dev_id) as vol:
        end = vol.size if length is None else offset + length
        if offset > vol.size or end > vol.size:
            raise click.ClickException(f"range {offset}+{end - offset} is beyond the end of volume "
                                       f"{dev_id} ({vol.size} bytes)")
        out = sys.stdout.buffer if output == "-" else \
            open(open_output(output, p.files()), "wb", closefd=True)
        try:
            pos = offset
            while pos < end:
                n = min(CHUNK, end - pos)
                out.write(vol.read(pos, n))
                pos += n
            out.flush()
            if out is not sys.stdout.buffer:
                out.close()
        except BrokenPipeError:
            raise _OutputClosed() from None
        except OSError as e:
            raise click.ClickException(f"cannot write to {output}: {e.strerror}") from None
        finally:
            if out is not sys.stdout.buffer and not out.closed:
                try:
                    out.close()
                except OSError:
                    pass


@cli.command()
@click.argument("directory", type=click.Path(file_okay=False))
@click.argument("dev_id", type=DEV_ID)
@click.option("--offset", type=SIZE, required=True, help="Byte offset (units allowed).")
@click.option("--length", type=SIZE, required=True, help="Bytes (units allowed).")
@_clean_errors
def discard(directory: str, dev_id: int, offset: int, length: int) -> None:
    """Unmap the whole blocks inside a byte range."""
    with _open_pool(directory) as p, p.volume(dev_id) as vol:
        vol.discard(offset, length)
        vol.flush()


@cli.command("export-image")
@click.argument("directory", type=click.Path(file_okay=False))
@click.argument("dev_id", type=DEV_ID)
@click.argument("path", type=click.Path(dir_okay=False))
@_clean_errors
def export_image_cmd(directory: str, dev_id: int, path: str) -> None:
    """Copy a volume into a sparse raw image file (never one of the pool's own files)."""
    from .pool.images import export_image

    with _open_pool(directory) as p:
        n = export_image(p, dev_id, path)
    click.echo(f"exported volume {dev_id} to {path} ({n} bytes of data)")


@cli.command("import-image")
@click.argument("directory", type=click.Path(file_okay=False))
@click.argument("dev_id", type=DEV_ID)
@click.argument("path", type=click.Path(exists=True, dir_okay=False))
@_clean_errors
def import_image_cmd(directory: str, dev_id: int, path: str) -> None:
    """Copy a raw image (file, block device or pipe) into a volume.

    Holes and all-zero blocks stay unprovisioned.
    """
    from .pool.images import import_image

    with _open_pool(directory) as p:
        n = import_image(p, dev_id, path)
    click.echo(f"imported {path} into volume {dev_id} ({n} bytes of data)")


@cli.command()
@click.argument("directory", required=False, type=click.Path(file_okay=False))
@click.option("--dir", "workdir", type=click.Path(file_okay=False),
              help="Where to create the demo files (default: a temporary directory).")
@_clean_errors
def demo(directory: str | None, workdir: str | None) -> None:
    """Walk through dm-thin metadata: devices, snapshots, check and dump.

    DIRECTORY (or --dir) keeps the demo's pool there; by default a temporary
    directory is used and removed afterwards.
    """
    from .demo import run_demo

    if directory and workdir and directory != workdir:
        raise click.UsageError("give the demo directory once (DIRECTORY or --dir)")
    run_demo(directory or workdir, click.echo)


if __name__ == "__main__":  # pragma: no cover
    main()
