"""The pool engine: thin volumes with a copy-on-write data path on a data file."""
