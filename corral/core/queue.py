"""A bounded priority queue: five FIFO levels, O(1) push and pop, Backpressure when full."""

from __future__ import annotations

from collections import deque
from enum import IntEnum
from typing import Generic, TypeVar

from corral.errors import Backpressure

__all__ = ["Priority", "PriorityQueue"]

T = TypeVar("T")


class Priority(IntEnum):
    """Task priority; a lower value is served first."""

    CRITICAL = 0
    HIGH = 1
    NORMAL = 2
    LOW = 3
    BACKGROUND = 4

    @classmethod
    def parse(cls, text: str) -> Priority:
        """Parse a level name such as ``"high"`` (case-insensitive)."""
        try:
            return cls[text.strip().upper()]
        except KeyError:
            names = ", ".join(p.name.lower() for p in cls)
            raise ValueError(f"unknown priority {text!r}; expected one of: {names}") from None


class PriorityQueue(Generic[T]):
    """Highest priority first, FIFO within a level, at most ``maxsize`` items."""

    def __init__(self, maxsize: int) -> None:
        # No default: like trio's channels, the caller chooses the bound on purpose.
        if maxsize < 1:
            raise ValueError(f"maxsize must be >= 1, got {maxsize!r}")
        self.maxsize = maxsize
        self._levels: tuple[deque[T], ...] = tuple(deque() for _ in Priority)
        self._len = 0
        self._peak = 0

    def push(self, item: T, priority: Priority = Priority.NORMAL) -> None:
        """Queue ``item``; raise Backpressure when the queue is full."""
        if self._len >= self.maxsize:
            raise Backpressure(f"queue is full ({self._len}/{self.maxsize} items)")
        self._levels[priority].append(item)
        self._len += 1
        self._peak = max(self._peak, self._len)

    def pop(self) -> T:
        """Remove and return the next item; IndexError when empty."""
        for level in self._levels:
            if level:
                self._len -= 1
                return level.popleft()
        raise IndexError("pop from an empty PriorityQueue")

    def peek(self) -> T:
        """Return the next item without removing it; IndexError when empty."""
        for level in self._levels:
            if level:
                return level[0]
        raise IndexError("peek at an empty PriorityQueue")

    def remove(self, item: T) -> bool:
        """Remove the first queued object that *is* ``item``; return whether one was found."""
        # Identity, not equality: two equal task payloads are still two tasks.
        for level in self._levels:
            for i, queued in enumerate(level):
                if queued is item:
                    del level[i]
                    self._len -= 1
                    return True
        return False

    def depth_by_level(self) -> dict[Priority, int]:
        """How many items wait at each priority."""
        return {p: len(self._levels[p]) for p in Priority}

    @property
    def peak(self) -> int:
        """The largest length this queue has had."""
        return self._peak

    def drain(self) -> list[T]:
        """Remove and return every item, in pop order."""
        items = [x for level in self._levels for x in level]
        for level in self._levels:
            level.clear()
        self._len = 0
        return items

    def __len__(self) -> int:
        return self._len

    def __bool__(self) -> bool:
        return self._len > 0
