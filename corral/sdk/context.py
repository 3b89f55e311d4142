"""``self.ctx``: what a running agent can ask of the runtime."""

from __future__ import annotations

from typing import Any, Protocol

__all__ = ["Context", "Outbound"]


class Outbound(Protocol):
    """The channel a Context speaks through; each tier provides one."""

    def send(self, to: str, payload: Any, handler: str) -> None:
        """Queue a one-way message to another agent."""

    async def request(self, to: str, payload: Any, handler: str, timeout: float | None) -> Any:
        """Ask another agent and return its answer, or raise its error."""

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

    def log(self, message: str, *, level: str = "info") -> None:
        """Write a line to this agent's log (``corral logs NAME``)."""
        self._out.log(level, message)
