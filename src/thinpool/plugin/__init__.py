"""Docker's graphdriver plugin (legacy v1: HTTP + JSON on a unix socket) backed by a thinpool graph driver.

* ``http``: HTTP/1.1 server side without I/O (request heads, Content-Length
  and chunked bodies, bounded sizes; response bytes).
* ``api``: ``GraphPlugin``, the plugin's methods on a ``GraphDriver``
  (errors as ``{"Err": ...}``, state remembered across restarts).
* ``server``: ``PluginServer``, the unix socket and its threads.
"""
