"""Graph drivers: Docker's storage-driver contract (devicemapper on thinpool, vfs, overlay2, btrfs).

Importing the package registers every built-in driver by name, lazily: a
driver's module is imported only when the registry initialises that driver
(see ``registry``), so importing ``thinpool.graph.driver`` or selecting a
driver does not load the others (devicemapper's module pulls in the pool
engine and numpy).  A new driver is added by one ``register_lazy`` line here.
"""

from .registry import register_lazy

register_lazy("overlay2", __name__ + ".overlay2", "Overlay2Driver")
register_lazy("btrfs", __name__ + ".btrfs", "BtrfsDriver")
register_lazy("devicemapper", __name__ + ".devmapper", "DevmapperDriver", automatic=False)
register_lazy("vfs", __name__ + ".vfs", "VfsDriver")
