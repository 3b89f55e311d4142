"""``self.ctx``: what a running agent can ask of the runtime."""

from __future__ import annotations

from datetime import timedelta
from typing import Any, Protocol

from corral.core.subjects import validate_subject
from corral.wire.messages import Guarantee

__all__ = ["Context", "Outbound"]

_GUARANTEES: frozenset[str] = frozenset(("at-most-once", "at-least-once", "effectively-once"))


class Outbound(Protocol):
    """The channel a Context speaks through; each tier provides one."""

    def send(self, to: str, payload: Any, handler: str) -> None:
        """Queue a one-way message to another agent."""

    async def request(self, to: str, payload: Any, handler: str, timeout: float | None) -> Any:
        """Ask another agent and return its answer, or raise its error."""

    def publish(self, subject: str, payload: Any, guarantee: Guarantee, ttl: float | None,
                idempotency_key: str | None, headers: dict[str, str]) -> None:
        """Queue a one-way message on a subject, for every matching subscriber."""

    def broadcast(self, payload: Any, handler: str, namespace: str | None,
                  selector: str) -> None:
        """Queue one message for many agents (all, a namespace, or a label selector)."""

    def subscribe(self, subject: str, handler: str, ack_wait: float, guarantee: str = "") -> None:
        """Start consuming a topic (durably)."""

    def unsubscribe(self, subject: str) -> None:
        """Stop consuming a topic subscribed to at run time."""

    def log(self, level: str, message: str) -> None:
        """Record a log line for this agent."""


class Context:
    """The runtime as seen from inside an agent: messaging, logging and identity."""

    def __init__(self, *, agent: str, instance: str, config: dict[str, Any],
                 outbound: Outbound, restarts: int = 0) -> None:
        self.agent = agent
        self.instance = instance
        self.config = config
        #: How many times the supervisor restarted this instance (0 on the first start).
        self.restarts = restarts
        self._out = outbound

    def send(self, to: str, payload: Any = None, *, handler: str = "") -> None:
        """Send a one-way message to the agent named ``to``."""
        self._out.send(to, payload, handler)

    async def request(self, to: str, payload: Any = None, *, handler: str = "",
                      timeout: float | None = None) -> Any:
        """Ask the agent named ``to`` and return its answer; raises TaskFailed/TaskTimeout."""
        return await self._out.request(to, payload, handler, timeout)

    def subscribe(self, subject: str, *, handler: str = "", ack_wait: float = 30.0,
                  guarantee: Guarantee | None = None) -> None:
        """Consume messages on ``subject`` (``*``/``>`` wildcards) with ``handler``, from now on.

        Durable, like a manifest subscription: it survives restarts until ``unsubscribe``.
        It takes effect asynchronously: messages published before the runtime has opened it
        are not delivered to it. ``guarantee`` overrides each message's own for this
        subscription (see docs/messaging.md).
        """
        from corral.core.subjects import validate_filter

        try:
            validate_filter(subject)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"can't subscribe to {subject!r}: {exc}") from exc
        if not ack_wait > 0:
            raise ValueError(f"ack_wait must be positive, got {ack_wait!r}")
        if guarantee not in (None, *_GUARANTEES):
            raise ValueError(f"guarantee must be one of {', '.join(sorted(_GUARANTEES))}, got {guarantee!r}")
        self._out.subscribe(subject, handler, float(ack_wait), guarantee or "")

    def unsubscribe(self, subject: str) -> None:
        """Stop consuming ``subject`` (a subscription made with ``subscribe``)."""
        self._out.unsubscribe(subject)

    def broadcast(self, payload: Any = None, *, handler: str = "", namespace: str | None = None,
                  selector: str = "") -> None:
        """Send ``payload`` to every other agent, or those of ``namespace``, or matching ``selector``.

        One-way and durable for each recipient, like ``send``. ``selector`` is kubectl-style
        (``team=nlp,tier!=gpu,canary``); a malformed one raises ValueError here.
        """
        from corral.core.selector import parse_selector

        parse_selector(selector)
        self._out.broadcast(payload, handler, namespace, selector)

    def publish(self, subject: str, payload: Any = None, *, guarantee: Guarantee = "at-most-once",
                ttl: float | timedelta | None = None, idempotency_key: str | None = None,
                headers: dict[str, str] | None = None) -> None:
        """Publish ``payload`` on ``subject`` to every agent subscribed to a matching filter.

        One-way: it returns at once and nothing comes back. A malformed subject (or another
        bad argument) raises ValueError here; anything the runtime refuses later (no route,
        a full mailbox, ...) shows up as an error line in this agent's log (``corral logs NAME``).
        ``ttl`` is how long the message stays deliverable; ``idempotency_key`` lets the bus
        drop repeats under ``guarantee="effectively-once"``.
        """
        try:
            validate_subject(subject)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"can't publish on subject {subject!r}: {exc}") from exc
        if guarantee not in _GUARANTEES:
            raise ValueError(f"can't publish with guarantee {guarantee!r}: use one of "
                             f"{', '.join(sorted(_GUARANTEES))}")
        seconds = ttl.total_seconds() if isinstance(ttl, timedelta) else ttl
        if seconds is not None and not seconds > 0:
            raise ValueError(f"can't publish with ttl {ttl!r}: it must be positive (or None)")
        self._out.publish(subject, payload, guarantee, None if seconds is None else float(seconds),
                          idempotency_key, dict(headers or {}))

    def log(self, message: str, *, level: str = "info") -> None:
        """Write a line to this agent's log (``corral logs NAME``)."""
        self._out.log(level, message)
