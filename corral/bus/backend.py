"""BusBackend: the few primitives every message backend provides.

The bus (patterns, guarantees, DLQ, dedup, TTL, signing, encryption) is built once on top
of these; ``corral/bus/backends/{local,nats,redis}.py`` implement them, and
``tests/bus/test_contract.py`` holds every backend to the same contract:

1. ``publish(subject, data)`` returns once the backend has accepted the message; with
   ``durable=True`` (the default) it survives a crash of this process.
2. ``subscribe(name, filter)`` opens the durable subscription ``name``. It receives every
   message published *after* it was first created whose subject matches ``filter``
   (NATS-style: ``*`` is one token, ``>`` one or more trailing tokens). Opening ``name``
   again, from this or a new backend instance, resumes it: unacknowledged messages come
   back, acknowledged ones never do.
3. Several fetchers on one subscription compete: each message goes to one of them.
   Different subscriptions each get their own copy.
4. A fetched message is redelivered (``delivered`` + 1) if it is not acknowledged within
   ``ack_wait``, or after ``nack(delay)``; ``term()`` drops it for good; ``ack()`` settles it.
5. Messages of one subject, from one publisher, are delivered to a subscription in the
   order they were published (redeliveries aside).
6. ``unsubscribe(name)`` deletes the subscription and its pending messages.

Each backend maps its library's exceptions to ``BackendUnavailable`` / ``BusError`` in one
place, and imports its library lazily (a missing extra names the ``pip install``).
"""

from __future__ import annotations

from typing import Protocol

__all__ = ["BusBackend", "Incoming", "Subscription"]


class Incoming(Protocol):
    """One delivery of one message to a subscription."""

    subject: str
    data: bytes
    headers: dict[str, str]
    #: 1 on the first delivery, 2 on the first redelivery, ...
    delivered: int

    async def ack(self) -> None:
        """Settle the message: it is never delivered again."""

    async def nack(self, delay: float = 0.0) -> None:
        """Give the message back: it is delivered again after ``delay`` seconds."""

    async def term(self) -> None:
        """Drop the message without processing (e.g. it went to the dead-letter queue)."""


class Subscription(Protocol):
    """A durable, named subscription; fetchers on one name compete for its messages."""

    name: str
    filter: str

    async def fetch(self, max_messages: int = 100, timeout: float = 1.0) -> list[Incoming]:
        """Up to ``max_messages`` deliveries; waits up to ``timeout`` for the first, else []."""

    async def close(self) -> None:
        """Stop fetching; the subscription and its pending messages remain."""


class BusBackend(Protocol):
    """A message backend: durable subjects and durable, named subscriptions."""

    name: str

    async def start(self) -> None:
        """Connect (or open files); raises BackendUnavailable with what to do."""

    async def aclose(self) -> None:
        """Close connections; durable state remains."""

    async def publish(self, subject: str, data: bytes, headers: dict[str, str] | None = None,
                      *, durable: bool = True) -> None:
        """Append one message to ``subject``; durable ones survive a crash once this returns."""

    async def subscribe(self, name: str, filter: str, *, ack_wait: float = 30.0) -> Subscription:
        """Open (create or resume) the durable subscription ``name`` on ``filter``."""

    async def unsubscribe(self, name: str) -> None:
        """Delete the subscription ``name`` and its pending messages."""
