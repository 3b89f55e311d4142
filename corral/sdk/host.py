"""AgentHost: hosts one instance of an SDK agent class and turns Deliver into Result.

The same host runs in the runtime's own loop (inproc tier) and in a worker process
(process tier); only the Outbound it is given differs.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import os
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgspec

from corral.errors import CorralError, HandlerNotFound, SpawnError
from corral.sdk.context import Context, Outbound
from corral.sdk.decorators import (
    AGENT_ATTR,
    HANDLER_ATTR,
    SCHEDULE_ATTR,
    CapabilityDescriptor,
    MemoryDescriptor,
    ScheduleMark,
)
from corral.sdk.message import Message
from corral.sdk.message import Result as SdkResult
from corral.wire.messages import Deliver, ErrorInfo, Ready, Result, Schedule

__all__ = ["AgentHost", "error_info", "load_class"]

_ENC = msgspec.msgpack.Encoder()


def load_class(entrypoint: str, python_path: list[str] | None = None) -> type:
    """Import ``package.module:ClassName``, with extra import paths first."""
    for p in reversed(python_path or []):
        if p not in sys.path:
            sys.path.insert(0, p)
    module_name, _, attr = entrypoint.partition(":")
    if not module_name or not attr:
        raise SpawnError(f"entrypoint {entrypoint!r} is not of the form 'package.module:ClassName'",
                         hint="fix spec.entrypoint")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise SpawnError(f"cannot import {module_name!r} for entrypoint {entrypoint!r}: {exc}",
                         hint="check spec.entrypoint and spec.pythonPath") from exc
    try:
        obj = getattr(module, attr)
    except AttributeError as exc:
        raise SpawnError(f"module {module_name!r} has no attribute {attr!r}",
                         hint="check the class name in spec.entrypoint") from exc
    if not isinstance(obj, type):
        raise SpawnError(f"entrypoint {entrypoint!r} is not a class", hint="point it at the agent class")
    return obj


_CORRAL_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _agent_traceback(exc: BaseException) -> str:
    # Show the agent author their own frames: drop the leading ones inside Corral.
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None and \
            os.path.abspath(tb.tb_frame.f_code.co_filename).startswith(_CORRAL_DIR + os.sep):
        tb = tb.tb_next
    return "".join(traceback.format_exception(type(exc), exc, tb))


def error_info(exc: BaseException, *, with_traceback: bool = True) -> ErrorInfo:
    """The wire form of an exception raised by agent code."""
    tb = _agent_traceback(exc) if with_traceback else ""
    hint = exc.hint if isinstance(exc, CorralError) else ""
    msg = exc.message if isinstance(exc, CorralError) else str(exc)
    return ErrorInfo(type=type(exc).__name__, message=msg or type(exc).__name__,
                     traceback=tb, hint=hint)


@dataclass(frozen=True)
class _Shape:
    """What the decorators marked on a class; the same for every instance of it."""

    handlers: dict[str, Callable[..., Any]]
    schedules: list[Schedule]
    memories: dict[str, MemoryDescriptor]
    capabilities: list[str]
    #: Whether each handler takes a Message (a scheduled method takes none).
    takes_message: dict[str, bool]


@functools.cache
def _shape(cls: type) -> _Shape:
    shape = _Shape({}, [], {}, [], {})
    for klass in reversed(cls.__mro__):
        for attr, value in vars(klass).items():
            if isinstance(value, MemoryDescriptor):
                shape.memories[attr] = value
            elif isinstance(value, CapabilityDescriptor):
                shape.capabilities.append(attr)
            elif callable(value):
                hname = getattr(value, HANDLER_ATTR, None)
                mark: ScheduleMark | None = getattr(value, SCHEDULE_ATTR, None)
                if hname:
                    shape.handlers[hname] = value
                if mark is not None:
                    shape.handlers.setdefault(attr, value)
                    shape.schedules.append(Schedule(attr, mark.interval, mark.cron))
    for name, fn in shape.handlers.items():
        shape.takes_message[name] = len(inspect.signature(fn).parameters) > 1
    return shape


class AgentHost:
    """One live instance of an agent class: handlers, memory, schedules and lifecycle hooks."""

    def __init__(self, cls: type, *, agent: str, instance: str, config: dict[str, Any],
                 outbound: Outbound, restarts: int = 0) -> None:
        self.cls = cls
        self.info = getattr(cls, AGENT_ATTR, None)
        shape = _shape(cls)
        self.handlers = shape.handlers
        self.schedules = shape.schedules
        self.memories = shape.memories
        self.capabilities = shape.capabilities
        self.ctx = Context(agent=agent, instance=instance, config=config, outbound=outbound,
                           restarts=restarts)
        self.instance: Any = None
        self._saved: dict[str, bytes] = {}
        self._takes_msg = shape.takes_message
        self.memory_exhausted = False

    async def start(self, memory: dict[str, Any], memory_age: dict[str, float]) -> Ready:
        """Instantiate the class, restore persistent memory (minus expired), run on_start."""
        obj: Any = object.__new__(self.cls)
        obj.ctx = self.ctx
        store: dict[str, Any] = obj.__dict__.setdefault("__corral_memory__", {})
        for name, desc in self.memories.items():
            if not desc.persistent or name not in memory:
                continue
            age = memory_age.get(name, 0.0)
            if desc.ttl is not None and age > desc.ttl:
                continue  # expired: the factory builds a fresh value on first use
            store[name] = memory[name]
            self._saved[name] = _ENC.encode(memory[name])
        init = getattr(self.cls, "__init__", object.__init__)
        if init is not object.__init__:
            await _maybe_await(init(obj))
        self.instance = obj
        on_start = getattr(obj, "on_start", None)
        if on_start is not None:
            await _maybe_await(on_start())
        return Ready(handlers=sorted(self.handlers), schedules=self.schedules)

    async def invoke(self, d: Deliver) -> Result:
        """Run one task; an exception becomes an error Result and the instance stays up."""
        fn = self.handlers.get(d.handler)
        if fn is None:
            err = HandlerNotFound(f"no handler {d.handler!r}; handlers: {sorted(self.handlers)}")
            return Result(d.id, False, error=error_info(err, with_traceback=False))
        try:
            if self._takes_msg[d.handler]:
                msg = Message(content=d.payload, sender=d.sender, handler=d.handler, id=d.id,
                              kind=d.kind, subject=d.subject)
                out = await _maybe_await(fn(self.instance, msg))
            else:
                out = await _maybe_await(fn(self.instance))
        except MemoryError:
            # Report the limit as exactly that; the worker then exits so a fresh process
            # replaces the exhausted heap.
            self.memory_exhausted = True
            return Result(d.id, False, error=ErrorInfo(
                type="LimitExceeded", message="memory limit exceeded (MemoryError in handler)",
                hint="raise resources.memory in the manifest or use less"))
        except Exception as exc:
            return Result(d.id, False, error=error_info(exc))
        if isinstance(out, SdkResult):
            if out.ok:
                return Result(d.id, True, payload=out.data)
            return Result(d.id, False, payload=out.data,
                          error=ErrorInfo(type=out.error_type, message=out.error or "failed"))
        return Result(d.id, True, payload=out)

    def memory_changes(self) -> dict[str, Any]:
        """Persistent memory values that changed since the last call (compared by encoding)."""
        if self.instance is None or not self.memories:
            return {}
        store: dict[str, Any] = self.instance.__dict__.get("__corral_memory__", {})
        changed: dict[str, Any] = {}
        for name, desc in self.memories.items():
            if not desc.persistent or name not in store:
                continue
            try:
                blob = _ENC.encode(store[name])
            except (TypeError, ValueError) as exc:
                raise CorralError(f"persistent memory {name!r} holds a value msgpack cannot encode: {exc}",
                                  hint="keep persistent memory to dicts, lists, str, numbers, bytes") from exc
            if self._saved.get(name) != blob:
                self._saved[name] = blob
                changed[name] = store[name]
        return changed

    async def stop(self) -> None:
        """Run the agent's on_stop hook, if it has one."""
        on_stop = getattr(self.instance, "on_stop", None)
        if on_stop is not None:
            await _maybe_await(on_stop())



async def _maybe_await(value: Any) -> Any:
    if inspect.isawaitable(value):
        return await value
    return value



