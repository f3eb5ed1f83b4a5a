"""The driver registry and Docker's selection (graphdriver.New).

A driver is registered under its name, as an init function or lazily as a
module and a class that are imported only when the driver is initialised::

    register("vfs", VfsDriver)                            # any callable (home, options) -> GraphDriver
    register_lazy("vfs", "thinpool.graph.vfs", "VfsDriver")

``thinpool.graph`` registers the built-in drivers lazily, so importing the
package (or any of its modules) loads no driver: selection needs only the
names, and a driver's module (devicemapper's pulls in the pool engine and
numpy) is imported when that driver is initialised - named, found as prior
state, or tried in priority order.  Adding a built-in driver is one module
plus one line there, never a change here.

(``Registry`` instances other than ``DEFAULT`` hold other sets, e.g. in
tests.) ``new_driver(root, name, options)`` picks and initialises a driver on
``<root>/<name>`` the way dockerd does:

1. A name was given: that driver (an unknown name is ``NotSupported``).
2. Prior state: every registered driver except vfs whose ``<root>/<name>``
   exists and is not empty. Walking the priority list, the first such
   driver is initialised and its errors are fatal (images must not
   silently disappear); if there are several, Docker's "contains several
   valid graphdrivers" error.
3. Otherwise each driver in priority order, then any other registered one;
   ``NotSupported`` (and its subclasses ``PrerequisitesMissing``,
   ``IncompatibleFS``) means "skip"; nothing left: "no supported storage
   driver found".

The priority is Docker 24's (``overlay2, fuse-overlayfs, btrfs, zfs,
devicemapper, vfs``), restricted to what is registered. A driver registered
with ``automatic=False`` is used when named or found as prior state, never
picked in step 3: Docker 24 skips devicemapper there (as deprecated), and
thinpool's devicemapper, which would create a 100 GB pool and a pool
server, is only made on request too.
"""

from __future__ import annotations

import importlib
import os
import threading
from typing import Callable

from .driver import GraphDriver, GraphError, NotSupported

InitFunc = Callable[[str, list[str]], GraphDriver]
"""Makes a driver on its home directory with the daemon-wide options (Docker's InitFunc)."""

PRIORITY = ("overlay2", "fuse-overlayfs", "btrfs", "zfs", "devicemapper", "vfs")
"""Docker 24's automatic selection order (driver_linux.go)."""


class _Deferred:
    """An init function that imports ``module`` and calls its ``attr`` on first use."""

    def __init__(self, module: str, attr: str) -> None:
        self.module = module
        self.attr = attr

    def __call__(self, home: str, options: list[str]) -> GraphDriver:
        init: InitFunc = getattr(importlib.import_module(self.module), self.attr)
        return init(home, options)


class Registry:
    """A set of named drivers and Docker's selection among them (thread-safe)."""

    def __init__(self) -> None:
        self._drivers: dict[str, InitFunc] = {}
        self._explicit: set[str] = set()  # never picked automatically (step 3)
        self._lock = threading.Lock()

    def register(self, name: str, init: InitFunc, automatic: bool = True) -> None:
        """Make driver ``name`` available; registering a name twice is a GraphError (as in Docker)."""
        with self._lock:
            if name in self._drivers:
                raise GraphError(f"name already registered {name}")
            self._drivers[name] = init
            if not automatic:
                self._explicit.add(name)

    def register_lazy(self, name: str, module: str, attr: str, automatic: bool = True) -> None:
        """``register`` of ``module.attr``, imported only when driver ``name`` is initialised."""
        self.register(name, _Deferred(module, attr), automatic)

    def registered(self) -> list[str]:
        """Registered names: those in the priority list in its order, then the others sorted."""
        with self._lock:
            names = set(self._drivers)
        return [n for n in PRIORITY if n in names] + sorted(names - set(PRIORITY))

    def init_driver(self, name: str, home: str, options: list[str] | None = None) -> GraphDriver:
        """Initialise driver ``name`` on exactly ``home`` (for callers that choose the home, e.g. a plugin)."""
        with self._lock:
            init = self._drivers.get(name)
        if init is None:
            raise NotSupported(f"unknown driver {name!r} (known: {', '.join(self.registered()) or 'none'})")
        return init(os.path.abspath(home), list(options or []))

    def prior_drivers(self, root: str) -> list[str]:
        """Registered drivers other than vfs with a non-empty ``<root>/<name>``, in priority order."""
        found = []
        for name in self.registered():
            if name == "vfs":
                continue
            path = os.path.join(root, name)
            try:
                with os.scandir(path) as it:
                    if next(it, None) is None:
                        continue
            except (FileNotFoundError, NotADirectoryError):
                continue
            except OSError:
                pass  # unreadable: Docker counts it as not empty
            found.append(name)
        return found

    def new_driver(self, root: str, name: str | None = None, options: list[str] | None = None) -> GraphDriver:
        """Select and initialise a driver on ``<root>/<name>`` (see the module docstring)."""
        root = os.path.abspath(root)
        opts = list(options or [])
        if name:
            return self.init_driver(name, os.path.join(root, name), opts)
        prior = self.prior_drivers(root)
        if len(prior) > 1:
            raise GraphError(f"{root} contains several valid graphdrivers: {', '.join(prior)}; "
                             "cleanup or explicitly choose storage driver (-s <DRIVER>)")
        if prior:
            return self.init_driver(prior[0], os.path.join(root, prior[0]), opts)
        os.makedirs(root, mode=0o711, exist_ok=True)
        reasons = []
        for candidate in self.registered():
            if candidate in self._explicit:
                continue
            try:
                return self.init_driver(candidate, os.path.join(root, candidate), opts)
            except NotSupported as e:
                reasons.append(f"{candidate}: {e}")
        raise GraphError("no supported storage driver found" + (f" ({'; '.join(reasons)})" if reasons else ""))


DEFAULT = Registry()
"""The registry the built-in drivers are registered in (by ``thinpool.graph``, lazily)."""

register = DEFAULT.register
register_lazy = DEFAULT.register_lazy
registered = DEFAULT.registered
init_driver = DEFAULT.init_driver
prior_drivers = DEFAULT.prior_drivers
new_driver = DEFAULT.new_driver
