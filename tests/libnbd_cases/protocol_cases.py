"""Protocol-level cases through libnbd's Python binding (Debian's python3-libnbd).

Run by tests/test_server.py with /usr/bin/python3 (the binding is built for
Debian's Python): ``python3 protocol_cases.py SOCKET``.  Prints one JSON object
with what it saw; asserts inside raise and fail the run with a message.
"""

import json
import sys

import nbd

sock = sys.argv[1]
out = {}


def connect(export, meta=True, strict=True):
    h = nbd.NBD()
    if meta:
        h.add_meta_context("base:allocation")
    h.set_export_name(export)
    if not strict:
        h.set_strict_mode(0)
    h.connect_unix(sock)
    return h


# meta contexts: base:allocation is offered and nothing else of ours
h = nbd.NBD()
h.set_opt_mode(True)
h.connect_unix(sock)
h.set_export_name("base")
seen = []
h.opt_list_meta_context(lambda name: seen.append(name) or 0)
h.opt_abort()
out["meta_contexts"] = seen
assert "base:allocation" in seen, seen

# block status agrees with what was written: data at 1M, holes elsewhere
h = connect("base")
assert h.can_meta_context("base:allocation")
h.pwrite(b"x" * 65536, 1 << 20)
h.flush()
extents = []


def got(metacontext, offset, entries, err):
    extents.append((offset, list(entries)))
    return 0


h.block_status(4 << 20, 0, got)
flat = extents[0][1]
out["extents"] = flat
pos, runs = 0, []
for i in range(0, len(flat), 2):
    runs.append((pos, flat[i], flat[i + 1]))
    pos += flat[i]
assert any(start <= (1 << 20) < start + n and flags == 0 for start, n, flags in runs), runs
assert runs[0][2] & 1, runs  # a hole at the start

# pipelining: 64 reads and writes in flight on one connection
cookies = []
bufs = []
for i in range(32):
    data = bytes([i + 1]) * 4096
    cookies.append(h.aio_pwrite(data, (8 << 20) + i * 4096))
while h.aio_in_flight() > 0:
    h.poll(-1)
for c in cookies:
    assert h.aio_command_completed(c)
for i in range(32):
    b = nbd.Buffer(4096)
    bufs.append((b, h.aio_pread(b, (8 << 20) + i * 4096)))
while h.aio_in_flight() > 0:
    h.poll(-1)
for i, (b, c) in enumerate(bufs):
    assert h.aio_command_completed(c)
    assert b.to_bytearray() == bytes([i + 1]) * 4096
out["pipelined"] = 64

# multi-conn: a write acknowledged on one connection, flushed on another, read on a third
assert h.can_multi_conn()
h2, h3 = connect("base"), connect("0")
h.pwrite(b"multi-conn", 20 << 20)
h2.flush()
assert h3.pread(10, 20 << 20) == b"multi-conn"
out["multi_conn"] = True

# strict mode off: requests libnbd would refuse reach the server and get NBD errors
bad = connect("base", strict=False)
size = bad.get_size()
errors = {}
for name, fn in (("read beyond end", lambda: bad.pread(4096, size)),
                 ("write beyond end", lambda: bad.pwrite(b"z" * 10, size - 5)),
                 ("zero beyond end", lambda: bad.zero(4096, size)),
                 ("trim beyond end", lambda: bad.trim(4096, size))):
    try:
        fn()
        errors[name] = None
    except nbd.Error as e:
        errors[name] = e.errno
out["strict_off_errors"] = errors
assert errors == {"read beyond end": "EINVAL", "write beyond end": "ENOSPC",
                  "zero beyond end": "ENOSPC", "trim beyond end": "EINVAL"}, errors
assert bad.pread(10, 20 << 20) == b"multi-conn"  # the connection still works
for x in (h, h2, h3, bad):
    x.shutdown()
print(json.dumps(out))
