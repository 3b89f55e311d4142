"""The typed messages of the runtime<->agent wire protocol, one tagged union per direction.

Evolution rules (docs/wire-protocol.md): tags never change, new fields get defaults,
existing field types never change. Anything that breaks these bumps PROTOCOL_VERSION.
Unknown fields are ignored by both sides, so old peers read new messages.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

__all__ = [
    "PROTOCOL_VERSION",
    "Broadcast",
    "Cancel",
    "Deliver",
    "ErrorInfo",
    "Guarantee",
    "Heartbeat",
    "Hello",
    "Init",
    "InitError",
    "Log",
    "MemorySave",
    "Publish",
    "Ready",
    "Reply",
    "Request",
    "Result",
    "Schedule",
    "Send",
    "Shutdown",
    "Stats",
    "Subscribe",
    "ToRuntime",
    "ToWorker",
    "Unsubscribe",
]

#: Bumped only by a change that breaks the evolution rules above.
PROTOCOL_VERSION = 1

#: How hard the runtime tries to deliver a Publish (the bus's Guarantee values).
Guarantee = Literal["at-most-once", "at-least-once", "effectively-once"]


class ErrorInfo(msgspec.Struct, frozen=True):
    """An error carried on the wire: its type name, message and optional traceback."""

    type: str
    message: str
    traceback: str = ""
    hint: str = ""


class Schedule(msgspec.Struct, frozen=True):
    """A periodic handler the agent declares: exactly one of interval (seconds) or cron."""

    handler: str
    interval: float | None = None
    cron: str | None = None


# ---------------------------------------------------------------- agent -> runtime


class Hello(msgspec.Struct, frozen=True, tag="hello"):
    """First frame from the agent: which protocol it speaks."""

    protocol_version: int
    pid: int = 0
    sdk: str = ""


class Ready(msgspec.Struct, frozen=True, tag="ready"):
    """The agent is initialised: its handlers and schedules."""

    handlers: list[str] = []
    schedules: list[Schedule] = []


class InitError(msgspec.Struct, frozen=True, tag="init_error"):
    """The agent failed to initialise; the runtime records Failed and supervises."""

    error: ErrorInfo


class Result(msgspec.Struct, frozen=True, tag="result"):
    """The outcome of one Deliver, matched by id. ok=False carries error."""

    id: int
    ok: bool
    payload: Any = None
    error: ErrorInfo | None = None


class Send(msgspec.Struct, frozen=True, tag="send"):
    """The agent sends a one-way message to another agent by name."""

    to: str
    payload: Any = None
    handler: str = ""


class Request(msgspec.Struct, frozen=True, tag="request"):
    """The agent asks another agent and waits for a Reply with the same id."""

    id: int
    to: str
    payload: Any = None
    handler: str = ""
    timeout: float | None = None


class Heartbeat(msgspec.Struct, frozen=True, tag="heartbeat"):
    """Sent by the agent every heartbeat interval while its event loop is alive."""

    seq: int = 0


class Log(msgspec.Struct, frozen=True, tag="log"):
    """One log line from the agent."""

    message: str
    level: str = "info"


class Stats(msgspec.Struct, frozen=True, tag="stats"):
    """Self-reported counters from the agent (the runtime also samples the process)."""

    tasks: int = 0
    errors: int = 0


class MemorySave(msgspec.Struct, frozen=True, tag="memory"):
    """Persistent memory values that changed; the runtime stores them."""

    values: dict[str, Any] = {}


class Publish(msgspec.Struct, frozen=True, tag="publish"):
    """The agent publishes a one-way message on a subject; every matching subscriber gets it.

    No answer comes back: a bad subject or a refused publish becomes a log line of the agent.
    """

    subject: str
    payload: Any = None
    guarantee: Guarantee = "at-most-once"
    #: Seconds the message stays deliverable; None: no expiry.
    ttl: float | None = None
    #: For "effectively-once": publishes with a key seen recently are dropped.
    idempotency_key: str | None = None
    headers: dict[str, str] = {}


class Broadcast(msgspec.Struct, frozen=True, tag="broadcast"):
    """The agent sends one message to every agent, or to a namespace, or a label selector.

    Each recipient gets it as a durable one-way task (like Send); the sender is left out.
    No answer comes back: a bad selector becomes a log line of the agent.
    """

    payload: Any = None
    handler: str = ""
    #: Only agents of this namespace (None: every namespace).
    namespace: str | None = None
    #: kubectl-style label selector, e.g. "team=nlp,tier!=gpu" ("": every agent).
    selector: str = ""


class Subscribe(msgspec.Struct, frozen=True, tag="subscribe"):
    """The agent starts consuming a topic at run time; it lasts until Unsubscribe or delete.

    Durable: it survives restarts of the agent and of the runtime. No answer comes back; a
    bad filter becomes an error line in the agent's log.
    """

    subject: str
    handler: str = ""
    ack_wait: float = 30.0
    #: Overrides each message's guarantee for this subscription ("" = the message's).
    guarantee: str = ""


class Unsubscribe(msgspec.Struct, frozen=True, tag="unsubscribe"):
    """The agent stops consuming a topic it subscribed to at run time."""

    subject: str


ToRuntime = (
    Hello | Ready | InitError | Result | Send | Request | Heartbeat | Log | Stats | MemorySave
    | Publish | Broadcast | Subscribe | Unsubscribe
)


# ---------------------------------------------------------------- runtime -> agent


class Init(msgspec.Struct, frozen=True, tag="init"):
    """Answer to Hello: who the agent is, its config and its persistent memory."""

    agent: str
    instance: str
    entrypoint: str = ""
    config: dict[str, Any] = {}
    memory: dict[str, Any] = {}
    heartbeat_interval: float = 1.0
    #: Extra import paths for the entrypoint (Python agents).
    python_path: list[str] = []
    #: Seconds since each persistent memory value was saved, for TTLs.
    memory_age: dict[str, float] = {}
    #: How many times the supervisor restarted this instance before this start.
    restarts: int = 0


class Deliver(msgspec.Struct, frozen=True, tag="deliver"):
    """One task for the agent. The agent answers with a Result of the same id."""

    id: int
    handler: str
    payload: Any = None
    sender: str = ""
    kind: Literal["send", "request", "scheduled", "publish"] = "request"
    timeout: float | None = None
    #: The subject it was published on, for kind "publish"; "" otherwise.
    subject: str = ""


class Reply(msgspec.Struct, frozen=True, tag="reply"):
    """Answer to the agent's own Request of the same id."""

    id: int
    ok: bool
    payload: Any = None
    error: ErrorInfo | None = None


class Cancel(msgspec.Struct, frozen=True, tag="cancel"):
    """Cancel the Deliver of this id (its deadline passed or the caller gave up)."""

    id: int
    reason: str = "timeout"


class Shutdown(msgspec.Struct, frozen=True, tag="shutdown"):
    """Finish in-flight work within grace seconds, save memory, and exit."""

    grace: float = 5.0


ToWorker = Init | Deliver | Reply | Cancel | Shutdown
