"""A containerd proxy snapshotter: containerd's snapshot gRPC service on thinpool's storage.

``core`` (the contract), ``store`` (records in sqlite), ``filters``
(containerd's filter syntax), backends ``devmapper`` (thin devices of a
thinpool pool), ``dirs`` (overlay2, vfs), ``service`` (gRPC), ``daemon``
(``thinpool snapshotter serve``); ``proto`` holds containerd's generated API.
"""
