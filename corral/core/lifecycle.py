"""The agent lifecycle as a pure state machine: one table of legal moves, no I/O.

Rules, in the spirit of h11's ``_state.py``:

1. Every lifecycle rule lives in this file, in ``TRANSITIONS``.
2. The table ignores mode and sandbox tier: the controller chooses the event
   (``Rearm`` for persistent agents, ``Retire`` for ephemeral ones).
3. An event the current state does not accept raises ``IllegalTransition`` and changes nothing.
4. Live transitions and replay (``fold``) go through the same ``apply``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum

from corral.errors import IllegalTransition

__all__ = [
    "EVENTS",
    "TRANSITIONS",
    "Allowed",
    "Crashed",
    "Event",
    "GiveUp",
    "InitFailed",
    "Initialized",
    "Override",
    "Rearm",
    "Restart",
    "Resumed",
    "Retire",
    "State",
    "Stop",
    "TaskStarted",
    "TasksDone",
    "Violation",
    "Wait",
    "apply",
    "event_from_name",
    "fold",
    "mermaid",
]


class State(StrEnum):
    """Where an agent instance is in its life."""

    INITIALIZING = "Initializing"
    READY = "Ready"
    RUNNING = "Running"
    WAITING = "Waiting"
    SUSPENDED = "Suspended"
    COMPLETED = "Completed"
    FAILED = "Failed"
    TERMINATED = "Terminated"


@dataclass(frozen=True)
class Event:
    """Base of lifecycle events; ``reason`` is free text kept for audit and replay."""

    reason: str = ""


@dataclass(frozen=True)
class Initialized(Event):
    """The worker finished its setup and said Ready."""


@dataclass(frozen=True)
class InitFailed(Event):
    """The worker failed before it became ready."""


@dataclass(frozen=True)
class TaskStarted(Event):
    """A task was handed to a ready agent."""


@dataclass(frozen=True)
class Wait(Event):
    """The running agent is blocked on something outside it (a reply, a tool)."""


@dataclass(frozen=True)
class Resumed(Event):
    """What the agent waited for arrived."""


@dataclass(frozen=True)
class TasksDone(Event):
    """The agent has no task left."""


@dataclass(frozen=True)
class Rearm(Event):
    """A persistent agent goes back to Ready for more work."""


@dataclass(frozen=True)
class Retire(Event):
    """An ephemeral agent ends after its work."""


@dataclass(frozen=True)
class Violation(Event):
    """A policy violation suspends the agent pending a decision."""


@dataclass(frozen=True)
class Allowed(Event):
    """The suspension was reviewed and the agent may go on."""


@dataclass(frozen=True)
class Override(Event):
    """The suspension was reviewed and the agent is ended."""


@dataclass(frozen=True)
class Crashed(Event):
    """The worker died or broke the protocol."""


@dataclass(frozen=True)
class Restart(Event):
    """The supervisor restarts a failed agent."""


@dataclass(frozen=True)
class GiveUp(Event):
    """The supervisor stops restarting a failed agent."""


@dataclass(frozen=True)
class Stop(Event):
    """An operator or shutdown ends the agent from any live state."""


TRANSITIONS: dict[State, dict[type[Event], State]] = {
    State.INITIALIZING: {
        Initialized: State.READY, InitFailed: State.FAILED, Stop: State.TERMINATED,
    },
    State.READY: {
        TaskStarted: State.RUNNING, Violation: State.SUSPENDED, Crashed: State.FAILED,
        Stop: State.TERMINATED,
    },
    State.RUNNING: {
        Wait: State.WAITING, TasksDone: State.COMPLETED, Violation: State.SUSPENDED,
        Crashed: State.FAILED, Stop: State.TERMINATED,
    },
    State.WAITING: {
        Resumed: State.RUNNING, Violation: State.SUSPENDED, Crashed: State.FAILED,
        Stop: State.TERMINATED,
    },
    State.SUSPENDED: {
        Allowed: State.RUNNING, Override: State.TERMINATED, Crashed: State.FAILED,
        Stop: State.TERMINATED,
    },
    State.COMPLETED: {
        Rearm: State.READY, Retire: State.TERMINATED, Crashed: State.FAILED,
        Stop: State.TERMINATED,
    },
    State.FAILED: {Restart: State.INITIALIZING, GiveUp: State.TERMINATED, Stop: State.TERMINATED},
    State.TERMINATED: {},  # absorbing: a terminated instance is never reused
}

EVENTS: dict[str, type[Event]] = {
    cls.__name__: cls for moves in TRANSITIONS.values() for cls in moves
}


def apply(state: State, event: Event) -> State:
    """Return the state after ``event``, or raise IllegalTransition (nothing changes)."""
    try:
        return TRANSITIONS[state][type(event)]
    except KeyError:
        raise IllegalTransition(state, event) from None


def event_from_name(name: str, reason: str = "") -> Event:
    """Rebuild a stored event from its class name, for replay."""
    cls = EVENTS.get(name)
    if cls is None:
        known = ", ".join(sorted(EVENTS))
        raise ValueError(f"unknown lifecycle event {name!r}; expected one of: {known}")
    return cls(reason=reason)


def fold(events: Iterable[Event], start: State = State.INITIALIZING) -> State:
    """Replay ``events`` from ``start`` through ``apply`` and return the final state."""
    state = start
    for event in events:
        state = apply(state, event)
    return state


def mermaid() -> str:
    """Render TRANSITIONS as a mermaid ``stateDiagram-v2`` for the docs."""
    lines = ["stateDiagram-v2", f"    [*] --> {State.INITIALIZING.value}"]
    for state, moves in TRANSITIONS.items():
        for event, target in moves.items():
            lines.append(f"    {state.value} --> {target.value}: {event.__name__}")
    lines.append(f"    {State.TERMINATED.value} --> [*]")
    return "\n".join(lines) + "\n"
