"""The agent SDK: decorators, Message/Result, Context, and AgentHost turning Deliver into Result."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Coroutine
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from corral import Agent, Context, Message, Result, capability, handler, memory, scheduled
from corral.errors import AgentNotFound, CorralError, SpawnError
from corral.sdk.decorators import AgentInfo, CapabilityDescriptor, MemoryDescriptor, ScheduleMark
from corral.sdk.host import AgentHost, error_info, load_class
from corral.wire.messages import Deliver, ErrorInfo, Ready, Schedule
from corral.wire.messages import Result as WireResult

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run one coroutine to completion (for hypothesis tests, which are sync)."""
    return asyncio.run(coro)


class FakeOutbound:
    """Records what an agent asks of the runtime through self.ctx."""

    def __init__(self, answer: Any = None) -> None:
        self.answer = answer
        self.sent: list[tuple[str, Any, str]] = []
        self.requests: list[tuple[str, Any, str, float | None]] = []
        self.logs: list[tuple[str, str]] = []
        self.published: list[tuple[str, Any, str, float | None, str | None, dict[str, str]]] = []

    def send(self, to: str, payload: Any, handler: str) -> None:
        self.sent.append((to, payload, handler))

    async def request(self, to: str, payload: Any, handler: str, timeout: float | None) -> Any:
        self.requests.append((to, payload, handler, timeout))
        return self.answer

    def publish(self, subject: str, payload: Any, guarantee: str, ttl: float | None,
                idempotency_key: str | None, headers: dict[str, str]) -> None:
        self.published.append((subject, payload, guarantee, ttl, idempotency_key, headers))

    def log(self, level: str, message: str) -> None:
        self.logs.append((level, message))


def make_host(cls: type, *, outbound: FakeOutbound | None = None,
              config: dict[str, Any] | None = None, restarts: int = 0) -> AgentHost:
    return AgentHost(cls, agent="agent", instance="agent-0", config=config or {},
                     outbound=outbound or FakeOutbound(), restarts=restarts)


async def started(cls: type, memory: dict[str, Any] | None = None,
                  ages: dict[str, float] | None = None, **kw: Any) -> AgentHost:
    host = make_host(cls, **kw)
    await host.start(memory or {}, ages or {})
    return host


def deliver(handler: str, payload: Any = None, *, id: int = 1, sender: str = "client",
            kind: Any = "request") -> Deliver:
    return Deliver(id, handler, payload, sender, kind)


# ---------------------------------------------------------------------------- agents


@Agent(name="kitchen", version="1.2.3", description="does everything")
class Kitchen:
    @memory(persistent=True)
    def saved(self) -> dict[str, Any]:
        return {"n": 0}

    @memory
    def scratch(self) -> list[Any]:
        return []

    @handler
    async def echo(self, msg: Message) -> Any:
        return msg.content

    @handler
    def sync_echo(self, msg: Message) -> Any:
        return msg.content

    @handler("renamed")
    async def internal_name(self, msg: Message) -> str:
        return "renamed ran"

    @handler
    async def no_message(self) -> str:
        return "no message needed"

    @handler
    async def whole_message(self, msg: Message) -> dict[str, Any]:
        return {"content": msg.content, "sender": msg.sender, "handler": msg.handler,
                "id": msg.id, "kind": msg.kind}

    @handler
    async def succeed(self, msg: Message) -> Result:
        return Result.success(msg.content)

    @handler
    async def fail(self, msg: Message) -> Result:
        return Result.failure("not today", error_type="Refused", data={"why": msg.content})

    @handler
    async def fail_quietly(self, msg: Message) -> Result:
        return Result.failure("")

    @handler
    async def boom(self, msg: Message) -> None:
        raise ValueError(f"bad input: {msg.content!r}")

    @handler
    async def silent_boom(self) -> None:
        raise KeyError

    @handler
    async def corral_boom(self) -> None:
        raise AgentNotFound("no agent named 'x'", hint="apply it first")

    @handler
    async def hog(self) -> None:
        raise MemoryError

    @handler
    async def bump(self) -> int:
        self.saved["n"] += 1
        return int(self.saved["n"])

    @handler
    async def touch_scratch(self) -> int:
        self.scratch.append(1)
        return len(self.scratch)

    @scheduled(interval=timedelta(seconds=5))
    async def tick(self) -> None:
        self.saved["n"] += 1

    @scheduled(cron="*/5 * * * *")
    def every_five_minutes(self) -> None:
        pass

    def helper(self) -> None:
        """Not a handler: unmarked methods are not exposed."""


# ---------------------------------------------------------------------------- decorators


def test_agent_metadata() -> None:
    assert Kitchen.__corral_agent__ == AgentInfo("kitchen", "1.2.3", "does everything")  # type: ignore[attr-defined]
    assert make_host(Kitchen).info == AgentInfo("kitchen", "1.2.3", "does everything")


def test_agent_defaults_come_from_the_class() -> None:
    @Agent
    class Bare:
        """Greets people.

        At length."""

    info = Bare.__corral_agent__  # type: ignore[attr-defined]
    assert info.name == "Bare"
    assert info.version == "0.0.0"
    assert info.description.startswith("Greets people.")

    @Agent(name="n")
    class NoDoc:
        pass

    assert NoDoc.__corral_agent__ == AgentInfo("n", "0.0.0", "")  # type: ignore[attr-defined]


def test_agent_decorator_returns_the_class_itself() -> None:
    class Plain:
        pass

    assert Agent(Plain) is Plain
    assert Agent(name="p")(Plain) is Plain


def test_an_unmarked_class_can_still_be_hosted() -> None:
    class NoAgentDecorator:
        @handler
        def run(self) -> int:
            return 1

    host = make_host(NoAgentDecorator)
    assert host.info is None
    assert list(host.handlers) == ["run"]


def test_handler_discovery() -> None:
    host = make_host(Kitchen)
    assert set(host.handlers) == {
        "echo", "sync_echo", "renamed", "no_message", "whole_message", "succeed", "fail",
        "fail_quietly", "boom", "silent_boom", "corral_boom", "hog", "bump", "touch_scratch",
        "tick", "every_five_minutes",
    }
    assert "internal_name" not in host.handlers  # @handler("renamed") replaces the method name
    assert "helper" not in host.handlers
    assert host.schedules == [Schedule("tick", 5.0, None),
                              Schedule("every_five_minutes", None, "*/5 * * * *")]
    assert set(host.memories) == {"saved", "scratch"}


async def test_start_reports_sorted_handlers_and_schedules() -> None:
    host = make_host(Kitchen)
    ready = await host.start({}, {})
    assert isinstance(ready, Ready)
    assert ready.handlers == sorted(host.handlers)
    assert ready.schedules == host.schedules


def test_handlers_are_inherited_and_subclasses_add_more() -> None:
    class Base:
        @handler
        async def base(self) -> str:
            return "base"

    class Child(Base):
        @handler("child")
        async def more(self) -> str:
            return "child"

    assert set(make_host(Child).handlers) == {"base", "child"}


def test_a_method_can_be_both_a_named_handler_and_scheduled() -> None:
    class Both:
        @handler("refresh")
        @scheduled(interval=60)
        async def refresh_cache(self) -> None:
            pass

    host = make_host(Both)
    assert set(host.handlers) == {"refresh", "refresh_cache"}
    assert host.schedules == [Schedule("refresh_cache", 60.0, None)]


def test_handler_marks_without_wrapping() -> None:
    async def fn(self: Any) -> None:
        pass

    assert handler(fn) is fn
    assert fn.__corral_handler__ == "fn"  # type: ignore[attr-defined]

    def other(self: Any) -> None:
        pass

    assert handler()(other).__corral_handler__ == "other"  # type: ignore[attr-defined]
    assert handler("custom")(other).__corral_handler__ == "custom"  # type: ignore[attr-defined]


@pytest.mark.parametrize(("interval", "seconds"), [
    (timedelta(hours=6), 21600.0),
    (timedelta(milliseconds=250), 0.25),
    (30, 30.0),
    (0.5, 0.5),
])
def test_scheduled_interval(interval: timedelta | float, seconds: float) -> None:
    def fn(self: Any) -> None:
        pass

    scheduled(interval=interval)(fn)
    assert fn.__corral_schedule__ == ScheduleMark(interval=seconds)  # type: ignore[attr-defined]


def test_scheduled_cron() -> None:
    def fn(self: Any) -> None:
        pass

    scheduled(cron="0 * * * *")(fn)
    assert fn.__corral_schedule__ == ScheduleMark(cron="0 * * * *")  # type: ignore[attr-defined]


@pytest.mark.parametrize("kwargs", [{}, {"interval": 5, "cron": "* * * * *"}])
def test_scheduled_needs_exactly_one_of_interval_or_cron(kwargs: dict[str, Any]) -> None:
    with pytest.raises(TypeError, match="exactly one of interval= or cron="):
        scheduled(**kwargs)


@pytest.mark.parametrize("interval", [0, -1, 0.0, timedelta(0), timedelta(seconds=-5)])
def test_scheduled_interval_must_be_positive(interval: Any) -> None:
    with pytest.raises(ValueError, match="must be positive"):
        scheduled(interval=interval)


@pytest.mark.parametrize("cron", ["not a cron", "61 * * * *", "* * *"])
def test_scheduled_cron_must_be_valid(cron: str) -> None:
    with pytest.raises(ValueError, match="invalid cron expression"):
        scheduled(cron=cron)


def test_memory_decorator_forms() -> None:
    def factory(self: Any) -> int:
        return 0

    plain = memory(factory)
    assert isinstance(plain, MemoryDescriptor)
    assert (plain.persistent, plain.ttl) == (False, None)
    kept = memory(persistent=True, ttl=timedelta(hours=1))(factory)
    assert (kept.persistent, kept.ttl, kept.name) == (True, 3600.0, "factory")


def test_memory_is_per_instance_and_assignable() -> None:
    calls = []

    class Holder:
        @memory
        def items(self) -> list[int]:
            calls.append(1)
            return []

    a, b = Holder(), Holder()
    a.items.append(1)
    assert a.items == [1]
    assert b.items == []
    assert len(calls) == 2  # one factory call per instance, on first use
    a.items = [9]
    assert a.items == [9]
    assert isinstance(Holder.__dict__["items"], MemoryDescriptor)


def test_message_and_result_shapes() -> None:
    m = Message()
    assert (m.content, m.sender, m.handler, m.id, m.kind, m.headers, m.subject) == (
        None, "", "", 0, "request", {}, "")
    assert Result.success(3) == Result(ok=True, data=3)
    assert Result.success() == Result(ok=True, data=None)
    assert Result.failure("no", error_type="E", data=1) == Result(ok=False, data=1, error="no",
                                                                  error_type="E")
    assert Result.failure("no").error_type == "Error"


# ---------------------------------------------------------------------------- Context


async def test_context_speaks_through_its_outbound() -> None:
    out = FakeOutbound(answer={"answer": 42})
    ctx = Context(agent="a", instance="a-1", config={"k": "v"}, outbound=out, restarts=2)
    assert (ctx.agent, ctx.instance, ctx.config, ctx.restarts) == ("a", "a-1", {"k": "v"}, 2)
    ctx.send("b", {"x": 1}, handler="h")
    ctx.send("c")
    assert await ctx.request("d", [1], handler="q", timeout=2.5) == {"answer": 42}
    assert await ctx.request("e") == {"answer": 42}
    ctx.log("hello")
    ctx.log("uh oh", level="error")
    assert out.sent == [("b", {"x": 1}, "h"), ("c", None, "")]
    assert out.requests == [("d", [1], "q", 2.5), ("e", None, "", None)]
    assert out.logs == [("info", "hello"), ("error", "uh oh")]


def test_context_publish_passes_every_field_to_its_outbound() -> None:
    out = FakeOutbound()
    ctx = Context(agent="a", instance="a-1", config={}, outbound=out)
    ctx.publish("orders.eu.created")
    headers = {"trace": "t1"}
    ctx.publish("orders.eu.paid", {"id": 1}, guarantee="at-least-once", ttl=timedelta(minutes=2),
                idempotency_key="k", headers=headers)
    ctx.publish("a-b_c.9", [1], ttl=5)
    headers["trace"] = "changed"  # the Context copied it
    assert out.published == [
        ("orders.eu.created", None, "at-most-once", None, None, {}),
        ("orders.eu.paid", {"id": 1}, "at-least-once", 120.0, "k", {"trace": "t1"}),
        ("a-b_c.9", [1], "at-most-once", 5.0, None, {}),
    ]


@pytest.mark.parametrize("subject", ["", "a..b", ".a", "a.", "a.*", "a.>", "a b", "ä", 3])
def test_context_publish_rejects_an_invalid_subject_at_once(subject: Any) -> None:
    out = FakeOutbound()
    ctx = Context(agent="a", instance="a-1", config={}, outbound=out)
    with pytest.raises(ValueError, match="can't publish on subject"):
        ctx.publish(subject, {"x": 1})
    assert out.published == []


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"guarantee": "exactly-once"}, "guarantee 'exactly-once'"),
    ({"ttl": 0}, "ttl 0"),
    ({"ttl": timedelta(seconds=-1)}, "ttl"),
])  # fmt: skip
def test_context_publish_rejects_bad_options_at_once(kwargs: dict[str, Any], match: str) -> None:
    out = FakeOutbound()
    ctx = Context(agent="a", instance="a-1", config={}, outbound=out)
    with pytest.raises(ValueError, match=match):
        ctx.publish("a.b", **kwargs)
    assert out.published == []


async def test_the_message_carries_the_publish_subject() -> None:
    class Listener:
        @handler
        async def on_event(self, msg: Message) -> Any:
            return [msg.kind, msg.subject, msg.content]

    host = await started(Listener)
    d = Deliver(5, "on_event", {"n": 1}, "billing", "publish", subject="orders.eu.created")
    assert (await host.invoke(d)).payload == ["publish", "orders.eu.created", {"n": 1}]
    assert (await host.invoke(deliver("on_event", 2))).payload == ["request", "", 2]


async def test_handlers_reach_the_runtime_through_self_ctx() -> None:
    class Chatty:
        @handler
        async def run(self, msg: Message) -> Any:
            self.ctx.log(f"config says {self.ctx.config['greeting']}")
            self.ctx.send("audit", {"seen": msg.content})
            answer = await self.ctx.request("oracle", msg.content, handler="ask", timeout=1)
            return {"answer": answer, "agent": self.ctx.agent, "instance": self.ctx.instance,
                    "restarts": self.ctx.restarts}

    out = FakeOutbound(answer="yes")
    host = await started(Chatty, outbound=out, config={"greeting": "hi"}, restarts=3)
    res = await host.invoke(deliver("run", "q?"))
    assert res.ok
    assert res.payload == {"answer": "yes", "agent": "agent", "instance": "agent-0",
                           "restarts": 3}
    assert out.logs == [("info", "config says hi")]
    assert out.sent == [("audit", {"seen": "q?"}, "")]
    assert out.requests == [("oracle", "q?", "ask", 1)]


# ---------------------------------------------------------------------------- invoke


async def test_plain_return_values_are_the_payload() -> None:
    host = await started(Kitchen)
    assert await host.invoke(deliver("echo", {"a": [1, 2]}, id=7)) == WireResult(
        7, True, payload={"a": [1, 2]})
    assert await host.invoke(deliver("sync_echo", "s", id=8)) == WireResult(8, True, payload="s")
    assert await host.invoke(deliver("renamed")) == WireResult(1, True, payload="renamed ran")


async def test_a_handler_without_a_message_parameter_is_called_without_one() -> None:
    host = await started(Kitchen)
    res = await host.invoke(deliver("no_message", "ignored"))
    assert res == WireResult(1, True, payload="no message needed")


async def test_the_message_carries_the_deliver_fields() -> None:
    host = await started(Kitchen)
    res = await host.invoke(deliver("whole_message", [1], id=42, sender="ingest", kind="send"))
    assert res.payload == {"content": [1], "sender": "ingest", "handler": "whole_message",
                           "id": 42, "kind": "send"}


async def test_result_success_and_failure() -> None:
    host = await started(Kitchen)
    assert await host.invoke(deliver("succeed", [1])) == WireResult(1, True, payload=[1])
    res = await host.invoke(deliver("fail", "reason"))
    assert not res.ok
    assert res.payload == {"why": "reason"}
    assert res.error == ErrorInfo(type="Refused", message="not today")
    res = await host.invoke(deliver("fail_quietly"))
    assert res.error == ErrorInfo(type="Error", message="failed")


async def test_an_exception_becomes_an_error_result_with_its_traceback() -> None:
    host = await started(Kitchen)
    res = await host.invoke(deliver("boom", 5, id=3))
    assert (res.id, res.ok, res.payload) == (3, False, None)
    assert res.error is not None
    assert res.error.type == "ValueError"
    assert res.error.message == "bad input: 5"
    assert "Traceback" in res.error.traceback
    assert "in boom" in res.error.traceback
    assert "ValueError: bad input: 5" in res.error.traceback
    assert res.error.hint == ""
    # The instance stays usable after a failed task.
    assert (await host.invoke(deliver("echo", 1))).ok


async def test_an_exception_without_a_message_is_named_by_its_type() -> None:
    host = await started(Kitchen)
    res = await host.invoke(deliver("silent_boom"))
    assert res.error is not None
    assert (res.error.type, res.error.message) == ("KeyError", "KeyError")


async def test_a_corral_error_keeps_its_type_message_and_hint() -> None:
    host = await started(Kitchen)
    res = await host.invoke(deliver("corral_boom"))
    assert res.error is not None
    assert (res.error.type, res.error.message, res.error.hint) == (
        "AgentNotFound", "no agent named 'x'", "apply it first")


async def test_an_unknown_handler_is_handler_not_found() -> None:
    host = await started(Kitchen)
    res = await host.invoke(deliver("nope", id=9))
    assert (res.id, res.ok) == (9, False)
    assert res.error is not None
    assert res.error.type == "HandlerNotFound"
    assert "'nope'" in res.error.message
    assert "'echo'" in res.error.message  # it lists the handlers there are
    assert res.error.traceback == ""
    assert res.error.hint  # HandlerNotFound says where to look


async def test_memory_error_is_reported_as_the_memory_limit() -> None:
    host = await started(Kitchen)
    assert host.memory_exhausted is False
    res = await host.invoke(deliver("hog", id=4))
    assert (res.id, res.ok) == (4, False)
    assert res.error is not None
    assert res.error.type == "LimitExceeded"
    assert "memory limit exceeded" in res.error.message
    assert "resources.memory" in res.error.hint
    assert host.memory_exhausted is True


async def test_sync_and_async_hooks_and_init_run_in_order() -> None:
    calls: list[str] = []

    class Hooks:
        def __init__(self) -> None:
            calls.append(f"init restarts={self.ctx.restarts}")  # type: ignore[attr-defined]

        async def on_start(self) -> None:
            calls.append("on_start")

        def on_stop(self) -> None:
            calls.append("on_stop")

        @handler
        def run(self) -> None:
            calls.append("run")

    host = make_host(Hooks, restarts=1)
    assert calls == []
    await host.start({}, {})
    assert calls == ["init restarts=1", "on_start"]
    await host.invoke(deliver("run"))
    await host.stop()
    assert calls == ["init restarts=1", "on_start", "run", "on_stop"]


async def test_hooks_are_optional() -> None:
    class NoHooks:
        @handler
        def run(self) -> int:
            return 1

    host = await started(NoHooks)
    await host.stop()


async def test_on_start_errors_propagate() -> None:
    class Broken:
        def on_start(self) -> None:
            raise RuntimeError("missing config")

    with pytest.raises(RuntimeError, match="missing config"):
        await started(Broken)


# ---------------------------------------------------------------------------- capability


async def test_capability_is_built_lazily_once_per_instance() -> None:
    built: list[int] = []

    class WithClient:
        @capability
        def client(self) -> dict[str, int]:
            built.append(1)
            return {"id": len(built)}

        @handler
        def use(self) -> int:
            return self.client["id"]

        @handler
        def ignore(self) -> str:
            return "no client"

    host = await started(WithClient)
    assert host.capabilities == ["client"]
    assert isinstance(WithClient.__dict__["client"], CapabilityDescriptor)
    assert (await host.invoke(deliver("ignore"))).payload == "no client"
    assert built == []  # not built until first use
    assert (await host.invoke(deliver("use"))).payload == 1
    assert (await host.invoke(deliver("use"))).payload == 1
    assert built == [1]
    other = await started(WithClient)
    assert (await other.invoke(deliver("use"))).payload == 2  # another instance, another build


# ---------------------------------------------------------------------------- memory


async def test_memory_changes_reports_only_changed_persistent_values() -> None:
    host = await started(Kitchen)
    assert host.memory_changes() == {}  # nothing used yet
    await host.invoke(deliver("bump"))
    assert host.memory_changes() == {"saved": {"n": 1}}
    assert host.memory_changes() == {}  # reported once
    await host.invoke(deliver("touch_scratch"))
    assert host.memory_changes() == {}  # non-persistent memory is never saved
    await host.invoke(deliver("echo", 1))
    assert host.memory_changes() == {}
    await host.invoke(deliver("bump"))
    assert host.memory_changes() == {"saved": {"n": 2}}


async def test_memory_changes_is_empty_before_start_and_without_memory() -> None:
    assert make_host(Kitchen).memory_changes() == {}

    class Stateless:
        @handler
        def run(self) -> None:
            pass

    host = await started(Stateless)
    await host.invoke(deliver("run"))
    assert host.memory_changes() == {}


async def test_a_fresh_default_counts_as_a_change_once_used() -> None:
    host = await started(Kitchen)
    await host.invoke(deliver("tick"))  # a scheduled method, invoked like any handler
    assert host.memory_changes() == {"saved": {"n": 1}}


async def test_memory_changes_refuses_values_msgpack_cannot_encode() -> None:
    class Bad:
        @memory(persistent=True)
        def thing(self) -> Any:
            return object()

        @handler
        def touch(self) -> None:
            _ = self.thing

    host = await started(Bad)
    await host.invoke(deliver("touch"))
    with pytest.raises(CorralError, match=r"'thing'.*msgpack") as exc:
        host.memory_changes()
    assert "dicts, lists" in exc.value.hint


async def test_start_restores_persistent_memory_without_reporting_it_changed() -> None:
    host = await started(Kitchen, memory={"saved": {"n": 41}, "scratch": [1, 2, 3]})
    assert (await host.invoke(deliver("echo"))).ok
    assert host.memory_changes() == {}
    assert (await host.invoke(deliver("touch_scratch"))).payload == 1  # not restored
    assert (await host.invoke(deliver("bump"))).payload == 42
    assert host.memory_changes() == {"saved": {"n": 42}}


async def test_start_ignores_stored_values_of_unknown_names() -> None:
    host = await started(Kitchen, memory={"gone": 1})
    await host.invoke(deliver("bump"))
    assert host.memory_changes() == {"saved": {"n": 1}}


class Cache:
    @memory(persistent=True, ttl=timedelta(minutes=1))
    def recent(self) -> dict[str, int]:
        return {}

    @memory(persistent=True)
    def forever(self) -> dict[str, int]:
        return {}

    @handler
    def read(self) -> dict[str, Any]:
        return {"recent": self.recent, "forever": self.forever}


@pytest.mark.parametrize(("age", "kept"), [(0.0, True), (59.9, True), (60.0, True),
                                           (60.1, False), (1e9, False)])
async def test_start_drops_values_older_than_their_ttl(age: float, kept: bool) -> None:
    stored = {"recent": {"a": 1}, "forever": {"b": 2}}
    host = await started(Cache, memory=stored, ages={"recent": age, "forever": age})
    out = (await host.invoke(deliver("read"))).payload
    assert out["forever"] == {"b": 2}  # no ttl: kept at any age
    assert out["recent"] == ({"a": 1} if kept else {})


async def test_a_value_without_an_age_counts_as_fresh() -> None:
    host = await started(Cache, memory={"recent": {"a": 1}}, ages={})
    assert (await host.invoke(deliver("read"))).payload["recent"] == {"a": 1}


# ---------------------------------------------------------------------------- properties

msgpackable = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False) | st.text() | st.binary(),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner,
                                                                 max_size=5),
    max_leaves=20,
)


@settings(max_examples=60, deadline=None)
@given(payload=msgpackable)
def test_payloads_round_trip_through_invoke(payload: Any) -> None:
    async def go() -> tuple[WireResult, WireResult, WireResult]:
        host = await started(Kitchen)
        return (await host.invoke(deliver("echo", payload)),
                await host.invoke(deliver("sync_echo", payload)),
                await host.invoke(deliver("succeed", payload)))

    for res in run(go()):
        assert res.ok
        assert res.payload == payload
        assert res.error is None


@settings(max_examples=60, deadline=None)
@given(message=st.text(), data=msgpackable, error_type=st.text(min_size=1))
def test_failures_carry_their_message_type_and_data(message: str, data: Any,
                                                    error_type: str) -> None:
    class Refuser:
        @handler
        def refuse(self) -> Result:
            return Result.failure(message, error_type=error_type, data=data)

        @handler
        def raise_it(self) -> None:
            raise RuntimeError(message)

    async def go() -> tuple[WireResult, WireResult]:
        host = await started(Refuser)
        return await host.invoke(deliver("refuse")), await host.invoke(deliver("raise_it"))

    refused, raised = run(go())
    assert not refused.ok
    assert refused.payload == data
    assert refused.error == ErrorInfo(type=error_type, message=message or "failed")
    assert not raised.ok
    assert raised.error is not None
    assert raised.error.type == "RuntimeError"
    assert raised.error.message == (message or "RuntimeError")


@settings(max_examples=60, deadline=None)
@given(values=st.lists(msgpackable, min_size=1, max_size=6))
def test_memory_changes_reports_a_value_exactly_when_its_encoding_changes(
        values: list[Any]) -> None:
    class Box:
        @memory(persistent=True)
        def value(self) -> Any:
            return None

        @handler
        def put(self, msg: Message) -> None:
            self.value = msg.content

    enc = msgspec.msgpack.encode

    async def go() -> None:
        host = await started(Box, memory={"value": values[0]})
        last = enc(values[0])
        for v in values[1:]:
            await host.invoke(deliver("put", v))
            changes = host.memory_changes()
            if enc(v) == last:
                assert changes == {}
            else:
                assert changes == {"value": v}
            last = enc(v)

    run(go())


# ---------------------------------------------------------------------------- helpers


def test_error_info_without_traceback() -> None:
    info = error_info(ValueError("x"), with_traceback=False)
    assert info == ErrorInfo(type="ValueError", message="x", traceback="", hint="")


def test_load_class_imports_from_python_path(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "path", list(sys.path))
    (tmp_path / "sdk_loadme.py").write_text(
        "from corral import Agent\n\n@Agent\nclass Thing:\n    pass\n\nnot_a_class = 3\n")
    try:
        cls = load_class("sdk_loadme:Thing", [str(tmp_path)])
        assert cls.__name__ == "Thing"
        assert sys.path[0] == str(tmp_path)
        with pytest.raises(SpawnError, match="no attribute 'Missing'"):
            load_class("sdk_loadme:Missing", [str(tmp_path)])
        with pytest.raises(SpawnError, match="is not a class"):
            load_class("sdk_loadme:not_a_class", [str(tmp_path)])
    finally:
        sys.modules.pop("sdk_loadme", None)
    with pytest.raises(SpawnError, match="cannot import 'sdk_no_such_module'"):
        load_class("sdk_no_such_module:X")
    with pytest.raises(SpawnError, match="not of the form"):
        load_class("no_colon")
