"""WorkerCore driven by wire messages alone: no process, no socket, the test owns the TaskGroup."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from corral import Message, handler, memory, scheduled
from corral.errors import AgentNotFound, LimitExceeded, TaskFailed, TaskTimeout
from corral.wire.messages import (
    Cancel,
    Deliver,
    ErrorInfo,
    Init,
    InitError,
    Log,
    MemorySave,
    Publish,
    Ready,
    Reply,
    Request,
    Result,
    Schedule,
    Send,
    Shutdown,
    Subscribe,
    ToRuntime,
)
from corral.worker.core import EXIT_INIT_FAILED, EXIT_MEMORY, EXIT_OK, WorkerCore

INIT = Init(agent="agent", instance="agent-0")


async def until(cond: Callable[[], object], within: float = 2.0) -> None:
    """Let the loop run (sleep(0), no timed sleeps) until ``cond()`` holds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not cond():
        if loop.time() > deadline:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0)


async def settle(spins: int = 20) -> None:
    for _ in range(spins):
        await asyncio.sleep(0)


class Harness:
    """A WorkerCore whose emitted messages land in ``out``."""

    def __init__(self, core: WorkerCore, out: list[ToRuntime]) -> None:
        self.core = core
        self.out = out

    def of(self, kind: type) -> list[Any]:
        return [m for m in self.out if isinstance(m, kind)]

    async def result(self, id: int) -> Result:
        await until(lambda: any(r.id == id for r in self.of(Result)))
        return next(r for r in self.of(Result) if r.id == id)

    async def ready(self, init: Init = INIT) -> Ready:
        self.core.handle(init)
        await until(lambda: self.of(Ready) or self.of(InitError))
        assert self.of(Ready), self.out
        ready: Ready = self.of(Ready)[0]
        return ready


@asynccontextmanager
async def worker(cls: type | None) -> AsyncIterator[Harness]:
    """Run a WorkerCore in a TaskGroup the test owns; on the way out, stop what still runs."""
    out: list[ToRuntime] = []
    try:
        async with asyncio.TaskGroup() as tg:
            core = WorkerCore(out.append, tg, cls=cls)
            try:
                yield Harness(core, out)
            finally:
                core.cancel_all()
                if not core.finished.done():
                    core.connection_lost()
    except ExceptionGroup as group:
        # Show a failed assertion of the test body as itself, not wrapped by the TaskGroup.
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise


# ---------------------------------------------------------------------------- agents

class Gate:
    """Shared between a test and its agent: handlers wait on it."""

    def __init__(self) -> None:
        self.open = asyncio.Event()
        self.entered = 0
        self.cancelled = 0


GATE: Gate


class Worker:
    @memory(persistent=True)
    def counter(self) -> dict[str, int]:
        return {"n": 0}

    @memory(persistent=True)
    def junk(self) -> Any:
        return None

    def on_stop(self) -> None:
        self.counter["stopped"] = 1

    @handler
    async def echo(self, msg: Message) -> Any:
        return msg.content

    @handler
    async def bump(self) -> int:
        self.counter["n"] += 1
        return self.counter["n"]

    @handler
    async def boom(self) -> None:
        raise ValueError("boom")

    @handler
    async def hog(self) -> None:
        raise MemoryError

    @handler
    async def spoil(self) -> str:
        self.junk = object()  # msgpack can't encode it
        return "spoiled"

    @handler
    async def wait(self, msg: Message) -> Any:
        GATE.entered += 1
        try:
            await GATE.open.wait()
        except asyncio.CancelledError:
            GATE.cancelled += 1
            raise
        return msg.content

    @handler
    async def ask(self, msg: Message) -> Any:
        return await self.ctx.request("oracle", msg.content, handler="answer", timeout=5)

    @handler
    async def ask_and_catch(self, msg: Message) -> dict[str, Any]:
        try:
            await self.ctx.request("oracle", msg.content)
        except Exception as exc:
            return {"cls": type(exc).__name__, "message": getattr(exc, "message", str(exc)),
                    "error_type": getattr(exc, "error_type", None),
                    "traceback": getattr(exc, "traceback", None),
                    "hint": getattr(exc, "hint", None)}
        return {"cls": None}

    @handler
    async def ask_quickly(self) -> str:
        try:
            await self.ctx.request("slowpoke", None, timeout=0.001)
        except TaskTimeout as exc:
            return exc.message
        return "answered"

    @handler
    async def chat(self, msg: Message) -> None:
        self.ctx.send("audit", msg.content, handler="record")
        self.ctx.log("hello", level="warning")


@pytest.fixture(autouse=True)
def gate() -> Gate:
    global GATE
    GATE = Gate()
    return GATE


# ---------------------------------------------------------------------------- init


async def test_init_answers_ready_with_handlers() -> None:
    class Scheduled(Worker):
        @scheduled(interval=30)
        async def tick(self) -> None:
            pass

    async with worker(Scheduled) as w:
        ready = await w.ready()
        assert ready.handlers == sorted(["echo", "bump", "boom", "hog", "spoil", "wait", "ask",
                                         "ask_and_catch", "ask_quickly", "chat", "tick"])
        assert ready.schedules == [Schedule("tick", 30.0)]
        assert w.core.host is not None
        assert w.core.host.ctx.agent == "agent"
        assert not w.core.finished.done()


async def test_init_passes_identity_config_restarts_and_memory() -> None:
    seen: dict[str, Any] = {}

    class Introspect(Worker):
        def on_start(self) -> None:
            seen.update(agent=self.ctx.agent, instance=self.ctx.instance,
                        config=self.ctx.config, restarts=self.ctx.restarts,
                        counter=dict(self.counter))

    async with worker(Introspect) as w:
        await w.ready(Init(agent="a", instance="a-3", config={"k": 1}, restarts=2,
                           memory={"counter": {"n": 9}}, memory_age={"counter": 1.0}))
    assert seen == {"agent": "a", "instance": "a-3", "config": {"k": 1}, "restarts": 2,
                    "counter": {"n": 9}}


async def test_init_loads_the_entrypoint_from_python_path(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "path", list(sys.path))
    (tmp_path / "wc_entry.py").write_text(
        "from corral import handler\n\nclass Entry:\n    @handler\n    def run(self):\n"
        "        return 'loaded'\n")
    try:
        async with worker(None) as w:
            await w.ready(Init(agent="a", instance="a-0", entrypoint="wc_entry:Entry",
                               python_path=[str(tmp_path)]))
            w.core.handle(Deliver(1, "run"))
            assert (await w.result(1)).payload == "loaded"
    finally:
        sys.modules.pop("wc_entry", None)


async def test_init_error_when_on_start_raises() -> None:
    class Broken(Worker):
        async def on_start(self) -> None:
            raise RuntimeError("missing config")

    async with worker(Broken) as w:
        w.core.handle(INIT)
        code = await w.core.finished
        assert code == EXIT_INIT_FAILED
        [err] = w.of(InitError)
        assert (err.error.type, err.error.message) == ("RuntimeError", "missing config")
        assert "in on_start" in err.error.traceback
        assert not w.of(Ready)


async def test_init_error_when_the_entrypoint_does_not_import() -> None:
    async with worker(None) as w:
        w.core.handle(Init(agent="a", instance="a-0", entrypoint="wc_no_such_module:Agent"))
        assert await w.core.finished == EXIT_INIT_FAILED
        [err] = w.of(InitError)
        assert err.error.type == "SpawnError"
        assert "wc_no_such_module" in err.error.message
        assert err.error.hint


async def test_deliver_before_init_is_refused() -> None:
    async with worker(Worker) as w:
        w.core.handle(Deliver(1, "echo", "x"))
        res = await w.result(1)
        assert not res.ok
        assert res.error == ErrorInfo("AgentUnavailable", "agent not initialised")


# ---------------------------------------------------------------------------- deliver


async def test_deliver_answers_with_a_result() -> None:
    async with worker(Worker) as w:
        await w.ready()
        w.core.handle(Deliver(7, "echo", {"x": [1, 2]}, "client", "request", 30.0))
        assert await w.result(7) == Result(7, True, payload={"x": [1, 2]})
        assert w.core._tasks == {}


async def test_a_failing_handler_answers_an_error_result_and_the_worker_stays_up() -> None:
    async with worker(Worker) as w:
        await w.ready()
        w.core.handle(Deliver(1, "boom"))
        res = await w.result(1)
        assert res.error is not None
        assert (res.error.type, res.error.message) == ("ValueError", "boom")
        assert "ValueError: boom" in res.error.traceback
        w.core.handle(Deliver(2, "nope"))
        res = await w.result(2)
        assert res.error is not None
        assert res.error.type == "HandlerNotFound"
        w.core.handle(Deliver(3, "echo", 3))
        assert (await w.result(3)).payload == 3
        assert not w.core.finished.done()


async def test_tasks_run_concurrently_and_answer_in_completion_order() -> None:
    async with worker(Worker) as w:
        await w.ready()
        w.core.handle(Deliver(1, "wait", "slow"))
        w.core.handle(Deliver(2, "echo", "fast"))
        await w.result(2)
        assert GATE.entered == 1
        assert [r.id for r in w.of(Result)] == [2]
        GATE.open.set()
        assert (await w.result(1)).payload == "slow"
        assert [r.id for r in w.of(Result)] == [2, 1]


async def test_changed_persistent_memory_precedes_the_result() -> None:
    # State before result: a crash between the two writes redelivers, never loses.
    async with worker(Worker) as w:
        await w.ready()
        w.core.handle(Deliver(1, "bump"))
        await w.result(1)
        assert w.out[-2:] == [MemorySave({"counter": {"n": 1}}), Result(1, True, payload=1)]
        w.core.handle(Deliver(2, "echo"))
        await w.result(2)
        assert w.out[-1] == Result(2, True)  # nothing changed, nothing saved
        assert len(w.of(MemorySave)) == 1


async def test_unencodable_memory_is_logged_not_saved() -> None:
    async with worker(Worker) as w:
        await w.ready()
        w.core.handle(Deliver(1, "spoil"))
        assert (await w.result(1)).payload == "spoiled"
        [log] = w.of(Log)
        assert log.level == "error"
        assert "'junk'" in log.message
        assert not w.of(MemorySave)
        assert not w.core.finished.done()


async def test_memory_error_answers_limit_exceeded_then_finishes() -> None:
    async with worker(Worker) as w:
        await w.ready()
        w.core.handle(Deliver(1, "hog"))
        res = await w.result(1)
        assert res.error is not None
        assert res.error.type == "LimitExceeded"
        assert await w.core.finished == EXIT_MEMORY


async def test_send_and_log_from_a_handler_are_emitted() -> None:
    async with worker(Worker) as w:
        await w.ready()
        w.core.handle(Deliver(1, "chat", {"n": 1}))
        await w.result(1)
        assert w.of(Send) == [Send("audit", {"n": 1}, "record")]
        assert w.of(Log) == [Log("hello", "warning")]


class Publisher(Worker):
    @handler
    async def announce(self, msg: Message) -> None:
        self.ctx.publish("orders.eu.created", msg.content)
        self.ctx.publish("orders.eu.paid", {"id": 1}, guarantee="effectively-once",
                         ttl=timedelta(seconds=90), idempotency_key="order-1",
                         headers={"trace": "t1"})

    @handler
    async def join(self, msg: Message) -> None:
        self.ctx.subscribe("orders.>", handler="where", ack_wait=5, guarantee="at-least-once")
        self.ctx.subscribe("audit.*")
        self.ctx.subscribe("x.y", guarantee=msg.content)  # a bad one fails the handler

    @handler
    async def where(self, msg: Message) -> dict[str, Any]:
        return {"subject": msg.subject, "kind": msg.kind, "content": msg.content}


async def test_publish_from_a_handler_is_emitted_with_its_fields() -> None:
    async with worker(Publisher) as w:
        await w.ready()
        w.core.handle(Deliver(1, "announce", {"n": 1}))
        assert (await w.result(1)).ok
        assert w.of(Publish) == [
            Publish("orders.eu.created", {"n": 1}),
            Publish("orders.eu.paid", {"id": 1}, "effectively-once", 90.0, "order-1",
                    {"trace": "t1"}),
        ]


async def test_subscribe_carries_its_guarantee_and_refuses_unknown_ones() -> None:
    async with worker(Publisher) as w:
        await w.ready()
        w.core.handle(Deliver(1, "join", "maybe-once"))
        res = await w.result(1)
        assert not res.ok and res.error is not None and "guarantee must be one of" in res.error.message
        assert w.of(Subscribe) == [Subscribe("orders.>", "where", 5.0, "at-least-once"),
                                   Subscribe("audit.*", "", 30.0, "")]


async def test_the_message_subject_comes_from_the_deliver() -> None:
    async with worker(Publisher) as w:
        await w.ready()
        w.core.handle(Deliver(1, "where", "hi", kind="publish", subject="orders.eu.created"))
        w.core.handle(Deliver(2, "where", "yo", kind="send"))
        assert (await w.result(1)).payload == {"subject": "orders.eu.created", "kind": "publish",
                                               "content": "hi"}
        assert (await w.result(2)).payload == {"subject": "", "kind": "send", "content": "yo"}


# ---------------------------------------------------------------------------- cancel


async def test_cancel_answers_task_timeout() -> None:
    async with worker(Worker) as w:
        await w.ready()
        w.core.handle(Deliver(5, "wait", "x"))
        await until(lambda: GATE.entered == 1)
        w.core.handle(Cancel(5, "timeout"))
        res = await w.result(5)
        assert not res.ok
        assert res.error is not None
        assert res.error.type == "TaskTimeout"
        assert "timeout" in res.error.message
        assert res.error.traceback == ""
        assert GATE.cancelled == 1
        assert w.core._tasks == {}
        assert w.core._cancelled == {}
        assert not w.core.finished.done()  # the instance stays up


async def test_cancel_of_an_unknown_or_finished_task_is_ignored() -> None:
    async with worker(Worker) as w:
        await w.ready()
        w.core.handle(Deliver(1, "echo", 1))
        await w.result(1)
        w.core.handle(Cancel(1))
        w.core.handle(Cancel(99))
        await settle()
        assert len(w.of(Result)) == 1


async def test_cancel_right_after_deliver_still_answers_task_timeout() -> None:
    # Deliver and its Cancel can arrive in one read (the worker's loop was busy past the
    # task's timeout). The runtime has already failed the task and waits cancel_grace for
    # a Result before it kills the instance as hung, so one must come.
    async with worker(Worker) as w:
        await w.ready()
        w.core.handle(Deliver(5, "wait", "x"))
        w.core.handle(Cancel(5, "timeout"))
        await settle()
        results = w.of(Result)
        assert [r.id for r in results] == [5], "no Result for a task cancelled before it ran"
        assert results[0].error is not None
        assert results[0].error.type == "TaskTimeout"
        assert w.core._tasks == {}


# ---------------------------------------------------------------------------- shutdown


async def test_shutdown_waits_for_in_flight_work_then_finishes() -> None:
    async with worker(Worker) as w:
        await w.ready()
        w.core.handle(Deliver(1, "wait", "done"))
        await until(lambda: GATE.entered == 1)
        w.core.handle(Shutdown(grace=60))
        await settle()
        assert not w.core.finished.done()  # still waiting for task 1
        w.core.handle(Deliver(2, "echo"))  # no new work once shutting down
        res = await w.result(2)
        assert res.error == ErrorInfo("AgentUnavailable", "agent is shutting down")
        GATE.open.set()
        assert await w.core.finished == EXIT_OK
        assert (await w.result(1)).payload == "done"
        # on_stop changed persistent memory: saved on the way out.
        assert w.of(MemorySave)[-1] == MemorySave({"counter": {"n": 0, "stopped": 1}})


async def test_shutdown_cancels_work_still_running_after_the_grace() -> None:
    async with worker(Worker) as w:
        await w.ready()
        w.core.handle(Deliver(1, "wait"))
        await until(lambda: GATE.entered == 1)
        w.core.handle(Shutdown(grace=0))
        assert await w.core.finished == EXIT_OK
        await until(lambda: GATE.cancelled == 1)
        assert not w.of(Result)  # the runtime fails unfinished work when the channel closes


async def test_shutdown_with_nothing_in_flight_finishes_at_once() -> None:
    async with worker(Worker) as w:
        await w.ready()
        w.core.handle(Shutdown(grace=60))
        w.core.handle(Shutdown(grace=60))  # a second one changes nothing
        assert await w.core.finished == EXIT_OK


async def test_shutdown_reports_an_on_stop_error_and_still_finishes() -> None:
    class BadStop(Worker):
        def on_stop(self) -> None:
            raise RuntimeError("disk gone")

    async with worker(BadStop) as w:
        await w.ready()
        w.core.handle(Shutdown(grace=1))
        assert await w.core.finished == EXIT_OK
        [log] = w.of(Log)
        assert log.level == "error"
        assert "disk gone" in log.message


async def test_shutdown_before_init_finishes() -> None:
    async with worker(Worker) as w:
        w.core.handle(Shutdown(grace=1))
        assert await w.core.finished == EXIT_OK


# ---------------------------------------------------------------------------- requests


async def test_reply_resolves_an_outbound_request() -> None:
    async with worker(Worker) as w:
        await w.ready()
        w.core.handle(Deliver(1, "ask", {"q": "?"}))
        await until(lambda: w.of(Request))
        [req] = w.of(Request)
        assert req == Request(req.id, "oracle", {"q": "?"}, "answer", 5)
        assert not w.of(Result)
        w.core.handle(Reply(req.id, True, payload={"a": 42}))
        assert (await w.result(1)).payload == {"a": 42}
        assert w.core._pending == {}


async def test_each_request_gets_its_own_id() -> None:
    async with worker(Worker) as w:
        await w.ready()
        w.core.handle(Deliver(1, "ask", "one"))
        w.core.handle(Deliver(2, "ask", "two"))
        await until(lambda: len(w.of(Request)) == 2)
        first, second = w.of(Request)
        assert first.id != second.id
        w.core.handle(Reply(second.id, True, payload="for two"))
        w.core.handle(Reply(first.id, True, payload="for one"))
        assert (await w.result(1)).payload == "for one"
        assert (await w.result(2)).payload == "for two"


async def test_a_reply_nobody_waits_for_is_ignored() -> None:
    async with worker(Worker) as w:
        await w.ready()
        w.core.handle(Reply(12345, True, payload="stray"))
        await settle()
        assert w.out == [w.of(Ready)[0]]


@pytest.mark.parametrize(("error", "cls", "expect"), [
    (ErrorInfo("TaskFailed", "nope", traceback="tb", hint="h"), TaskFailed,
     {"message": "nope", "error_type": "TaskFailed", "traceback": "tb", "hint": "h"}),
    (ErrorInfo("ValueError", "bad", traceback="Traceback..."), TaskFailed,
     {"message": "bad", "error_type": "ValueError", "traceback": "Traceback..."}),
    (ErrorInfo("AgentNotFound", "no agent named 'oracle'"), AgentNotFound,
     {"message": "no agent named 'oracle'", "hint": AgentNotFound.hint}),
    (ErrorInfo("TaskTimeout", "too slow"), TaskTimeout, {"message": "too slow"}),
    (ErrorInfo("LimitExceeded", "memory limit exceeded"), LimitExceeded,
     {"message": "memory limit exceeded"}),
    (None, TaskFailed, {"message": "request failed", "error_type": "TaskFailed"}),
])
async def test_an_error_reply_raises_the_rebuilt_error_in_the_handler(
        error: ErrorInfo | None, cls: type, expect: dict[str, Any]) -> None:
    async with worker(Worker) as w:
        await w.ready()
        w.core.handle(Deliver(1, "ask_and_catch", "q"))
        await until(lambda: w.of(Request))
        w.core.handle(Reply(w.of(Request)[0].id, False, error=error))
        caught = (await w.result(1)).payload
        assert caught["cls"] == cls.__name__
        for key, value in expect.items():
            assert caught[key] == value, key


async def test_an_uncaught_error_reply_fails_the_task_with_that_error() -> None:
    async with worker(Worker) as w:
        await w.ready()
        w.core.handle(Deliver(1, "ask", "q"))
        await until(lambda: w.of(Request))
        w.core.handle(Reply(w.of(Request)[0].id, False,
                            error=ErrorInfo("AgentNotFound", "no agent named 'oracle'")))
        res = await w.result(1)
        assert res.error is not None
        assert (res.error.type, res.error.message) == ("AgentNotFound", "no agent named 'oracle'")


async def test_a_request_without_a_reply_in_time_raises_task_timeout() -> None:
    async with worker(Worker) as w:
        await w.ready()
        w.core.handle(Deliver(1, "ask_quickly"))
        res = await w.result(1)
        assert res.payload == "request to 'slowpoke' got no answer within 0.001s"
        assert w.core._pending == {}


# ---------------------------------------------------------------------------- connection lost


async def test_connection_lost_stops_everything_and_finishes() -> None:
    async with worker(Worker) as w:
        await w.ready()
        w.core.handle(Deliver(1, "wait"))
        w.core.handle(Deliver(2, "ask", "q"))
        await until(lambda: GATE.entered == 1 and w.of(Request))
        pending = list(w.core._pending.values())
        w.core.connection_lost()
        assert await w.core.finished == EXIT_OK
        await until(lambda: not w.core._tasks)
        assert GATE.cancelled == 1
        assert all(f.cancelled() for f in pending)
        assert not w.of(Result)  # nobody is there to hear it


async def test_connection_lost_before_init_finishes() -> None:
    async with worker(Worker) as w:
        w.core.connection_lost()
        assert await w.core.finished == EXIT_OK
