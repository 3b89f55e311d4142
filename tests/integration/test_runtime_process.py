"""The process tier end to end: real zygote, real worker processes, real signals."""

from __future__ import annotations

import asyncio
import os

import psutil
import pytest

from corral.core.lifecycle import State
from corral.errors import (
    AgentNotFound,
    AgentUnavailable,
    Backpressure,
    HandlerNotFound,
    LimitExceeded,
    SpecError,
    TaskFailed,
    TaskTimeout,
)
from corral.runtime.runtime import Runtime
from corral.spec.models import AgentManifest
from tests.conftest import manifest

FAST_RESTART = {"policy": "on-failure", "maxRestarts": 3, "window": "30s",
                "backoff": {"initial": "20ms", "max": "200ms", "jitter": 0.1}}


async def until(cond, timeout: float = 10.0, step: float = 0.02) -> None:
    """Wait for cond() to hold (a deadline, not a timed assertion)."""
    async with asyncio.timeout(timeout):
        while not cond():
            await asyncio.sleep(step)


def inst(rt: Runtime, name: str, i: int = 0):
    return rt.agents[name].instances[f"{name}-{i}"]


async def test_spawn_and_request(rt: Runtime) -> None:
    await rt.apply([manifest("echo")], wait=True, timeout=20)
    out = await rt.request("echo", {"x": 1}, handler="echo")
    assert out["echo"] == {"x": 1}
    assert out["pid"] != os.getpid()
    assert out["sender"] == "client"
    assert rt.get("echo")["status"] == "Running"


async def test_handler_error_keeps_agent_up(rt: Runtime) -> None:
    await rt.apply([manifest("echo")], wait=True, timeout=20)
    pid = (await rt.request("echo", 1, handler="echo"))["pid"]
    with pytest.raises(TaskFailed, match="bad input") as exc:
        await rt.request("echo", "zz", handler="boom")
    assert exc.value.error_type == "ValueError"
    assert "Traceback" in exc.value.traceback
    with pytest.raises(TaskFailed, match="not today"):
        await rt.request("echo", None, handler="refuse")
    with pytest.raises(HandlerNotFound):
        await rt.request("echo", None, handler="nope")
    assert (await rt.request("echo", 2, handler="echo"))["pid"] == pid
    assert rt.agents["echo"].restarts == 0
    stats = rt.stats()
    assert stats["tasks_failed"] == 3 and stats["tasks_succeeded"] == 2


async def test_unknown_agent_and_bad_manifest_apply_nothing(rt: Runtime) -> None:
    with pytest.raises(AgentNotFound):
        await rt.request("ghost", 1)
    good = manifest("good")
    bad = manifest("bad", "Nope", entrypoint="no_such_module:Nope")
    with pytest.raises(SpecError, match="no_such_module"):
        await rt.apply([good, bad])
    assert rt.list() == []


async def test_crash_is_detected_and_restarted_with_backoff(rt: Runtime) -> None:
    await rt.apply([manifest("echo", restart=FAST_RESTART)], wait=True, timeout=20)
    first = (await rt.request("echo", 1, handler="echo"))["pid"]
    with pytest.raises(AgentUnavailable, match="crashed"):
        await rt.request("echo", None, handler="crash")
    i = inst(rt, "echo")
    assert i.last_exit is not None and i.last_exit.code == 3
    await until(lambda: i.state is State.READY and i.restarts == 1)
    second = (await rt.request("echo", 1, handler="echo"))["pid"]
    assert second != first
    events = [e.data.get("event") for e in await rt.store.events(agent="echo")
              if e.kind == "instance.transition"]
    assert events[-4:] == ["Crashed", "Restart", "Initialized", "TaskStarted"][:4] or \
        "Restart" in events


async def test_gives_up_after_max_restarts(rt: Runtime) -> None:
    restart = dict(FAST_RESTART, maxRestarts=2)
    await rt.apply([manifest("initfail", "InitFail", restart=restart)])
    await until(lambda: rt.get("initfail")["status"] == "GaveUp")
    row = rt.get("initfail")
    assert "3 restarts" in row["gave_up"] or "restarts in" in row["gave_up"]
    assert inst(rt, "initfail").state is State.TERMINATED
    assert "missing config" in (inst(rt, "initfail").last_exit.detail)
    with pytest.raises(AgentUnavailable, match="given up"):
        await rt.request("initfail", 1)


async def test_hung_agent_is_killed_and_restarted(rt: Runtime) -> None:
    health = {"heartbeatInterval": "100ms", "heartbeatTimeout": "500ms"}
    await rt.apply([manifest("echo", health=health, restart=FAST_RESTART)], wait=True, timeout=20)
    with pytest.raises(AgentUnavailable, match="hung"):
        await rt.request("echo", 30, handler="block")
    i = inst(rt, "echo")
    assert i.last_exit is not None and i.last_exit.reason == "hung"
    await until(lambda: i.state is State.READY and i.restarts == 1)


async def test_task_timeout_cancels_and_agent_stays_up(rt: Runtime) -> None:
    await rt.apply([manifest("echo", resources={"taskTimeout": "300ms"})], wait=True, timeout=20)
    pid = (await rt.request("echo", 1, handler="echo"))["pid"]
    with pytest.raises(TaskTimeout, match="timeout"):
        await rt.request("echo", 30, handler="nap")
    assert (await rt.request("echo", 1, handler="echo"))["pid"] == pid
    await until(lambda: not inst(rt, "echo").inflight)


async def test_memory_hog_is_stopped_and_reported(rt: Runtime) -> None:
    if not rt.cgroup_support.memory:
        pytest.skip(f"no usable memory cgroup here ({rt.cgroup_support.reason}); "
                    "test_memory_hog_without_cgroups_hits_rlimit covers RLIMIT_AS")
    await rt.apply([manifest("echo", resources={"memory": "96Mi"}, restart=FAST_RESTART)],
                   wait=True, timeout=20)
    with pytest.raises(LimitExceeded, match="memory limit 96Mi exceeded"):
        await rt.request("echo", 400, handler="hog")
    i = inst(rt, "echo")
    assert i.last_exit is not None and i.last_exit.reason == "memory_limit"
    await until(lambda: i.state is State.READY and i.restarts == 1)
    assert await rt.request("echo", 8, handler="hog") == 8


async def test_memory_hog_without_cgroups_hits_rlimit(tmp_path) -> None:
    async with Runtime(home=tmp_path / "h", use_cgroups=False, shutdown_grace=2.0) as rt:
        await rt.apply([manifest("echo", resources={"memory": "256Mi"}, restart=FAST_RESTART)],
                       wait=True, timeout=20)
        limits = {row["limit"]: row for row in (await rt.describe("echo"))["limits"]}
        assert limits["memory"]["by"].startswith("RLIMIT_AS")
        with pytest.raises(LimitExceeded, match="memory"):
            await rt.request("echo", 1024, handler="hog")
        i = inst(rt, "echo")
        await until(lambda: i.last_exit is not None)
        assert i.last_exit.reason == "memory_limit"


async def test_backpressure_and_priority_order(rt: Runtime) -> None:
    await rt.apply([manifest("order", "Order", concurrency=1, mailbox=4)], wait=True, timeout=20)
    first = asyncio.ensure_future(rt.request("order", "first"))
    await until(lambda: bool(inst(rt, "order").inflight))  # in flight, not in the mailbox
    low = [asyncio.ensure_future(rt.request("order", f"low{i}", priority="low")) for i in range(3)]
    crit = asyncio.ensure_future(rt.request("order", "crit", priority="critical"))
    await asyncio.sleep(0)
    with pytest.raises(Backpressure):
        await rt.request("order", "overflow")
    seen = await crit
    assert seen.index("crit") < len(seen) and not any(x.startswith("low") for x in seen)
    await asyncio.gather(first, *low)


async def test_persistent_memory_survives_crash_and_runtime_restart(tmp_path) -> None:
    home = tmp_path / "home"
    async with Runtime(home=home, shutdown_grace=2.0) as rt:
        await rt.apply([manifest("counter", "Counter", restart=FAST_RESTART)], wait=True,
                       timeout=20)
        for _ in range(3):
            await rt.request("counter", handler="incr")
        with pytest.raises(AgentUnavailable):
            await rt.request("counter", None, handler="crash")
        await rt.wait_ready(["counter"], timeout=20)
        assert await rt.request("counter", handler="incr") == 4  # survived the crash
        async with asyncio.timeout(10):
            while (await rt.request("counter", handler="get"))["ticks"] < 1:
                await asyncio.sleep(0.05)
        ticks = (await rt.request("counter", handler="get"))["ticks"]
    async with Runtime(home=home, shutdown_grace=2.0) as rt:
        await rt.wait_ready(["counter"], timeout=20)
        assert await rt.request("counter", handler="incr") == 5  # survived the runtime restart
        state = await rt.request("counter", handler="get")
        assert state["ticks"] >= ticks


async def test_scheduled_interval_runs(rt: Runtime) -> None:
    await rt.apply([manifest("counter", "Counter")], wait=True, timeout=20)
    await asyncio.sleep(0.5)
    state = await rt.request("counter", handler="get")
    assert state["ticks"] >= 2
    desc = await rt.describe("counter")
    assert desc["schedules"][0]["handler"] == "tick"


async def test_agent_to_agent_request_and_send(rt: Runtime) -> None:
    await rt.apply([manifest("echo"), manifest("caller", "Caller"),
                    manifest("counter", "Counter")], wait=True, timeout=20)
    out = await rt.request("caller", {"q": 1}, handler="relay")
    assert out == {"relayed": {"q": 1}, "via": "caller"}
    assert await rt.request("caller", None, handler="notify") == "sent"
    await until(lambda: rt.agents["counter"].tasks_ok >= 1)
    assert (await rt.request("counter", handler="get"))["n"] == 1


async def test_durable_send_and_task_record(rt: Runtime) -> None:
    await rt.apply([manifest("counter", "Counter")], wait=True, timeout=20)
    tid = await rt.send("counter", handler="incr")
    async with asyncio.timeout(10):
        while (rec := await rt.task(tid)) is None or rec.status != "done":
            await asyncio.sleep(0.02)
    assert rec.result == 1


async def test_scale_up_and_down(rt: Runtime) -> None:
    await rt.apply([manifest("echo")], wait=True, timeout=20)
    await rt.scale("echo", 3)
    await rt.wait_ready(["echo"], timeout=20)
    assert rt.get("echo")["ready"] == "3/3"
    pids = {(await rt.request("echo", i, handler="echo"))["pid"] for i in range(30)}
    assert len(pids) >= 2
    await rt.scale("echo", 1)
    await until(lambda: rt.get("echo")["ready"] == "1/1")
    await rt.stop("echo")
    assert rt.get("echo")["status"] == "Stopped"
    with pytest.raises(AgentUnavailable, match="stopped"):
        await rt.request("echo", 1)


async def test_ephemeral_agent_runs_each_task_in_a_fresh_instance(rt: Runtime) -> None:
    await rt.apply([manifest("eph", mode="ephemeral")])
    a = await rt.request("eph", 1, handler="echo")
    b = await rt.request("eph", 2, handler="echo")
    assert a["pid"] != b["pid"]
    await until(lambda: not rt.agents["eph"].instances)


async def test_graceful_shutdown_leaves_no_orphans(tmp_path) -> None:
    async with Runtime(home=tmp_path / "h", shutdown_grace=1.0) as rt:
        await rt.apply([manifest("echo", replicas=3)], wait=True, timeout=20)
        pids = [i.channel.pid for i in rt.agents["echo"].instances.values() if i.channel]
        zygote = rt.zygote.pid
        busy = asyncio.ensure_future(rt.request("echo", 30, handler="nap"))
        await asyncio.sleep(0.05)
    with pytest.raises(AgentUnavailable):
        await busy
    for pid in [*pids, zygote]:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


async def test_scheduled_mode_runs_a_fresh_instance_per_fire(rt: Runtime) -> None:
    # A 6-field cron fires every second; each run is a one-shot instance that then retires.
    sched = {"cron": "* * * * * */1", "handler": "incr"}
    await rt.apply([manifest("counter", "Counter", mode="scheduled", schedule=sched)])
    assert rt.get("counter")["status"] in ("Scheduled", "Active")
    await until(lambda: rt.agents["counter"].tasks_ok >= 2, timeout=15)
    # Persistent memory carries the count across the one-shot instances.
    assert rt.agents["counter"].memory["state"][0]["n"] >= 2
    assert rt.agents["counter"].restarts == 0


async def test_ephemeral_crash_does_not_block_later_tasks(rt: Runtime) -> None:
    await rt.apply([manifest("eph", mode="ephemeral")])
    with pytest.raises(AgentUnavailable, match="crashed"):
        await rt.request("eph", None, handler="crash")
    assert (await rt.request("eph", 5, handler="echo"))["echo"] == 5


async def test_stop_right_after_scaling_and_after_ephemeral_work(rt: Runtime) -> None:
    await rt.apply([manifest("echo"), manifest("eph", mode="ephemeral")], wait=True, timeout=20)
    await rt.request("eph", 1, handler="echo")
    await rt.scale("echo", 3)
    await rt.stop("echo")  # two replicas are still starting: they are killed, not shut down
    assert rt.get("echo")["status"] == "Stopped"
    await rt.scale("echo", 2)
    await rt.wait_ready(["echo"], timeout=20)  # the stopped instances are not waited on
    assert rt.get("echo")["ready"] == "2/2"


async def test_wait_ready_fails_fast_when_no_restart_is_coming(rt: Runtime) -> None:
    await rt.apply([manifest("initfail", "InitFail", restart={"policy": "never"})])
    with pytest.raises(AgentUnavailable, match="failed before Ready"):
        await rt.wait_ready(["initfail"], timeout=20)


async def test_agent_names_are_unique_across_namespaces(rt: Runtime) -> None:
    a = manifest("echo")
    b = AgentManifest.model_validate({**a.to_dict(), "metadata": {"name": "echo",
                                      "namespace": "other"}}).with_origin("b.yaml", a.base_dir)
    with pytest.raises(SpecError, match="namespaces"):
        await rt.apply([a, b])
    await rt.apply([a], wait=True, timeout=20)
    with pytest.raises(SpecError, match="already runs in namespace 'default'"):
        await rt.apply([b])


async def test_event_driven_agent_is_a_virtual_actor(rt: Runtime) -> None:
    await rt.apply([manifest("listener", "Listener", mode="event-driven",
                             resources={"idleTimeout": "500ms"})])
    assert rt.get("listener")["status"] == "Idle" and not rt.agents["listener"].instances
    await rt.request("listener", "first", handler="on_news")  # the message activates it
    assert rt.get("listener")["status"] == "Running"
    await until(lambda: not rt.agents["listener"].instances)  # idle 500ms: deactivated
    assert rt.get("listener")["status"] == "Idle"
    got = await rt.request("listener", handler="items")  # activated again, memory kept
    assert [g["content"] for g in got] == ["first"]
    reasons = [e.data.get("reason", "") for e in await rt.store.events(agent="listener")
               if e.kind == "instance.transition" and e.data["event"] == "Stop"]
    assert any("idle for 0.5s (event-driven)" in r for r in reasons)


async def test_event_driven_agent_is_activated_by_a_topic(rt: Runtime) -> None:
    subs = [{"subject": "news.*", "handler": "on_news"}]
    await rt.apply([manifest("listener", "Listener", mode="event-driven", subscriptions=subs,
                             resources={"idleTimeout": "10s"})])
    assert not rt.agents["listener"].instances
    await rt.publish("news.eu", "wake up", guarantee="at-least-once")
    await until(lambda: rt.agents["listener"].tasks_ok >= 1)
    assert [g["content"] for g in await rt.request("listener", handler="items")] == ["wake up"]
