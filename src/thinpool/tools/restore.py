"""thin_restore: build metadata from thin_dump XML."""

from __future__ import annotations

import os

from ..outputs import refuse_same_file
from ..thin.builder import MetadataBuilder
from ..thin.xml import read_xml


def restore(xml: str | os.PathLike[str], metadata_path: str | os.PathLike[str]) -> None:
    """Parse ``xml`` and write fresh metadata to the existing file or device.

    The output is touched only after a complete dry run of the same build
    (the XML parsed and validated, the trees built without writing) has
    succeeded, so a missing, malformed or oversized input leaves it as it was.
    """
    refuse_same_file(metadata_path, [xml])
    for dry_run in (True, False):
        builder = MetadataBuilder(metadata_path, dry_run=dry_run)
        try:
            read_xml(xml, builder)
        finally:
            builder.close()
