"""Docker layer tars in and out of directory trees: the archive layer under every graph driver.

* ``open_layer_stream(fileobj)``: plain / gzip / zstd / bzip2 / xz detection.
* ``apply_layer(root, stream, whiteouts="delete"|"overlay")``: Docker's
  ApplyDiff / UnpackLayer, confined to ``root``; returns the tar's size sum.
* ``changes(new_root, old_root)``: Docker's ChangesDirs; ``changes_size``:
  ChangesSize.
* ``export_changes(root, changes)``, ``export_tree(root)``,
  ``export_overlay(upper)``: layer tars (Docker's Diff, naive and overlay2).
* ``TarWriter`` and ``Entry``: the tar entries of files described by any
  walker (the directory-fd walkers above, or a reader of a filesystem image).

Errors are ``ArchiveError`` (``UnsafeArchiveError`` for entries that try to
leave the root). This package imports nothing from the pool, thin or pdata
layers.
"""

from .apply import OPAQUE_XATTR, apply_layer
from .changes import Change, ChangeKind, changes, changes_size
from .compression import open_layer_stream
from .errors import ArchiveError, UnsafeArchiveError
from .export import Entry, TarWriter, export_changes, export_overlay, export_tree

__all__ = [
    "ArchiveError", "Change", "ChangeKind", "Entry", "OPAQUE_XATTR", "UnsafeArchiveError", "apply_layer", "changes",
    "changes_size", "export_changes", "export_overlay", "export_tree", "open_layer_stream", "TarWriter",
]
