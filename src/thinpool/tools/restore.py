"""thin_restore: build metadata from thin_dump XML."""

from __future__ import annotations

import os
from typing import BinaryIO

from ..thin.builder import MetadataBuilder
from ..thin.xml import read_xml


def restore(xml: str | os.PathLike[str] | BinaryIO, metadata_path: str | os.PathLike[str]) -> None:
    """Parse ``xml`` and write fresh metadata to the existing file or device."""
    builder = MetadataBuilder(metadata_path)
    try:
        read_xml(xml, builder)
    finally:
        builder.close()
