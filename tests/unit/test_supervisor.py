"""Supervision decisions: strategies, restart policies, intensity, backoff, invariants."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from corral.core.backoff import BackoffPolicy
from corral.core.supervisor import (
    Action,
    ChildAdded,
    ChildExited,
    ChildRemoved,
    ChildSpec,
    ChildStarted,
    GiveUp,
    RestartPolicy,
    StartChild,
    StopChild,
    Strategy,
    SupervisorEvent,
    SupervisorState,
    decide,
)
from corral.errors import RestartLimitExceeded

FLAT = BackoffPolicy(initial=1.0, max=8.0, multiplier=2.0, jitter=0.0, reset_after=60.0)
ON_FAILURE, ALWAYS, NEVER = RestartPolicy.ON_FAILURE, RestartPolicy.ALWAYS, RestartPolicy.NEVER


def make(
    strategy: Strategy = Strategy.ONE_FOR_ONE, names: str = "abc", max_restarts: int = 3,
    window: float = 10.0, restart: RestartPolicy = ON_FAILURE, backoff: BackoffPolicy = FLAT,
) -> SupervisorState:
    specs = tuple(ChildSpec(n, restart, backoff) for n in names)
    state = SupervisorState.new(strategy, max_restarts, window, specs)
    for n in names:
        state, _ = step(state, ChildStarted(n))
    return state


def step(
    state: SupervisorState, event: SupervisorEvent, now: float = 0.0, seed: int = 0
) -> tuple[SupervisorState, list[Action]]:
    return decide(state, event, now, random.Random(seed))


def fail(state: SupervisorState, name: str, now: float) -> tuple[SupervisorState, list[Action]]:
    return step(state, ChildExited(name, failed=True, reason="boom"), now)


# --- construction and bookkeeping -------------------------------------------------------

def test_new_has_idle_children() -> None:
    s = SupervisorState.new(Strategy.ONE_FOR_ONE, 3, 5.0, (ChildSpec("a"), ChildSpec("b")))
    assert s.names == ("a", "b")
    assert all(not f.running and f.failures == 0 and not f.stopping for f in s.facts)
    assert not s.gave_up and s.restarts == ()


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((-1, 5.0, ()), "max_restarts"),
        ((1, 0.0, ()), "window"),
        ((1, 5.0, (ChildSpec("a"), ChildSpec("a"))), "unique"),
    ],
)
def test_new_validates(args: tuple[int, float, tuple[ChildSpec, ...]], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SupervisorState.new(Strategy.ONE_FOR_ONE, *args)


def test_child_added_starts_it() -> None:
    s = make(names="")
    s, actions = step(s, ChildAdded(ChildSpec("x")))
    assert actions == [StartChild("x", 0.0)] and s.names == ("x",)
    with pytest.raises(ValueError, match="already supervised"):
        step(s, ChildAdded(ChildSpec("x")))


def test_child_started_sets_facts_once() -> None:
    s = make(names="")
    s, _ = step(s, ChildAdded(ChildSpec("x")))
    s, actions = step(s, ChildStarted("x"), now=5.0)
    assert actions == [] and s.facts_of("x").running and s.facts_of("x").started_at == 5.0
    again, actions = step(s, ChildStarted("x"), now=9.0)
    assert again == s and actions == []


def test_child_removed() -> None:
    s = make()
    s, actions = step(s, ChildRemoved("b"))
    assert actions == [StopChild("b")] and s.names == ("a", "c")
    s, _ = step(s, ChildExited("a", failed=False))
    s, actions = step(s, ChildRemoved("a"))
    assert actions == [] and s.names == ("c",)


@pytest.mark.parametrize(
    "event", [ChildStarted("zz"), ChildExited("zz", failed=True), ChildRemoved("zz")]
)
def test_unknown_child(event: SupervisorEvent) -> None:
    with pytest.raises(ValueError, match="unknown child 'zz'"):
        step(make(), event)


def test_not_an_event() -> None:
    with pytest.raises(TypeError):
        step(make(), "ChildStarted")  # type: ignore[arg-type]


# --- strategies ---------------------------------------------------------------------------

def test_one_for_one() -> None:
    s, actions = fail(make(Strategy.ONE_FOR_ONE), "b", 1.0)
    assert actions == [StartChild("b", 1.0)]
    assert not s.facts_of("b").running and s.facts_of("a").running


def test_one_for_all() -> None:
    s, actions = fail(make(Strategy.ONE_FOR_ALL), "b", 1.0)
    assert actions == [
        StopChild("c"), StopChild("a"),
        StartChild("a", 1.0), StartChild("b", 1.0), StartChild("c", 1.0),
    ]
    assert s.facts_of("a").stopping and s.facts_of("c").stopping


def test_rest_for_one() -> None:
    s, actions = fail(make(Strategy.REST_FOR_ONE, names="abcd"), "b", 1.0)
    assert actions == [
        StopChild("d"), StopChild("c"),
        StartChild("b", 1.0), StartChild("c", 1.0), StartChild("d", 1.0),
    ]
    assert not s.facts_of("a").stopping


def test_rest_for_one_last_child_is_one_for_one() -> None:
    _, actions = fail(make(Strategy.REST_FOR_ONE), "c", 1.0)
    assert actions == [StartChild("c", 1.0)]


def test_one_for_all_skips_stopped_siblings_and_never_children() -> None:
    specs = (ChildSpec("a", NEVER, FLAT), ChildSpec("b", ON_FAILURE, FLAT),
             ChildSpec("c", ON_FAILURE, FLAT))
    s = SupervisorState.new(Strategy.ONE_FOR_ALL, 3, 10.0, specs)
    for n in "ab":
        s, _ = step(s, ChildStarted(n))
    # c is not running: nothing to stop, but it is started with the rest (as OTP does).
    s, actions = fail(s, "b", 1.0)
    # a (restart=never) is stopped, not restarted.
    assert actions == [StopChild("a"), StartChild("b", 1.0), StartChild("c", 1.0)]


def test_supervisor_stops_are_not_failures() -> None:
    s, _ = fail(make(Strategy.ONE_FOR_ALL), "b", 1.0)
    for n in "ca":
        s, actions = step(s, ChildExited(n, failed=True, reason="SIGTERM"), 1.5)
        assert actions == []
        assert not s.facts_of(n).stopping and not s.facts_of(n).running
        assert s.facts_of(n).failures == 0
    assert s.restarts == (1.0,)


def test_no_duplicate_stop() -> None:
    s, _ = fail(make(Strategy.ONE_FOR_ALL), "b", 1.0)
    # c is already being stopped: removing it must not stop it twice.
    s, actions = step(s, ChildRemoved("c"))
    assert actions == []


def test_child_failing_before_it_started_is_restarted() -> None:
    s = make(names="")
    s, _ = step(s, ChildAdded(ChildSpec("x", backoff=FLAT)))
    s, actions = fail(s, "x", 0.5)
    assert actions == [StartChild("x", 1.0)]


# --- restart policies ---------------------------------------------------------------------

@pytest.mark.parametrize(
    ("policy", "failed", "restarts"),
    [
        (NEVER, True, False), (NEVER, False, False),
        (ON_FAILURE, True, True), (ON_FAILURE, False, False),
        (ALWAYS, True, True), (ALWAYS, False, True),
    ],
)
def test_restart_policies(policy: RestartPolicy, failed: bool, restarts: bool) -> None:
    s = make(names="a", restart=policy)
    s, actions = step(s, ChildExited("a", failed=failed), 1.0)
    assert actions == ([StartChild("a", 1.0)] if restarts else [])
    assert len(s.restarts) == int(restarts)


# --- intensity ------------------------------------------------------------------------------

def test_gives_up_at_max_restarts_plus_one() -> None:
    s = make(Strategy.ONE_FOR_ONE, max_restarts=3, window=10.0)
    for t in (0.0, 1.0, 2.0):
        s, actions = fail(s, "b", t)
        assert actions == [StartChild("b", actions[0].delay)]  # type: ignore[union-attr]
        s, _ = step(s, ChildStarted("b"), t)
    s, actions = fail(s, "b", 3.0)
    assert actions == [
        StopChild("c"), StopChild("a"),
        GiveUp("4 restarts in 10s (maxRestarts=3)", ("a", "b", "c")),
    ]
    assert s.gave_up
    give_up = actions[-1]
    assert isinstance(give_up, GiveUp) and isinstance(give_up.error(), RestartLimitExceeded)


def test_zero_max_restarts_gives_up_at_once() -> None:
    _, actions = fail(make(names="a", max_restarts=0), "a", 0.0)
    assert actions == [GiveUp("1 restarts in 10s (maxRestarts=0)", ("a",))]


def test_restarts_spread_over_more_than_the_window_never_give_up() -> None:
    s = make(names="a", max_restarts=3, window=10.0)
    for k in range(100):
        s, actions = fail(s, "a", k * 3.4)  # 3 restarts per 10.2 s
        assert len(actions) == 1 and isinstance(actions[0], StartChild)
        s, _ = step(s, ChildStarted("a"), k * 3.4)
    assert not s.gave_up


def test_window_boundary_is_inclusive() -> None:
    s = make(names="a", max_restarts=1, window=10.0)
    s, _ = fail(s, "a", 0.0)
    _, actions = fail(s, "a", 10.0)  # the restart at 0 is still in [0, 10]
    assert isinstance(actions[-1], GiveUp)
    _, actions = fail(s, "a", 10.001)
    assert isinstance(actions[-1], StartChild)


def test_after_give_up_nothing_happens() -> None:
    s, _ = fail(make(max_restarts=0), "a", 0.0)
    for event in (ChildExited("b", failed=True), ChildStarted("a"), ChildExited("c", False),
                  ChildAdded(ChildSpec("d")), ChildRemoved("b")):
        s, actions = step(s, event, 1.0)
        assert actions == []
    assert s.names == ("a", "c", "d") and s.gave_up


# --- backoff ------------------------------------------------------------------------------

def test_backoff_grows_and_caps() -> None:
    s = make(names="a", max_restarts=100, window=1.0)
    delays = []
    for k in range(6):
        s, actions = fail(s, "a", k * 2.0)
        delays.append(actions[0].delay)  # type: ignore[union-attr]
        s, _ = step(s, ChildStarted("a"), k * 2.0 + 1)
    assert delays == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    assert s.facts_of("a").failures == 6


def test_backoff_resets_after_stable_period() -> None:
    s = make(names="a", max_restarts=100, window=1.0)
    for k in range(3):
        s, _ = fail(s, "a", k * 2.0)
        s, _ = step(s, ChildStarted("a"), k * 2.0 + 1)  # last start at t=5
    s, actions = fail(s, "a", 5.0 + 59.9)  # ran 59.9s < reset_after
    assert actions == [StartChild("a", 8.0)]
    s, _ = step(s, ChildStarted("a"), 100.0)
    s, actions = fail(s, "a", 160.0)  # ran 60s: stable, start over
    assert actions == [StartChild("a", 1.0)]
    assert s.facts_of("a").failures == 1


def test_spawn_failures_after_a_stable_run_keep_backing_off() -> None:
    s = make(names="a", max_restarts=100, window=1.0)
    s, actions = fail(s, "a", 100.0)  # stable run: attempt 0
    assert actions == [StartChild("a", 1.0)]
    for t, delay in ((101.0, 2.0), (103.0, 4.0)):  # restarts die before ChildStarted
        s, actions = fail(s, "a", t)
        assert actions == [StartChild("a", delay)]


def test_jitter_bounds() -> None:
    jittery = BackoffPolicy(initial=1.0, max=8.0, multiplier=2.0, jitter=0.5)
    for seed in range(200):
        s = make(names="a", backoff=jittery)
        _, actions = decide(s, ChildExited("a", True), 0.0, random.Random(seed))
        assert 0.5 <= actions[0].delay <= 1.5  # type: ignore[union-attr]


# --- properties ---------------------------------------------------------------------------

# Each op: (kind, child index, failed, time step). Kinds: 0 start, 1 exit, 2 remove+re-add.
ops_st = st.lists(
    st.tuples(st.integers(0, 2), st.integers(0, 3), st.booleans(),
              st.floats(0, 5, allow_nan=False)),
    max_size=80,
)
backoffs = st.builds(BackoffPolicy, initial=st.floats(0.01, 2), max=st.floats(2, 50),
                     multiplier=st.floats(1, 4), jitter=st.floats(0, 1),
                     reset_after=st.floats(0, 20))


@given(
    st.sampled_from(list(Strategy)), st.integers(0, 5), st.floats(0.5, 30),
    st.lists(st.sampled_from(list(RestartPolicy)), min_size=4, max_size=4), backoffs,
    ops_st, st.integers(0, 2**16),
)
def test_invariants(
    strategy: Strategy, max_restarts: int, window: float, policies: list[RestartPolicy],
    backoff: BackoffPolicy, ops: list[tuple[int, int, bool, float]], seed: int,
) -> None:
    names = ["w", "x", "y", "z"]
    specs = tuple(ChildSpec(n, p, backoff) for n, p in zip(names, policies, strict=True))
    state = SupervisorState.new(strategy, max_restarts, window, specs)
    rng = random.Random(seed)
    now = 0.0
    restart_times: list[float] = []
    gave_up = False
    for kind, idx, failed, dt in ops:
        now += dt
        name = names[idx]
        before = state
        if kind == 0:
            state, actions = decide(state, ChildStarted(name), now, rng)
            if before.facts_of(name).running:
                assert state == before  # never marked running twice
        elif kind == 1:
            state, actions = decide(state, ChildExited(name, failed), now, rng)
            if any(isinstance(a, StartChild) for a in actions):
                restart_times.append(now)
                assert not before.facts_of(name).stopping  # our own stops never restart
        else:
            state, actions = decide(state, ChildRemoved(name), now, rng)
            state, more = decide(state, ChildAdded(specs[idx]), now, rng)
            actions += more

        if gave_up:
            assert actions == []  # nothing after GiveUp
        gave_up = state.gave_up
        assert sum(isinstance(a, GiveUp) for a in actions) <= 1
        for a in actions:
            if isinstance(a, StartChild):
                assert 0 <= a.delay <= backoff.ceiling
            elif isinstance(a, StopChild) and a.name in before.names:
                f = before.facts_of(a.name)
                assert f.running and not f.stopping
        assert len(state.facts) == len(state.children)
        assert all(f.running for f in state.facts if f.stopping)

    # Never more than max_restarts restart decisions within any window.
    for t in restart_times:
        assert sum(t - window <= r <= t for r in restart_times) <= max_restarts


@given(st.sampled_from(list(Strategy)), st.integers(0, 3), st.integers(0, 3))
def test_strategy_action_shape(strategy: Strategy, failed_idx: int, n_extra: int) -> None:
    names = "abcdefg"[: failed_idx + 1 + n_extra]
    s = make(strategy, names=names)
    failed = names[failed_idx]
    _, actions = fail(s, failed, 1.0)
    stops = [a.name for a in actions if isinstance(a, StopChild)]
    starts = [a.name for a in actions if isinstance(a, StartChild)]
    assert actions[: len(stops)] == [StopChild(n) for n in stops]  # stops come first
    expected = {
        Strategy.ONE_FOR_ONE: failed,
        Strategy.ONE_FOR_ALL: names,
        Strategy.REST_FOR_ONE: names[failed_idx:],
    }[strategy]
    assert starts == list(expected)
    assert stops == [n for n in reversed(expected) if n != failed]
