"""Parse and format Kubernetes-style quantities: memory, CPU and durations.

Every parser raises ``ValueError`` whose message starts with "expected ..." so the
manifest loader can show the user what a valid value looks like.
"""

from __future__ import annotations

import math
import re
from decimal import Decimal, localcontext

__all__ = [
    "MAX_DURATION",
    "MAX_MEMORY",
    "format_duration",
    "format_memory",
    "parse_cpu",
    "parse_duration",
    "parse_memory",
]

#: Largest memory quantity accepted, in bytes (fits a signed 64-bit column).
MAX_MEMORY = 2**63 - 1
#: Largest duration accepted, in seconds (Go's time.Duration limit, about 292 years).
MAX_DURATION = 9_223_372_036.854775807

_MAX_TEXT = 64  # longer strings are never a sensible quantity
_NUMBER = r"(?:\d+(?:\.\d*)?|\.\d+)"

_BINARY_UNITS = {"Ei": 1024**6, "Pi": 1024**5, "Ti": 1024**4, "Gi": 1024**3, "Mi": 1024**2,
                 "Ki": 1024}
_DECIMAL_UNITS = {"E": 10**18, "P": 10**15, "T": 10**12, "G": 10**9, "M": 10**6, "k": 1000}
_MEMORY_UNITS = {"": 1, "K": 1000, **_BINARY_UNITS, **_DECIMAL_UNITS}
_MEMORY_RE = re.compile(rf"([+-]?)({_NUMBER})([A-Za-z]*)")
_MEMORY_EXPECTED = "expected a memory quantity like 256Mi or 1Gi"

_CPU_RE = re.compile(rf"([+-]?)({_NUMBER})(m?)")
_CPU_EXPECTED = "expected a CPU quantity greater than 0 like 0.5, 2 or 500m"

_DURATION_UNITS = {"ns": Decimal("1e-9"), "us": Decimal("1e-6"), "µs": Decimal("1e-6"),
                   "ms": Decimal("1e-3"), "s": Decimal(1), "m": Decimal(60),
                   "h": Decimal(3600), "d": Decimal(86400)}
_UNIT = r"(ns|us|µs|ms|s|m|h|d)"
_DURATION_RE = re.compile(rf"([+-]?)((?:{_NUMBER}{_UNIT})+|{_NUMBER})")
_DURATION_PART = re.compile(rf"({_NUMBER}){_UNIT}")
_DURATION_EXPECTED = "expected a duration like 300s, 10m, 1h30m or 100ms (a bare number is seconds)"


def _check_text(v: str, expected: str) -> str:
    text = v.strip()
    if not text or len(text) > _MAX_TEXT:
        raise ValueError(expected)
    return text


def parse_memory(v: str | int | float) -> int:
    """Parse a memory quantity ("256Mi", "1G", "1.5Gi", 1048576) into bytes, rounding up."""
    if isinstance(v, bool):
        raise ValueError(_MEMORY_EXPECTED)
    if isinstance(v, int):
        amount = Decimal(v)
    elif isinstance(v, float):
        if not math.isfinite(v):
            raise ValueError(_MEMORY_EXPECTED)
        amount = Decimal(v)
    elif isinstance(v, str):
        match = _MEMORY_RE.fullmatch(_check_text(v, _MEMORY_EXPECTED))
        if match is None or match.group(3) not in _MEMORY_UNITS:
            raise ValueError(_MEMORY_EXPECTED)
        sign, number, unit = match.groups()
        with localcontext(prec=100):
            amount = Decimal(number) * _MEMORY_UNITS[unit]
        if sign == "-":
            amount = -amount
    else:
        raise ValueError(_MEMORY_EXPECTED)
    if amount < 0:
        raise ValueError("expected a memory quantity that is not negative, like 256Mi")
    if amount > MAX_MEMORY:
        raise ValueError("expected a memory quantity below 8Ei")
    return math.ceil(amount)


def parse_cpu(v: str | int | float) -> float:
    """Parse a CPU quantity (0.5, "0.5", "500m", "2") into cores; it must be over 0."""
    if isinstance(v, bool):
        raise ValueError(_CPU_EXPECTED)
    if isinstance(v, int | float):
        cores = float(v)
    elif isinstance(v, str):
        match = _CPU_RE.fullmatch(_check_text(v, _CPU_EXPECTED))
        if match is None:
            raise ValueError(_CPU_EXPECTED)
        sign, number, milli = match.groups()
        cores = float(Decimal(number) / (1000 if milli else 1))
        if sign == "-":
            cores = -cores
    else:
        raise ValueError(_CPU_EXPECTED)
    if not math.isfinite(cores) or cores <= 0:
        raise ValueError(_CPU_EXPECTED)
    return cores


def parse_duration(v: str | int | float) -> float:
    """Parse a duration ("300s", "10m", "1h30m", "100ms", "250us", or seconds) into seconds."""
    if isinstance(v, bool):
        raise ValueError(_DURATION_EXPECTED)
    if isinstance(v, int):
        seconds = Decimal(v)
    elif isinstance(v, float):
        if not math.isfinite(v):
            raise ValueError(_DURATION_EXPECTED)
        seconds = Decimal(v)
    elif isinstance(v, str):
        match = _DURATION_RE.fullmatch(_check_text(v, _DURATION_EXPECTED))
        if match is None:
            raise ValueError(_DURATION_EXPECTED)
        sign, body = match.group(1), match.group(2)
        with localcontext(prec=100):
            if _DURATION_PART.match(body):
                seconds = sum((Decimal(n) * _DURATION_UNITS[u]
                               for n, u in _DURATION_PART.findall(body)), Decimal(0))
            else:
                seconds = Decimal(body)
        if sign == "-":
            seconds = -seconds
    else:
        raise ValueError(_DURATION_EXPECTED)
    if seconds < 0:
        raise ValueError("expected a duration that is not negative, like 30s")
    if seconds > Decimal(str(MAX_DURATION)):
        raise ValueError("expected a duration shorter than 292 years")
    return float(seconds)


def format_memory(n: int) -> str:
    """Show bytes in the largest unit that divides them exactly: 268435456 -> "256Mi"."""
    if n < 0:
        raise ValueError("expected a number of bytes that is not negative")
    if n == 0:
        return "0"
    for units in (_BINARY_UNITS, _DECIMAL_UNITS):
        for unit, size in units.items():
            if n % size == 0:
                return f"{n // size}{unit}"
    return str(n)


def _number(x: float) -> str:
    return f"{x:.6f}".rstrip("0").rstrip(".")


def _whole(x: float) -> bool:
    return abs(x - round(x)) < 1e-9


def format_duration(seconds: float) -> str:
    """Show seconds for humans: 300 -> "300s", 600 -> "10m", 0.1 -> "100ms", 7200 -> "2h".

    Whole days and hours use d and h; whole minutes use m from ten minutes up; below
    one second it is ms, us or ns.
    """
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError("expected a duration in seconds that is not negative")
    if seconds == 0:
        return "0s"
    for unit, size, least in (("d", 86400, 86400), ("h", 3600, 3600), ("m", 60, 600)):
        if seconds >= least and _whole(seconds / size):
            return f"{round(seconds / size)}{unit}"
    if seconds >= 1:
        return f"{_number(seconds)}s"
    for small, scale in (("ms", 1e3), ("us", 1e6)):
        if seconds * scale >= 1:
            return f"{_number(seconds * scale)}{small}"
    return f"{_number(seconds * 1e9)}ns"
