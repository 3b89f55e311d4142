"""What a handler receives (Message) and what it returns (Result)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["Message", "Result"]


@dataclass(frozen=True, slots=True)
class Message:
    """One task delivered to an agent: its content and where it came from."""

    content: Any = None
    sender: str = ""
    handler: str = ""
    id: int = 0
    kind: str = "request"
    headers: dict[str, str] = field(default_factory=dict)
    #: The subject it was published on (kind "publish"); "" for other messages.
    subject: str = ""


@dataclass(frozen=True, slots=True)
class Result:
    """A handler's outcome: ``Result.success(data)`` or ``Result.failure(message)``."""

    ok: bool = True
    data: Any = None
    error: str | None = None
    error_type: str = "Error"

    @classmethod
    def success(cls, data: Any = None) -> Result:
        """A successful result carrying ``data``."""
        return cls(ok=True, data=data)

    @classmethod
    def failure(cls, message: str, *, error_type: str = "Error", data: Any = None) -> Result:
        """A failed result; the caller gets a TaskFailed with this message."""
        return cls(ok=False, data=data, error=message, error_type=error_type)
