"""The rows the store hands back: plain frozen dataclasses, decoded and ready to use."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["PENDING_STATUSES", "DeadLetterRecord", "LogRecord", "StoredEvent", "TaskRecord"]

#: Task statuses that mean "not finished yet"; everything else is terminal.
PENDING_STATUSES: tuple[str, ...] = ("queued", "running")


@dataclass(frozen=True)
class StoredEvent:
    """One event from the append-only log; ``seq`` grows strictly in commit order."""

    seq: int
    ts: float
    agent: str
    kind: str
    data: dict[str, Any]


@dataclass(frozen=True)
class TaskRecord:
    """A task as persisted: enough to re-queue it after a restart and to report its outcome."""

    id: str
    agent: str
    handler: str
    payload: Any
    priority: int
    kind: str
    sender: str
    status: str
    created: float
    attempts: int = 0
    result: Any = None
    error: str | None = None
    finished: float | None = None


@dataclass(frozen=True)
class LogRecord:
    """One line an agent instance logged."""

    seq: int
    ts: float
    agent: str
    instance: str
    level: str
    message: str


@dataclass(frozen=True)
class DeadLetterRecord:
    """A message the bus gave up on, kept with why, until it is replayed or purged.

    ``data`` is the message exactly as the backend delivered it (a msgpack Envelope, maybe
    sealed or signed); ``message_id``, ``subject`` and ``sender`` come from its envelope and
    are None when it could not be decoded.
    """

    seq: int
    ts: float
    subscription: str
    message_id: str | None
    subject: str | None
    sender: str | None
    reason: str
    delivered: int
    data: bytes
