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


@main.command("ls")
@click.argument("metadata", type=click.Path(dir_okay=False))
@click.option("-m", "--metadata-snap", "snapshot", is_flag=True)
@click.option("--no-headers", is_flag=True)
@click.option("-o", "--format", "fields", help="Comma-separated fields (thin_ls names).")
@_clean_errors
def ls_cmd(metadata: str, snapshot: bool, no_headers: bool, fields: str | None) -> None:
    """List devices with mapped, exclusive and shared blocks (like thin_ls)."""
    from .tools.ls import DEFAULT_FIELDS, format_ls, list_devices

    rows = list_devices(metadata, snapshot=snapshot)
    chosen = [f.strip().upper() for f in fields.split(",")] if fields else list(DEFAULT_FIELDS)
    from .thin.reader import MetadataReader

    with MetadataReader(metadata, snapshot=snapshot) as reader:
        block_size = reader.live.data_block_size
    click.echo(format_ls(rows, chosen, headers=not no_headers, data_block_size=block_size), nl=False)


@main.command()
@click.argument("metadata", type=click.Path(dir_okay=False))
@click.option("--snap1", "--thin1", "snap1", required=True, type=int)
@click.option("--snap2", "--thin2", "snap2", required=True, type=int)
@click.option("-m", "--metadata-snap", "snapshot", is_flag=True)
@click.option("--verbose", is_flag=True, help="Show data blocks of every range.")
@_clean_errors
def delta(metadata: str, snap1: int, snap2: int, snapshot: bool, verbose: bool) -> None:
    """Show how two devices' mappings differ (like thin_delta)."""
    from .tools.delta import delta as run_delta

    click.echo(run_delta(metadata, snap1, snap2, snapshot=snapshot, verbose=verbose), nl=False)


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
