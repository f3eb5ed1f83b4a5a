"""containerd's ``containerd.services.snapshots.v1.Snapshots`` gRPC service over ``Snapshotter``.

``serve(snapshotter, socket_path)`` listens on a unix socket created with
mode 0600 (containerd connects as root).  Each call runs on a worker thread;
errors become gRPC statuses: the ``SnapshotterError`` classes by their code,
a pool out of space as ``RESOURCE_EXHAUSTED``, any other thinpool or system
error as ``UNKNOWN`` with its one-line message, and a bug as ``INTERNAL``
(logged with its traceback) - the server keeps serving in every case.
``List`` streams batches of ``LIST_BATCH`` snapshots; a client that goes
away mid-stream just ends the stream.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import stat
from concurrent import futures
from typing import Any, Callable, Iterator, TypeVar

import grpc
from google.protobuf import empty_pb2, timestamp_pb2

from ..errors import ThinpoolError
from .backend import Mount
from .core import Info, Snapshotter
from .errors import InvalidArgument, SnapshotterError
from .proto import mount_pb2
from .proto import snapshots_pb2 as pb
from .proto import snapshots_pb2_grpc as pb_grpc

log = logging.getLogger("thinpool.snapshotter")

LIST_BATCH = 100
WORKERS = 16
T = TypeVar("T")


class SocketError(ThinpoolError):
    """The socket path cannot be served."""


def _ts(ns: int) -> timestamp_pb2.Timestamp:
    return timestamp_pb2.Timestamp(seconds=ns // 1_000_000_000, nanos=ns % 1_000_000_000)


def _ns(ts: timestamp_pb2.Timestamp) -> int:
    return ts.seconds * 1_000_000_000 + ts.nanos


def _mounts(mounts: list[Mount]) -> list[mount_pb2.Mount]:
    return [mount_pb2.Mount(type=m.type, source=m.source, options=list(m.options))
            for m in mounts]


def _info(info: Info) -> pb.Info:
    return pb.Info(name=info.name, parent=info.parent, kind=pb.Kind.Name(info.kind),
                   created_at=_ts(info.created), updated_at=_ts(info.updated),
                   labels=info.labels)


def _code(e: BaseException) -> grpc.StatusCode:
    if isinstance(e, SnapshotterError):
        return getattr(grpc.StatusCode, e.code)
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    return grpc.StatusCode.UNKNOWN


def _message(e: BaseException) -> str:
    if isinstance(e, ThinpoolError):
        return str(e)
    assert isinstance(e, OSError)
    return f"{e.strerror or e}" + (f": {e.filename}" if e.filename else "")


class Servicer(pb_grpc.SnapshotsServicer):
    """The gRPC methods, each a thin translation to ``Snapshotter``."""

    def __init__(self, snapshotter: Snapshotter) -> None:
        self.sn = snapshotter

    def _call(self, context: grpc.ServicerContext, name: str, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except (ThinpoolError, OSError) as e:
            log.info("%s: %s", name, _message(e))
            context.abort(_code(e), _message(e))
        except Exception as e:  # noqa: BLE001 - a bug must not take the server down
            log.exception("%s failed", name)
            context.abort(grpc.StatusCode.INTERNAL, f"internal error in the snapshotter: {e!r}")
        raise AssertionError("unreachable")  # context.abort raises

    def Prepare(self, request: pb.PrepareSnapshotRequest, context: Any
                ) -> pb.PrepareSnapshotResponse:
        mounts = self._call(context, "Prepare", lambda: self.sn.prepare(
            request.key, request.parent, dict(request.labels)))
        return pb.PrepareSnapshotResponse(mounts=_mounts(mounts))

    def View(self, request: pb.ViewSnapshotRequest, context: Any) -> pb.ViewSnapshotResponse:
        mounts = self._call(context, "View", lambda: self.sn.view(
            request.key, request.parent, dict(request.labels)))
        return pb.ViewSnapshotResponse(mounts=_mounts(mounts))

    def Mounts(self, request: pb.MountsRequest, context: Any) -> pb.MountsResponse:
        mounts = self._call(context, "Mounts", lambda: self.sn.mounts(request.key))
        return pb.MountsResponse(mounts=_mounts(mounts))

    def Commit(self, request: pb.CommitSnapshotRequest, context: Any) -> empty_pb2.Empty:
        self._call(context, "Commit", lambda: self.sn.commit(
            request.name, request.key, dict(request.labels)))
        return empty_pb2.Empty()

    def Remove(self, request: pb.RemoveSnapshotRequest, context: Any) -> empty_pb2.Empty:
        self._call(context, "Remove", lambda: self.sn.remove(request.key))
        return empty_pb2.Empty()

    def Stat(self, request: pb.StatSnapshotRequest, context: Any) -> pb.StatSnapshotResponse:
        info = self._call(context, "Stat", lambda: self.sn.stat(request.key))
        return pb.StatSnapshotResponse(info=_info(info))

    def Update(self, request: pb.UpdateSnapshotRequest, context: Any
               ) -> pb.UpdateSnapshotResponse:
        i = request.info
        info = Info(i.name, i.parent, i.kind, _ns(i.created_at), _ns(i.updated_at),
                    dict(i.labels))
        paths = list(request.update_mask.paths) if request.HasField("update_mask") else []
        updated = self._call(context, "Update", lambda: self.sn.update(info, paths))
        return pb.UpdateSnapshotResponse(info=_info(updated))

    def List(self, request: pb.ListSnapshotsRequest, context: Any
             ) -> Iterator[pb.ListSnapshotsResponse]:
        infos = self._call(context, "List", lambda: self.sn.list_snapshots(list(request.filters)))
        for i in range(0, len(infos), LIST_BATCH):
            if not context.is_active():
                log.info("List: the client went away after %d snapshots", i)
                return
            yield pb.ListSnapshotsResponse(info=[_info(x) for x in infos[i:i + LIST_BATCH]])

    def Usage(self, request: pb.UsageRequest, context: Any) -> pb.UsageResponse:
        usage = self._call(context, "Usage", lambda: self.sn.usage(request.key))
        return pb.UsageResponse(size=usage.size, inodes=usage.inodes)

    def Cleanup(self, request: pb.CleanupRequest, context: Any) -> empty_pb2.Empty:
        self._call(context, "Cleanup", self.sn.cleanup)
        return empty_pb2.Empty()


def _claim_socket(path: str) -> None:
    """Remove a stale socket file at ``path``; refuse a live one or a non-socket."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise SocketError(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        os.unlink(path)  # nobody listens: a dead server's socket
        return
    finally:
        probe.close()
    raise SocketError(f"another server is listening on {path}")


def serve(snapshotter: Snapshotter, socket_path: str) -> grpc.Server:
    """Start serving on ``socket_path`` (mode 0600); the running server."""
    socket_path = os.path.abspath(socket_path)
    if len(socket_path.encode()) > 107:
        raise InvalidArgument(f"socket path {socket_path} is longer than a unix socket address "
                              "allows (107 bytes)")
    os.makedirs(os.path.dirname(socket_path), mode=0o711, exist_ok=True)
    _claim_socket(socket_path)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=WORKERS,
                                                    thread_name_prefix="snapshots"))
    pb_grpc.add_SnapshotsServicer_to_server(Servicer(snapshotter), server)
    old = os.umask(0o177)  # the socket is born 0600
    try:
        bound = server.add_insecure_port(f"unix:{socket_path}")
    finally:
        os.umask(old)
    if not bound:
        raise SocketError(f"cannot listen on {socket_path}")
    os.chmod(socket_path, 0o600)
    server.start()
    return server
