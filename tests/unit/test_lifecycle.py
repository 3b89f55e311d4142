"""The lifecycle table: every (state, event) pair, replay, and random event sequences."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from corral.core.lifecycle import (
    EVENTS,
    TRANSITIONS,
    Crashed,
    Event,
    GiveUp,
    Initialized,
    Restart,
    State,
    Stop,
    TaskStarted,
    apply,
    event_from_name,
    fold,
    mermaid,
)
from corral.errors import IllegalTransition, LifecycleError

ALL_EVENTS = sorted(EVENTS.values(), key=lambda c: c.__name__)
PAIRS = [(s, e) for s in State for e in ALL_EVENTS]


def test_table_covers_every_state_and_named_events() -> None:
    assert set(TRANSITIONS) == set(State)
    assert len(ALL_EVENTS) == 15
    assert TRANSITIONS[State.TERMINATED] == {}


@pytest.mark.parametrize(("state", "event_type"), PAIRS)
def test_every_state_event_pair(state: State, event_type: type[Event]) -> None:
    event = event_type(reason="r")
    target = TRANSITIONS[state].get(event_type)
    if target is not None:
        assert apply(state, event) is target
        return
    before = state
    with pytest.raises(IllegalTransition) as info:
        apply(state, event)
    assert state is before
    assert info.value.state is state and info.value.event is event
    assert event_type.__name__ in str(info.value) and state.value in str(info.value)


def test_expected_moves() -> None:
    assert apply(State.INITIALIZING, Initialized()) is State.READY
    assert apply(State.FAILED, Restart()) is State.INITIALIZING
    assert apply(State.FAILED, GiveUp()) is State.TERMINATED
    for s in State:
        if s is not State.TERMINATED:
            assert apply(s, Stop()) is State.TERMINATED
    crashable = {s for s in State if Crashed in TRANSITIONS[s]}
    assert crashable == {State.READY, State.RUNNING, State.WAITING, State.SUSPENDED,
                         State.COMPLETED}


def test_illegal_transition_is_a_lifecycle_error() -> None:
    with pytest.raises(LifecycleError):
        apply(State.TERMINATED, Stop())


def test_event_from_name_round_trips() -> None:
    for name, cls in EVENTS.items():
        event = event_from_name(name, "why")
        assert type(event) is cls and event.reason == "why"


def test_event_from_name_unknown() -> None:
    with pytest.raises(ValueError, match="unknown lifecycle event 'Nope'"):
        event_from_name("Nope")


def test_events_are_frozen() -> None:
    with pytest.raises(AttributeError):
        Stop().reason = "x"  # type: ignore[misc]


def test_fold_replays() -> None:
    events = [Initialized(), TaskStarted(), Crashed(), Restart(), Initialized()]
    assert fold(events) is State.READY
    assert fold([]) is State.INITIALIZING
    assert fold([Stop()], start=State.FAILED) is State.TERMINATED
    with pytest.raises(IllegalTransition):
        fold([TaskStarted()])


def test_mermaid_has_every_edge() -> None:
    text = mermaid()
    assert text.startswith("stateDiagram-v2\n")
    for state, moves in TRANSITIONS.items():
        for event, target in moves.items():
            assert f"{state.value} --> {target.value}: {event.__name__}" in text


events_st = st.lists(st.sampled_from(ALL_EVENTS).map(lambda cls: cls()), max_size=40)


@given(st.sampled_from(list(State)), events_st)
def test_random_sequences(start: State, events: list[Event]) -> None:
    state = start
    legal: list[Event] = []
    for event in events:
        try:
            new = apply(state, event)
        except IllegalTransition:
            assert type(event) not in TRANSITIONS[state]
            continue
        assert state is not State.TERMINATED  # absorbing: nothing leaves it
        legal.append(event)
        state = new
    assert fold(legal, start=start) is state


@given(events_st)
def test_terminated_is_absorbing(events: list[Event]) -> None:
    for event in events:
        with pytest.raises(IllegalTransition):
            apply(State.TERMINATED, event)
