"""TokenBucket and RateLimiter: burst, refill, wait_time, eviction, and the rate bound."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from corral.core.ratelimit import RateLimiter, TokenBucket


def test_burst_then_refill() -> None:
    b = TokenBucket(rate=2.0, burst=3)
    assert [b.take(0.0) for _ in range(4)] == [True, True, True, False]
    assert b.tokens(0.0) == 0.0
    assert b.take(0.25) is False  # half a token
    assert b.take(0.5) is True
    assert b.take(0.5) is False
    assert b.tokens(100.0) == 3.0  # never more than burst


def test_take_n() -> None:
    b = TokenBucket(rate=1.0, burst=5)
    assert b.take(0.0, 4) is True
    assert b.take(0.0, 2) is False  # nothing is taken on failure
    assert b.tokens(0.0) == 1.0
    assert b.take(1.0, 2) is True
    assert b.take(1.0, 0) is True


def test_wait_time() -> None:
    b = TokenBucket(rate=4.0, burst=2)
    assert b.wait_time(0.0) == 0.0
    b.take(0.0, 2)
    assert b.wait_time(0.0) == 0.25
    assert b.wait_time(0.0, 2) == 0.5
    assert b.wait_time(0.1) == pytest.approx(0.15)
    assert b.take(0.0 + b.wait_time(0.0)) is True


def test_clock_stepping_back_is_only_stricter() -> None:
    b = TokenBucket(rate=1.0, burst=1)
    assert b.take(100.0)
    assert b.take(50.0) is False
    assert b.tokens(50.0) == 0.0
    assert b.wait_time(50.0) == 51.0


@pytest.mark.parametrize("n", [-1, 4, 1.5, True])
def test_n_validation(n: int) -> None:
    b = TokenBucket(rate=1.0, burst=3)
    with pytest.raises(ValueError, match="from 0 to burst=3"):
        b.take(0.0, n)
    with pytest.raises(ValueError, match="from 0 to burst=3"):
        b.wait_time(0.0, n)


@pytest.mark.parametrize("now", [math.nan, math.inf, -math.inf])
def test_now_validation(now: float) -> None:
    with pytest.raises(ValueError, match="now must be a finite"):
        TokenBucket(1.0, 1).take(now)


@pytest.mark.parametrize(
    ("rate", "burst", "message"),
    [(0.0, 1, "rate"), (-1.0, 1, "rate"), (math.inf, 1, "rate"), (math.nan, 1, "rate"),
     (1.0, 0, "burst"), (1.0, 1.5, "burst")],
)
def test_config_validation(rate: float, burst: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TokenBucket(rate, burst)
    with pytest.raises(ValueError, match=message):
        RateLimiter(rate, burst, 10)


def test_limiter_max_keys_validation() -> None:
    with pytest.raises(ValueError, match="max_keys"):
        RateLimiter(1.0, 1, 0)


def test_limiter_keys_are_independent() -> None:
    rl = RateLimiter(rate=1.0, burst=2, max_keys=10)
    assert rl.take("a", 0.0) and rl.take("a", 0.0)
    assert rl.take("a", 0.0) is False
    assert rl.take("b", 0.0) is True
    assert rl.wait_time("a", 0.0) == 1.0
    assert rl.wait_time("new", 0.0) == 0.0
    assert len(rl) == 2  # wait_time does not create buckets


def test_limiter_drops_full_buckets() -> None:
    rl = RateLimiter(rate=1.0, burst=2, max_keys=10)
    rl.take("a", 0.0)
    rl.take("b", 0.5)
    assert len(rl) == 2
    rl.take("c", 1.0)  # "a" (least recently used) is full again at 1.0: dropped
    assert len(rl) == 2
    assert rl.prune(10.0) == 2
    assert len(rl) == 0 and rl.forced_evictions == 0


def test_limiter_forced_eviction_of_least_recently_used() -> None:
    rl = RateLimiter(rate=1.0, burst=2, max_keys=2)
    for key in ("a", "b"):
        rl.take(key, 0.0, 2)
    rl.take("a", 0.0)  # "a" is now the most recently used (the take itself fails)
    assert rl.take("c", 0.0) is True
    assert rl.forced_evictions == 1 and len(rl) == 2
    assert rl.take("a", 0.0) is False  # "a" kept its empty bucket
    assert rl.take("b", 0.0, 2) is True  # "b" was dropped early: it starts full again


def test_limiter_invalid_call_changes_nothing() -> None:
    rl = RateLimiter(rate=1.0, burst=2, max_keys=1)
    rl.take("a", 0.0, 2)
    with pytest.raises(ValueError):
        rl.take("b", 0.0, 3)
    assert len(rl) == 1 and rl.forced_evictions == 0 and rl.take("a", 0.0) is False


# --- properties ---------------------------------------------------------------------------

_rates = st.floats(0.01, 1000)
_bursts = st.integers(1, 20)


@given(rate=_rates, burst=_bursts,
       calls=st.lists(st.tuples(st.floats(-1e6, 1e6), st.integers(0, 3)), min_size=1,
                      max_size=200))
def test_never_more_than_burst_plus_rate_times_elapsed(
    rate: float, burst: int, calls: list[tuple[float, int]]
) -> None:
    """Over any times (even out of order), taken <= burst + rate * (latest - earliest)."""
    b = TokenBucket(rate, burst)
    taken = 0
    times = [t for t, _ in calls]
    for now, n in calls:
        n = min(n, burst)
        if b.take(now, n):
            taken += n
    bound = burst + rate * (max(times) - min(times))
    assert taken <= bound * (1 + 1e-9) + 1e-9


@given(rate=_rates, burst=_bursts, start=st.floats(0, 1e6),
       steps=st.lists(st.floats(0, 2), min_size=1, max_size=100))
def test_steady_clock_bound(rate: float, burst: int, start: float, steps: list[float]) -> None:
    """The same bound for a caller that drains the bucket at every tick of a steady clock."""
    b = TokenBucket(rate, burst)
    now, taken = start, 0
    for step in steps:
        now += step
        while b.take(now):
            taken += 1
    bound = burst + rate * (now - start)
    assert taken <= bound * (1 + 1e-9) + 1e-9


@given(rate=_rates, burst=_bursts, now=st.floats(-1e6, 1e6),
       taken=st.integers(0, 40), n=st.integers(0, 20))
def test_wait_time_is_exact(rate: float, burst: int, now: float, taken: int, n: int) -> None:
    """take fails now if wait_time(now) > 0, and succeeds at now + wait_time(now)."""
    b = TokenBucket(rate, burst)
    n = min(n, burst)
    for _ in range(taken):
        b.take(now)
    wait = b.wait_time(now, n)
    slack = 64 * math.ulp(abs(now) + burst / rate)  # rounding of the stored times
    assert 0.0 <= wait <= burst / rate + slack
    if wait > 0:
        assert b.take(now, n) is False
    assert b.take(now + wait, n) is True


@given(keys=st.lists(st.tuples(st.sampled_from("abcdef"), st.floats(0, 1)), max_size=100),
       max_keys=st.integers(1, 6))
def test_limiter_memory_bound(keys: list[tuple[str, float]], max_keys: int) -> None:
    rl = RateLimiter(rate=1.0, burst=2, max_keys=max_keys)
    now = 0.0
    for key, step in keys:
        now += step
        rl.take(key, now)
        assert len(rl) <= max_keys
