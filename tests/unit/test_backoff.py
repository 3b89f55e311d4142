"""BackoffPolicy: growth, cap, jitter bounds, validation and huge attempts."""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from corral.core.backoff import BackoffPolicy


def test_growth_without_jitter() -> None:
    p = BackoffPolicy(initial=0.1, max=30.0, multiplier=2.0, jitter=0.0)
    rng = random.Random(0)
    assert [p.delay(n, rng) for n in range(4)] == pytest.approx([0.1, 0.2, 0.4, 0.8])


def test_cap() -> None:
    p = BackoffPolicy(initial=1.0, max=5.0, multiplier=3.0, jitter=0.0)
    assert p.delay(10, random.Random(0)) == 5.0


@pytest.mark.parametrize("attempt", [1_000, 10**6, 10**400])
def test_huge_attempts_do_not_overflow(attempt: int) -> None:
    p = BackoffPolicy(jitter=0.2)
    d = p.delay(attempt, random.Random(1))
    assert 30.0 * 0.8 <= d <= 30.0 * 1.2


def test_multiplier_one_is_constant() -> None:
    p = BackoffPolicy(initial=2.0, max=10.0, multiplier=1.0, jitter=0.0)
    assert {p.delay(n, random.Random(0)) for n in (0, 5, 10**9)} == {2.0}


def test_same_seed_same_delays() -> None:
    p = BackoffPolicy()
    a = [p.delay(n, random.Random(42)) for n in range(5)]
    b = [p.delay(n, random.Random(42)) for n in range(5)]
    assert a == b


def test_negative_attempt() -> None:
    with pytest.raises(ValueError, match="attempt"):
        BackoffPolicy().delay(-1, random.Random(0))


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"initial": 0.0}, "initial"),
        ({"initial": -1.0}, "initial"),
        ({"initial": 5.0, "max": 1.0}, "max"),
        ({"multiplier": 0.5}, "multiplier"),
        ({"jitter": -0.1}, "jitter"),
        ({"jitter": 1.5}, "jitter"),
        ({"reset_after": -1.0}, "reset_after"),
        ({"max": float("inf")}, "max"),
        ({"initial": float("nan")}, "initial"),
    ],
)
def test_validation(kwargs: dict[str, float], field: str) -> None:
    with pytest.raises(ValueError, match=f"backoff.{field}"):
        BackoffPolicy(**kwargs)


policies = st.builds(
    BackoffPolicy,
    initial=st.floats(0.001, 10),
    max=st.floats(10, 1000),
    multiplier=st.floats(1, 10),
    jitter=st.floats(0, 1),
    reset_after=st.floats(0, 100),
)


@given(policies, st.integers(0, 10_000), st.integers(0, 2**32))
def test_delay_within_bounds(p: BackoffPolicy, attempt: int, seed: int) -> None:
    d = p.delay(attempt, random.Random(seed))
    # The reference computes in log space, so it cannot overflow either.
    base = min(p.max, math.exp(min(700.0, math.log(p.initial) + attempt * math.log(p.multiplier))))
    assert 0 <= d <= p.ceiling
    assert base * (1 - p.jitter) * (1 - 1e-9) <= d <= base * (1 + p.jitter) * (1 + 1e-9)


@given(policies, st.integers(0, 200))
def test_unjittered_delay_never_shrinks(p: BackoffPolicy, attempt: int) -> None:
    flat = BackoffPolicy(p.initial, p.max, p.multiplier, 0.0, p.reset_after)
    rng = random.Random(0)
    assert flat.delay(attempt, rng) <= flat.delay(attempt + 1, rng)
