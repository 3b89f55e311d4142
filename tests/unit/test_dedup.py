"""DedupWindow: window expiry, the max_keys bound, clocks stepping back, export/load, a model."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from corral.core.dedup import DedupWindow


def test_seen_within_window() -> None:
    w = DedupWindow(window=10.0, max_keys=100)
    assert w.seen("k", 0.0) is False
    assert w.seen("k", 9.999) is True
    assert w.seen("other", 5.0) is False
    assert len(w) == 2


def test_expires_after_window() -> None:
    w = DedupWindow(window=10.0, max_keys=100)
    w.seen("k", 0.0)
    assert w.seen("k", 10.0) is False  # expired exactly at window, recorded again at 10
    assert w.seen("k", 19.0) is True
    assert w.seen("k", 20.0) is False


def test_seen_does_not_extend_the_window() -> None:
    w = DedupWindow(window=10.0, max_keys=100)
    w.seen("k", 0.0)
    assert w.seen("k", 9.0) is True
    assert w.seen("k", 10.0) is False  # the window counts from the first recording


def test_expire_and_len() -> None:
    w = DedupWindow(window=10.0, max_keys=100)
    for i in range(5):
        w.seen(f"k{i}", float(i))
    assert w.expire(12.0) == 3  # k0, k1, k2 are >= 10 s old
    assert len(w) == 2
    assert [k for k, _ in w.export()] == ["k3", "k4"]


def test_max_keys_evicts_oldest_and_counts() -> None:
    w = DedupWindow(window=100.0, max_keys=3)
    for i, key in enumerate("abcd"):
        assert w.seen(key, float(i)) is False
    assert len(w) == 3 and w.evictions == 1
    # "a" was forgotten early: a duplicate of it now counts as new (and can be redelivered).
    assert w.seen("a", 4.0) is False
    assert w.evictions == 2  # recording "a" again pushed out "b"
    assert w.seen("c", 4.0) is True


def test_clock_stepping_back_pauses_the_window() -> None:
    w = DedupWindow(window=10.0, max_keys=100)
    w.seen("a", 100.0)
    assert w.seen("b", 50.0) is False  # recorded at 100, the latest time seen
    assert w.export() == [("a", 100.0), ("b", 100.0)]
    assert w.seen("a", 60.0) is True  # still within the window: nothing rewinds
    assert w.seen("a", 110.0) is False


def test_export_load_round_trip() -> None:
    w = DedupWindow(window=10.0, max_keys=100)
    for i in range(5):
        w.seen(f"k{i}", float(i))
    saved = w.export()
    restored = DedupWindow(window=10.0, max_keys=100)
    restored.load(saved, now=5.0)
    assert restored.export() == saved
    assert restored.seen("k4", 13.9) is True
    assert restored.seen("k3", 13.9) is False  # 10.9 s old: expired


def test_load_drops_expired_clamps_future_merges_and_bounds() -> None:
    w = DedupWindow(window=10.0, max_keys=3)
    w.seen("live", 18.0)
    w.load([("old", 5.0), ("x", 15.0), ("x", 12.0), ("future", 1e9), ("live", 11.0),
            ("y", 16.0)], now=20.0)
    # "old" expired; "x" keeps its later time; "future" is read as now; "live" keeps 18.
    # Four remain for three slots, so the oldest ("x") goes.
    assert w.export() == [("y", 16.0), ("live", 18.0), ("future", 20.0)]
    assert w.evictions == 1


@pytest.mark.parametrize(
    ("entries", "message"),
    [([(1, 0.0)], "dedup key must be a str"), ([("k", math.nan)], "finite number")],
)
def test_load_validates(entries: list[tuple[str, float]], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DedupWindow(10.0, 10).load(entries, now=0.0)


@pytest.mark.parametrize(
    ("window", "max_keys", "message"),
    [(0, 10, "window"), (-1.0, 10, "window"), (math.inf, 10, "window"), (1.0, 0, "max_keys"),
     (1.0, 2.5, "max_keys")],
)
def test_config_validation(window: float, max_keys: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DedupWindow(window, max_keys)


def test_now_must_be_finite() -> None:
    with pytest.raises(ValueError, match="now must be a finite"):
        DedupWindow(1.0, 1).seen("k", math.nan)


@given(
    calls=st.lists(
        st.tuples(st.sampled_from("abcdefg"), st.floats(0, 5, allow_nan=False)),
        max_size=60,
    ),
    window=st.floats(0.5, 20),
    max_keys=st.integers(1, 8),
)
def test_matches_model(calls: list[tuple[str, float]], window: float, max_keys: int) -> None:
    """seen(k) is True iff k was recorded < window ago and < max_keys keys were recorded since."""
    w = DedupWindow(window, max_keys)
    clock = 0.0
    log: list[tuple[str, float]] = []  # every recording, in order
    for key, step in calls:
        clock += step
        expected = False
        for i in range(len(log) - 1, -1, -1):
            k, t = log[i]
            if k == key:
                expected = clock - t < window and len(log) - 1 - i < max_keys
                break
        # Before `key`'s last recording, another recording of it would have returned True,
        # so the last recording is the only one that matters.
        assert w.seen(key, clock) is expected
        if not expected:
            log.append((key, clock))
        assert len(w) <= max_keys


def test_contains_records_nothing() -> None:
    w = DedupWindow(10.0, 10)
    assert not w.contains("k", 0.0)
    assert not w.seen("k", 1.0)  # contains() did not record it
    assert w.contains("k", 2.0) and w.seen("k", 3.0)
