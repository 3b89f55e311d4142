"""Rate limits: a token bucket, and one bucket per key (agent name) in bounded memory.

A bucket holds up to ``burst`` tokens and refills at ``rate`` tokens per second; each message
takes one. It starts full. Over any run of calls, the number of tokens taken is at most
``burst + rate * (latest now - earliest now)``.

``TokenBucket`` stores one number, the "theoretical arrival time" of the generic cell rate
algorithm (GCRA): the time at which the bucket would be full again. That is the same limit
as counting tokens, with no refill arithmetic, and a clock that steps back only makes the
bucket stricter. ``take(now + wait_time(now))`` succeeds, float rounding included.
"""

from __future__ import annotations

import math
from collections import OrderedDict

__all__ = ["RateLimiter", "TokenBucket"]


def _check_config(rate: float, burst: int) -> None:
    if isinstance(rate, bool) or not isinstance(rate, int | float) or not (
        math.isfinite(rate) and rate > 0
    ):
        raise ValueError(f"rate must be a finite number of tokens per second > 0, got {rate!r}")
    if isinstance(burst, bool) or not isinstance(burst, int) or burst < 1:
        raise ValueError(f"burst must be an integer >= 1, got {burst!r}")


class TokenBucket:
    """At most ``burst`` at once, refilled at ``rate`` tokens per second; starts full."""

    __slots__ = ("_interval", "_tat", "burst", "rate")

    def __init__(self, rate: float, burst: int) -> None:
        _check_config(rate, burst)
        self.rate = float(rate)
        self.burst = burst
        self._interval = 1.0 / self.rate  # seconds to refill one token
        self._tat = -math.inf  # the bucket is full whenever now >= _tat

    def take(self, now: float, n: int = 1) -> bool:
        """Take ``n`` tokens if the bucket holds them at ``now``; False (nothing taken) if not."""
        if now < self._ready_at(now, n):
            return False
        self._tat = max(self._tat, now) + n * self._interval
        return True

    def wait_time(self, now: float, n: int = 1) -> float:
        """Seconds from ``now`` until ``take(n)`` would succeed (0.0 if it would now)."""
        ready = self._ready_at(now, n)
        if now >= ready:
            return 0.0
        wait = ready - now
        while now + wait < ready:  # at most a few steps: undo the subtraction's rounding
            wait = math.nextafter(wait, math.inf)
        return wait

    def tokens(self, now: float) -> float:
        """How many tokens the bucket holds at ``now``, between 0 and ``burst``."""
        if now >= self._tat:
            return float(self.burst)
        return max(0.0, self.burst - (self._tat - now) * self.rate)

    def full(self, now: float) -> bool:
        """Whether the bucket is full at ``now``, so it is the same as a new one."""
        return now >= self._tat

    def _ready_at(self, now: float, n: int) -> float:
        """The earliest time at which ``n`` tokens are available."""
        if not math.isfinite(now):
            raise ValueError(f"now must be a finite number of seconds, got {now!r}")
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= self.burst:
            raise ValueError(f"n must be an integer from 0 to burst={self.burst}, got {n!r}; "
                             f"more than burst could never be taken")
        return self._tat - (self.burst - n) * self._interval


class RateLimiter:
    """One ``TokenBucket(rate, burst)`` per key, for at most ``max_keys`` keys.

    A full bucket is the same as a new one, so dropping it loses nothing: each call drops the
    least recently used buckets while they are full, and ``prune`` drops every full bucket.
    When a new key arrives with ``max_keys`` buckets still in use, the least recently used
    bucket is dropped although it is not full (``forced_evictions`` counts these): its key
    then starts again from a full bucket, so it may send up to ``burst`` more messages than
    its limit allows. A key that keeps sending stays recently used and is not the one dropped.
    """

    def __init__(self, rate: float, burst: int, max_keys: int) -> None:
        _check_config(rate, burst)
        if isinstance(max_keys, bool) or not isinstance(max_keys, int) or max_keys < 1:
            raise ValueError(f"rate limiter max_keys must be an integer >= 1, got {max_keys!r}")
        self.rate = float(rate)
        self.burst = burst
        self.max_keys = max_keys
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()  # least recently used first
        self._forced = 0

    def take(self, key: str, now: float, n: int = 1) -> bool:
        """Take ``n`` tokens from ``key``'s bucket if it holds them at ``now``."""
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = TokenBucket(self.rate, self.burst)
            ok = bucket.take(now, n)  # validates now and n before anything changes
            self._drop_full(now)
            if len(self._buckets) >= self.max_keys:
                self._buckets.popitem(last=False)
                self._forced += 1
            self._buckets[key] = bucket
        else:
            self._buckets.move_to_end(key)
            ok = bucket.take(now, n)
            self._drop_full(now)
        return ok

    def wait_time(self, key: str, now: float, n: int = 1) -> float:
        """Seconds from ``now`` until ``take(key, n)`` would succeed (0.0 if it would now)."""
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = TokenBucket(self.rate, self.burst)  # what take would start from
        return bucket.wait_time(now, n)

    def prune(self, now: float) -> int:
        """Drop every bucket that is full at ``now``; return how many went."""
        full = [key for key, bucket in self._buckets.items() if bucket.full(now)]
        for key in full:
            del self._buckets[key]
        return len(full)

    @property
    def forced_evictions(self) -> int:
        """How many buckets were dropped before they were full, to respect ``max_keys``."""
        return self._forced

    def __len__(self) -> int:
        """The number of keys with a bucket."""
        return len(self._buckets)

    def _drop_full(self, now: float) -> None:
        buckets = self._buckets
        while buckets and next(iter(buckets.values())).full(now):
            buckets.popitem(last=False)
