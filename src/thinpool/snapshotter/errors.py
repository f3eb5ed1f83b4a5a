"""The snapshotter's errors, one class per gRPC status code containerd understands.

containerd turns a gRPC status back into its own error classes by code
(``errdefs.FromGRPC``): NotFound, AlreadyExists, FailedPrecondition and
InvalidArgument drive its logic (an unpack that finds its layer already
committed, a garbage collector that skips a busy snapshot).  Every class is a
``ThinpoolError``: one clear line.
"""

from __future__ import annotations

from ..errors import ThinpoolError


class SnapshotterError(ThinpoolError):
    """Base class; ``code`` is the name of the gRPC status code it is sent as."""

    code = "UNKNOWN"


class NotFound(SnapshotterError):
    code = "NOT_FOUND"


class AlreadyExists(SnapshotterError):
    code = "ALREADY_EXISTS"


class FailedPrecondition(SnapshotterError):
    code = "FAILED_PRECONDITION"


class InvalidArgument(SnapshotterError):
    code = "INVALID_ARGUMENT"


class ResourceExhausted(SnapshotterError):
    """The pool (or the root's filesystem) has no room for the request."""

    code = "RESOURCE_EXHAUSTED"


class Unavailable(SnapshotterError):
    """A part the snapshotter depends on (the pool server) cannot be reached."""

    code = "UNAVAILABLE"
