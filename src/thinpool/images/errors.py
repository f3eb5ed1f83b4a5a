"""Errors of the image and container layer (each a one-line ``ThinpoolError``)."""

from __future__ import annotations

from ..errors import ThinpoolError


class ImageError(ThinpoolError):
    """An image, layer or container operation failed (bad archive, digest mismatch, ...)."""


class NotFound(ImageError):
    """No image, layer or container by that name."""


class Conflict(ImageError):
    """The operation would break something that uses the object (an image a container runs on...)."""


class DigestMismatch(ImageError):
    """Content whose sha256 is not the one its manifest or config promised."""


def note_or_raise(error: ImageError, problems: list[str] | None) -> None:
    """For listings that may skip unreadable records: raise ``error`` when the caller
    keeps no ``problems`` list, else note its line there once."""
    if problems is None:
        raise error
    if str(error) not in problems:
        problems.append(str(error))
