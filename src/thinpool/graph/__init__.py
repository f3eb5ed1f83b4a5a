"""Graph drivers: Docker's storage-driver contract (devicemapper on thinpool, vfs, overlay2, btrfs)."""
