"""Linux interfaces Python's standard library lacks: mount(2) and mountinfo (mounts), loop
devices through their ioctls (loop), filesystem superblock probes (fsprobe), threads sharing a
CPU (cpu), whether a process exists (procs) and memory barriers in other processes
(membarrier).

A leaf layer: it imports only ``thinpool.errors``; the FUSE mount, the pool
server's kernel devices, the graph drivers and the snapshotter build on it.
"""
