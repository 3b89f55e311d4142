"""WorkerCore: the agent side of the wire protocol, above the transport.

It takes ToWorker messages and emits ToRuntime messages through ``emit``. The process
worker wires ``emit`` to a socket; the inproc tier wires it straight to the runtime.
Every task it starts lives in the TaskGroup its owner hands it.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable
from typing import Any

from corral.errors import CorralError, TaskTimeout, error_from_info
from corral.sdk.host import AgentHost, error_info, load_class
from corral.wire.messages import (
    Broadcast,
    Cancel,
    Deliver,
    ErrorInfo,
    Guarantee,
    Init,
    InitError,
    Log,
    MemorySave,
    Publish,
    Reply,
    Request,
    Result,
    Send,
    Shutdown,
    Subscribe,
    ToRuntime,
    ToWorker,
    Unsubscribe,
)

__all__ = ["EXIT_MEMORY", "EXIT_OK", "WorkerCore"]

EXIT_OK = 0
#: Exit code a worker uses after a MemoryError, so the runtime reports the memory limit.
EXIT_MEMORY = 86
#: Exit code after the agent failed to initialise.
EXIT_INIT_FAILED = 87


class WorkerCore:
    """Hosts one agent instance and speaks the worker side of the protocol."""

    def __init__(self, emit: Callable[[ToRuntime], None], tg: asyncio.TaskGroup,
                 *, cls: type | None = None) -> None:
        self._emit = emit
        self._tg = tg
        self._cls = cls
        self.host: AgentHost | None = None
        self._tasks: dict[int, asyncio.Task[None]] = {}
        self._cancelled: dict[int, str] = {}
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._ids = itertools.count(1)
        self._shutting_down = False
        self.finished: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    # ------------------------------------------------------------------ inbound

    def handle(self, msg: ToWorker) -> None:
        """Dispatch one message from the runtime; never blocks."""
        if isinstance(msg, Deliver):
            if self._shutting_down:
                self._emit(Result(msg.id, False, error=ErrorInfo(
                    "AgentUnavailable", "agent is shutting down")))
                return
            task = self._tg.create_task(self._run(msg))
            self._tasks[msg.id] = task
            task.add_done_callback(lambda t, d=msg: self._task_done(d, t))
        elif isinstance(msg, Reply):
            fut = self._pending.pop(msg.id, None)
            if fut is None or fut.done():
                return
            if msg.ok:
                fut.set_result(msg.payload)
            else:
                err = msg.error or ErrorInfo("TaskFailed", "request failed")
                fut.set_exception(error_from_info(err.type, err.message, hint=err.hint,
                                                  traceback=err.traceback))
        elif isinstance(msg, Cancel):
            task = self._tasks.get(msg.id)
            if task is not None:
                self._cancelled[msg.id] = msg.reason
                task.cancel()
        elif isinstance(msg, Init):
            self._tg.create_task(self._init(msg))
        elif isinstance(msg, Shutdown) and not self._shutting_down:
            self._shutting_down = True
            self._tg.create_task(self._shutdown(msg.grace))

    def connection_lost(self) -> None:
        """The runtime went away: stop everything now."""
        for task in self._tasks.values():
            task.cancel()
        for fut in self._pending.values():
            if not fut.done():
                fut.cancel()
        self._finish(EXIT_OK)

    # ------------------------------------------------------------------ outbound (self.ctx)

    def send(self, to: str, payload: Any, handler: str) -> None:
        """Outbound: one-way message."""
        self._emit(Send(to, payload, handler))

    async def request(self, to: str, payload: Any, handler: str, timeout: float | None) -> Any:
        """Outbound: request another agent and wait for the Reply."""
        rid = next(self._ids)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        self._emit(Request(rid, to, payload, handler, timeout))
        try:
            if timeout is None:
                return await fut
            async with asyncio.timeout(timeout):
                return await fut
        except TimeoutError:
            raise TaskTimeout(f"request to {to!r} got no answer within {timeout}s") from None
        finally:
            self._pending.pop(rid, None)

    def publish(self, subject: str, payload: Any, guarantee: Guarantee, ttl: float | None,
                idempotency_key: str | None, headers: dict[str, str]) -> None:
        """Outbound: one-way message on a subject."""
        self._emit(Publish(subject, payload, guarantee, ttl, idempotency_key, headers))

    def subscribe(self, subject: str, handler: str, ack_wait: float, guarantee: str = "") -> None:
        """Outbound: subscribe at run time."""
        self._emit(Subscribe(subject, handler, ack_wait, guarantee))

    def unsubscribe(self, subject: str) -> None:
        """Outbound: unsubscribe."""
        self._emit(Unsubscribe(subject))

    def broadcast(self, payload: Any, handler: str, namespace: str | None, selector: str) -> None:
        """Outbound: one message for many agents."""
        self._emit(Broadcast(payload, handler, namespace, selector))

    def log(self, level: str, message: str) -> None:
        """Outbound: a log line."""
        self._emit(Log(message, level))

    # ------------------------------------------------------------------ internals

    async def _init(self, init: Init) -> None:
        try:
            cls = self._cls or load_class(init.entrypoint, init.python_path)
            self.host = AgentHost(cls, agent=init.agent, instance=init.instance,
                                  config=init.config, outbound=self, restarts=init.restarts)
            ready = await self.host.start(init.memory, init.memory_age)
        except Exception as exc:
            self._emit(InitError(error_info(exc)))
            self._finish(EXIT_INIT_FAILED)
            return
        self._emit(ready)

    async def _run(self, d: Deliver) -> None:
        host = self.host
        try:
            if host is None:
                res = Result(d.id, False, error=ErrorInfo("AgentUnavailable", "agent not initialised"))
            else:
                res = await host.invoke(d)
        except asyncio.CancelledError:
            reason = self._cancelled.pop(d.id, None)
            if reason is None:
                raise  # our owner is cancelling us: let it propagate
            err = TaskTimeout(f"task {d.id} cancelled: {reason}")
            res = Result(d.id, False, error=error_info(err, with_traceback=False))
        finally:
            self._tasks.pop(d.id, None)
        if host is not None:
            # State first, then the result: the runtime stores them in this order, so a
            # crash between the two redelivers the task (at-least-once) instead of marking
            # it done without its effect.
            self._save_memory(host)
        self._emit(res)
        if host is not None and host.memory_exhausted:
            self._finish(EXIT_MEMORY)

    def _task_done(self, d: Deliver, task: asyncio.Task[None]) -> None:
        # A Cancel that lands before the task's first step never reaches _run's except:
        # answer for it here, so every Deliver still gets exactly one Result.
        if task.cancelled() and self._tasks.pop(d.id, None) is not None:
            reason = self._cancelled.pop(d.id, None)
            if reason is not None:
                err = TaskTimeout(f"task {d.id} cancelled: {reason}")
                self._emit(Result(d.id, False, error=error_info(err, with_traceback=False)))

    def _save_memory(self, host: AgentHost) -> None:
        try:
            changed = host.memory_changes()
        except CorralError as exc:
            self._emit(Log(str(exc), "error"))
            return
        if changed:
            self._emit(MemorySave(changed))

    async def _shutdown(self, grace: float) -> None:
        if self._tasks:
            try:
                async with asyncio.timeout(grace):
                    await asyncio.gather(*self._tasks.values(), return_exceptions=True)
            except TimeoutError:
                for task in list(self._tasks.values()):
                    task.cancel()
        if self.host is not None:
            try:
                await self.host.stop()
            except Exception as exc:
                self._emit(Log(f"on_stop raised: {exc!r}", "error"))
            self._save_memory(self.host)
        self._finish(EXIT_OK)

    def _finish(self, code: int) -> None:
        if not self.finished.done():
            self.finished.set_result(code)

    def cancel_all(self) -> None:
        """Cancel every task still running (used on the way out)."""
        for task in self._tasks.values():
            task.cancel()

