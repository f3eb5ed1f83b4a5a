"""The data path: thin devices over a pool's metadata and data device."""
