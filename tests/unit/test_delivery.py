"""The at-least-once decision table: every row, validation, and properties of delays."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from corral.core.backoff import BackoffPolicy
from corral.core.delivery import (
    Ack,
    DeadLetter,
    Decision,
    DeliveryPolicy,
    Nack,
    Outcome,
    Redeliver,
    Settle,
    Timeout,
    decide,
    expired,
)

FIXED = DeliveryPolicy(max_deliver=5, backoff=BackoffPolicy(initial=1.0, max=8.0, jitter=0.0))


def run(outcome: Outcome, delivered: int = 1, now: float = 100.0,
        expires_at: float | None = None, policy: DeliveryPolicy = FIXED) -> Decision:
    return decide(outcome, delivered=delivered, now=now, expires_at=expires_at, policy=policy,
                  rng=random.Random(0))


@pytest.mark.parametrize(
    ("outcome", "delivered", "expires_at", "expected"),
    [
        # Ack settles, whatever else is true.
        (Ack(), 1, None, Settle()),
        (Ack(), 5, None, Settle()),
        (Ack(), 99, 50.0, Settle()),
        # Out of deliveries: dead-letter with the last reason (checked before the TTL).
        (Nack("boom"), 5, None, DeadLetter("delivered 5 times (maxDeliver=5): boom")),
        (Nack(), 6, None, DeadLetter("delivered 6 times (maxDeliver=5): nacked")),
        (Timeout(), 5, 50.0,
         DeadLetter("delivered 5 times (maxDeliver=5): no ack within ack wait")),
        # TTL ran out (now >= expires_at).
        (Nack("x"), 1, 100.0, DeadLetter("ttl expired")),
        (Timeout(), 2, 99.0, DeadLetter("ttl expired")),
        # The redelivery would land at or after the expiry.
        (Nack("x"), 1, 101.0, DeadLetter("ttl would expire before redelivery")),  # 100 + 1
        (Nack("x"), 3, 103.5, DeadLetter("ttl would expire before redelivery")),  # 100 + 4
        # Otherwise redeliver after backoff(delivered - 1).
        (Nack("x"), 1, None, Redeliver(1.0)),
        (Timeout(), 2, None, Redeliver(2.0)),
        (Nack("x"), 3, 104.5, Redeliver(4.0)),
        (Nack("x"), 4, None, Redeliver(8.0)),
    ],
)
def test_table(outcome: Outcome, delivered: int, expires_at: float | None,
               expected: Decision) -> None:
    assert run(outcome, delivered, expires_at=expires_at) == expected


def test_cap_applies_to_late_attempts() -> None:
    policy = DeliveryPolicy(max_deliver=100, backoff=BackoffPolicy(initial=1.0, max=8.0, jitter=0))
    assert run(Nack(), 50, policy=policy) == Redeliver(8.0)


def test_max_deliver_one_never_redelivers() -> None:
    policy = DeliveryPolicy(max_deliver=1)
    assert run(Nack("bad input"), 1, policy=policy) == DeadLetter(
        "delivered 1 times (maxDeliver=1): bad input")


def test_defaults() -> None:
    p = DeliveryPolicy()
    assert p.max_deliver == 5
    assert (p.backoff.initial, p.backoff.max) == (0.1, 30.0)


def test_expired() -> None:
    assert expired(10.0, None) is False
    assert expired(9.9, 10.0) is False
    assert expired(10.0, 10.0) is True
    assert expired(11.0, 10.0) is True


def test_same_seed_same_decision() -> None:
    policy = DeliveryPolicy()
    a = decide(Nack(), delivered=2, now=0.0, expires_at=None, policy=policy, rng=random.Random(7))
    b = decide(Nack(), delivered=2, now=0.0, expires_at=None, policy=policy, rng=random.Random(7))
    assert a == b and isinstance(a, Redeliver)


@pytest.mark.parametrize("delivered", [0, -1])
def test_delivered_must_be_positive(delivered: int) -> None:
    with pytest.raises(ValueError, match="delivered counts the delivery just made"):
        run(Ack(), delivered)


def test_unknown_outcome() -> None:
    with pytest.raises(TypeError, match="not a delivery outcome"):
        run(Settle())  # type: ignore[arg-type]


@pytest.mark.parametrize("value", [0, -3, 2.5, True])
def test_max_deliver_validation(value: object) -> None:
    with pytest.raises(ValueError, match="maxDeliver"):
        DeliveryPolicy(max_deliver=value)  # type: ignore[arg-type]


_outcomes = st.sampled_from([Ack(), Nack("e"), Timeout()])


@given(
    outcome=_outcomes,
    delivered=st.integers(1, 50),
    max_deliver=st.integers(1, 10),
    now=st.floats(0, 1e6),
    ttl=st.none() | st.floats(-100, 100),
    seed=st.integers(0, 2**32),
)
def test_properties(outcome: Outcome, delivered: int, max_deliver: int, now: float,
                    ttl: float | None, seed: int) -> None:
    policy = DeliveryPolicy(max_deliver=max_deliver)
    expires_at = None if ttl is None else now + ttl
    d = decide(outcome, delivered=delivered, now=now, expires_at=expires_at, policy=policy,
               rng=random.Random(seed))
    if isinstance(outcome, Ack):
        assert d == Settle()
        return
    assert not isinstance(d, Settle)
    if delivered >= max_deliver or expired(now, expires_at):
        assert isinstance(d, DeadLetter)
    if isinstance(d, Redeliver):
        assert delivered < max_deliver
        assert 0 <= d.delay <= policy.backoff.ceiling
        assert expires_at is None or now + d.delay < expires_at
