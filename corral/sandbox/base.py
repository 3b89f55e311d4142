"""What every sandbox tier gives the runtime: a Channel to one live agent instance."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Protocol

from corral.sandbox.limits import Enforcement
from corral.wire.messages import ToRuntime, ToWorker

__all__ = ["Channel", "ChannelSink", "ExitInfo"]


@dataclass(frozen=True)
class ExitInfo:
    """How an instance ended. reason is one of: exited, crashed, killed, hung, memory_limit,
    cpu_time_limit, init_failed, protocol_error, runtime_shutdown."""

    reason: str
    code: int | None = None
    detail: str = ""

    @property
    def failed(self) -> bool:
        """Whether the supervisor should treat this as a failure (OTP's abnormal exit)."""
        return self.reason != "exited"

    def describe(self) -> str:
        """One line for describe and logs."""
        code = f" (exit {self.code})" if self.code is not None else ""
        return f"{self.reason}{code}{': ' + self.detail if self.detail else ''}"


class ChannelSink(Protocol):
    """Where a channel reports what its instance says and when it ends."""

    def on_message(self, msg: ToRuntime) -> None:
        """A message from the agent."""

    def on_log(self, line: str, level: str) -> None:
        """A line the agent wrote to stdout/stderr."""

    def on_closed(self, exit: ExitInfo) -> None:
        """The instance is gone; called exactly once."""


@dataclass
class Channel(ABC):
    """The runtime's handle on one live instance, whatever its tier."""

    tier: str
    pid: int | None = None
    enforcement: list[Enforcement] = field(default_factory=list)

    @abstractmethod
    def send(self, msg: ToWorker) -> None:
        """Deliver a message to the agent (never blocks)."""

    @abstractmethod
    def kill(self, reason: str) -> None:
        """Stop the instance now; on_closed follows with this reason."""

    def sample(self) -> dict[str, Any]:
        """Resource usage now (rss, uss, cpu, fds); call off the event loop."""
        return {}
