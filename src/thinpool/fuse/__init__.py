"""Volumes as files on a FUSE mount, for loop devices with direct I/O.

``FuseMount`` serves ``Export`` objects (the NBD export's shape) as fixed-size
files; ``thinpool.linux.loop`` attaches such files to loop devices. Pure Python
over /dev/fuse: no libfuse. Layers: ``protocol`` (wire structures), ``session``
(the filesystem as a request-in, reply-out state machine), ``mount`` (mount
syscall and worker threads).
"""

from .backend import Export
from .mount import FuseMount, is_mounted
from .session import FileBusyError, FuseError

__all__ = ["Export", "FileBusyError", "FuseError", "FuseMount", "is_mounted"]
