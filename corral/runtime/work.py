"""Work: one task on its way to an agent, from submit to its Result."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from corral.core.queue import Priority

__all__ = ["Work"]


@dataclass(eq=False, slots=True)
class Work:
    """A task: who it is for, what it carries, and how its caller hears back."""

    id: int
    handler: str
    payload: Any
    sender: str
    kind: str  # "request" | "send" | "scheduled"
    priority: Priority
    timeout: float
    #: Set for requests: the caller awaits it.
    future: asyncio.Future[Any] | None = None
    #: Set for durable sends: the id of the row in the store.
    task_id: str | None = None
    attempts: int = 0
    started: float = 0.0
    timer: asyncio.TimerHandle | None = None
    #: The caller was told it timed out; the agent's late Result is ignored.
    abandoned: bool = False
    #: The topic, for work that arrived from a subscription.
    subject: str = ""
