"""next_fire and validate_cron, with time passed in."""

from __future__ import annotations

import re
from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from corral.core.schedule import next_fire, validate_cron


def ts(year: int, month: int, day: int, hour: int = 0, minute: int = 0) -> float:
    return datetime(year, month, day, hour, minute, tzinfo=UTC).timestamp()


def test_interval_first_and_after_last() -> None:
    assert next_fire(now=100.0, interval=10.0) == 110.0
    assert next_fire(now=100.0, interval=10.0, last=95.0) == 105.0
    assert next_fire(now=100.0, interval=10.0, last=50.0) == 60.0  # missed: fire now


def test_cron_is_utc_and_strictly_after_now() -> None:
    on_slot = ts(2024, 1, 1, 0, 5)
    assert next_fire(now=on_slot, cron="*/5 * * * *") == ts(2024, 1, 1, 0, 10)
    assert next_fire(now=on_slot - 0.5, cron="*/5 * * * *") == on_slot
    assert next_fire(now=ts(2024, 1, 1, 13, 30), cron="0 9 * * *") == ts(2024, 1, 2, 9, 0)


def test_cron_never_goes_behind_last() -> None:
    last = ts(2024, 1, 1, 1, 0)
    assert next_fire(now=last - 30, cron="0 * * * *", last=last) == ts(2024, 1, 1, 2, 0)


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"interval": 5.0, "cron": "* * * * *"}, {"interval": 0.0}, {"interval": -1.0},
     {"interval": float("nan")}, {"interval": float("inf")}],
)
def test_bad_schedules(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        next_fire(now=0.0, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("expr", ["", "bad", "* * * *", "61 * * * *", "* * 32 * *"])
def test_validate_cron_rejects(expr: str) -> None:
    with pytest.raises(ValueError, match=re.escape(f"invalid cron expression {expr!r}")):
        validate_cron(expr)


@pytest.mark.parametrize("expr", ["* * * * *", "*/5 * * * *", "0 9 * * mon-fri", "@hourly"])
def test_validate_cron_accepts(expr: str) -> None:
    validate_cron(expr)


def test_impossible_cron_date() -> None:
    with pytest.raises(ValueError, match="never fires"):
        next_fire(now=0.0, cron="0 0 31 2 *")


@given(st.floats(0, 4e9), st.sampled_from(["* * * * *", "*/7 * * * *", "0 */3 * * *"]))
def test_cron_fires_after_now_on_a_minute(now: float, expr: str) -> None:
    t = next_fire(now=now, cron=expr)
    assert now < t <= now + 3 * 3600
    assert t % 60 == 0
