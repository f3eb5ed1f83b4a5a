"""Docker's graphdriver plugin API on top of a thinpool ``GraphDriver``, without sockets.

``GraphPlugin.handle(http_method, target, body)`` serves one call:
``target`` is ``/<Method>[?query]`` and ``body`` any object with
``read(n)`` (the request body, already de-chunked); the answer is a
``JSONReply`` or, for ``GraphDriver.Diff``, a ``StreamReply`` whose chunks
are the tar.  The socket adapter (``thinpool.plugin.server``) supplies the
bytes; tests can call ``handle`` directly.

What dockerd expects, and gets:

* Every JSON call answers HTTP 200; a failure is ``{"Err": "one line"}``
  (dockerd shows it to the user as it is).  ``GraphDriver.Diff`` is read by
  dockerd as a raw tar when the status is 200, so its failures answer 500
  with the same ``{"Err": ...}`` body; an unknown method answers 404 (for
  ``Capabilities`` that means "no capabilities" to dockerd), a method other
  than POST 405, a JSON body over ``MAX_JSON_BYTES`` 413.
* ``Plugin.Activate`` -> ``{"Implements": ["GraphDriver"]}``;
  ``GraphDriver.Init`` opens the driver under the ``Home`` dockerd sends
  (the driver's own directory is ``Home/<driver name>``) with ``Opts`` as
  its storage options; user-namespace maps are refused.
* The plugin remembers ``Home``, ``Opts`` and its driver's name in
  ``state_path`` (JSON, written atomically, mode 0600) and re-opens the
  driver from it when it starts again (``restore``), because dockerd never
  repeats ``Init`` to a restarted plugin.  ``Cleanup`` (dockerd shutting down) runs the driver's
  cleanup (everything unmounted) and closes it; a later call re-opens it
  from the remembered state.
* ``ApplyDiff`` streams the body into ``driver.apply_diff`` (never
  buffered whole) and then reads what the tar reader left (the zero padding
  after the end-of-archive marker).  When it fails (a hostile or corrupt
  tar, a client that went away, a body that breaks HTTP framing) the layer
  is removed at once, so no half-applied layer is left; dockerd's own
  ``Remove`` that follows succeeds, as the driver's remove is idempotent.
* ``Capabilities`` is the driver's own (``ReproducesExactDiffs`` only when
  its diff gives back the applied tar byte for byte).  ``Status`` is the
  driver's pairs followed by ``("Thinpool Driver", <its name>)``.
* Ids (and parents) are checked with the driver contract's ``check_id``
  (one plain path component) before the driver sees them.  JSON field
  names match case-insensitively, as Go's decoder does.

Concurrency: calls may come from several threads; the driver is shared
(drivers serialize what they need), and opening, re-opening or closing it
happens under one lock.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Protocol
from urllib.parse import parse_qs, urlsplit

from ..errors import ThinpoolError
from ..graph.driver import CreateOpts, GraphDriver, check_id

log = logging.getLogger("thinpool.plugin")

MAX_JSON_BYTES = 1 << 20
JSON_TYPE = "application/vnd.docker.plugins.v1+json"
TAR_TYPE = "application/x-tar"
STATE_VERSION = 1

DriverOpener = Callable[[str, str, list[str]], GraphDriver]
"""(root, driver name, storage options) -> an open driver whose home is ``root/<name>``
(``thinpool.graph.registry.new_driver``)."""


class PluginError(ThinpoolError):
    """A plugin call that cannot be served (bad request, no driver yet...)."""


class BodyReader(Protocol):
    def read(self, n: int = -1, /) -> bytes: ...


@dataclass
class JSONReply:
    """An answer with a JSON body."""

    body: dict[str, Any]
    status: int = 200


@dataclass
class StreamReply:
    """An answer whose body is streamed in chunks (the Diff tar)."""

    chunks: Iterator[bytes]
    content_type: str = TAR_TYPE
    close: Callable[[], None] = field(default=lambda: None)


Reply = JSONReply | StreamReply


@dataclass(frozen=True)
class PluginState:
    """What dockerd's Init said, and which driver serves it."""

    home: str
    opts: tuple[str, ...]
    driver: str

    def to_json(self) -> bytes:
        return json.dumps({"version": STATE_VERSION, "home": self.home, "opts": list(self.opts),
                           "driver": self.driver}, indent=1).encode() + b"\n"

    @classmethod
    def from_json(cls, data: bytes) -> "PluginState":
        try:
            doc = json.loads(data)
            if not isinstance(doc, dict) or doc.get("version") != STATE_VERSION:
                raise ValueError("unknown version")
            home, opts, driver = doc["home"], doc["opts"], doc["driver"]
            if not (isinstance(home, str) and os.path.isabs(home) and isinstance(driver, str)
                    and isinstance(opts, list) and all(isinstance(o, str) for o in opts)):
                raise ValueError("bad field types")
        except (ValueError, KeyError, TypeError) as e:
            raise PluginError(f"not a docker-plugin state file ({e})") from None
        return cls(home, tuple(opts), driver)


def write_state(path: str, state: PluginState) -> None:
    """Replace ``path`` atomically (temporary file, fsync, rename), mode 0600."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".state-", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(state.to_json())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _field(doc: dict[str, Any], name: str) -> Any:
    """Go's encoding/json matches field names case-insensitively (exact match first)."""
    if name in doc:
        return doc[name]
    lower = name.lower()
    for key, value in doc.items():
        if key.lower() == lower:
            return value
    return None


def _str(doc: dict[str, Any], name: str, *, required: bool = False) -> str:
    value = _field(doc, name)
    if value is None:
        value = ""
    if not isinstance(value, str):
        raise PluginError(f"field {name} must be a string, not {type(value).__name__}")
    if required and not value:
        raise PluginError(f"field {name} is missing")
    return value


def _layer(doc: dict[str, Any], name: str = "ID") -> str:
    return check_id(_str(doc, name, required=True))


def _parent(value: str) -> str | None:
    return check_id(value) if value else None


def _drain(body: BodyReader) -> None:
    while body.read(1 << 16):
        pass


class GraphPlugin:
    """The graphdriver plugin: dockerd's calls -> one thinpool ``GraphDriver``."""

    def __init__(self, driver_name: str, opener: DriverOpener, state_path: str | None) -> None:
        self.driver_name = driver_name
        self._opener = opener
        self.state_path = state_path
        self._state: PluginState | None = None
        self._driver: GraphDriver | None = None
        self._lock = threading.Lock()

    # -- lifecycle ------------------------------------------------------------------------
    def restore(self) -> str | None:
        """Re-open the driver from the state file, if there is one; a note for the log.

        A state file for another driver, or an unreadable one, is left alone
        (the next ``Init`` replaces it); the plugin then waits for ``Init``.
        """
        if self.state_path is None:
            return None
        try:
            with open(self.state_path, "rb") as f:
                state = PluginState.from_json(f.read(1 << 20))
        except FileNotFoundError:
            return None
        except (OSError, PluginError) as e:
            return f"ignoring {self.state_path}: {e}; waiting for dockerd's Init"
        if state.driver != self.driver_name:
            return (f"ignoring {self.state_path}: it was written for driver {state.driver}, this "
                    f"plugin runs {self.driver_name}; waiting for dockerd's Init")
        with self._lock:
            self._state = state
            try:
                self._driver = self._opener(state.home, state.driver, list(state.opts))
            except (ThinpoolError, OSError) as e:
                return f"cannot re-open the {state.driver} driver under {state.home}: {e}"
        return f"re-opened the {state.driver} driver under {state.home} (from {self.state_path})"

    @property
    def state(self) -> PluginState | None:
        return self._state

    def _require_driver(self) -> GraphDriver:
        with self._lock:
            if self._driver is not None:
                return self._driver
            if self._state is None:
                raise PluginError("the plugin has not been initialized (dockerd sends "
                                  "GraphDriver.Init when it starts; restart dockerd)")
            self._driver = self._opener(self._state.home, self._state.driver,
                                        list(self._state.opts))
            return self._driver

    def _init(self, home: str, opts: list[str]) -> None:
        with self._lock:
            old = self._state
            if (self._driver is not None and old is not None and old.home == home
                    and old.opts == tuple(opts)
                    and old.driver == self.driver_name):
                return
            if self._driver is not None:
                self._driver.cleanup()
                self._driver = None
            self._driver = self._opener(home, self.driver_name, opts)
            self._state = PluginState(home, tuple(opts), self.driver_name)
            if self.state_path is not None:
                write_state(self.state_path, self._state)

    def _cleanup(self) -> None:
        with self._lock:
            driver, self._driver = self._driver, None
        if driver is not None:
            driver.cleanup()

    # -- dispatch -------------------------------------------------------------------------
    def handle(self, http_method: str, target: str, body: BodyReader) -> Reply:
        """Serve one call (see the module docstring); never raises for a bad request."""
        parts = urlsplit(target)
        method = parts.path.lstrip("/")
        if http_method != "POST":
            return JSONReply({"Err": f"{http_method} is not allowed: plugin calls are POST"}, 405)
        if method == "GraphDriver.ApplyDiff":
            return self._apply_diff(parts.query, body)
        handler = self._HANDLERS.get(method)
        if handler is None:
            return JSONReply({"Err": f"unknown plugin method {method[:100]!r}"}, 404)
        data = body.read(MAX_JSON_BYTES + 1)
        if len(data) > MAX_JSON_BYTES:
            return JSONReply({"Err": f"{method}: request body larger than {MAX_JSON_BYTES} bytes"},
                             413)
        try:
            doc = self._json(data)
            return handler(self, doc)
        except (ThinpoolError, OSError) as e:
            return JSONReply({"Err": self._message(method, e)},
                             500 if method == "GraphDriver.Diff" else 200)
        except Exception as e:  # a bug: logged in full, answered in one line, serving goes on
            log.exception("%s failed", method)
            return JSONReply({"Err": f"{method}: internal error: {e!r}"},
                             500 if method == "GraphDriver.Diff" else 200)

    @staticmethod
    def _message(method: str, e: BaseException) -> str:
        if isinstance(e, OSError) and not isinstance(e, ThinpoolError):
            where = f" ({e.filename})" if e.filename else ""
            text = f"{e.strerror or e}{where}"
        else:
            text = str(e)
        return f"{method}: {text}"

    @staticmethod
    def _json(data: bytes) -> dict[str, Any]:
        if not data.strip():
            return {}
        try:
            doc = json.loads(data)
        except (ValueError, UnicodeDecodeError) as e:
            raise PluginError(f"malformed JSON request: {e}") from None
        if not isinstance(doc, dict):
            raise PluginError(f"malformed JSON request: expected an object, got "
                              f"{type(doc).__name__}")
        return doc

    # -- the methods ----------------------------------------------------------------------
    def _activate(self, doc: dict[str, Any]) -> Reply:
        return JSONReply({"Implements": ["GraphDriver"]})

    def _init_call(self, doc: dict[str, Any]) -> Reply:
        home = _str(doc, "Home", required=True)
        if not os.path.isabs(home) or "\0" in home:
            raise PluginError(f"Home must be an absolute path, not {home[:200]!r}")
        opts = _field(doc, "Opts") or []
        if not isinstance(opts, list) or not all(isinstance(o, str) for o in opts):
            raise PluginError("Opts must be a list of strings")
        for maps in ("UIDMaps", "GIDMaps"):
            if _field(doc, maps):
                raise PluginError("user namespace remapping (dockerd --userns-remap) is not "
                                  "supported by the thinpool plugin")
        self._init(os.path.normpath(home), opts)
        return JSONReply({})

    def _capabilities(self, doc: dict[str, Any]) -> Reply:
        caps = self._require_driver().capabilities()
        return JSONReply({"Capabilities": {"ReproducesExactDiffs":
                                           bool(caps.get("ReproducesExactDiffs", False))}})

    def _create_opts(self, doc: dict[str, Any]) -> CreateOpts:
        storage = _field(doc, "StorageOpt") or {}
        if not isinstance(storage, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in storage.items()):
            raise PluginError("StorageOpt must be an object of strings")
        return CreateOpts(mount_label=_str(doc, "MountLabel"), storage_opt=dict(storage))

    def _create(self, doc: dict[str, Any]) -> Reply:
        layer, parent, opts = _layer(doc), _parent(_str(doc, "Parent")), self._create_opts(doc)
        self._require_driver().create(layer, parent, opts)
        return JSONReply({})

    def _create_rw(self, doc: dict[str, Any]) -> Reply:
        layer, parent, opts = _layer(doc), _parent(_str(doc, "Parent")), self._create_opts(doc)
        self._require_driver().create_rw(layer, parent, opts)
        return JSONReply({})

    def _remove(self, doc: dict[str, Any]) -> Reply:
        self._require_driver().remove(_layer(doc))
        return JSONReply({})

    def _get(self, doc: dict[str, Any]) -> Reply:
        layer, label = _layer(doc), _str(doc, "MountLabel")
        return JSONReply({"Dir": self._require_driver().get(layer, label)})

    def _put(self, doc: dict[str, Any]) -> Reply:
        self._require_driver().put(_layer(doc))
        return JSONReply({})

    def _exists(self, doc: dict[str, Any]) -> Reply:
        return JSONReply({"Exists": self._require_driver().exists(_layer(doc))})

    def _status(self, doc: dict[str, Any]) -> Reply:
        driver = self._require_driver()
        pairs = [[str(k), str(v)] for k, v in driver.status()]
        return JSONReply({"Status": pairs + [["Thinpool Driver", driver.name]]})

    def _metadata(self, doc: dict[str, Any]) -> Reply:
        meta = self._require_driver().get_metadata(_layer(doc))
        return JSONReply({"Metadata": {str(k): str(v) for k, v in meta.items()}})

    def _cleanup_call(self, doc: dict[str, Any]) -> Reply:
        self._cleanup()
        return JSONReply({})

    def _diff(self, doc: dict[str, Any]) -> Reply:
        layer, parent = _layer(doc), _parent(_str(doc, "Parent"))
        chunks = iter(self._require_driver().diff(layer, parent))
        try:
            first = next(chunks, b"")  # errors before the first byte still become an Err
        except BaseException:
            _close(chunks)
            raise

        def stream() -> Iterator[bytes]:
            if first:
                yield first
            yield from chunks
        return StreamReply(stream(), close=lambda: _close(chunks))

    def _changes(self, doc: dict[str, Any]) -> Reply:
        layer, parent = _layer(doc), _parent(_str(doc, "Parent"))
        changes = self._require_driver().changes(layer, parent)
        return JSONReply({"Changes": [{"Path": c.path, "Kind": int(c.kind)} for c in changes]})

    def _diff_size(self, doc: dict[str, Any]) -> Reply:
        layer, parent = _layer(doc), _parent(_str(doc, "Parent"))
        return JSONReply({"Size": self._require_driver().diff_size(layer, parent)})

    def _apply_diff(self, query: str, body: BodyReader) -> Reply:
        method = "GraphDriver.ApplyDiff"
        layer = ""
        try:
            args = parse_qs(query, keep_blank_values=True)
            layer = check_id((args.get("id") or [""])[-1])
            parent = _parent((args.get("parent") or [""])[-1])
            driver = self._require_driver()
        except (ThinpoolError, OSError) as e:
            return JSONReply({"Err": self._message(method, e)})
        try:
            size = driver.apply_diff(layer, parent, body)  # type: ignore[arg-type]
            _drain(body)
            return JSONReply({"Size": size})
        except Exception as e:
            if not isinstance(e, (ThinpoolError, OSError)):
                log.exception("%s %s failed", method, layer)
            message = self._message(method, e)
            try:
                driver.remove(layer)
            except (ThinpoolError, OSError) as removal:
                message += f" (and removing the half-applied layer failed: {removal})"
            return JSONReply({"Err": message})

    _HANDLERS: dict[str, Callable[["GraphPlugin", dict[str, Any]], Reply]] = {
        "Plugin.Activate": _activate,
        "GraphDriver.Init": _init_call,
        "GraphDriver.Capabilities": _capabilities,
        "GraphDriver.Create": _create,
        "GraphDriver.CreateReadWrite": _create_rw,
        "GraphDriver.Remove": _remove,
        "GraphDriver.Get": _get,
        "GraphDriver.Put": _put,
        "GraphDriver.Exists": _exists,
        "GraphDriver.Status": _status,
        "GraphDriver.GetMetadata": _metadata,
        "GraphDriver.Cleanup": _cleanup_call,
        "GraphDriver.Diff": _diff,
        "GraphDriver.Changes": _changes,
        "GraphDriver.DiffSize": _diff_size,
    }


def _close(chunks: Iterator[bytes]) -> None:
    close = getattr(chunks, "close", None)
    if close is not None:
        close()
