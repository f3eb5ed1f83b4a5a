"""thinpool: userspace thin provisioning, byte-compatible with Linux dm-thin metadata."""

__version__ = "0.1.0"
