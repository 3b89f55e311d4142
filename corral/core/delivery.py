"""At-least-once delivery: what becomes of a message after one delivery attempt.

``decide(outcome, delivered=..., now=..., expires_at=..., policy=..., rng=...)`` is the whole
decision table. Rows are checked top to bottom and the first that applies wins:

=================  ==========================================  ==================================
outcome            condition                                   decision
=================  ==========================================  ==================================
``Ack``            always (even if the TTL ran out meanwhile)  ``Settle()``
``Nack/Timeout``   ``delivered >= policy.max_deliver``         ``DeadLetter("delivered N times
                                                               (maxDeliver=M): <reason>")``
``Nack/Timeout``   ``expired(now, expires_at)``                ``DeadLetter("ttl expired")``
``Nack/Timeout``   ``now + delay >= expires_at``               ``DeadLetter("ttl would expire
                                                               before redelivery")``
``Nack/Timeout``   otherwise                                   ``Redeliver(delay)``
=================  ==========================================  ==================================

``delay`` is ``policy.backoff.delay(delivered - 1, rng)``, so the first redelivery waits about
``backoff.initial``; ``<reason>`` is the Nack's reason, or ``"no ack within ack wait"`` for a
Timeout. ``rng`` is drawn from only when a delay is computed.

Runtime contract: ``delivered`` counts deliveries of this message including the one just
made (1 on the first, as in ``Incoming.delivered``); check ``expired`` before each delivery
and dead-letter with ``"ttl expired"`` instead of delivering; carry out the decision, and
feed the next delivery's outcome back here.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from corral.core.backoff import BackoffPolicy

__all__ = [
    "Ack",
    "DeadLetter",
    "Decision",
    "DeliveryPolicy",
    "Nack",
    "Outcome",
    "Redeliver",
    "Settle",
    "Timeout",
    "decide",
    "expired",
]


@dataclass(frozen=True)
class DeliveryPolicy:
    """How often a message is delivered before it is dead-lettered, and how long between tries."""

    max_deliver: int = 5
    backoff: BackoffPolicy = field(default_factory=lambda: BackoffPolicy(initial=0.1, max=30.0))

    def __post_init__(self) -> None:
        if isinstance(self.max_deliver, bool) or not isinstance(self.max_deliver, int):
            raise ValueError(f"maxDeliver must be an integer, got {self.max_deliver!r}")
        if self.max_deliver < 1:
            raise ValueError(f"maxDeliver must be >= 1, got {self.max_deliver!r}")


@dataclass(frozen=True)
class Ack:
    """The handler finished with the message."""


@dataclass(frozen=True)
class Nack:
    """The handler gave the message back; ``reason`` says why (e.g. the error it raised)."""

    reason: str = ""


@dataclass(frozen=True)
class Timeout:
    """No ack or nack arrived within the subscription's ack wait."""


@dataclass(frozen=True)
class Settle:
    """The message is done: never deliver it again."""


@dataclass(frozen=True)
class Redeliver:
    """Deliver the message again after ``delay`` seconds."""

    delay: float


@dataclass(frozen=True)
class DeadLetter:
    """Move the message to the dead-letter queue with ``reason``; never deliver it again."""

    reason: str


Outcome = Ack | Nack | Timeout
Decision = Settle | Redeliver | DeadLetter

_TIMEOUT_REASON = "no ack within ack wait"


def expired(now: float, expires_at: float | None) -> bool:
    """Whether a message with this expiry time (None: never expires) is past its TTL at ``now``."""
    return expires_at is not None and now >= expires_at


def decide(
    outcome: Outcome,
    *,
    delivered: int,
    now: float,
    expires_at: float | None,
    policy: DeliveryPolicy,
    rng: random.Random,
) -> Decision:
    """What to do with a message after a delivery ended in ``outcome`` (see the module's table)."""
    if delivered < 1:
        raise ValueError(f"delivered counts the delivery just made, so it must be >= 1, "
                         f"got {delivered!r}")
    match outcome:
        case Ack():
            return Settle()
        case Nack(reason):
            why = reason or "nacked"
        case Timeout():
            why = _TIMEOUT_REASON
        case _:
            raise TypeError(f"not a delivery outcome: {outcome!r}")
    if delivered >= policy.max_deliver:
        return DeadLetter(f"delivered {delivered} times (maxDeliver={policy.max_deliver}): {why}")
    if expired(now, expires_at):
        return DeadLetter("ttl expired")
    delay = policy.backoff.delay(delivered - 1, rng)
    if expires_at is not None and now + delay >= expires_at:
        return DeadLetter("ttl would expire before redelivery")
    return Redeliver(delay)
