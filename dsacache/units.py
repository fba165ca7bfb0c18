"""Parsing of the small string languages users type: sizes and ``name:key=value`` specs."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from dsacache.errors import DsacacheError

_SIZE_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}
_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*$")


def parse_size(text: str | int) -> int:
    """Parse ``50MiB``, ``16MB``, ``4096`` or ``1.5GiB`` into a whole number of bytes."""
    if isinstance(text, bool):
        raise DsacacheError(f"invalid size {text!r}: expected a byte count such as 50MiB")
    if isinstance(text, int):
        if text < 0:
            raise DsacacheError(f"invalid size {text}: must not be negative")
        return text
    m = _SIZE_RE.match(str(text))
    unit = m.group(2).upper() if m else None
    if m is None or unit not in _SIZE_UNITS:
        raise DsacacheError(
            f"invalid size {text!r}: expected a number with an optional unit "
            "B, KB, MB, GB, TB, KiB, MiB, GiB or TiB (e.g. 50MiB, 16MB, 4096)"
        )
    value = float(m.group(1)) * _SIZE_UNITS[unit]
    if not math.isfinite(value):
        raise DsacacheError(f"invalid size {text!r}: too large")
    if value != int(value):
        raise DsacacheError(f"invalid size {text!r}: not a whole number of bytes")
    return int(value)


def format_size(nbytes: int) -> str:
    """Render bytes with a binary unit, e.g. ``52428800`` -> ``50 MiB``."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            value = nbytes / scale
            return f"{value:.0f} {unit}" if value == int(value) else f"{value:.2f} {unit}"
    return f"{nbytes} B"


@dataclass(frozen=True)
class Spec:
    """A parsed ``name:key=value,key=value`` string (policies, layouts)."""

    name: str
    params: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        if not self.params:
            return self.name
        return self.name + ":" + ",".join(f"{k}={v}" for k, v in self.params.items())


_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]*$")


def parse_spec(text: str, what: str = "spec") -> Spec:
    """Split ``token-lru:reserve=16MiB,inner=lru`` into a name and a parameter dict."""
    name, _, rest = str(text).strip().partition(":")
    name = name.strip()
    if not _NAME_RE.match(name):
        raise DsacacheError(f"invalid {what} {text!r}: expected NAME or NAME:key=value,...")
    params: dict[str, str] = {}
    if rest.strip():
        for item in rest.split(","):
            key, eq, value = item.partition("=")
            key, value = key.strip(), value.strip()
            if not eq or not _NAME_RE.match(key) or not value:
                raise DsacacheError(
                    f"invalid {what} {text!r}: parameter {item!r} is not of the form key=value"
                )
            if key in params:
                raise DsacacheError(f"invalid {what} {text!r}: parameter {key!r} given twice")
            params[key] = value
    return Spec(name, params)
