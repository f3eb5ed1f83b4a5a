"""Persistent data: block I/O, block cache, transactions, space maps, btrees.

Dependency direction inside this package: blockio -> block_manager ->
space_map / transaction -> btree.  Nothing here knows about thin devices.
"""
