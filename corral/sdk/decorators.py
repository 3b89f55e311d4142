"""The decorators agent authors use: Agent, handler, memory, capability, scheduled.

They only mark the class; ``corral.sdk.host.AgentHost`` reads the marks when it hosts an
instance, in any tier. Nothing here does I/O.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar, overload

__all__ = [
    "Agent",
    "AgentInfo",
    "CapabilityDescriptor",
    "MemoryDescriptor",
    "ScheduleMark",
    "capability",
    "handler",
    "memory",
    "scheduled",
]

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])

HANDLER_ATTR = "__corral_handler__"
SCHEDULE_ATTR = "__corral_schedule__"
AGENT_ATTR = "__corral_agent__"


@dataclass(frozen=True)
class AgentInfo:
    """What ``@Agent`` records about a class."""

    name: str
    version: str = "0.0.0"
    description: str = ""


@overload
def Agent(cls: type[T], /) -> type[T]: ...
@overload
def Agent(
    *, name: str | None = None, version: str = "0.0.0", description: str = ""
) -> Callable[[type[T]], type[T]]: ...


def Agent(  # the SDK's public name, as in seed 000
    cls: type[T] | None = None,
    /,
    *,
    name: str | None = None,
    version: str = "0.0.0",
    description: str = "",
) -> Any:
    """Mark a class as a Corral agent: ``@Agent(name="summarizer", version="1.0.0")``."""

    def mark(c: type[T]) -> type[T]:
        setattr(c, AGENT_ATTR, AgentInfo(name or c.__name__, version,
                                         description or (c.__doc__ or "").strip()))
        return c

    return mark(cls) if cls is not None else mark


@overload
def handler(fn: F, /) -> F: ...
@overload
def handler(name: str | None = None, /) -> Callable[[F], F]: ...


def handler(arg: Any = None, /) -> Any:
    """Mark a method as a message handler; its name is the handler name unless given."""
    if callable(arg):
        setattr(arg, HANDLER_ATTR, arg.__name__)
        return arg

    def mark(fn: F) -> F:
        setattr(fn, HANDLER_ATTR, arg or fn.__name__)
        return fn

    return mark


class _Lazy:
    """A per-instance value that ``factory`` builds on first access."""

    #: The instance attribute (a dict) the values live in.
    slot = ""

    def __init__(self, factory: Callable[[Any], Any]) -> None:
        self.factory = factory
        self.name = factory.__name__

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: Any, objtype: type | None = None) -> Any:
        if obj is None:
            return self
        values: dict[str, Any] = obj.__dict__.setdefault(self.slot, {})
        if self.name not in values:
            values[self.name] = self.factory(obj)
        return values[self.name]


class MemoryDescriptor(_Lazy):
    """Agent memory with an initial value from a factory; persistent ones survive restarts."""

    slot = "__corral_memory__"

    def __init__(self, factory: Callable[[Any], Any], persistent: bool,
                 ttl: timedelta | None) -> None:
        super().__init__(factory)
        self.persistent = persistent
        self.ttl = ttl.total_seconds() if ttl is not None else None

    def __set__(self, obj: Any, value: Any) -> None:
        obj.__dict__.setdefault(self.slot, {})[self.name] = value


@overload
def memory(fn: Callable[[Any], Any], /) -> MemoryDescriptor: ...
@overload
def memory(
    *, persistent: bool = False, ttl: timedelta | None = None
) -> Callable[[Callable[[Any], Any]], MemoryDescriptor]: ...


def memory(fn: Any = None, /, *, persistent: bool = False, ttl: timedelta | None = None) -> Any:
    """Declare agent memory: ``@memory(persistent=True, ttl=timedelta(hours=24))``."""
    if fn is not None:
        return MemoryDescriptor(fn, persistent, ttl)
    return lambda f: MemoryDescriptor(f, persistent, ttl)


class CapabilityDescriptor(_Lazy):
    """A value built lazily on first use and kept for the life of the instance."""

    slot = "__corral_capabilities__"


def capability(fn: Callable[[Any], Any], /) -> CapabilityDescriptor:
    """Declare a lazily built capability (a client, a model, a connection)."""
    return CapabilityDescriptor(fn)


@dataclass(frozen=True)
class ScheduleMark:
    """When a scheduled method runs: every ``interval`` seconds, or on a cron expression."""

    interval: float | None = None
    cron: str | None = None


def scheduled(*, interval: timedelta | float | None = None,
              cron: str | None = None) -> Callable[[F], F]:
    """Run a method periodically: ``@scheduled(interval=timedelta(hours=6))`` or ``cron="0 * * * *"``."""
    if (interval is None) == (cron is None):
        raise TypeError("@scheduled takes exactly one of interval= or cron=")
    seconds: float | None = None
    if interval is not None:
        seconds = interval.total_seconds() if isinstance(interval, timedelta) else float(interval)
        if seconds <= 0:
            raise ValueError(f"@scheduled interval must be positive, got {interval!r}")
    if cron is not None:
        from corral.core.schedule import validate_cron

        validate_cron(cron)

    def mark(fn: F) -> F:
        setattr(fn, SCHEDULE_ATTR, ScheduleMark(seconds, cron))
        return fn

    return mark
