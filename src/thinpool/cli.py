"""Command-line interface: the only module that reads argv or prints.

Every ThinpoolError (and OSError) becomes one line on stderr and exit code 1;
no traceback reaches the user.
"""

from __future__ import annotations

import functools
import sys
from typing import Any, Callable

import click

from .errors import ThinpoolError


def _clean_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ThinpoolError as e:
            raise click.ClickException(str(e)) from None
        except OSError as e:
            where = f" ({e.filename})" if e.filename else ""
            raise click.ClickException(f"{e.strerror or e}{where}") from None
        except MemoryError:
            raise click.ClickException("out of memory") from None
    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="thinpool")
def main() -> None:
    """thinpool: userspace thin provisioning, compatible with Linux dm-thin."""


@main.command()
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


@main.command()
@click.argument("metadata", type=click.Path(dir_okay=False))
@click.option("-m", "--metadata-snap", "snapshot", is_flag=True,
              help="Dump the held metadata snapshot.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Write XML to FILE.")
@click.option("--dev-id", type=int, help="Dump only this device.")
@_clean_errors
def dump(metadata: str, snapshot: bool, output: str | None, dev_id: int | None) -> None:
    """Print metadata as thin_dump XML."""
    from .tools.dump import dump as run_dump

    if output is None:
        run_dump(metadata, sys.stdout, snapshot=snapshot, dev_id=dev_id)
        sys.stdout.flush()
    else:
        with open(output, "w", encoding="ascii") as out:
            run_dump(metadata, out, snapshot=snapshot, dev_id=dev_id)


@main.command()
@click.option("-i", "--input", "xml", required=True, type=click.Path(dir_okay=False),
              help="thin_dump XML to restore.")
@click.option("-o", "--output", "metadata", required=True, type=click.Path(dir_okay=False),
              help="Existing metadata file or device to overwrite.")
@_clean_errors
def restore(xml: str, metadata: str) -> None:
    """Write fresh metadata from thin_dump XML (like thin_restore)."""
    from .tools.restore import restore as run_restore

    run_restore(xml, metadata)


@main.command()
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


@main.command("ls")
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


@main.command()
@click.argument("metadata", type=click.Path(dir_okay=False))
@click.option("--snap1", "--thin1", "snap1", required=True, type=int)
@click.option("--snap2", "--thin2", "snap2", required=True, type=int)
@click.option("-m", "--metadata-snap", "snapshot", is_flag=True)
@click.option("--verbose", is_flag=True, help="Show data blocks of every range.")
@_clean_errors
def delta(metadata: str, snap1: int, snap2: int, snapshot: bool, verbose: bool) -> None:
    """Show how two devices' mappings differ (like thin_delta)."""
    from .tools.delta import write_delta

    write_delta(metadata, snap1, snap2, sys.stdout, snapshot=snapshot, verbose=verbose)
    sys.stdout.flush()


# -- pools ---------------------------------------------------------------------------------------
def _size(ctx: click.Context, param: click.Parameter, value: str | None) -> int | None:
    from .pool.config import parse_size

    if value is None:
        return None
    try:
        return parse_size(value)
    except ThinpoolError as e:
        raise click.BadParameter(str(e)) from None


def _open_pool(directory: str, read_only: bool = False):
    from .pool.engine import Pool

    return Pool(directory, read_only=read_only)


@main.group()
def pool() -> None:
    """Create and resize pools."""


@pool.command("create")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--data-size", default="100G", show_default=True, callback=_size)
@click.option("--metadata-size", default="2G", show_default=True, callback=_size)
@click.option("--block-size", default="64K", show_default=True, callback=_size,
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
@click.option("--data-dev", type=click.Path(dir_okay=False), help="Use this file/device for data.")
@click.option("--metadata-dev", type=click.Path(dir_okay=False),
              help="Use this file/device for metadata.")
@click.option("--table", help='Kernel table line, e.g. "0 20971520 thin-pool META DATA 128 0 1 '
                              'skip_block_zeroing".')
@_clean_errors
def pool_create(directory: str, data_size: int, metadata_size: int, block_size: int,
                low_water_mark: int, low_water_hook: str | None, no_space_timeout: float,
                skip_block_zeroing: bool, ignore_discard: bool, no_discard_passdown: bool,
                error_if_no_space: bool, read_only: bool, data_dev: str | None,
                metadata_dev: str | None, table: str | None) -> None:
    """Create a pool in DIRECTORY (sparse DIR/data and DIR/metadata by default)."""
    import os

    from .pool.config import PoolConfig, parse_table, validate_block_sectors
    from .pool.engine import Pool

    if table is not None:
        parsed = parse_table(table)
        config = parsed.config
        data_size = parsed.length_sectors * 512
        for path, size in ((parsed.data_dev, data_size), (parsed.metadata_dev, metadata_size)):
            if not os.path.exists(path):
                with open(path, "xb") as f:
                    f.truncate(size)
        data_dev, metadata_dev = parsed.data_dev, parsed.metadata_dev
    else:
        if block_size % 512:
            raise click.BadParameter("block size must be a multiple of 64K", param_hint="--block-size")
        config = PoolConfig(data_block_sectors=validate_block_sectors(block_size // 512),
                            low_water_mark=low_water_mark, skip_block_zeroing=skip_block_zeroing,
                            ignore_discard=ignore_discard, no_discard_passdown=no_discard_passdown,
                            read_only=read_only, error_if_no_space=error_if_no_space)
    config.no_space_timeout = no_space_timeout
    config.low_water_hook = low_water_hook
    Pool.create(directory, data_size, metadata_size, config, data_dev=data_dev,
                metadata_dev=metadata_dev)
    with _open_pool(directory, read_only=True) as p:
        st = p.status()
    click.echo(f"created pool {directory}: {st.total_data} data blocks of "
               f"{config.block_size // 1024} KiB, {st.total_metadata} metadata blocks")


@pool.command("resize")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--data-size", callback=_size)
@click.option("--metadata-size", callback=_size)
@_clean_errors
def pool_resize(directory: str, data_size: int | None, metadata_size: int | None) -> None:
    """Grow the data and/or metadata device (never shrinks)."""
    if data_size is None and metadata_size is None:
        raise click.UsageError("give --data-size and/or --metadata-size")
    with _open_pool(directory) as p:
        p.resize(data_size=data_size, metadata_size=metadata_size)
        click.echo(p.status().line())


@main.command()
@click.argument("directory", type=click.Path(file_okay=False))
@click.argument("text")
@_clean_errors
def message(directory: str, text: str) -> None:
    """Send a kernel pool message, e.g. "create_thin 0" or "create_snap 1 0"."""
    with _open_pool(directory) as p:
        p.message(text)


@main.command("create-thin")
@click.argument("directory", type=click.Path(file_okay=False))
@click.argument("dev_id", type=int)
@click.option("--size", callback=_size, help="Virtual size (default: the pool's data size).")
@click.option("--name")
@click.option("--origin", type=click.Path(exists=True, dir_okay=False),
              help="Read-only external origin (e.g. a raw base image).")
@_clean_errors
def create_thin(directory: str, dev_id: int, size: int | None, name: str | None,
                origin: str | None) -> None:
    """Create a thin volume."""
    with _open_pool(directory) as p:
        p.create_thin(dev_id, size=size, name=name, origin=origin)


@main.command("create-snap")
@click.argument("directory", type=click.Path(file_okay=False))
@click.argument("dev_id", type=int)
@click.argument("origin_id", type=int)
@click.option("--name")
@_clean_errors
def create_snap(directory: str, dev_id: int, origin_id: int, name: str | None) -> None:
    """Snapshot volume ORIGIN_ID as DEV_ID."""
    with _open_pool(directory) as p:
        p.create_snap(dev_id, origin_id, name=name)


@main.command("delete")
@click.argument("directory", type=click.Path(file_okay=False))
@click.argument("dev_id", type=int)
@_clean_errors
def delete_cmd(directory: str, dev_id: int) -> None:
    """Delete a thin volume and release its blocks."""
    with _open_pool(directory) as p:
        p.delete(dev_id)


@main.command("list")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True)
@_clean_errors
def list_cmd(directory: str, as_json: bool) -> None:
    """List volumes: id, size, mapped, origin, creation time."""
    import dataclasses
    import json

    with _open_pool(directory, read_only=True) as p:
        vols = p.list_volumes()
        bs = p.block_size
    if as_json:
        click.echo(json.dumps([dataclasses.asdict(v) for v in vols], indent=1))
        return
    click.echo(f"{'ID':>8} {'SIZE':>14} {'MAPPED':>14} {'CTIME':>6} {'STIME':>6}  NAME / ORIGIN")
    for v in vols:
        extra = " ".join(x for x in (v.name or "", f"origin={v.origin}" if v.origin else "") if x)
        click.echo(f"{v.dev_id:>8} {v.size:>14} {v.mapped_blocks * bs:>14} {v.creation_time:>6} "
                   f"{v.snapshotted_time:>6}  {extra}")


@main.command()
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--thin", "dev_id", type=int, help="Status of one thin volume instead of the pool.")
@click.option("--json", "as_json", is_flag=True)
@_clean_errors
def status(directory: str, dev_id: int | None, as_json: bool) -> None:
    """Kernel-style status line of the pool or of one thin volume."""
    import dataclasses
    import json

    from .pool.locks import PoolBusyError

    try:
        p = _open_pool(directory)
    except PoolBusyError:
        p = _open_pool(directory, read_only=True)
    with p:
        st = p.status() if dev_id is None else p.thin_status(dev_id)
    click.echo(json.dumps(dataclasses.asdict(st)) if as_json else st.line())


@main.command()
@click.argument("directory", type=click.Path(file_okay=False))
@click.argument("dev_id", type=int)
@click.option("--offset", type=click.IntRange(min=0), default=0)
@click.argument("source", type=click.File("rb"), default="-")
@_clean_errors
def write(directory: str, dev_id: int, offset: int, source) -> None:
    """Write SOURCE (a file or - for stdin) into a volume at --offset."""
    with _open_pool(directory) as p, p.volume(dev_id) as vol:
        pos = offset
        while True:
            chunk = source.read(1 << 20)
            if not chunk:
                break
            vol.write(pos, chunk)
            pos += len(chunk)
        vol.flush()


@main.command()
@click.argument("directory", type=click.Path(file_okay=False))
@click.argument("dev_id", type=int)
@click.option("--offset", type=click.IntRange(min=0), default=0)
@click.option("--length", type=click.IntRange(min=0), help="Bytes to read (default: to the end).")
@click.option("-o", "--output", type=click.File("wb"), default="-")
@_clean_errors
def read(directory: str, dev_id: int, offset: int, length: int | None, output) -> None:
    """Read bytes from a volume."""
    from .pool.locks import PoolBusyError

    try:
        p = _open_pool(directory)
    except PoolBusyError:
        p = _open_pool(directory, read_only=True)
    with p, p.volume(dev_id) as vol:
        end = vol.size if length is None else offset + length
        pos = offset
        while pos < end:
            n = min(1 << 20, end - pos)
            output.write(vol.read(pos, n))
            pos += n
        output.flush()


@main.command()
@click.argument("directory", type=click.Path(file_okay=False))
@click.argument("dev_id", type=int)
@click.option("--offset", type=click.IntRange(min=0), required=True)
@click.option("--length", type=click.IntRange(min=0), required=True)
@_clean_errors
def discard(directory: str, dev_id: int, offset: int, length: int) -> None:
    """Unmap the whole blocks inside a byte range."""
    with _open_pool(directory) as p, p.volume(dev_id) as vol:
        vol.discard(offset, length)
        vol.flush()


@main.command("export-image")
@click.argument("directory", type=click.Path(file_okay=False))
@click.argument("dev_id", type=int)
@click.argument("path", type=click.Path(dir_okay=False))
@_clean_errors
def export_image_cmd(directory: str, dev_id: int, path: str) -> None:
    """Copy a volume into a sparse raw image file."""
    from .pool.images import export_image

    with _open_pool(directory) as p:
        n = export_image(p, dev_id, path)
    click.echo(f"exported volume {dev_id} to {path} ({n} bytes of data)")


@main.command("import-image")
@click.argument("directory", type=click.Path(file_okay=False))
@click.argument("dev_id", type=int)
@click.argument("path", type=click.Path(exists=True, dir_okay=False))
@_clean_errors
def import_image_cmd(directory: str, dev_id: int, path: str) -> None:
    """Copy a raw image file into a volume (holes and zero blocks stay unprovisioned)."""
    from .pool.images import import_image

    with _open_pool(directory) as p:
        n = import_image(p, dev_id, path)
    click.echo(f"imported {path} into volume {dev_id} ({n} bytes of data)")


@main.command()
@click.option("--dir", "workdir", type=click.Path(file_okay=False),
              help="Where to create the demo files (default: a temporary directory).")
@_clean_errors
def demo(workdir: str | None) -> None:
    """Walk through dm-thin metadata: devices, snapshots, check and dump."""
    from .demo import run_demo

    run_demo(workdir, click.echo)


if __name__ == "__main__":  # pragma: no cover
    main()
