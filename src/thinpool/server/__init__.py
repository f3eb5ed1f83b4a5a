"""The pool server: one process that owns a pool and serves it (NBD, control socket, FUSE)."""
