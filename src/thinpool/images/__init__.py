"""Images and containers the way Docker keeps them, on any thinpool graph driver.

* ``store.ImageRoot(root, driver)``: a Docker data root on one driver -
  image load (``docker save`` and OCI archives) / ls / rm / save, containers
  (create with the ``-init`` layer, mount, export, changes, commit, rm);
* ``layers.LayerStore``: ``image/<driver>/layerdb`` (chain ids, diff ids,
  tar-split, container mounts) with its commit and crash story;
* ``imagedb.ImageStore``: image configs and tags (``repositories.json``);
* ``archives``: reading and writing image archives;
* ``dockerroot``: offline, read-only access to real Docker devicemapper
  roots (list, export, mount, migrate to another driver).

No printing here: long work reports through ``progress.Progress``.
"""
