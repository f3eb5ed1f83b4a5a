"""Graph drivers: Docker's storage-driver contract (devicemapper on thinpool, vfs, overlay2, btrfs).

Importing the package registers every built-in driver (each driver module
calls ``registry.register`` at import); a new driver is added by importing
its module here.
"""

from . import btrfs, devmapper, overlay2, vfs  # noqa: F401  (each registers itself)
