"""Go ``time.ParseDuration`` syntax, as plasma's ``PLASMA_*`` durations use.

A duration is an optional sign and a sequence of decimal numbers, each with an
optional fraction and a unit: ``ns``, ``us`` (or ``µs``/``μs``), ``ms``, ``s``,
``m``, ``h``. ``"0"`` alone needs no unit. Examples: ``500ms``, ``1m30s``,
``1.5h``. The result is in seconds (a float), which is what trio wants.
"""

from __future__ import annotations

import re

__all__ = ["format_duration", "parse_duration"]

_UNITS_NS = {
    "ns": 1,
    "us": 1_000,
    "µs": 1_000,  # U+00B5 MICRO SIGN
    "μs": 1_000,  # U+03BC GREEK SMALL LETTER MU
    "ms": 1_000_000,
    "s": 1_000_000_000,
    "m": 60_000_000_000,
    "h": 3_600_000_000_000,
}
_PART = re.compile(r"(\d+\.?\d*|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_MAX_NS = 2**63 - 1  # Go's time.Duration is an int64 of nanoseconds


def parse_duration(text: str) -> float:
    """Parse a Go duration string and return seconds.

    Raises:
        ValueError: with a short reason, when ``text`` is not a Go duration or
            overflows Go's range (about 290 years).
    """
    s = text.strip()
    if not s:
        raise ValueError("empty duration")
    sign = 1
    if s[0] in "+-":
        sign = -1 if s[0] == "-" else 1
        s = s[1:]
    if s == "0":
        return 0.0
    if not s:
        raise ValueError(f"invalid duration {text!r}")
    pos = 0
    total_ns = 0
    while pos < len(s):
        m = _PART.match(s, pos)
        if m is None:
            if re.match(r"\d+\.?\d*|\.\d+", s[pos:]):
                raise ValueError(f"missing unit in duration {text!r} (use ns, us, ms, s, m, h)")
            raise ValueError(f"invalid duration {text!r}")
        number, unit = m.group(1), m.group(2)
        whole, _, frac = number.partition(".")
        scale = _UNITS_NS[unit]
        total_ns += int(whole or "0") * scale
        if frac:
            total_ns += int(frac) * scale // 10 ** len(frac)
        if total_ns > _MAX_NS:
            raise ValueError(f"duration {text!r} out of range")
        pos = m.end()
    return sign * total_ns / 1e9


def format_duration(seconds: float) -> str:
    """Render seconds in Go's ``Duration.String`` style, e.g. ``1m30s``, ``500ms``."""
    ns = round(seconds * 1e9)
    if ns == 0:
        return "0s"
    sign = "-" if ns < 0 else ""
    ns = abs(ns)
    if ns < 1_000:
        return f"{sign}{ns}ns"
    if ns < 1_000_000:
        return f"{sign}{_trim(ns / 1_000)}µs"
    if ns < 1_000_000_000:
        return f"{sign}{_trim(ns / 1_000_000)}ms"
    hours, rest = divmod(ns, 3_600_000_000_000)
    minutes, rest = divmod(rest, 60_000_000_000)
    secs = _trim(rest / 1e9)
    out = sign
    if hours:
        out += f"{hours}h"
    if hours or minutes:
        out += f"{minutes}m"
    return out + f"{secs}s"


def _trim(value: float) -> str:
    text = f"{value:.9f}".rstrip("0").rstrip(".")
    return text or "0"
