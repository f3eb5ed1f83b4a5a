"""Command-line interface: the only module that reads argv or prints.

Exit status: 0 success, 1 an operation failed (one line on stderr, never a
traceback), 2 a usage error (bad option or argument), 130 interrupted
(Ctrl-C), 141 the reader of our output went away (``| head``), quietly.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import signal
import sys
from typing import Any, Callable, Iterator

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
@click.argument("metadata", type=click.Path())
@click.option("-m", "--metadata-snap", "snapshot", is_flag=True,
              help="Check the held metadata snapshot instead of the live metadata.")
@click.option("-q", "--quiet", is_flag=True, help="Print nothing; only the exit code tells.")
@_clean_errors
def check(metadata: str, snapshot: bool, quiet: bool) -> None:
    """Verify metadata like thin_check (exit 0 when clean).

    METADATA is a metadata file or device, or a pool directory.  The metadata
    of a pool whose server runs is checked by the server, with commits held
    back meanwhile, so the check sees one committed state.
    """
    from .server import control
    from .server.control import control_path
    from .tools.check import check as run_check

    pool_dir = _pool_dir_of(metadata)
    path = control_path(pool_dir) if pool_dir else None
    result = None
    if path and not snapshot and os.path.exists(path):
        try:
            result = control.request(path, "check", {})
        except (ConnectionRefusedError, FileNotFoundError):
            pass
    if result is None:
        target = metadata
        if pool_dir and os.path.isdir(metadata):
            target = _pool_metadata_path(pool_dir)
        report = run_check(target, snapshot=snapshot)
        result = {"errors": report.errors, "leaks": report.leaks, "clean": report.clean}
    if not quiet:
        for line in result["errors"]:
            click.echo(f"error: {line}", err=True)
        for line in result["leaks"]:
            click.echo(f"leak: {line}", err=True)
        if result["clean"]:
            click.echo(f"{metadata}: clean", err=True)
    sys.exit(0 if result["clean"] else 1)


def _pool_metadata_path(pool_dir: str) -> str:
    import json

    with open(os.path.join(pool_dir, "pool.json"), encoding="utf-8") as f:
        return os.path.join(pool_dir, json.load(f)["metadata"])


def _pool_dir_of(path: str) -> str | None:
    """The pool directory ``path`` is, or whose metadata file it is; else None."""
    if os.path.isfile(os.path.join(path, "pool.json")):
        return path
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.isfile(os.path.join(parent, "pool.json")):
        try:
            if os.path.samefile(_pool_metadata_path(parent), path):
                return parent
        except (OSError, ValueError, KeyError):
            return None
    return None


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


def _call(directory: str, command: str, args: dict[str, Any], fds: list[int] | None = None
          ) -> dict[str, Any]:
    """Run a pool command: through the pool's server if one runs, else on the pool itself.

    Either way the same function runs (``server.commands``), so outputs and
    errors are the same.
    """
    import errno

    from .server import commands, control
    from .server.control import control_path

    fds = fds or []
    path = control_path(directory)
    if os.path.exists(path):
        try:
            return control.request(path, command, args, fds)
        except (ConnectionRefusedError, FileNotFoundError):
            pass  # a stale socket: no server runs
        except control.RemoteError as e:
            if e.errno == errno.EPIPE:
                raise _OutputClosed() from None
            raise
    with _open_pool(directory, read_only=not commands.COMMANDS[command].writes) as p:
        try:
            return commands.run(p, command, args, fds)
        except ThinpoolError as e:
            if getattr(e, "errno", None) == errno.EPIPE:
                raise _OutputClosed() from None
            raise


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
    out = _call(directory, "resize", {"data_size": data_size, "metadata_size": metadata_size})
    click.echo(out["line"])


@cli.command()
@click.argument("directory", type=click.Path(file_okay=False))
@click.argument("text")
@_clean_errors
def message(directory: str, text: str) -> None:
    """Send a kernel pool message, e.g. "create_thin 0" or "create_snap 1 0"."""
    _call(directory, "message", {"text": text})


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
    _call(directory, "create-thin", {"id": dev_id, "size": size, "name": name,
                                     "origin": os.path.abspath(origin) if origin else None})


@cli.command("create-snap")
@click.argument("directory", type=click.Path(file_okay=False))
@click.argument("dev_id", type=DEV_ID)
@click.argument("origin_id", type=DEV_ID)
@click.option("--name", help="A unique name (NBD export name); not all digits.")
@_clean_errors
def create_snap(directory: str, dev_id: int, origin_id: int, name: str | None) -> None:
    """Snapshot volume ORIGIN_ID as DEV_ID."""
    _call(directory, "create-snap", {"id": dev_id, "origin_id": origin_id, "name": name})


@cli.command("delete")
@click.argument("directory", type=click.Path(file_okay=False))
@click.argument("dev_id", type=DEV_ID)
@click.option("--discard", is_flag=True,
              help="Also discard the blocks only this volume held (their space goes back to "
                   "a sparse data file), as a discard of the whole volume first would.")
@_clean_errors
def delete_cmd(directory: str, dev_id: int, discard: bool) -> None:
    """Delete a thin volume and release its blocks."""
    _call(directory, "delete", {"id": dev_id, "discard": discard})


@cli.command("list")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--tree", is_flag=True,
              help="The snapshot family tree, with mapped, exclusive and shared space.")
@click.option("--json", "as_json", is_flag=True)
@_clean_errors
def list_cmd(directory: str, tree: bool, as_json: bool) -> None:
    """List volumes: id, size, mapped, origin, creation time."""
    import json

    out = _call(directory, "list", {"tree": tree})
    if tree:
        if as_json:
            click.echo(json.dumps(out["tree"], indent=1))
        else:
            _print_tree(out["tree"])
        return
    if as_json:
        click.echo(json.dumps(out["volumes"], indent=1))
        return
    bs = out["block_size"]
    click.echo(f"{'ID':>8} {'SIZE':>14} {'MAPPED':>14} {'CTIME':>6} {'STIME':>6}  NAME / ORIGIN")
    for v in out["volumes"]:
        extra = " ".join(x for x in (
            v["name"] or "", f"origin={v['origin']}" if v["origin"] else "",
            "" if v["snapshot_of"] is None else f"snapshot-of={v['snapshot_of']}") if x)
        click.echo(f"{v['dev_id']:>8} {v['size']:>14} {v['mapped_blocks'] * bs:>14} "
                   f"{v['creation_time']:>6} {v['snapshotted_time']:>6}  {extra}")


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
    import json

    out = _call(directory, "status", {"thin": dev_id})
    click.echo(json.dumps(out["status"]) if as_json else out["line"])


def _open_input(path: str) -> int:
    return sys.stdin.fileno() if path == "-" else os.open(path, os.O_RDONLY | os.O_CLOEXEC)


def _open_output(path: str) -> int:
    """An output fd opened without truncation: the command checks it against the pool's files
    first, then truncates it."""
    if path == "-":
        return sys.stdout.fileno()
    try:
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise click.ClickException(f"cannot write to {path}: {e.strerror}") from None


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
    fd = _open_input(source)
    try:
        _call(directory, "write", {"id": dev_id, "offset": offset, "source": source}, [fd])
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
    """Read bytes from a volume (the range is checked before anything is written)."""
    sys.stdout.flush()
    created = output != "-" and not os.path.lexists(output)
    fd = _open_output(output)
    try:
        _call(directory, "read", {"id": dev_id, "offset": offset, "length": length,
                                  "output": None if output == "-" else output}, [fd])
    except BaseException:
        if created and os.fstat(fd).st_size == 0:
            os.unlink(output)  # nothing was written to the file this command created
        raise
    finally:
        if output != "-":
            os.close(fd)


@cli.command()
@click.argument("directory", type=click.Path(file_okay=False))
@click.argument("dev_id", type=DEV_ID)
@click.option("--offset", type=SIZE, required=True, help="Byte offset (units allowed).")
@click.option("--length", type=SIZE, required=True, help="Bytes (units allowed).")
@_clean_errors
def discard(directory: str, dev_id: int, offset: int, length: int) -> None:
    """Unmap the whole blocks inside a byte range."""
    _call(directory, "discard", {"id": dev_id, "offset": offset, "length": length})


@cli.command("export-image")
@click.argument("directory", type=click.Path(file_okay=False))
@click.argument("dev_id", type=DEV_ID)
@click.argument("path", type=click.Path(dir_okay=False))
@_clean_errors
def export_image_cmd(directory: str, dev_id: int, path: str) -> None:
    """Copy a volume into a sparse raw image file (never one of the pool's own files)."""
    fd = _open_output(path)
    try:
        out = _call(directory, "export-image", {"id": dev_id, "path": path}, [fd])
    finally:
        os.close(fd)
    click.echo(f"exported volume {dev_id} to {path} ({out['copied']} bytes of data)")


@cli.command("import-image")
@click.argument("directory", type=click.Path(file_okay=False))
@click.argument("dev_id", type=DEV_ID)
@click.argument("path", type=click.Path(exists=True, dir_okay=False))
@_clean_errors
def import_image_cmd(directory: str, dev_id: int, path: str) -> None:
    """Copy a raw image (file, block device or pipe) into a volume.

    Holes and all-zero blocks stay unprovisioned.
    """
    fd = _open_input(path)
    try:
        out = _call(directory, "import-image", {"id": dev_id, "path": path}, [fd])
    finally:
        os.close(fd)
    click.echo(f"imported {path} into volume {dev_id} ({out['written']} bytes of data)")


# -- the pool server ------------------------------------------------------------------------------
def _listen_address(ctx: click.Context, param: click.Parameter,
                    value: str | None) -> tuple[str, int] | None:
    if value is None:
        return None
    host, sep, port = value.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not (port.isascii() and port.isdigit()) or int(port) > 65535:
        raise click.BadParameter(f"{value!r} is not HOST:PORT", param=param)
    return host, int(port)


def _is_loopback(host: str) -> bool:
    import ipaddress
    import socket as socket_mod

    try:
        infos = socket_mod.getaddrinfo(host, None)
    except OSError:
        return False
    return all(ipaddress.ip_address(str(info[4][0]).split("%")[0]).is_loopback for info in infos)


@cli.command()
@click.argument("directory", type=click.Path(file_okay=False, exists=True))
@click.option("--socket", "nbd_socket", type=click.Path(dir_okay=False),
              help="NBD unix socket (default DIR/nbd.sock), created with mode 0600.")
@click.option("--listen", callback=_listen_address, metavar="HOST:PORT",
              help="Also serve NBD over TCP. Anything but loopback needs --tls require "
                   "(or --insecure).")
@click.option("--tls", type=click.Choice(["off", "allow", "require"]), default="off",
              show_default=True, help="NBD_OPT_STARTTLS policy.")
@click.option("--tls-creds", type=click.Path(file_okay=False, exists=True),
              help="Directory with ca-cert.pem, server-cert.pem, server-key.pem (qemu's "
                   "tls-creds-x509 layout).")
@click.option("--insecure", is_flag=True, help="Allow plain TCP on a non-loopback address.")
@click.option("--read-only", "read_only", type=DEV_ID, multiple=True,
              help="Serve this volume read-only (repeatable).")
@click.option("--workers", type=click.IntRange(0, 64), default=0, show_default=True,
              help="NBD worker processes that serve reads and overwrites beside the pool "
                   "process, for many clients at once (not with --tls).")
@_clean_errors
def serve(directory: str, nbd_socket: str | None, listen: tuple[str, int] | None, tls: str,
          tls_creds: str | None, insecure: bool, read_only: tuple[int, ...],
          workers: int) -> None:
    """Own the pool and serve its volumes over NBD until stopped.

    While it runs, every thinpool command on DIRECTORY goes through it (the
    control socket DIRECTORY/control.sock). Stop it with 'thinpool stop',
    SIGTERM or Ctrl-C.
    """
    from pathlib import Path

    from .nbd.protocol import TLSMode
    from .nbd.server import TLSConfig
    from .server.daemon import PoolServer, ServerOptions

    if tls != "off" and not tls_creds:
        raise click.UsageError("--tls allow/require needs --tls-creds DIR")
    if tls != "off" and workers:
        raise click.UsageError("--workers cannot be used with --tls (TLS connections are "
                               "served by the pool process)")
    if tls_creds and tls == "off":
        raise click.UsageError("--tls-creds needs --tls allow or --tls require")
    if listen and not _is_loopback(listen[0]) and tls != "require" and not insecure:
        raise click.UsageError(f"refusing to serve NBD on {listen[0]} without TLS: pass --tls "
                               "require --tls-creds DIR, or --insecure")
    tls_config = None if tls == "off" else TLSConfig(
        Path(tls_creds or ""), TLSMode.REQUIRED if tls == "require" else TLSMode.ALLOWED)
    server = PoolServer(directory, ServerOptions(
        nbd_socket=os.path.abspath(nbd_socket) if nbd_socket else None, tcp=listen,
        tls=tls_config, read_only=set(read_only), workers=workers))
    server.start()
    click.echo(f"serving {directory}: NBD on {server.nbd_socket}"
               + (f" and {listen[0]}:{server.nbd.tcp_address[1] if server.nbd and server.nbd.tcp_address else listen[1]}"
                  if listen else "") + f"; pid {os.getpid()}", err=True)
    server.serve_forever()


def _server_pid(directory: str) -> int | None:
    from .server.daemon import read_state

    pid = (read_state(directory) or {}).get("pid")
    return pid if isinstance(pid, int) else None


def _wait_gone(directory: str, pid: int, timeout: float) -> None:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        if _server_pid(directory) != pid:
            return
        time.sleep(0.05)
    raise click.ClickException(f"the server (pid {pid}) did not stop within {timeout:g} s")


# -- graph drivers (Docker's storage-driver contract) ---------------------------------------------
GRAPH_ROOT = "/var/lib/thinpool/graph"


def _graph_driver(ctx: click.Context) -> Any:
    """The driver the ``graph`` group's options select (initialised once per command)."""
    from .graph import registry

    cfg = ctx.find_object(dict)
    assert cfg is not None
    if cfg["driver"] and cfg["driver"] not in registry.registered():
        raise click.UsageError(f"unknown driver {cfg['driver']!r} (known: {', '.join(registry.registered())})")
    if "driver_obj" not in cfg:
        cfg["driver_obj"] = registry.new_driver(cfg["root"], cfg["driver"], list(cfg["storage_opt"]))
    return cfg["driver_obj"]


def _graph_create_opts(storage_opt: tuple[str, ...]) -> Any:
    from .graph.driver import BadOption, CreateOpts

    opts: dict[str, str] = {}
    for option in storage_opt:
        key, sep, value = option.partition("=")
        if not sep or not key.strip():
            raise BadOption(f"unable to parse key/value option: {option}")
        opts[key.strip()] = value.strip()
    return CreateOpts(storage_opt=opts)


_LAYER_ID = click.argument("layer_id", metavar="ID")
_PARENT = click.option("--parent", metavar="P", help="The parent layer (default: none).")
_LAYER_OPT = click.option("--storage-opt", "layer_opt", multiple=True, metavar="KEY=VALUE",
                          help="Per-layer option, e.g. size=10G (repeatable).")


def _storage_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """--root, --driver and --storage-opt: how 'graph', 'image' and 'container' find their driver."""
    fn = click.option("--storage-opt", "storage_opt", multiple=True, metavar="KEY=VALUE",
                      help="Driver option, e.g. overlay2.size=10G (repeatable).")(fn)
    fn = click.option("--driver", "-s", "driver", metavar="NAME",
                      help="vfs, overlay2, btrfs, devicemapper, ... (default: what ROOT already holds, "
                           "else the first driver that works here, in Docker's order).")(fn)
    return click.option("--root", default=GRAPH_ROOT, show_default=True, type=click.Path(file_okay=False),
                        help="Where the drivers keep their homes (ROOT/NAME).")(fn)


@cli.group()
@_storage_options
@click.pass_context
def graph(ctx: click.Context, root: str, driver: str | None, storage_opt: tuple[str, ...]) -> None:
    """Layers with Docker's graph drivers (vfs, overlay2, btrfs...) under ROOT/DRIVER.

    A layer is an image layer (create, then apply-diff) or a container layer
    (create-rw). 'get' mounts a layer and leaves it mounted after the command
    ends, until 'put' (or 'cleanup', which unmounts every layer).
    """
    ctx.obj = {"root": root, "driver": driver, "storage_opt": storage_opt}


@graph.command("create")
@_LAYER_ID
@_PARENT
@_LAYER_OPT
@click.pass_context
@_clean_errors
def graph_create(ctx: click.Context, layer_id: str, parent: str | None, layer_opt: tuple[str, ...]) -> None:
    """Create an empty image layer on top of --parent."""
    _graph_driver(ctx).create(layer_id, parent, _graph_create_opts(layer_opt))


@graph.command("create-rw")
@_LAYER_ID
@_PARENT
@_LAYER_OPT
@click.pass_context
@_clean_errors
def graph_create_rw(ctx: click.Context, layer_id: str, parent: str | None, layer_opt: tuple[str, ...]) -> None:
    """Create a writable (container) layer on top of --parent."""
    _graph_driver(ctx).create_rw(layer_id, parent, _graph_create_opts(layer_opt))


@graph.command("remove")
@_LAYER_ID
@click.pass_context
@_clean_errors
def graph_remove(ctx: click.Context, layer_id: str) -> None:
    """Remove a layer (no error if it does not exist; refused if it is mounted or has children)."""
    _graph_driver(ctx).remove(layer_id)


@graph.command("get")
@_LAYER_ID
@click.option("--mount-label", default="", help="SELinux mount label.")
@click.pass_context
@_clean_errors
def graph_get(ctx: click.Context, layer_id: str, mount_label: str) -> None:
    """Mount a layer and print the path of its root (it stays mounted until 'put')."""
    click.echo(_graph_driver(ctx).get(layer_id, mount_label))


@graph.command("put")
@_LAYER_ID
@click.pass_context
@_clean_errors
def graph_put(ctx: click.Context, layer_id: str) -> None:
    """Release a layer 'get' mounted (a mount counts once, whatever number of 'get's made it)."""
    _graph_driver(ctx).put(layer_id)


@graph.command("exists")
@_LAYER_ID
@click.pass_context
@_clean_errors
def graph_exists(ctx: click.Context, layer_id: str) -> None:
    """Exit 0 if the layer exists, 1 if not (prints nothing)."""
    if not _graph_driver(ctx).exists(layer_id):
        sys.exit(EXIT_FAILURE)


@graph.command("status")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
@_clean_errors
def graph_status(ctx: click.Context, as_json: bool) -> None:
    """The driver's name and status pairs (what 'docker info' shows)."""
    import json

    from .tools.ls import format_disk_unit

    driver = _graph_driver(ctx)
    status = driver.status()
    usage = driver.layer_usage()
    if as_json:
        click.echo(json.dumps({"Driver": driver.name, "Home": driver.home,
                               "Status": [list(p) for p in status], "Layers": usage}))
        return
    click.echo(f"Storage Driver: {driver.name}")
    click.echo(f" Home: {driver.home}")
    for key, value in status:
        click.echo(f" {key}: {value}")
    if usage:
        click.echo(f" Layers (from the pool's mappings): {'MAPPED':>10} {'EXCLUSIVE':>10} "
                   f"{'SHARED':>10}")
        for layer, u in sorted(usage.items()):
            click.echo(f"  {layer:<64} {format_disk_unit(u['mapped']):>10} "
                       f"{format_disk_unit(u['exclusive']):>10} {format_disk_unit(u['shared']):>10}")


@graph.command("metadata")
@_LAYER_ID
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
@_clean_errors
def graph_metadata(ctx: click.Context, layer_id: str, as_json: bool) -> None:
    """Per-layer information ('docker inspect' .GraphDriver.Data)."""
    import json

    meta = _graph_driver(ctx).get_metadata(layer_id)
    if as_json:
        click.echo(json.dumps(meta, sort_keys=True))
        return
    for key in sorted(meta):
        click.echo(f"{key}: {meta[key]}")


def _refuse_inside(path: str, home: str, what: str) -> None:
    real = os.path.realpath(path)
    home = os.path.realpath(home)
    if real == home or real.startswith(home.rstrip("/") + "/"):
        raise click.UsageError(f"refusing to {what} {path}: it is inside the driver's home {home}")


@graph.command("diff")
@_LAYER_ID
@_PARENT
@click.option("-o", "--output", type=click.Path(dir_okay=False, allow_dash=True), default="-",
              help="Write the tar to FILE (default: standard output).")
@click.pass_context
@_clean_errors
def graph_diff(ctx: click.Context, layer_id: str, parent: str | None, output: str) -> None:
    """The layer's changes against --parent as an uncompressed tar (the whole layer without --parent).

    A FILE appears only complete: the tar is written next to it and renamed
    into place at the end.
    """
    import tempfile

    if output == "-" and sys.stdout.isatty():
        raise click.UsageError("refusing to write a tar to a terminal: use -o FILE or a pipe")
    driver = _graph_driver(ctx)
    if output != "-":
        _refuse_inside(output, driver.home, "write the diff to")
    stream = driver.diff(layer_id, parent)
    try:
        if output == "-":
            out = sys.stdout.buffer
            for chunk in stream:
                out.write(chunk)
            out.flush()
            return
        directory = os.path.dirname(os.path.abspath(output))
        fd, tmp = tempfile.mkstemp(prefix=".diff-", dir=directory)
        try:
            with os.fdopen(fd, "wb") as f:
                for chunk in stream:
                    f.write(chunk)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)
            os.replace(tmp, output)
        except BaseException:
            os.unlink(tmp)
            raise
    finally:
        close = getattr(stream, "close", None)
        if close is not None:
            close()


@graph.command("changes")
@_LAYER_ID
@_PARENT
@click.option("--json", "as_json", is_flag=True, help="Docker's plugin form: [{\"Path\": .., \"Kind\": 0|1|2}].")
@click.pass_context
@_clean_errors
def graph_changes(ctx: click.Context, layer_id: str, parent: str | None, as_json: bool) -> None:
    """Changed paths against --parent: 'A /path' added, 'C /path' changed, 'D /path' deleted."""
    import json

    changes = _graph_driver(ctx).changes(layer_id, parent)
    if as_json:
        click.echo(json.dumps([{"Path": c.path, "Kind": int(c.kind)} for c in changes]))
        return
    for change in changes:
        click.echo(str(change))


@graph.command("apply-diff")
@_LAYER_ID
@_PARENT
@click.option("-i", "--input", "input_path", type=click.Path(dir_okay=False, allow_dash=True), default="-",
              help="Read the tar (plain, gzip, zstd, bzip2 or xz) from FILE (default: standard input).")
@click.pass_context
@_clean_errors
def graph_apply_diff(ctx: click.Context, layer_id: str, parent: str | None, input_path: str) -> None:
    """Unpack a layer tar into a layer and print the sum of its entries' sizes.

    Give the --parent the layer was created on (overlay2 then applies
    natively). A layer whose tar fails to apply is removed.
    """
    if input_path == "-" and sys.stdin.isatty():
        raise click.UsageError("refusing to read a tar from a terminal: use -i FILE or a pipe")
    driver = _graph_driver(ctx)
    if input_path == "-":
        size = driver.apply_diff(layer_id, parent, sys.stdin.buffer)
    else:
        with open(input_path, "rb") as f:
            size = driver.apply_diff(layer_id, parent, f)
    click.echo(size)


@graph.command("diff-size")
@_LAYER_ID
@_PARENT
@click.pass_context
@_clean_errors
def graph_diff_size(ctx: click.Context, layer_id: str, parent: str | None) -> None:
    """Bytes of the files the layer added or changed against --parent."""
    click.echo(_graph_driver(ctx).diff_size(layer_id, parent))


def _report_findings(findings: list[Any], as_json: bool) -> None:
    """Print check findings (``problem``, ``repaired``); exit 1 while any is unrepaired."""
    import json

    if as_json:
        click.echo(json.dumps([{"problem": f.problem, "repaired": f.repaired} for f in findings]))
    else:
        for f in findings:
            click.echo(("repaired: " if f.repaired else "problem: ") + f.problem)
        if not findings:
            click.echo("clean")
    if any(not f.repaired for f in findings):
        sys.exit(EXIT_FAILURE)


@graph.command("check")
@click.option("--repair", is_flag=True, help="Fix what can be fixed safely.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
@_clean_errors
def graph_check(ctx: click.Context, repair: bool, as_json: bool) -> None:
    """Reconcile the driver's records with its storage (exit 1 while problems remain).

    For devicemapper: unclosed transactions, records without pool devices,
    pool devices no record names (leaked ids), devices awaiting deferred
    deletion, stray mount points, and the pool's metadata itself.  A containerd
    snapshotter's root (thinpool snapshotter serve --root) is checked as
    'thinpool snapshotter check' does.
    """
    cfg = ctx.find_object(dict)
    assert cfg is not None
    if os.path.isfile(os.path.join(cfg["root"], "snapshots.db")):
        from .snapshotter.check import check as check_snapshotter

        _report_findings(check_snapshotter(cfg["root"], repair=repair), as_json)
        return
    _report_findings(_graph_driver(ctx).check(repair=repair), as_json)


@graph.command("cleanup")
@click.pass_context
@_clean_errors
def graph_cleanup(ctx: click.Context) -> None:
    """Unmount every layer of the driver (what dockerd does when it stops)."""
    _graph_driver(ctx).cleanup()


# -- images and containers (Docker's layer store on any graph driver) ------------------------------
class _RichTask:
    def __init__(self, progress: Any, task_id: Any) -> None:
        self.progress = progress
        self.task_id = task_id

    def advance(self, n: int) -> None:
        self.progress.advance(self.task_id, n)

    def finish(self) -> None:
        self.progress.update(self.task_id, visible=False)


class _RichProgress:
    """thinpool.images.progress.Progress as rich progress bars on standard error."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                                   TransferSpeedColumn)

        self.bars = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(binary_units=True),
                             TransferSpeedColumn(), TimeRemainingColumn(), console=Console(stderr=True),
                             transient=True)

    def task(self, description: str, total: int | None) -> _RichTask:
        task = _RichTask(self.bars, self.bars.add_task(description, total=total))
        self.bars.refresh()  # drawn at once, also for work shorter than one refresh period
        return task


@contextlib.contextmanager
def _progress() -> Iterator[Any]:
    """Progress bars when standard error is a terminal, else nothing."""
    from .images.progress import NO_PROGRESS

    if not sys.stderr.isatty():
        yield NO_PROGRESS
        return
    bars = _RichProgress()
    with bars.bars:
        yield bars


@contextlib.contextmanager
def _image_root(ctx: click.Context) -> Iterator[Any]:
    """The ImageRoot the group's --root/--driver/--storage-opt select; released at the end."""
    from .images.store import ImageRoot

    root = ImageRoot(ctx.find_object(dict)["root"], _graph_driver(ctx))  # type: ignore[index]
    for line in root.recovered:
        click.echo(f"thinpool: recovered: {line}", err=True)
    try:
        yield root
    finally:
        root.close()


def _write_tar(chunks: Any, output: str, root: str, what: str = "") -> None:
    """A tar to -o FILE (complete or not at all) or to standard output (never a terminal).

    With ``what``, a progress bar (bytes written) while standard error is a terminal.
    """
    try:
        with _progress() as progress:
            task = progress.task(what, None) if what else None
            _write_tar_to(chunks if task is None else _counted(chunks, task.advance), output, root)
            if task is not None:
                task.finish()
    finally:
        close = getattr(chunks, "close", None)
        if close is not None:
            close()


def _counted(chunks: Any, advance: Callable[[int], None]) -> Iterator[bytes]:
    for chunk in chunks:
        advance(len(chunk))
        yield chunk


def _write_tar_to(chunks: Any, output: str, root: str) -> None:
    from .images.archives import write_atomically

    try:
        if output == "-":
            if sys.stdout.isatty():
                raise click.UsageError("refusing to write a tar to a terminal: use -o FILE or a pipe")
            out = sys.stdout.buffer
            for chunk in chunks:
                out.write(chunk)
            out.flush()
            return
        _refuse_inside(output, root, "write")
        write_atomically(output, chunks)
    finally:
        close = getattr(chunks, "close", None)
        if close is not None:
            close()


def _human(n: int) -> str:
    from .graph.options import human_size

    return human_size(n)


def _table(rows: list[list[str]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        click.echo("   ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


@cli.group()
@_storage_options
@click.pass_context
def image(ctx: click.Context, root: str, driver: str | None, storage_opt: tuple[str, ...]) -> None:
    """Images as Docker keeps them (ROOT/image/DRIVER, layers on the graph driver).

    Same --root, --driver and --storage-opt as 'thinpool graph'; ROOT laid
    out like a Docker --data-root.
    """
    ctx.obj = {"root": root, "driver": driver, "storage_opt": storage_opt}


@image.command("load")
@click.argument("archive", required=False, type=click.Path(dir_okay=False))
@click.option("-i", "--input", "input_path", type=click.Path(dir_okay=False),
              help="The archive (same as ARCHIVE).")
@click.option("-q", "--quiet", is_flag=True, help="Print nothing but errors.")
@click.pass_context
@_clean_errors
def image_load(ctx: click.Context, archive: str | None, input_path: str | None, quiet: bool) -> None:
    """Load a 'docker save' tarball or an OCI image layout archive (gzip or zstd layers).

    Every digest is verified; a load that fails leaves nothing of itself behind.
    """
    path = archive or input_path
    if not path:
        raise click.UsageError("give the archive: thinpool image load FILE")
    with _image_root(ctx) as root, _progress() as progress:
        loaded = root.load(path, progress)
    if not quiet:
        for image_id, tags in loaded:
            for tag in tags:
                click.echo(f"Loaded image: {tag}")
            if not tags:
                click.echo(f"Loaded image ID: {image_id}")


@image.command("ls")
@click.option("--json", "as_json", is_flag=True)
@click.option("-q", "--quiet", is_flag=True, help="Only image ids.")
@click.pass_context
@_clean_errors
def image_ls(ctx: click.Context, as_json: bool, quiet: bool) -> None:
    """Images: repository, tag, id, layers, size."""
    import json

    with _image_root(ctx) as root:
        images = root.list_images()
    if as_json:
        click.echo(json.dumps([i.to_json() for i in images], indent=1))
        return
    if quiet:
        for i in images:
            click.echo(i.id.split(":")[1][:12])
        return
    rows = [["REPOSITORY", "TAG", "IMAGE ID", "LAYERS", "SIZE"]]
    for i in images:
        for tag in i.tags or ["<none>:<none>"]:
            repo, _, t = tag.rpartition(":")
            rows.append([repo, t, i.id.split(":")[1][:12], str(i.layers), _human(i.size)])
    _table(rows)


@image.command("rm")
@click.argument("refs", nargs=-1, required=True, metavar="IMAGE...")
@click.option("-f", "--force", is_flag=True, help="Remove an image with several tags, or with child images.")
@click.pass_context
@_clean_errors
def image_rm(ctx: click.Context, refs: tuple[str, ...], force: bool) -> None:
    """Untag images; delete those left without tags, and their layers nobody else uses."""
    with _image_root(ctx) as root:
        for ref in refs:
            for line in root.remove_image(ref, force):
                click.echo(line)


@image.command("save")
@click.argument("refs", nargs=-1, required=True, metavar="IMAGE...")
@click.option("-o", "--output", default="-", type=click.Path(dir_okay=False, allow_dash=True),
              help="The archive to write (default: standard output).")
@click.pass_context
@_clean_errors
def image_save(ctx: click.Context, refs: tuple[str, ...], output: str) -> None:
    """Write images as a 'docker save' tarball; its layers are the tars that were loaded, byte for byte."""
    if output == "-" and sys.stdout.isatty():
        raise click.UsageError("refusing to write a tar to a terminal: use -o FILE or a pipe")
    with _image_root(ctx) as root, _progress() as progress:
        if output == "-":
            _write_tar(root.save_stream(list(refs), progress), "-", root.root)
        else:
            root.save(list(refs), output, progress)


@cli.group()
@_storage_options
@click.pass_context
def container(ctx: click.Context, root: str, driver: str | None, storage_opt: tuple[str, ...]) -> None:
    """Containers' filesystems as Docker keeps them: an -init layer and a read-write layer per container.

    Same --root, --driver and --storage-opt as 'thinpool graph'.
    """
    ctx.obj = {"root": root, "driver": driver, "storage_opt": storage_opt}


@container.command("create")
@click.argument("image_ref", metavar="IMAGE")
@click.option("--name", help="The container's name (default: thinpool_<short id>).")
@click.option("--storage-opt", "container_opt", multiple=True, metavar="KEY=VALUE",
              help="Per-container option, e.g. size=20G (repeatable).")
@click.pass_context
@_clean_errors
def container_create(ctx: click.Context, image_ref: str, name: str | None,
                     container_opt: tuple[str, ...]) -> None:
    """Create a container's layers on IMAGE; print its id."""
    opts = _graph_create_opts(container_opt).storage_opt
    with _image_root(ctx) as root:
        click.echo(root.create_container(image_ref, name, opts).id)


@container.command("ls")
@click.option("--json", "as_json", is_flag=True)
@click.option("-q", "--quiet", is_flag=True, help="Only container ids.")
@click.pass_context
@_clean_errors
def container_ls(ctx: click.Context, as_json: bool, quiet: bool) -> None:
    """Containers: id, image, name, where mounted."""
    import json

    with _image_root(ctx) as root:
        found = root.list_containers()
    if as_json:
        click.echo(json.dumps([c.to_json() for c in found], indent=1))
        return
    if quiet:
        for c in found:
            click.echo(c.id[:12])
        return
    rows = [["CONTAINER ID", "IMAGE", "NAME", "MOUNTED"]]
    rows += [[c.id[:12], c.image, c.name, c.mounted or ""] for c in found]
    _table(rows)


@container.command("mount")
@click.argument("ref", metavar="CONTAINER")
@click.pass_context
@_clean_errors
def container_mount(ctx: click.Context, ref: str) -> None:
    """Mount the container's filesystem and print its path (it stays mounted until 'umount')."""
    with _image_root(ctx) as root:
        click.echo(root.mount(ref))


@container.command("umount")
@click.argument("ref", metavar="CONTAINER")
@click.pass_context
@_clean_errors
def container_umount(ctx: click.Context, ref: str) -> None:
    """Release what 'mount' mounted."""
    with _image_root(ctx) as root:
        root.umount(ref)


@container.command("export")
@click.argument("ref", metavar="CONTAINER")
@click.option("-o", "--output", default="-", type=click.Path(dir_okay=False, allow_dash=True),
              help="Write the tar to FILE (default: standard output).")
@click.pass_context
@_clean_errors
def container_export(ctx: click.Context, ref: str, output: str) -> None:
    """The container's whole filesystem as a tar ('docker export')."""
    if output == "-" and sys.stdout.isatty():
        raise click.UsageError("refusing to write a tar to a terminal: use -o FILE or a pipe")
    with _image_root(ctx) as root:
        _write_tar(root.export(ref), output, root.root, f"exporting {ref}")


@container.command("diff")
@click.argument("ref", metavar="CONTAINER")
@click.option("--json", "as_json", is_flag=True, help="[{\"Path\": .., \"Kind\": 0|1|2}] as Docker's API.")
@click.pass_context
@_clean_errors
def container_diff(ctx: click.Context, ref: str, as_json: bool) -> None:
    """What the container changed: 'A /path' added, 'C /path' changed, 'D /path' deleted."""
    import json

    with _image_root(ctx) as root:
        changes = root.changes(ref)
    if as_json:
        click.echo(json.dumps([{"Path": c.path, "Kind": int(c.kind)} for c in changes]))
        return
    for change in changes:
        click.echo(str(change))


container.add_command(container_diff, "changes")


@container.command("commit")
@click.argument("ref", metavar="CONTAINER")
@click.argument("new_ref", metavar="[REPOSITORY[:TAG]]", required=False)
@click.option("-m", "--message", default="", help="A comment in the new image's history.")
@click.pass_context
@_clean_errors
def container_commit(ctx: click.Context, ref: str, new_ref: str | None, message: str) -> None:
    """A new image: the container's image plus one layer of its changes; print its id."""
    with _image_root(ctx) as root, _progress() as progress:
        click.echo(root.commit(ref, new_ref, progress, message))


@container.command("rm")
@click.argument("refs", nargs=-1, required=True, metavar="CONTAINER...")
@click.option("-f", "--force", is_flag=True, help="Also when mounted (it is unmounted).")
@click.pass_context
@_clean_errors
def container_rm(ctx: click.Context, refs: tuple[str, ...], force: bool) -> None:
    """Remove containers and their layers."""
    with _image_root(ctx) as root:
        for ref in refs:
            root.remove_container(ref, force)
            click.echo(ref)


# -- real Docker devicemapper roots, offline and read-only -----------------------------------------
_DOCKER_ROOT = click.argument("docker_root", metavar="ROOT", type=click.Path(file_okay=False))


def _docker_root_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    fn = click.option("--metadata", "metadata_path", type=click.Path(dir_okay=False),
                      help="The pool's metadata file or device (default: ROOT's devicemapper/metadata).")(fn)
    fn = click.option("--data", "data_path", type=click.Path(dir_okay=False),
                      help="The pool's data file or device (default: ROOT's devicemapper/data).")(fn)
    return click.option("--driver-name", metavar="NAME",
                        help="Which store when ROOT has several (devicemapper, or a plugin's name).")(fn)


def _open_docker_root(root: str, driver_name: str | None, data: str | None, metadata: str | None) -> Any:
    from .images.dockerroot import DockerRoot

    return DockerRoot(root, driver_name, data, metadata)


@cli.group("docker")
def docker_group() -> None:
    """Docker data roots that used devicemapper, read offline (no daemon, no device-mapper).

    ROOT is a copy of /var/lib/docker (or the real one, Docker stopped). It
    is never written to: the pool metadata is opened read-only and devices
    are mounted read-only without journal replay.
    """


@docker_group.command("ls")
@_DOCKER_ROOT
@_docker_root_options
@click.option("--json", "as_json", is_flag=True)
@_clean_errors
def docker_ls(docker_root: str, driver_name: str | None, data_path: str | None, metadata_path: str | None,
              as_json: bool) -> None:
    """Images (tags, layers), layers and containers (names, thin device ids, sizes, mapped space)."""
    import json

    report = _open_docker_root(docker_root, driver_name, data_path, metadata_path).report()
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=1))
        return

    def dev(d: Any) -> list[str]:
        if d is None:
            return ["-", "-", "-", "no device record"]
        mapped = "-" if d["Mapped"] is None else _human(d["Mapped"])
        return [str(d["DeviceId"]), _human(d["Size"]), mapped, d["Status"]]

    click.echo(f"Docker root {report.root} (storage {report.driver_name}, pool block "
               f"{_human(report.block_size)}, transaction {report.transaction_id})")
    rows = [["IMAGE ID", "REPOSITORY:TAG", "LAYERS", "SIZE", "STATUS"]]
    for i in report.images:
        for tag in i["RepoTags"] or ["<none>"]:
            rows.append([i["Id"].split(":")[1][:12], tag, str(i["Layers"]), _human(i["Size"]), i["Status"]])
    click.echo()
    _table(rows)
    rows = [["LAYER (DIFF ID)", "CACHE ID", "DEVICE", "VIRTUAL", "MAPPED", "STATUS"]]
    for layer in report.layers:
        rows.append([layer["DiffID"].split(":")[1][:12], layer["CacheID"][:12], *dev(layer["Device"])])
    click.echo()
    _table(rows)
    rows = [["CONTAINER ID", "NAME", "IMAGE", "DEVICE", "VIRTUAL", "MAPPED", "STATUS"]]
    for c in report.containers:
        rows.append([c["Id"][:12], c["Name"], c["Image"] or c["ImageID"][7:19], *dev(c.get("Device"))])
    click.echo()
    _table(rows)
    for problem in report.problems:
        click.echo(f"problem: {problem}", err=True)


@docker_group.command("export")
@_DOCKER_ROOT
@click.argument("ref", metavar="CONTAINER|IMAGE")
@_docker_root_options
@click.option("-o", "--output", default="-", type=click.Path(dir_okay=False, allow_dash=True),
              help="Write the tar to FILE (default: standard output).")
@click.option("--reader", type=click.Choice(["auto", "userspace", "kernel"]), default="auto", show_default=True,
              help="How the device's filesystem is read: ext2/3/4 in userspace from its blocks, through a "
                   "read-only kernel mount, or the first when it can (the tar is the same).")
@_clean_errors
def docker_export(docker_root: str, ref: str, driver_name: str | None, data_path: str | None,
                  metadata_path: str | None, output: str, reader: str) -> None:
    """A container's (or an image's) whole filesystem as a tar, like 'docker export'."""
    if output == "-" and sys.stdout.isatty():
        raise click.UsageError("refusing to write a tar to a terminal: use -o FILE or a pipe")
    root = _open_docker_root(docker_root, driver_name, data_path, metadata_path)
    _write_tar(root.export(ref, reader), output, root.root, f"exporting {ref}")


@docker_group.command("mount")
@_DOCKER_ROOT
@click.argument("ref", metavar="CONTAINER|IMAGE")
@click.argument("mountpoint", type=click.Path(file_okay=False))
@_docker_root_options
@click.option("--foreground", is_flag=True, help="Stay in the foreground until MOUNTPOINT is unmounted.")
@click.option("--ready-fd", type=int, hidden=True)
@_clean_errors
def docker_mount(docker_root: str, ref: str, mountpoint: str, driver_name: str | None,
                 data_path: str | None, metadata_path: str | None, foreground: bool,
                 ready_fd: int | None) -> None:
    """Mount a stopped container's (or an image's) filesystem read-only at MOUNTPOINT.

    A small server process keeps it mounted (the thin device as a read-only
    FUSE file on a read-only loop device) until 'thinpool docker umount
    MOUNTPOINT' or a plain 'umount MOUNTPOINT'.
    """
    import subprocess

    from .images.dockerroot import serve_mount

    if foreground or ready_fd is not None:
        def ready(path: str) -> None:
            if ready_fd is not None:
                os.write(ready_fd, f"ok {path}\n".encode())
                os.close(ready_fd)
            else:
                click.echo(path)

        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
        try:
            serve_mount(_open_docker_root(docker_root, driver_name, data_path, metadata_path), ref,
                        mountpoint, ready)
        except ThinpoolError as e:
            if ready_fd is None:
                raise
            with contextlib.suppress(OSError):
                os.write(ready_fd, f"error {e}\n".encode())
            sys.exit(EXIT_FAILURE)
        return
    r, w = os.pipe()
    args = [sys.executable, "-m", "thinpool.cli", "docker", "mount", docker_root, ref, mountpoint,
            "--ready-fd", str(w)]
    for flag, value in (("--driver-name", driver_name), ("--data", data_path), ("--metadata", metadata_path)):
        if value:
            args += [flag, value]
    proc = subprocess.Popen(args, pass_fds=(w,), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        answer = f.read().decode(errors="replace").strip()
    if answer.startswith("ok "):
        click.echo(answer[3:])
        return
    proc.wait()
    raise click.ClickException(answer[6:] if answer.startswith("error ") else
                               f"the mount server exited with status {proc.returncode}")


@docker_group.command("umount")
@click.argument("mountpoint", type=click.Path(file_okay=False))
@_clean_errors
def docker_umount(mountpoint: str) -> None:
    """Unmount what 'thinpool docker mount' mounted and wait until its server is gone."""
    from .images.dockerroot import unmount_served

    unmount_served(mountpoint)


@docker_group.command("migrate")
@_DOCKER_ROOT
@_docker_root_options
@click.option("--to", "to_driver", required=True, metavar="DRIVER",
              help="The new root's graph driver (overlay2, vfs, btrfs, devicemapper).")
@click.option("--dest", required=True, type=click.Path(file_okay=False),
              help="The new data root (missing or empty).")
@click.option("--storage-opt", "storage_opt", multiple=True, metavar="KEY=VALUE",
              help="Option of the new driver (repeatable).")
@click.option("--reader", type=click.Choice(["auto", "userspace", "kernel"]), default="auto", show_default=True,
              help="How the layers' filesystems are read: ext2/3/4 in userspace from their blocks, through "
                   "read-only kernel mounts, or the first when it can (the layers are the same; containers' "
                   "changes are always read through kernel mounts).")
@_clean_errors
def docker_migrate(docker_root: str, driver_name: str | None, data_path: str | None,
                   metadata_path: str | None, to_driver: str, dest: str, storage_opt: tuple[str, ...],
                   reader: str) -> None:
    """Copy every image and container into a new data root on another driver, diff ids unchanged.

    Start dockerd with --data-root DEST --storage-driver DRIVER afterwards:
    nothing needs pulling again.
    """
    from . import graph  # noqa: F401  (registers the built-in drivers)
    from .graph.registry import new_driver, registered

    if to_driver not in registered():
        raise click.UsageError(f"unknown driver {to_driver!r} (known: {', '.join(registered())})")
    root = _open_docker_root(docker_root, driver_name, data_path, metadata_path)
    dest_real = os.path.realpath(dest)
    if dest_real == root.root or dest_real.startswith(root.root + "/") or root.root.startswith(dest_real + "/"):
        raise click.UsageError(f"--dest {dest} overlaps the Docker root {root.root}")
    if os.path.isdir(dest) and os.listdir(dest):
        raise click.UsageError(f"--dest {dest} is not empty")
    with _progress() as progress:
        counts = root.migrate(dest, lambda: new_driver(dest, to_driver, list(storage_opt)), progress,
                              log=lambda line: click.echo(f"migrated {line}", err=True), reader=reader)
    click.echo(f"{counts['images']} images, {counts['layers']} layers, {counts['containers']} containers "
               f"migrated to {dest} ({to_driver})")


@cli.command()
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--force", is_flag=True,
              help="Also unmount what thinpool did not mount; with no server running, clean "
                   "up what a dead server left (its mounts, loop devices, FUSE mount).")
@click.option("--timeout", type=click.FloatRange(min=0), default=60.0, show_default=True,
              help="Seconds to wait for the server to finish.")
@_clean_errors
def stop(directory: str, force: bool, timeout: float) -> None:
    """Stop the pool's server cleanly: unmount, detach, commit, close.

    It refuses while an attached volume is mounted by something other than
    'thinpool mount' (unmount it, or use --force).
    """
    from .server import control
    from .server.daemon import STATE_FILE, control_path, read_state
    from .server.kernel import clean_up_leftovers

    path = control_path(directory)
    try:
        pid = control.request(path, "stop", {"force": force})["pid"]
    except (ConnectionRefusedError, FileNotFoundError):
        state = read_state(directory)
        if not force:
            raise click.ClickException(
                f"no pool server runs for {directory}"
                + (f" (server.json names pid {state['pid']}, which is not serving; 'thinpool "
                   "stop --force' cleans up what it left)" if state else "")) from None
        for line in clean_up_leftovers(directory, state):
            click.echo(line, err=True)
        for name in ("control.sock", "nbd.sock", STATE_FILE):
            try:
                os.unlink(os.path.join(directory, name))
            except FileNotFoundError:
                pass
        return
    _wait_gone(directory, pid, timeout)


def _ensure_server(directory: str) -> None:
    """Start the pool's server in the background (logging to DIR/server.log) unless one runs."""
    import subprocess
    import time

    from .unixsock import connect
    from .server.control import control_path

    path = control_path(directory)
    try:
        connect(path).close()
        return
    except OSError:
        pass
    if not os.path.isfile(os.path.join(directory, "pool.json")):
        raise click.ClickException(f"{directory} is not a thinpool pool directory (no pool.json)")
    log_path = os.path.join(directory, "server.log")
    with open(log_path, "ab") as log_file:
        proc = subprocess.Popen([sys.executable, "-m", "thinpool.cli", "serve", directory],
                                stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file,
                                start_new_session=True, close_fds=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            with open(log_path, "rb") as f:
                tail = f.read()[-2000:].decode(errors="replace").strip().splitlines()
            raise click.ClickException("the pool server did not start: "
                                       + (tail[-1] if tail else f"exit {proc.returncode}"))
        try:
            connect(path).close()
            return
        except OSError:
            time.sleep(0.05)
    raise click.ClickException(f"the pool server did not come up within 30 s (see {log_path})")


def _server_call(directory: str, command: str, args: dict[str, Any]) -> dict[str, Any]:
    from .server import control
    from .server.control import control_path

    _ensure_server(directory)
    return control.request(control_path(directory), command, args)


@cli.command()
@click.argument("directory", type=click.Path(file_okay=False))
@click.argument("dev_id", type=DEV_ID, required=False)
@click.option("--recover", is_flag=True,
              help="After the pool's server died: clean up what it left, start a new one and "
                   "attach and mount again what it had attached and mounted.")
@_clean_errors
def attach(directory: str, dev_id: int | None, recover: bool) -> None:
    """Attach a volume as a kernel block device (/dev/loopN) and print its path.

    Starts the pool's server in the background if none runs.
    """
    if recover:
        _recover(directory)
        if dev_id is None:
            return
    if dev_id is None:
        raise click.UsageError("give a volume id (or --recover)")
    click.echo(_server_call(directory, "attach", {"id": dev_id})["device"])


def _recover(directory: str) -> None:
    from .unixsock import connect
    from .server.daemon import control_path, read_state
    from .server.kernel import clean_up_leftovers

    try:
        connect(control_path(directory)).close()
        raise click.ClickException(f"the server of {directory} is running: nothing to recover")
    except OSError:
        pass
    state = read_state(directory) or {}
    for line in clean_up_leftovers(directory, state):
        click.echo(line, err=True)
    for name in ("control.sock", "server.json"):
        try:
            os.unlink(os.path.join(directory, name))
        except FileNotFoundError:
            pass
    mounts = state.get("mounts", {})
    remounted = {int(m["id"]) for m in mounts.values()}
    for mp, m in mounts.items():
        out = _server_call(directory, "mount", {"id": int(m["id"]), "mountpoint": mp,
                                                "options": m.get("options") or None})
        click.echo(f"mounted volume {m['id']} ({out['device']}) at {mp}")
    for dev in state.get("attached", {}):
        if int(dev) not in remounted:
            click.echo(f"attached volume {dev} as "
                       f"{_server_call(directory, 'attach', {'id': int(dev)})['device']}")


@cli.command()
@click.argument("directory", type=click.Path(file_okay=False))
@click.argument("target")
@_clean_errors
def detach(directory: str, target: str) -> None:
    """Detach an attached volume (by id or by its /dev/loopN); refuses while it is mounted."""
    from .server import control
    from .server.control import control_path

    try:
        control.request(control_path(directory), "detach", {"target": target})
    except (ConnectionRefusedError, FileNotFoundError):
        raise click.ClickException(f"no pool server runs for {directory}: nothing is "
                                   "attached") from None


@cli.command("mount")
@click.argument("directory", type=click.Path(file_okay=False))
@click.argument("dev_id", type=DEV_ID)
@click.argument("mountpoint", type=click.Path(file_okay=False))
@click.option("--mkfs", type=click.Choice(["ext4", "xfs"]),
              help="Make this filesystem first (refused if one is there, unless --force).")
@click.option("--force", is_flag=True, help="With --mkfs: format over an existing filesystem.")
@click.option("-o", "options", help="Mount options, as for mount -o (xfs gets nouuid).")
@_clean_errors
def mount_cmd(directory: str, dev_id: int, mountpoint: str, mkfs: str | None, force: bool,
              options: str | None) -> None:
    """Attach a volume (if needed) and mount its filesystem at MOUNTPOINT."""
    out = _server_call(directory, "mount", {"id": dev_id, "mountpoint": os.path.abspath(mountpoint),
                                            "mkfs": mkfs, "options": options, "force": force})
    click.echo(f"mounted volume {dev_id} ({out['device']}, {out['fstype']}) at {out['mountpoint']}")


@cli.command("umount")
@click.argument("mountpoint", type=click.Path(file_okay=False))
@_clean_errors
def umount_cmd(mountpoint: str) -> None:
    """Unmount a filesystem 'thinpool mount' mounted, and detach its volume."""
    from .server import control
    from .linux.mounts import mountinfo
    from .server.control import control_path
    from .server.kernel import FUSE_DIR

    real = os.path.realpath(mountpoint)
    sources = [e.source for e in mountinfo() if e.mountpoint == real]
    if not sources:
        raise click.ClickException(f"{mountpoint} is not a mount point")
    from .linux import loop

    backing = loop.backing_file(sources[-1]) if sources[-1].startswith("/dev/loop") else None
    fuse_dir = os.path.dirname(backing) if backing else ""
    if os.path.basename(fuse_dir) != FUSE_DIR:
        raise click.ClickException(f"{mountpoint} is not a thinpool volume")
    control.request(control_path(os.path.dirname(fuse_dir)), "umount", {"mountpoint": real})


# -- Docker graphdriver plugin ----------------------------------------------------------------------
DEFAULT_PLUGIN_SOCKET = "/run/docker/plugins/thinpool.sock"
DEFAULT_PLUGIN_DRIVER = "devicemapper"


def _key_value(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> list[str]:
    for value in values:
        key, sep, _ = value.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"{value!r} is not KEY=VALUE", param=param)
    return list(values)


@cli.command("docker-plugin")
@click.option("--socket", "socket_path", type=click.Path(dir_okay=False),
              default=DEFAULT_PLUGIN_SOCKET, show_default=True,
              help="Unix socket to serve (mode 0600). dockerd finds /run/docker/plugins/NAME.sock "
                   "as --storage-driver NAME.")
@click.option("--driver", default=DEFAULT_PLUGIN_DRIVER, show_default=True,
              help="Graph driver behind the plugin: devicemapper (on a thinpool pool), overlay2, "
                   "btrfs or vfs.")
@click.option("--storage-opt", "storage_opts", multiple=True, metavar="KEY=VALUE",
              callback=_key_value,
              help="Driver option (repeatable), before those dockerd's own --storage-opt sends.")
@click.option("--state", "state_path", type=click.Path(dir_okay=False),
              help="Where the plugin remembers dockerd's Init across restarts "
                   "(default: SOCKET.state.json).")
@click.option("-v", "--verbose", is_flag=True, help="Log every call on stderr.")
@_clean_errors
def docker_plugin(socket_path: str, driver: str, storage_opts: list[str],
                  state_path: str | None, verbose: bool) -> None:
    """Serve Docker's graphdriver plugin protocol, backed by a thinpool graph driver.

    Start it before 'dockerd --experimental --storage-driver thinpool' (the
    socket's name is the driver's name). Layers are stored under the Home
    dockerd sends (<data-root>/thinpool/<driver>). Stop it with SIGTERM or
    Ctrl-C: the socket is removed, mounts stay for running containers, and
    a restarted plugin re-opens the same driver.
    """
    from . import graph  # noqa: F401  (registers the built-in drivers)
    from .graph.driver import GraphDriver
    from .graph.registry import new_driver, registered
    from .plugin.api import GraphPlugin
    from .plugin.server import PluginServer

    known = registered()
    if driver not in known:
        raise click.UsageError(f"unknown graph driver {driver!r} (this build has: "
                               f"{', '.join(known)})")
    if verbose:
        logging.getLogger("thinpool.plugin").setLevel(logging.INFO)

    def opener(root: str, name: str, opts: list[str]) -> GraphDriver:
        return new_driver(root, name, storage_opts + opts)

    socket_path = os.path.abspath(socket_path)
    plugin = GraphPlugin(driver, opener, os.path.abspath(state_path or socket_path + ".state.json"))
    note = plugin.restore()
    if note:
        click.echo(f"thinpool docker-plugin: {note}", err=True)
    server = PluginServer(plugin, socket_path)
    server.start()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: server.request_stop())
    click.echo(f"thinpool docker-plugin: serving {socket_path} (driver {driver}); "
               f"pid {os.getpid()}", err=True)
    try:
        server.serve_forever()
    finally:
        server.stop()


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


# -- containerd snapshotter (proxy plugin) --------------------------------------------------------
@cli.group()
def snapshotter() -> None:
    """containerd's snapshot service over gRPC, for a proxy snapshotter plugin."""


@snapshotter.command("serve")
@click.option("--socket", "socket_path", required=True, type=click.Path(dir_okay=False),
              help="Unix socket to listen on (created mode 0600).")
@click.option("--root", required=True, type=click.Path(file_okay=False),
              help="Directory for the records and the storage (created if missing).")
@click.option("--driver", type=click.Choice(["devicemapper", "overlay2", "vfs"]),
              default="devicemapper", show_default=True, help="Where snapshots live.")
@click.option("--storage-opt", "storage_opts", multiple=True, metavar="KEY=VALUE",
              help="A backend option (repeatable), e.g. dm.basesize=20G.")
@click.option("-v", "--verbose", is_flag=True, help="Log every failed call and recovery step.")
@_clean_errors
def snapshotter_serve(socket_path: str, root: str, driver: str, storage_opts: tuple[str, ...],
                      verbose: bool) -> None:
    """Serve containerd.services.snapshots.v1.Snapshots on SOCKET until SIGTERM/SIGINT.

    A crash is finished on the next start: half-made snapshots are removed,
    interrupted removals completed.
    """
    from .snapshotter.daemon import parse_options, run

    logging.getLogger("thinpool.snapshotter").setLevel(logging.INFO if verbose else
                                                        logging.WARNING)
    run(root, socket_path, driver, parse_options(storage_opts),
        lambda path: click.echo(f"thinpool snapshotter ({driver}) serving {root} on {path}; "
                                f"pid {os.getpid()}", err=True))


@snapshotter.command("check")
@click.option("--root", required=True, type=click.Path(file_okay=False, exists=True),
              help="The snapshotter's root (it must not be serving).")
@click.option("--repair", is_flag=True,
              help="Finish interrupted changes and remove storage no record names.")
@click.option("--json", "as_json", is_flag=True)
@_clean_errors
def snapshotter_check(root: str, repair: bool, as_json: bool) -> None:
    """Check a stopped snapshotter's records against its storage (exit 1 while problems remain).

    Interrupted creations and removals, records and pool transaction ids,
    snapshots without storage, storage no snapshot names, the base device,
    and (devicemapper) the pool's metadata itself.
    """
    from .snapshotter.check import check

    _report_findings(check(root, repair=repair), as_json)


if __name__ == "__main__":  # pragma: no cover
    main()
