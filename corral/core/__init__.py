"""The pure core of Corral: state machines and decisions with no I/O.

Time is always a ``now`` argument and randomness an injected ``random.Random``. Nothing here
imports asyncio or any Corral module but ``corral.errors``.

``GiveUp`` names both a lifecycle event and a supervisor action, so neither is re-exported
here: use ``lifecycle.GiveUp`` or ``supervisor.GiveUp``.
"""

from corral.core import backoff, lifecycle, queue, schedule, supervisor
from corral.core.backoff import BackoffPolicy
from corral.core.lifecycle import (
    EVENTS,
    TRANSITIONS,
    Allowed,
    Crashed,
    Event,
    InitFailed,
    Initialized,
    Override,
    Rearm,
    Restart,
    Resumed,
    Retire,
    State,
    Stop,
    TasksDone,
    TaskStarted,
    Violation,
    Wait,
    apply,
    event_from_name,
    fold,
    mermaid,
)
from corral.core.queue import Priority, PriorityQueue
from corral.core.schedule import next_fire, validate_cron
from corral.core.supervisor import (
    Action,
    ChildAdded,
    ChildExited,
    ChildFacts,
    ChildRemoved,
    ChildSpec,
    ChildStarted,
    RestartPolicy,
    StartChild,
    StopChild,
    Strategy,
    SupervisorEvent,
    SupervisorState,
    decide,
)

__all__ = [
    "EVENTS",
    "TRANSITIONS",
    "Action",
    "Allowed",
    "BackoffPolicy",
    "ChildAdded",
    "ChildExited",
    "ChildFacts",
    "ChildRemoved",
    "ChildSpec",
    "ChildStarted",
    "Crashed",
    "Event",
    "InitFailed",
    "Initialized",
    "Override",
    "Priority",
    "PriorityQueue",
    "Rearm",
    "Restart",
    "RestartPolicy",
    "Resumed",
    "Retire",
    "StartChild",
    "State",
    "Stop",
    "StopChild",
    "Strategy",
    "SupervisorEvent",
    "SupervisorState",
    "TaskStarted",
    "TasksDone",
    "Violation",
    "Wait",
    "apply",
    "backoff",
    "decide",
    "event_from_name",
    "fold",
    "lifecycle",
    "mermaid",
    "next_fire",
    "queue",
    "schedule",
    "supervisor",
    "validate_cron",
]
