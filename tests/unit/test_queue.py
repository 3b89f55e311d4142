"""PriorityQueue: order, bound, remove, peak, and a model-based test against a sorted list."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from corral.core.queue import Priority, PriorityQueue
from corral.errors import Backpressure


def test_parse() -> None:
    assert Priority.parse("critical") is Priority.CRITICAL
    assert Priority.parse(" Background ") is Priority.BACKGROUND
    with pytest.raises(ValueError, match=r"unknown priority 'urgent'.*critical, high, normal"):
        Priority.parse("urgent")


def test_order_by_priority_then_fifo() -> None:
    q: PriorityQueue[str] = PriorityQueue(10)
    q.push("n1")
    q.push("l1", Priority.LOW)
    q.push("c1", Priority.CRITICAL)
    q.push("n2", Priority.NORMAL)
    q.push("b1", Priority.BACKGROUND)
    q.push("h1", Priority.HIGH)
    assert q.peek() == "c1"
    assert q.drain() == ["c1", "h1", "n1", "n2", "l1", "b1"]
    assert len(q) == 0 and not q


def test_empty() -> None:
    q: PriorityQueue[int] = PriorityQueue(1)
    with pytest.raises(IndexError):
        q.pop()
    with pytest.raises(IndexError):
        q.peek()
    assert q.drain() == []


def test_bound_raises_backpressure() -> None:
    q: PriorityQueue[int] = PriorityQueue(2)
    q.push(1)
    q.push(2, Priority.CRITICAL)
    with pytest.raises(Backpressure) as info:
        q.push(3, Priority.CRITICAL)
    assert "queue is full (2/2 items)" in str(info.value)
    assert info.value.hint == Backpressure.hint
    assert len(q) == 2
    q.pop()
    q.push(3)


@pytest.mark.parametrize("size", [0, -1])
def test_maxsize_must_be_positive(size: int) -> None:
    with pytest.raises(ValueError, match="maxsize"):
        PriorityQueue(size)


def test_remove_by_identity() -> None:
    a, b = [1], [1]  # equal, not identical
    q: PriorityQueue[list[int]] = PriorityQueue(5)
    q.push(a)
    q.push(b, Priority.HIGH)
    assert q.remove(a) is True
    assert q.remove(a) is False
    assert q.remove([1]) is False
    assert len(q) == 1 and q.pop() is b


def test_peak_and_depths() -> None:
    q: PriorityQueue[int] = PriorityQueue(10)
    for i in range(4):
        q.push(i, Priority(i % 2))
    q.pop()
    q.pop()
    q.push(9, Priority.LOW)
    assert q.peak == 4
    assert q.depth_by_level() == {Priority.CRITICAL: 0, Priority.HIGH: 2, Priority.NORMAL: 0,
                                  Priority.LOW: 1, Priority.BACKGROUND: 0}


class QueueModel(RuleBasedStateMachine):
    """The queue against a reference: a list kept sorted by (priority, sequence)."""

    def __init__(self) -> None:
        super().__init__()
        self.maxsize = 8
        self.q: PriorityQueue[object] = PriorityQueue(self.maxsize)
        self.model: list[tuple[int, int, object]] = []
        self.seq = 0
        self.peak = 0

    @rule(priority=st.sampled_from(list(Priority)))
    def push(self, priority: Priority) -> None:
        item = object()
        if len(self.model) >= self.maxsize:
            with pytest.raises(Backpressure):
                self.q.push(item, priority)
            return
        self.q.push(item, priority)
        self.model.append((priority, self.seq, item))
        self.model.sort(key=lambda e: (e[0], e[1]))
        self.seq += 1
        self.peak = max(self.peak, len(self.model))

    @rule()
    def pop(self) -> None:
        if not self.model:
            with pytest.raises(IndexError):
                self.q.pop()
            return
        assert self.q.peek() is self.model[0][2]
        assert self.q.pop() is self.model.pop(0)[2]

    @precondition(lambda self: bool(self.model))
    @rule(data=st.data())
    def remove(self, data: st.DataObject) -> None:
        i = data.draw(st.integers(0, len(self.model) - 1))
        assert self.q.remove(self.model.pop(i)[2])

    @rule()
    def remove_missing(self) -> None:
        assert not self.q.remove(object())

    @invariant()
    def agrees(self) -> None:
        assert len(self.q) == len(self.model)
        assert bool(self.q) == bool(self.model)
        assert self.q.peak == self.peak
        depths = self.q.depth_by_level()
        assert all(depths[p] == sum(e[0] == p for e in self.model) for p in Priority)


TestQueueModel = QueueModel.TestCase


@given(st.lists(st.tuples(st.integers(0, 1000), st.sampled_from(list(Priority))), max_size=50))
def test_drain_matches_sorted_reference(pushes: list[tuple[int, Priority]]) -> None:
    q: PriorityQueue[int] = PriorityQueue(50)
    for item, priority in pushes:
        q.push(item, priority)
    expected = [item for _, _, item in sorted((p, i, x) for i, (x, p) in enumerate(pushes))]
    assert q.drain() == expected
