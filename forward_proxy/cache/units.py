"""Human sizes and durations for options: `1GiB`, `512MB`, `1h`, `90s`, `5` (seconds).

>>> parse_size("1GiB")
1073741824
>>> parse_duration("1h30m")
5400.0
>>> format_size(1073741824), format_duration(3600)
('1.0 GiB', '1h')
"""

from __future__ import annotations

import re

_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "kib": 1024,
    "m": 1000**2,
    "mb": 1000**2,
    "mib": 1024**2,
    "g": 1000**3,
    "gb": 1000**3,
    "gib": 1024**3,
    "t": 1000**4,
    "tb": 1000**4,
    "tib": 1024**4,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")


def parse_size(text: str) -> int:
    """Bytes in `text`: a number with an optional unit (B, KB, KiB, MB, MiB, GB, GiB, TB, TiB)."""
    match = _SIZE.match(text)
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in _SIZE_UNITS:
        raise ValueError(f"{text!r} is not a size; write a number with a unit such as 512MiB, 1GiB or 200MB")
    return int(float(match.group(1)) * _SIZE_UNITS[unit])


def parse_duration(text: str) -> float:
    """Seconds in `text`: a plain number of seconds, or parts such as 500ms, 90s, 5m, 1h, 1d, 1h30m."""
    compact = text.strip().replace(" ", "")
    try:
        seconds = float(compact)
    except ValueError:
        parts = _DURATION_PART.findall(compact)
        if not parts or "".join(number + unit for number, unit in parts) != compact:
            raise ValueError(
                f"{text!r} is not a duration; write seconds (30) or a number with a unit (500ms, 90s, 5m, 1h, 1d)"
            ) from None
        seconds = sum(float(number) * _DURATION_UNITS[unit] for number, unit in parts)
    if seconds < 0 or seconds != seconds:
        raise ValueError(f"{text!r} is not a duration; it must be zero or more")
    return seconds


def format_size(size: int) -> str:
    """`size` bytes in binary units, for humans."""
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{value:.0f} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def format_duration(seconds: float) -> str:
    """`seconds` in the largest whole units, for humans (`1h`, `90s` → `1m30s`)."""
    if seconds < 1:
        return f"{seconds * 1000:g}ms" if seconds else "0s"
    remaining = round(seconds)
    parts = []
    for unit, length in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if remaining >= length:
            parts.append(f"{remaining // length}{unit}")
            remaining %= length
    return "".join(parts)
