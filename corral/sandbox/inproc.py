"""The ``inproc`` tier: trusted agents as asyncio actors inside the runtime.

Nothing is contained: the agent shares the runtime's memory, CPU and files, and
``enforcement`` says so. What it gets is speed: no process, no encoding.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Coroutine
from typing import Any

from corral.sandbox.base import Channel, ChannelSink, ExitInfo
from corral.sandbox.limits import Enforcement, Limits
from corral.wire.messages import PROTOCOL_VERSION, Hello, ToRuntime, ToWorker
from corral.worker.core import EXIT_INIT_FAILED, EXIT_OK, WorkerCore

__all__ = ["InprocChannel", "InprocLauncher"]

_NOT_ENFORCED = "inproc agents share the runtime process; use isolation: process to enforce it"


class InprocChannel(Channel):
    """One in-process instance: a WorkerCore in its own task and TaskGroup."""

    def __init__(self, sink: ChannelSink, enforcement: list[Enforcement]) -> None:
        super().__init__(tier="inproc", pid=os.getpid(), enforcement=enforcement)
        self.sink = sink
        self.core: WorkerCore | None = None
        self._task: asyncio.Task[None] | None = None
        self._kill_reason: tuple[str, str] | None = None

    async def run(self, started: asyncio.Future[None]) -> None:
        """The instance's whole life; its owner runs this in a TaskGroup."""
        exit = ExitInfo("exited", EXIT_OK)
        self._task = asyncio.current_task()
        try:
            async with asyncio.TaskGroup() as tg:
                self.core = WorkerCore(self._emit, tg)
                started.set_result(None)
                self._emit(Hello(PROTOCOL_VERSION, os.getpid(), "corral-inproc"))
                code = await self.core.finished
                self.core.cancel_all()
            if code == EXIT_INIT_FAILED:
                exit = ExitInfo("init_failed", code, "the agent failed to initialise")
        except asyncio.CancelledError:
            if self._kill_reason is None:
                raise  # the runtime is shutting down: let cancellation propagate
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
            exit = ExitInfo(self._kill_reason[0], None, self._kill_reason[1])
        except Exception as exc:  # a bug in the agent outside any handler
            exit = ExitInfo("crashed", None, f"{type(exc).__name__}: {exc}")
        finally:
            if not started.done():
                started.set_result(None)
        self.sink.on_closed(exit)

    def _emit(self, msg: ToRuntime) -> None:
        self.sink.on_message(msg)

    def send(self, msg: ToWorker) -> None:
        """Hand the message straight to the agent's core."""
        if self.core is not None:
            self.core.handle(msg)

    def kill(self, reason: str, detail: str = "") -> None:
        """Cancel the instance's task; on_closed follows with ``reason``."""
        if self._kill_reason is None:
            self._kill_reason = (reason, detail)
        if self._task is not None:
            self._task.cancel()


class InprocLauncher:
    """Starts inproc instances as tasks in the runtime's TaskGroup."""

    def __init__(self, spawn_task: Callable[[Coroutine[Any, Any, None]], None]) -> None:
        self._spawn_task = spawn_task

    def enforcement(self, limits: Limits) -> list[Enforcement]:
        """Inproc enforces no limit; say so for every one that is set."""
        rows = []
        for name, key in (("memory", "memory"), ("cpu", "cpu"), ("cpuTime", "cpu_time"),
                          ("maxOpenFiles", "max_open_files"), ("maxProcesses", "max_processes")):
            value = getattr(limits, key)
            if value is not None:
                rows.append(Enforcement(name, str(value), False, "none", _NOT_ENFORCED))
        return rows

    async def launch(self, *, instance: str, sink: ChannelSink, limits: Limits) -> InprocChannel:
        """Start the instance; it says Hello at once."""
        chan = InprocChannel(sink, self.enforcement(limits))
        started: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._spawn_task(chan.run(started))
        await started
        return chan
