"""A bounded map that forgets its oldest entry when full; lookups take no lock."""

from __future__ import annotations

import threading
from typing import Generic, TypeVar

__all__ = ["BoundedCache"]

K = TypeVar("K")
V = TypeVar("V")


class BoundedCache(Generic[K, V]):
    """At most ``size`` entries, oldest out first (dicts keep insertion order); size 0 = off.

    First-in-first-out rather than LRU: a hit then costs one dict lookup and no
    bookkeeping, which is the whole point on the decision path.
    """

    __slots__ = ("_data", "_lock", "size")

    def __init__(self, size: int) -> None:
        self.size = size
        self._data: dict[K, V] = {}
        self._lock = threading.Lock()

    def get(self, key: K) -> V | None:
        """The value stored for key, or None."""
        return self._data.get(key)

    def put(self, key: K, value: V) -> None:
        """Store a value, evicting the oldest entry when full."""
        if not self.size:
            return
        with self._lock:  # eviction must not race another thread's insert
            if len(self._data) >= self.size:
                del self._data[next(iter(self._data))]
            self._data[key] = value

    def __len__(self) -> int:
        return len(self._data)
