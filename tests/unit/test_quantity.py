"""Parsers and formatters of memory, CPU and duration quantities."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from corral.spec.quantity import (
    MAX_MEMORY,
    format_duration,
    format_memory,
    parse_cpu,
    parse_duration,
    parse_memory,
)

Ki, Mi, Gi, Ti = 1024, 1024**2, 1024**3, 1024**4


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("256Mi", 256 * Mi),
        ("1Gi", Gi),
        ("512Ki", 512 * Ki),
        ("2Ti", 2 * Ti),
        ("100M", 100_000_000),
        ("1G", 1_000_000_000),
        ("10k", 10_000),
        ("10K", 10_000),
        ("1.5Gi", 1536 * Mi),
        ("1048576", 1048576),
        (" 64Mi ", 64 * Mi),
        ("0", 0),
        ("0Mi", 0),
        ("0.5", 1),  # fractions of a byte round up
        (1048576, 1048576),
        (0, 0),
        (2.0, 2),
    ],
)
def test_parse_memory(text: str | int, expected: int) -> None:
    assert parse_memory(text) == expected


@pytest.mark.parametrize(
    "bad",
    ["", "abc", "1Qi", "Mi", "1 Mi", "-1Mi", "1e3", "1.2.3Gi", -1, True, None, [1], {},
     float("nan"), float("inf"), "9" * 100, "99999999Ei"],
)
def test_parse_memory_rejects(bad: object) -> None:
    with pytest.raises(ValueError, match="expected a memory quantity"):
        parse_memory(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("value", "expected"),
    [(0.5, 0.5), ("0.5", 0.5), ("500m", 0.5), ("2", 2.0), (2, 2.0), ("1m", 0.001), (" 4 ", 4.0)],
)
def test_parse_cpu(value: str | float, expected: float) -> None:
    assert parse_cpu(value) == pytest.approx(expected)


@pytest.mark.parametrize(
    "bad", [0, "0", "0m", -1, "-1", "", "half", "1 m", "5mm", True, None, float("nan"),
            float("inf"), [1]],
)
def test_parse_cpu_rejects(bad: object) -> None:
    with pytest.raises(ValueError, match="expected a CPU quantity greater than 0"):
        parse_cpu(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (30, 30.0),
        (1.5, 1.5),
        (0, 0.0),
        ("300s", 300.0),
        ("10m", 600.0),
        ("1h", 3600.0),
        ("2d", 172800.0),
        ("100ms", 0.1),
        ("1.5s", 1.5),
        ("250us", 0.00025),
        ("250µs", 0.00025),
        ("10ns", 1e-8),
        ("1h30m", 5400.0),
        ("1d2h3m4s5ms", 93784.005),
        ("30", 30.0),
        ("0.25", 0.25),
    ],
)
def test_parse_duration(value: str | float, expected: float) -> None:
    assert parse_duration(value) == pytest.approx(expected)


@pytest.mark.parametrize(
    "bad", ["", "s", "10x", "1h 30m", "-5s", -1, "ten seconds", "1.2.3s", True, None,
            float("nan"), float("inf"), "999999999999d", [1]],
)
def test_parse_duration_rejects(bad: object) -> None:
    with pytest.raises(ValueError, match="expected a duration"):
        parse_duration(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("n", "text"),
    [(0, "0"), (256 * Mi, "256Mi"), (Gi, "1Gi"), (1536 * Mi, "1536Mi"), (512 * Ki, "512Ki"),
     (100_000_000, "100M"), (10_000, "10k"), (1023, "1023")],
)
def test_format_memory(n: int, text: str) -> None:
    assert format_memory(n) == text


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0s"), (300, "300s"), (60, "60s"), (600, "10m"), (5400, "90m"), (3600, "1h"),
     (172800, "2d"), (0.1, "100ms"), (1.5, "1.5s"), (0.00025, "250us"), (1e-8, "10ns")],
)
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


def test_formatters_reject_negatives() -> None:
    with pytest.raises(ValueError):
        format_memory(-1)
    with pytest.raises(ValueError):
        format_duration(-1)


@given(st.integers(min_value=0, max_value=MAX_MEMORY))
def test_memory_round_trip(n: int) -> None:
    assert parse_memory(format_memory(n)) == n


@given(st.integers(min_value=0, max_value=2**20),
       st.sampled_from(["", "Ki", "Mi", "Gi", "Ti", "k", "M", "G"]))
def test_memory_whole_units_round_trip(count: int, unit: str) -> None:
    n = parse_memory(f"{count}{unit}")
    assert parse_memory(format_memory(n)) == n


@given(st.integers(min_value=0, max_value=10**9))
def test_duration_whole_seconds_round_trip(n: int) -> None:
    assert parse_duration(format_duration(n)) == n


@given(st.integers(min_value=1, max_value=10**6), st.sampled_from(["us", "ms", "s", "m", "h"]))
def test_duration_units_round_trip(count: int, unit: str) -> None:
    seconds = parse_duration(f"{count}{unit}")
    assert math.isclose(parse_duration(format_duration(seconds)), seconds, rel_tol=1e-6)


@given(st.one_of(st.text(max_size=20), st.integers(), st.floats(), st.none(), st.booleans()))
def test_parsers_only_raise_value_error(value: object) -> None:
    for parse in (parse_memory, parse_cpu, parse_duration):
        try:
            parse(value)  # type: ignore[operator]
        except ValueError as exc:
            assert str(exc).startswith("expected ")
