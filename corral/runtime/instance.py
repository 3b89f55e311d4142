"""Instance: one replica of an agent, through every incarnation the supervisor gives it.

It is the ChannelSink of its current channel: it turns what the agent says into
lifecycle events (``core.lifecycle``), finished work, stored memory and logs.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

from corral.core.lifecycle import (
    Crashed,
    Event,
    GiveUp,
    InitFailed,
    Initialized,
    Rearm,
    Restart,
    Resumed,
    Retire,
    State,
    Stop,
    TasksDone,
    TaskStarted,
    Wait,
    apply,
)
from corral.errors import (
    AgentUnavailable,
    CorralError,
    HandlerNotFound,
    LimitExceeded,
    PolicyDenied,
    TaskTimeout,
)
from corral.sandbox.base import Channel, ExitInfo
from corral.wire.messages import (
    Broadcast,
    Cancel,
    Deliver,
    Heartbeat,
    Hello,
    Init,
    InitError,
    Log,
    MemorySave,
    Publish,
    Ready,
    Request,
    Result,
    Schedule,
    Send,
    Shutdown,
    Stats,
    Subscribe,
    ToRuntime,
    Unsubscribe,
)

if TYPE_CHECKING:
    from corral.runtime.agent import AgentController
    from corral.runtime.work import Work

__all__ = ["Instance"]

_LIVE = (State.READY, State.RUNNING, State.WAITING)
_READY, _RUNNING, _WAITING = State.READY, State.RUNNING, State.WAITING
#: Seconds an instance stays Running with nothing in flight before it completes its burst
#: of work (Running -> Completed -> Ready). Back-to-back tasks keep it Running, so a busy
#: agent does not write three lifecycle events per task.
IDLE_LINGER = 0.05


class Instance:
    """One replica: lifecycle state, current channel, in-flight work, health facts."""

    def __init__(self, agent: AgentController, name: str, *, one_shot: bool = False) -> None:
        self.agent = agent
        self.rt = agent.rt
        self.name = name
        self.one_shot = one_shot  # ephemeral: one task, then retire
        self.state = State.INITIALIZING
        self.channel: Channel | None = None
        self.inflight: dict[int, Work] = {}
        self.handlers: list[str] = []
        self.schedules: list[Schedule] = []
        self.restarts = 0
        self.started_at = 0.0
        self.ready_at: float | None = None
        self.last_heartbeat = 0.0
        self.last_exit: ExitInfo | None = None
        self.init_error: str | None = None
        self.outstanding = 0
        self.used = False
        self.removed = False
        self.sample: dict[str, Any] = {}
        self.ready: asyncio.Future[None] = self._future()
        self.closed = asyncio.Event()
        self.closed.set()
        self._hello = False
        self._pending_start: float | None = None
        self._give_up: str | None = None
        self._timer: asyncio.TimerHandle | None = None
        #: Loop time the last task finished with nothing left in flight (None while busy).
        self.idle_since: float | None = None
        #: Loop time of the last sign of work (Ready, or a task finishing): for idleTimeout.
        self.last_active = 0.0
        self._shutdown_sent = False
        #: The request a policy denied, while Suspended: re-checked when policies change.
        self.violation: tuple[Any, ...] | None = None

    # ---------------------------------------------------------------- lifecycle

    def transition(self, event: Event) -> None:
        """Move the lifecycle by one event and record it (IllegalTransition changes nothing)."""
        old = self.state
        self.state = apply(old, event)
        data = {"instance": self.name, "event": type(event).__name__, "from": old.value,
                "to": self.state.value, "reason": event.reason}
        self.rt.store.append_event(self.agent.name, "instance.transition", data)
        self.rt.guard.note("lifecycle", actor="runtime", agent=self.agent.name,
                           resource=self.name, outcome=self.state.value, data=data)
        self.agent.on_transition(self, old)

    @property
    def accepting(self) -> bool:
        """Whether new work may be dispatched here."""
        return self.state in _LIVE and self.channel is not None and not self.removed

    def schedule_start(self, delay: float) -> None:
        """Start (or restart) after ``delay``; waits for a live incarnation to close first."""
        if self.removed or self.state is State.TERMINATED:
            return
        if self.channel is not None or not self.closed.is_set():
            self._pending_start = delay
            return
        self._cancel_timer()
        if delay <= 0:
            self._start()
        else:
            self._timer = asyncio.get_running_loop().call_later(delay, self._start)

    def _start(self) -> None:
        self._timer = None
        if self.removed or self.state is State.TERMINATED:
            return
        if self.state is State.FAILED:
            self.restarts += 1
            self.agent.restarts += 1
            self.transition(Restart(f"restart #{self.restarts}"))
        self.rt.spawn(self._launch())

    async def _launch(self) -> None:
        loop = asyncio.get_running_loop()
        if self.ready.done():
            self.ready = self._future()
        self.closed.clear()
        self._hello = False
        self._shutdown_sent = False
        self.init_error = None
        self.ready_at = None
        self.started_at = time.time()
        self.last_heartbeat = loop.time()
        self._timer = loop.call_later(self.agent.spec.health.start_timeout, self._start_overdue)
        try:
            channel = await self.agent.launch(self)
        except PolicyDenied as exc:
            # Not a crash to retry: it stays refused until the policy changes and it is scaled.
            self.rt.log(self.agent.name, self.name, "error", f"not started: {exc}")
            self._give_up = f"policy: {exc.message}"
            self.on_closed(ExitInfo("init_failed", None, str(exc)))
            return
        except CorralError as exc:
            self.rt.log(self.agent.name, self.name, "error", f"could not start: {exc}")
            self.on_closed(ExitInfo("init_failed", None, str(exc)))
            return
        self.channel = channel
        self.rt.counters.spawned += 1
        if self._hello:
            self._send_init()

    def _start_overdue(self) -> None:
        self._timer = None
        if self.state is State.INITIALIZING and self.channel is not None:
            limit = self.agent.spec.health.start_timeout
            self.channel.kill("init_failed", f"not Ready within startTimeout {limit:g}s")

    def give_up(self, reason: str) -> None:
        """The supervisor gave up: stop now and end in Terminated."""
        self._give_up = reason
        self._pending_start = None
        self._cancel_timer()
        if self.channel is not None:
            self.channel.kill("killed", f"supervisor gave up: {reason}")
        elif self.state is State.FAILED:
            self.transition(GiveUp(reason))

    def kill(self, reason: str, detail: str = "") -> None:
        """Kill the current incarnation (the supervisor decides what follows)."""
        if self.channel is not None:
            self.channel.kill(reason, detail)

    async def stop(self, grace: float, reason: str) -> None:
        """Stop for good: finish in-flight work within ``grace``, then kill."""
        self.removed = True
        self._pending_start = None
        self._cancel_timer()
        if self.state is not State.TERMINATED:
            self.transition(Stop(reason))
        if self.channel is not None:
            self._shutdown(grace)
            try:
                async with asyncio.timeout(grace + 1.0):
                    await self.closed.wait()
            except TimeoutError:
                if self.channel is not None:
                    self.channel.kill("killed", f"did not stop within {grace:g}s of shutdown")
                await self.closed.wait()
        if not self.ready.done():
            self.ready.set_exception(AgentUnavailable(f"instance {self.name} was stopped: {reason}"))

    # ---------------------------------------------------------------- work

    def dispatch(self, work: Work) -> None:
        """Send one task to the agent and arm its timeout."""
        assert self.channel is not None
        handler = work.handler or self.default_handler()
        if not handler:
            self.agent.fail(work, HandlerNotFound(
                f"agent {self.agent.name!r} has handlers {self.handlers}; name one with --handler"))
            return
        loop = asyncio.get_running_loop()
        work.started = loop.time()
        self.inflight[work.id] = work
        self.used = True
        self.idle_since = None
        if self.state is _READY:
            self.transition(TaskStarted(handler))
        self.channel.send(Deliver(work.id, handler, work.payload, work.sender, work.kind,  # type: ignore[arg-type]
                                  work.timeout, subject=work.subject))
        work.timer = loop.call_later(work.timeout, self._on_timeout, work)

    def default_handler(self) -> str:
        """The handler used when none is named: the only one, or one called handle/default/run."""
        if len(self.handlers) == 1:
            return self.handlers[0]
        for name in ("handle", "default", "run"):
            if name in self.handlers:
                return name
        return ""

    def _on_timeout(self, work: Work) -> None:
        work.timer = None
        if work.id not in self.inflight or work.abandoned:
            return
        work.abandoned = True
        self.agent.fail(work, TaskTimeout(
            f"task on {self.name} ran past its {work.timeout:g}s timeout and was cancelled"))
        if self.channel is not None:
            self.channel.send(Cancel(work.id, "timeout"))
            grace = self.rt.config.cancel_grace
            work.timer = asyncio.get_running_loop().call_later(grace, self._cancel_overdue, work, grace)

    def _cancel_overdue(self, work: Work, grace: float) -> None:
        work.timer = None
        if work.id in self.inflight and self.channel is not None:
            self.channel.kill("hung", f"a task did not stop within {grace:g}s of its timeout")

    def _on_result(self, msg: Result) -> None:
        work = self.inflight.pop(msg.id, None)
        if work is None:
            return
        if work.timer is not None:
            work.timer.cancel()
        if not work.abandoned:
            self.agent.finish(work, msg, asyncio.get_running_loop().time() - work.started)
        if not self.inflight:
            if self.one_shot:
                self.complete()
            else:
                self.idle_since = asyncio.get_running_loop().time()
        self.last_active = asyncio.get_running_loop().time()
        self.agent.on_task_done(self)

    def complete(self) -> None:
        """End a burst of work: Completed, then Ready (persistent) or Terminated (one-shot)."""
        self.idle_since = None
        if self.state is _WAITING and self.outstanding == 0:
            self.transition(Resumed())
        if self.state is not _RUNNING or self.inflight:
            return
        self.transition(TasksDone())
        if self.one_shot:
            self.transition(Retire("ephemeral: task done"))
            self.removed = True
            self._shutdown(self.rt.config.shutdown_grace)
        else:
            self.transition(Rearm())

    # ---------------------------------------------------------------- ChannelSink

    def on_message(self, msg: ToRuntime) -> None:
        """Everything the agent says arrives here."""
        t = type(msg)
        if t is Result:
            self._on_result(msg)  # type: ignore[arg-type]
        elif t is Heartbeat:
            self.last_heartbeat = asyncio.get_running_loop().time()
        elif t is Send:
            self.rt.spawn(self.rt.route_send(self, msg))  # type: ignore[arg-type]
        elif t is Request:
            self.rt.spawn(self._route_request(msg))  # type: ignore[arg-type]
        elif t is Subscribe:
            self.rt.spawn(self.rt.route_subscribe(self, msg))  # type: ignore[arg-type]
        elif t is Unsubscribe:
            self.rt.spawn(self.rt.route_unsubscribe(self, msg))  # type: ignore[arg-type]
        elif t is Broadcast:
            self.rt.spawn(self.rt.route_broadcast(self, msg))  # type: ignore[arg-type]
        elif t is Publish:
            self.rt.spawn(self.rt.route_publish(self, msg))  # type: ignore[arg-type]
        elif t is Log:
            self.rt.log(self.agent.name, self.name, msg.level, msg.message)  # type: ignore[union-attr]
        elif t is MemorySave:
            self.agent.save_memory(msg.values)  # type: ignore[union-attr]
        elif t is Hello:
            self._hello = True
            if self.channel is not None:
                self._send_init()
        elif t is Ready:
            self._on_ready(msg)  # type: ignore[arg-type]
        elif t is InitError:
            err = msg.error  # type: ignore[union-attr]
            self.init_error = f"{err.type}: {err.message}"
            self.rt.log(self.agent.name, self.name, "error",
                        f"init failed: {err.traceback or self.init_error}")
        elif t is Stats:
            self.sample["self_reported"] = {"tasks": msg.tasks, "errors": msg.errors}  # type: ignore[union-attr]

    def on_log(self, line: str, level: str) -> None:
        """A line the agent process printed."""
        self.rt.log(self.agent.name, self.name, level, line)

    def on_closed(self, exit: ExitInfo) -> None:
        """The incarnation ended: fail its work, record why, and let the supervisor decide."""
        self.channel = None
        self._cancel_timer()
        if exit.reason == "init_failed" and self.init_error:
            exit = ExitInfo(exit.reason, exit.code, self.init_error)
        self.last_exit = exit
        self.rt.store.append_event(self.agent.name, "instance.exited", {
            "instance": self.name, "reason": exit.reason, "code": exit.code, "detail": exit.detail})
        err: CorralError
        if exit.reason == "memory_limit":
            err = LimitExceeded("memory", "", exit.detail)
        else:
            err = AgentUnavailable(f"instance {self.name} ended: {exit.describe()}")
        inflight, self.inflight = self.inflight, {}
        for work in inflight.values():
            if work.timer is not None:
                work.timer.cancel()
            if not work.abandoned:
                self.agent.retry_or_fail(work, err)
        self.outstanding = 0
        if not self.ready.done():
            self.ready.set_exception(AgentUnavailable(
                f"instance {self.name} failed before Ready: {exit.describe()}"))
        self.closed.set()
        level = "info" if exit.reason == "exited" or self.state is State.TERMINATED else "error"
        self.rt.log(self.agent.name, self.name, level, f"instance ended: {exit.describe()}")
        if self.state is not State.TERMINATED:
            if self.state is State.INITIALIZING:
                self.transition(InitFailed(exit.describe()))
            else:
                self.transition(Crashed(exit.describe()))
            if self._give_up is not None:
                self.transition(GiveUp(self._give_up))
            elif self.one_shot:
                self.removed = True  # one task, one instance: the next task gets a fresh one
                self.transition(GiveUp("one-shot instance: not restarted"))
            else:
                self.agent.on_instance_exit(self, exit)
        if self.state is State.FAILED and self._pending_start is not None:
            delay, self._pending_start = self._pending_start, None
            self.schedule_start(delay)
        self.agent.on_instance_gone(self)

    @property
    def restart_pending(self) -> bool:
        """Whether the supervisor has a start of this instance on the way."""
        return self._timer is not None or self._pending_start is not None

    # ---------------------------------------------------------------- internals

    def _shutdown(self, grace: float) -> None:
        # Shutdown is for a Ready agent, once; one that never said Ready is killed instead.
        if self.channel is None or self._shutdown_sent:
            return
        if self.ready_at is None:
            self.channel.kill("killed", "stopped before it was Ready")
            return
        self._shutdown_sent = True
        self.channel.send(Shutdown(grace))

    def _send_init(self) -> None:
        assert self.channel is not None
        spec = self.agent.spec
        memory, ages = self.agent.memory_snapshot()
        self.channel.send(Init(
            agent=self.agent.name, instance=self.name, entrypoint=spec.entrypoint or "",
            config=dict(spec.config), memory=memory, memory_age=ages,
            heartbeat_interval=spec.health.heartbeat_interval,
            python_path=self.agent.python_path, restarts=self.restarts))

    def _on_ready(self, msg: Ready) -> None:
        if self.state is not State.INITIALIZING:
            return  # stopped while it was starting: the kill is already on its way
        self._cancel_timer()
        self.handlers = list(msg.handlers)
        self.schedules = list(msg.schedules)
        loop = asyncio.get_running_loop()
        self.ready_at = loop.time()
        self.last_heartbeat = self.last_active = self.ready_at
        self.transition(Initialized())
        if not self.ready.done():
            self.ready.set_result(None)
        self.agent.on_ready(self)

    async def _route_request(self, msg: Request) -> None:
        if self.outstanding == 0 and self.state is _RUNNING and self.inflight:
            self.transition(Wait(f"request to {msg.to}"))
        self.outstanding += 1
        channel = self.channel
        try:
            self.rt.check_outbound(self.agent.name, msg.payload)
            payload = await self.rt.request(msg.to, msg.payload, handler=msg.handler,
                                            timeout=msg.timeout, sender=self.agent.name)
            reply = _reply(msg.id, True, payload)
        except PolicyDenied as exc:
            reply = _reply_error(msg.id, exc)
            self.rt.suspend(self, exc)  # from Waiting too: the finally then leaves it Suspended
        except CorralError as exc:
            reply = _reply_error(msg.id, exc)
        finally:
            self.outstanding = max(0, self.outstanding - 1)
            if self.outstanding == 0 and self.state is _WAITING:
                self.transition(Resumed())
        if channel is not None and channel is self.channel:
            channel.send(reply)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    @staticmethod
    def _future() -> asyncio.Future[None]:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        # Nobody may await a replica's readiness; don't warn about an unread error.
        fut.add_done_callback(lambda f: f.cancelled() or f.exception())
        return fut


def _reply(rid: int, ok: bool, payload: Any) -> Any:
    from corral.wire.messages import Reply

    return Reply(rid, ok, payload)


def _reply_error(rid: int, exc: CorralError) -> Any:
    from corral.wire.messages import ErrorInfo, Reply

    return Reply(rid, False, error=ErrorInfo(type(exc).__name__, exc.message, hint=exc.hint))
