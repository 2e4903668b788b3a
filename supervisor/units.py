"""Sizes and durations as people write them in config files and on the command line.

Size units follow the standards strictly where the spelling is unambiguous: KiB/MiB/GiB/TiB are
powers of 1024 (IEC), KB/MB/GB/TB powers of 1000 (SI). Bare K/M/G/T are powers of 1024, as systemd
and most memory settings (``MemoryMax=4G``) read them, because that is what users of memory limits
expect. Unit letters are case-insensitive; a plain integer is a number of bytes.
"""

from __future__ import annotations

import math
import re

_KI = 1024
_SIZE_UNITS: dict[str, int] = {
    "": 1,
    "b": 1,
    "k": _KI,
    "m": _KI**2,
    "g": _KI**3,
    "t": _KI**4,
    "p": _KI**5,
    "kib": _KI,
    "mib": _KI**2,
    "gib": _KI**3,
    "tib": _KI**4,
    "pib": _KI**5,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
    "pb": 1000**5,
}
_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([A-Za-z]*)\s*$")
_SIZE_FORMS = (
    "expected bytes as an integer or a number with a unit, e.g. 6GiB, 6 GiB, 5000MB, 512M "
    "(KiB/MiB/GiB/TiB = 1024^n, KB/MB/GB/TB = 1000^n, K/M/G/T = 1024^n)"
)

_DURATION_UNITS: dict[str, float] = {
    "us": 1e-6,
    "ms": 1e-3,
    "": 1.0,
    "s": 1.0,
    "sec": 1.0,
    "m": 60.0,
    "min": 60.0,
    "h": 3600.0,
    "d": 86400.0,
}
_DURATION_PART = re.compile(r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([A-Za-z]*)")
_DURATION_FORMS = "expected seconds as a number or values with units, e.g. 30s, 5m, 1h, 250ms, 1h30m"


def parse_size(text: str | int) -> int:
    """Bytes for ``text``; ValueError (one line naming the value and the accepted forms) otherwise."""
    if isinstance(text, bool):
        raise ValueError(f"invalid size {text!r}: {_SIZE_FORMS}")
    if isinstance(text, int):
        if text < 0:
            raise ValueError(f"invalid size {text!r}: must not be negative")
        return text
    if isinstance(text, float):
        if not math.isfinite(text) or text < 0:
            raise ValueError(f"invalid size {text!r}: {_SIZE_FORMS}")
        return int(text)
    if not isinstance(text, str):
        raise ValueError(f"invalid size {text!r}: {_SIZE_FORMS}")
    match = _SIZE_RE.match(text)
    if match is None:
        raise ValueError(f"invalid size {text!r}: {_SIZE_FORMS}")
    number, unit = match.groups()
    factor = _SIZE_UNITS.get(unit.lower())
    if factor is None:
        raise ValueError(f"invalid size {text!r}: unknown unit {unit!r}; {_SIZE_FORMS}")
    if "." in number:
        return int(round(float(number) * factor))
    return int(number) * factor


def format_size(n: int | float) -> str:
    """Human-readable binary size, one decimal: ``5.6 GiB``, ``512 B``."""
    sign = "-" if n < 0 else ""
    value = float(abs(n))
    units = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")
    i = 0
    while value >= _KI and i < len(units) - 1:
        value /= _KI
        i += 1
    if i == 0:
        return f"{sign}{int(value)} B"
    if round(value, 1) >= _KI and i < len(units) - 1:  # 1023.97 MiB prints as 1.0 GiB, not 1024.0 MiB
        value /= _KI
        i += 1
    return f"{sign}{value:.1f} {units[i]}"


def format_mib(mb: float | None, missing: str = "?") -> str:
    """A figure in MiB as people read it: ``812 MiB``, ``5.6 GiB`` (``missing`` when unknown)."""
    if mb is None:
        return missing
    return f"{mb / 1024:.1f} GiB" if abs(mb) >= 1024 else f"{mb:.0f} MiB"


def format_duration(seconds: float | None, missing: str = "-", decimals: int = 0) -> str:
    """A duration as people read it: ``42s``, ``3m05s``, ``2h07m``, ``3d04h``."""
    if seconds is None:
        return missing
    if seconds < 60:
        return f"{seconds:.{decimals}f}s"
    s = int(round(seconds))
    d, rem = divmod(s, 86400)
    h, rem = divmod(rem, 3600)
    m, sec = divmod(rem, 60)
    if d:
        return f"{d}d{h:02d}h"
    if h:
        return f"{h}h{m:02d}m"
    return f"{m}m{sec:02d}s"


def format_count(v: float | None, missing: str = "-") -> str:
    """A whole figure with thousands separators: ``12,345``."""
    return missing if v is None else f"{v:,.0f}"


def gib(mb: float) -> str:
    """MiB as a GiB number with enough digits that 'needs ~X, budget is Y' never reads as X == Y."""
    return f"{mb / 1024:.1f}" if mb >= 10 * 1024 else f"{mb / 1024:.2f}"


def mib(n: int | float) -> float:
    """Bytes -> MiB, the unit of every ``*_mb`` field in logs and status."""
    return n / (1024 * 1024)


def parse_duration(text: str | int | float) -> float:
    """Seconds for ``30s``, ``5m``, ``1h``, ``250ms``, ``1h30m`` or a plain number of seconds."""
    if isinstance(text, bool):
        raise ValueError(f"invalid duration {text!r}: {_DURATION_FORMS}")
    if isinstance(text, (int, float)):
        if not math.isfinite(text) or text < 0:
            raise ValueError(f"invalid duration {text!r}: {_DURATION_FORMS}")
        return float(text)
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"invalid duration {text!r}: {_DURATION_FORMS}")
    total = 0.0
    pos = 0
    stripped = text.strip()
    parts = 0
    while pos < len(stripped):
        match = _DURATION_PART.match(stripped, pos)
        if match is None:
            raise ValueError(f"invalid duration {text!r}: {_DURATION_FORMS}")
        number, unit = match.groups()
        factor = _DURATION_UNITS.get(unit.lower())
        if factor is None or (unit == "" and parts > 0):
            raise ValueError(f"invalid duration {text!r}: {_DURATION_FORMS}")
        total += float(number) * factor
        pos = match.end()
        parts += 1
        if unit == "" and pos < len(stripped):
            raise ValueError(f"invalid duration {text!r}: {_DURATION_FORMS}")
    return total
