"""Effectively-once delivery: a bounded, time-windowed memory of idempotency keys.

``DedupWindow.seen(key, now)`` answers "was this key recorded within the last ``window``
seconds?" and records it if not. The exact guarantee: ``seen(k, now)`` returns True if and
only if ``k`` was recorded at some time ``t`` with ``now - t < window`` **and** fewer than
``max_keys`` other keys have been recorded since ``t``. The second condition is the memory
bound: the window holds at most ``max_keys`` keys and forgets the oldest first, so a key
evicted early is reported as new and its message can be delivered (processed) again. Size
``max_keys`` above the number of distinct keys expected within one window (peak message
rate times ``window``); ``evictions`` counts keys forgotten early, so the runtime can warn.

The window runs on the largest ``now`` seen so far: a clock that steps back pauses expiry
(keys are kept longer, never shorter) and a key is recorded at that largest time, which keeps
the keys in time order. Entries live in an ``OrderedDict`` oldest first, so ``seen`` costs
O(1) amortised: expiry pops from the front, recording appends at the back.

``export()`` and ``load()`` move the ``(key, time)`` pairs to and from storage so a restart
keeps the window; that needs a clock that survives restarts (wall time, not monotonic).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Iterable

__all__ = ["DedupWindow"]


class DedupWindow:
    """Idempotency keys recorded within the last ``window`` seconds, at most ``max_keys``."""

    def __init__(self, window: float, max_keys: int) -> None:
        if isinstance(window, bool) or not isinstance(window, int | float) or not (
            math.isfinite(window) and window > 0
        ):
            raise ValueError(f"dedup window must be a finite number of seconds > 0, got {window!r}")
        if isinstance(max_keys, bool) or not isinstance(max_keys, int) or max_keys < 1:
            raise ValueError(f"dedup max_keys must be an integer >= 1, got {max_keys!r}")
        self.window = float(window)
        self.max_keys = max_keys
        self._keys: OrderedDict[str, float] = OrderedDict()  # key -> time recorded, oldest first
        self._now = -math.inf  # the largest `now` seen
        self._evictions = 0

    def seen(self, key: str, now: float) -> bool:
        """True if ``key`` was recorded within the window; otherwise record it and return False."""
        now = self._advance(now)
        self._expire()
        if key in self._keys:
            return True
        if len(self._keys) >= self.max_keys:
            self._keys.popitem(last=False)
            self._evictions += 1
        self._keys[key] = now
        return False

    def contains(self, key: str, now: float) -> bool:
        """True if ``key`` was recorded within the window; records nothing."""
        now = self._advance(now)
        self._expire()
        return key in self._keys

    def expire(self, now: float) -> int:
        """Forget keys older than the window (``seen`` does this too); return how many went."""
        self._advance(now)
        return self._expire()

    def export(self) -> list[tuple[str, float]]:
        """The recorded ``(key, time)`` pairs, oldest first, for ``load`` after a restart."""
        return list(self._keys.items())

    def load(self, entries: Iterable[tuple[str, float]], now: float) -> None:
        """Merge exported pairs into the window, dropping any already expired at ``now``.

        A time later than ``now`` (the clock stepped back across a restart) is read as ``now``.
        A key present twice keeps its latest time. If more than ``max_keys`` remain, the
        oldest are dropped and counted in ``evictions``.
        """
        now = self._advance(now)
        merged = dict(self._keys)
        for key, ts in entries:
            if not isinstance(key, str):
                raise ValueError(f"dedup key must be a str, got {key!r}")
            if isinstance(ts, bool) or not isinstance(ts, int | float) or not math.isfinite(ts):
                raise ValueError(f"dedup time for key {key!r} must be a finite number, got {ts!r}")
            ts = min(float(ts), now)
            if now - ts < self.window and ts > merged.get(key, -math.inf):
                merged[key] = ts
        ordered = sorted(merged.items(), key=lambda kv: kv[1])
        drop = max(0, len(ordered) - self.max_keys)
        self._evictions += drop
        self._keys = OrderedDict(ordered[drop:])
        self._expire()

    @property
    def evictions(self) -> int:
        """How many keys were forgotten before their window ran out, to respect ``max_keys``."""
        return self._evictions

    def __len__(self) -> int:
        """The number of keys recorded (some may have expired since the last call)."""
        return len(self._keys)

    def _advance(self, now: float) -> float:
        if isinstance(now, bool) or not isinstance(now, int | float) or not math.isfinite(now):
            raise ValueError(f"now must be a finite number of seconds, got {now!r}")
        if now > self._now:
            self._now = float(now)
        return self._now

    def _expire(self) -> int:
        keys, now, window = self._keys, self._now, self.window
        gone = 0
        while keys:
            key, ts = next(iter(keys.items()))
            if now - ts < window:
                break
            del keys[key]
            gone += 1
        return gone
