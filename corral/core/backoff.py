"""Exponential backoff with jitter, as a pure function of the attempt number and an RNG."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

__all__ = ["BackoffPolicy"]


@dataclass(frozen=True)
class BackoffPolicy:
    """How long to wait before each retry: ``initial * multiplier**attempt``, capped and jittered.

    ``reset_after`` is the run time (seconds) after which a child counts as stable again;
    the supervisor then restarts its failure count from zero.
    """

    initial: float = 0.1
    max: float = 30.0
    multiplier: float = 2.0
    jitter: float = 0.2
    reset_after: float = 30.0

    def __post_init__(self) -> None:
        for field in ("initial", "max", "multiplier", "jitter", "reset_after"):
            value = getattr(self, field)
            if not isinstance(value, int | float) or not math.isfinite(value):
                raise ValueError(f"backoff.{field} must be a finite number, got {value!r}")
        if self.initial <= 0:
            raise ValueError(f"backoff.initial must be > 0 seconds, got {self.initial!r}")
        if self.max < self.initial:
            raise ValueError(
                f"backoff.max ({self.max!r}) must be >= backoff.initial ({self.initial!r})"
            )
        if self.multiplier < 1:
            raise ValueError(f"backoff.multiplier must be >= 1, got {self.multiplier!r}")
        if not 0 <= self.jitter <= 1:
            raise ValueError(f"backoff.jitter must be between 0 and 1, got {self.jitter!r}")
        if self.reset_after < 0:
            raise ValueError(f"backoff.reset_after must be >= 0 seconds, got {self.reset_after!r}")

    @property
    def ceiling(self) -> float:
        """The largest delay ``delay`` can return: ``max * (1 + jitter)``."""
        return self.max * (1 + self.jitter)

    def delay(self, attempt: int, rng: random.Random) -> float:
        """Seconds to wait before retry number ``attempt`` (0 is the first retry)."""
        if attempt < 0:
            raise ValueError(f"attempt must be >= 0, got {attempt!r}")
        try:
            grown = self.initial * self.multiplier**attempt
        except OverflowError:  # a huge attempt: the cap applies long before this
            grown = math.inf
        base = min(self.max, grown)
        # Jitter spreads restarts of many children so they don't retry in lockstep.
        factor = rng.uniform(1 - self.jitter, 1 + self.jitter)
        return min(max(base * factor, 0.0), self.ceiling)
