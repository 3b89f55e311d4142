"""Erlang/OTP-style supervision decisions as a pure function: events in, actions out.

``decide(state, event, now, rng)`` returns a new ``SupervisorState`` and a list of actions
(``StartChild``, ``StopChild``, ``GiveUp``) that ``corral/runtime`` carries out and feeds back
as events. Nothing here sleeps, reads a clock or spawns anything.

Invariants (checked by ``tests/unit/test_supervisor.py``):

1. Child names are unique; ``facts[i]`` describes ``children[i]`` (both in start order).
2. Only ``ChildStarted`` sets ``running`` and ``started_at``; only ``ChildExited`` clears them.
   A second ``ChildStarted`` for a running child changes nothing.
3. ``StopChild`` is emitted only for a running child not already being stopped, and marks it
   ``stopping``; its next ``ChildExited`` clears the flag and is never counted as a failure.
4. Every restart decision appends ``now`` to ``restarts``; after pruning to the window,
   ``len(restarts) <= max_restarts``. The restart that would exceed it gives up instead.
5. Once ``gave_up`` is set, ``decide`` returns no actions, ever.
6. Every ``StartChild.delay`` lies in ``[0, backoff.max * (1 + backoff.jitter)]``.

Runtime contract: carry out actions in order (a ``StopChild`` completes, and its
``ChildExited`` is reported, before a later ``StartChild`` for that name runs); a
``StartChild`` replaces any start still pending for that name; report each exit once, including
a child that failed before it started; report nothing about a name after ``ChildRemoved``.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass, field
from enum import StrEnum

from immutables import Map

from corral.core.backoff import BackoffPolicy
from corral.errors import RestartLimitExceeded

__all__ = [
    "Action",
    "ChildAdded",
    "ChildExited",
    "ChildFacts",
    "ChildRemoved",
    "ChildSpec",
    "ChildStarted",
    "GiveUp",
    "RestartPolicy",
    "StartChild",
    "StopChild",
    "Strategy",
    "SupervisorEvent",
    "SupervisorState",
    "decide",
]


class Strategy(StrEnum):
    """Which children restart when one fails."""

    ONE_FOR_ONE = "one_for_one"
    ONE_FOR_ALL = "one_for_all"
    REST_FOR_ONE = "rest_for_one"


class RestartPolicy(StrEnum):
    """When a child that exited is restarted."""

    ALWAYS = "always"
    ON_FAILURE = "on-failure"
    NEVER = "never"


@dataclass(frozen=True)
class ChildSpec:
    """A supervised child: its name, restart policy and backoff."""

    name: str
    restart: RestartPolicy = RestartPolicy.ON_FAILURE
    backoff: BackoffPolicy = field(default_factory=BackoffPolicy)


@dataclass(frozen=True)
class ChildFacts:
    """What the supervisor knows about one child at runtime."""

    running: bool = False
    started_at: float | None = None
    failures: int = 0  # consecutive failures, the backoff attempt number
    stopping: bool = False  # the supervisor emitted StopChild and awaits the exit


@dataclass(frozen=True)
class ChildAdded:
    """A child joins the supervisor (it is started unless the supervisor gave up)."""

    spec: ChildSpec


@dataclass(frozen=True)
class ChildRemoved:
    """A child leaves the supervisor for good (it is stopped if running)."""

    name: str


@dataclass(frozen=True)
class ChildStarted:
    """A child is up."""

    name: str


@dataclass(frozen=True)
class ChildExited:
    """A child's process ended; ``failed`` is False for a clean exit."""

    name: str
    failed: bool
    reason: str = ""


@dataclass(frozen=True)
class StartChild:
    """Start ``name`` after ``delay`` seconds, replacing any start still pending for it."""

    name: str
    delay: float


@dataclass(frozen=True)
class StopChild:
    """Stop ``name``; report its exit with ``ChildExited``."""

    name: str


@dataclass(frozen=True)
class GiveUp:
    """Too many restarts in the window: the supervisor stops all children and gives up."""

    reason: str
    children: tuple[str, ...]

    def error(self) -> RestartLimitExceeded:
        """The error to report for this decision."""
        return RestartLimitExceeded(self.reason)


SupervisorEvent = ChildAdded | ChildRemoved | ChildStarted | ChildExited
Action = StartChild | StopChild | GiveUp


@dataclass(frozen=True)
class SupervisorState:
    """Immutable supervisor state; ``decide`` returns a new one.

    Children live in persistent maps (``immutables.Map``), so an event about one child
    costs O(log n) however many siblings it has; ``children``, ``facts`` and ``names``
    are ordered views built on demand.
    """

    strategy: Strategy
    max_restarts: int
    window: float
    specs: Map[str, ChildSpec] = field(default_factory=Map)
    child_facts: Map[str, ChildFacts] = field(default_factory=Map)
    order: Map[str, int] = field(default_factory=Map)  # name -> start-order sequence number
    next_seq: int = 0
    restarts: tuple[float, ...] = ()  # times of restarts, pruned to the window when one happens
    gave_up: bool = False

    def __post_init__(self) -> None:
        if self.max_restarts < 0:
            raise ValueError(f"max_restarts must be >= 0, got {self.max_restarts!r}")
        if not self.window > 0:
            raise ValueError(f"window must be > 0 seconds, got {self.window!r}")
        if not len(self.specs) == len(self.child_facts) == len(self.order):
            raise ValueError("specs, facts and order must hold exactly one entry per child")

    @classmethod
    def new(
        cls, strategy: Strategy, max_restarts: int, window: float,
        children: tuple[ChildSpec, ...] = (),
    ) -> SupervisorState:
        """A supervisor with ``children`` registered, none running yet."""
        names = [c.name for c in children]
        if len(set(names)) != len(names):
            raise ValueError(f"child names must be unique, got {names}")
        return cls(strategy, max_restarts, window, Map((c.name, c) for c in children),
                   Map((c.name, ChildFacts()) for c in children),
                   Map((c.name, i) for i, c in enumerate(children)), len(children))

    @property
    def names(self) -> tuple[str, ...]:
        """Child names in start order."""
        return tuple(sorted(self.order, key=self.order.__getitem__))

    @property
    def children(self) -> tuple[ChildSpec, ...]:
        """Child specs in start order."""
        return tuple(self.specs[n] for n in self.names)

    @property
    def facts(self) -> tuple[ChildFacts, ...]:
        """Child facts in start order (``facts[i]`` describes ``children[i]``)."""
        return tuple(self.child_facts[n] for n in self.names)

    def index(self, name: str) -> int:
        """Position of child ``name`` in start order; ValueError if unknown."""
        self._known(name)
        return self.names.index(name)

    def facts_of(self, name: str) -> ChildFacts:
        """Runtime facts of child ``name``; ValueError if unknown."""
        self._known(name)
        return self.child_facts[name]

    def _known(self, name: str) -> None:
        if name not in self.specs:
            raise ValueError(f"unknown child {name!r}; children are {list(self.names)}")


def decide(
    state: SupervisorState, event: SupervisorEvent, now: float, rng: random.Random
) -> tuple[SupervisorState, list[Action]]:
    """Apply one event; return the new state and the actions to carry out, in order."""
    match event:
        case ChildAdded(spec):
            return _added(state, spec)
        case ChildRemoved(name):
            return _removed(state, name)
        case ChildStarted(name):
            f = state.facts_of(name)
            if f.running:
                return state, []
            return _put(state, name, dataclasses.replace(f, running=True, started_at=now)), []
        case ChildExited(name, failed):
            return _exited(state, name, failed, now, rng)
    raise TypeError(f"not a supervisor event: {event!r}")


def _with(state: SupervisorState, **changes: object) -> SupervisorState:
    """A copy with ``changes``; skips __init__ (dataclasses.replace re-validates the whole
    state, which dominates when one supervisor holds thousands of children)."""
    new = object.__new__(SupervisorState)
    new.__dict__.update(state.__dict__)
    new.__dict__.update(changes)
    return new


def _put(state: SupervisorState, name: str, facts: ChildFacts) -> SupervisorState:
    return _with(state, child_facts=state.child_facts.set(name, facts))


def _added(state: SupervisorState, spec: ChildSpec) -> tuple[SupervisorState, list[Action]]:
    if spec.name in state.specs:
        raise ValueError(f"child {spec.name!r} is already supervised")
    new = _with(
        state, specs=state.specs.set(spec.name, spec),
        child_facts=state.child_facts.set(spec.name, ChildFacts()),
        order=state.order.set(spec.name, state.next_seq), next_seq=state.next_seq + 1,
    )
    return new, [] if state.gave_up else [StartChild(spec.name, 0.0)]


def _removed(state: SupervisorState, name: str) -> tuple[SupervisorState, list[Action]]:
    f = state.facts_of(name)
    new = _with(
        state, specs=state.specs.delete(name), child_facts=state.child_facts.delete(name),
        order=state.order.delete(name),
    )
    stop = f.running and not f.stopping and not state.gave_up
    return new, [StopChild(name)] if stop else []


def _should_restart(policy: RestartPolicy, failed: bool) -> bool:
    return policy is RestartPolicy.ALWAYS or (policy is RestartPolicy.ON_FAILURE and failed)


def _exited(
    state: SupervisorState, name: str, failed: bool, now: float, rng: random.Random
) -> tuple[SupervisorState, list[Action]]:
    f = state.facts_of(name)
    ran_for = now - f.started_at if f.started_at is not None else 0.0
    # Forget started_at so a restart that dies before ChildStarted doesn't look long-lived.
    state = _put(state, name, dataclasses.replace(f, running=False, stopping=False,
                                                  started_at=None))
    # We asked for this exit; it says nothing about the child's health.
    if f.stopping or state.gave_up:
        return state, []
    spec = state.specs[name]
    if not _should_restart(spec.restart, failed):
        return state, []

    recent = tuple(t for t in state.restarts if t >= now - state.window)
    if len(recent) + 1 > state.max_restarts:
        return _give_up(state, recent, len(recent) + 1)

    # A child that stayed up long enough is healthy again: start its backoff over.
    failures = 0 if ran_for >= spec.backoff.reset_after else f.failures
    delay = spec.backoff.delay(failures, rng)
    state = _put(state, name, dataclasses.replace(state.child_facts[name],
                                                  failures=failures + 1))
    state = _with(state, restarts=(*recent, now))

    if state.strategy is Strategy.ONE_FOR_ONE:
        return state, [StartChild(name, delay)]
    names = state.names  # only the group strategies need the order: O(n log n) per failure
    i = names.index(name)
    group = list(names) if state.strategy is Strategy.ONE_FOR_ALL else list(names[i:])
    state, actions = _stop(state, [n for n in group if n != name])
    # As OTP does for temporary children, a sibling with restart=never is stopped, not restarted.
    actions += [
        StartChild(n, delay)
        for n in group
        if n == name or state.specs[n].restart is not RestartPolicy.NEVER
    ]
    return state, actions


def _stop(state: SupervisorState, names: list[str]) -> tuple[SupervisorState, list[Action]]:
    """StopChild, in reverse start order, for each running child not already stopping."""
    actions: list[Action] = []
    for n in reversed(names):
        f = state.child_facts[n]
        if f.running and not f.stopping:
            state = _put(state, n, dataclasses.replace(f, stopping=True))
            actions.append(StopChild(n))
    return state, actions


def _give_up(
    state: SupervisorState, recent: tuple[float, ...], count: int
) -> tuple[SupervisorState, list[Action]]:
    names = state.names
    state, actions = _stop(state, list(names))
    reason = f"{count} restarts in {state.window:g}s (maxRestarts={state.max_restarts})"
    actions.append(GiveUp(reason, names))
    return _with(state, restarts=recent, gave_up=True), actions
