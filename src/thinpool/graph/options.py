"""``--storage-opt`` parsing shared by the drivers (Docker's ParseKeyValueOpt and RAMInBytes) and go-units sizes."""

from __future__ import annotations

import re

from .driver import BadOption

_SIZE = re.compile(r"^(\d+(?:\.\d+)*) ?([kKmMgGtTpP])?[iI]?[bB]?$")
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}


def parse_size(value: str) -> int:
    """Bytes from a size in Docker's RAMInBytes form: ``10``, ``512k``, ``10M``, ``1.5GiB``, ``2gb``.

    Units are binary (k = 1024) whatever the spelling; ``BadOption`` otherwise.
    """
    m = _SIZE.match(value.strip()) if value.isascii() else None
    if m is None:
        raise BadOption(f"invalid size: {value!r}")
    try:
        number = float(m.group(1))
    except ValueError:
        raise BadOption(f"invalid size: {value!r}") from None
    return int(number * _UNITS[(m.group(2) or "").lower()])


def split_option(option: str) -> tuple[str, str]:
    """``(key, value)`` of a ``KEY=VALUE`` option; the key lower-cased, both stripped."""
    key, sep, value = option.partition("=")
    if not sep or not key.strip():
        raise BadOption(f"unable to parse key/value option: {option}")
    return key.strip().lower(), value.strip()


def human_size(n: float) -> str:
    """go-units HumanSize: decimal units, 4 significant digits (``65.54kB``, ``10.74GB``)."""
    units = ["B", "kB", "MB", "GB", "TB", "PB", "EB"]
    i = 0
    while n >= 1000 and i < len(units) - 1:
        n /= 1000
        i += 1
    return f"{n:.4g}{units[i]}"
