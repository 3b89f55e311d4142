"""Policy at every hook of the runtime, Suspended on a run-time violation, and the audit
trail of what happened (fail closed when it cannot be written)."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from corral.core.lifecycle import State
from corral.errors import AuditUnavailable, PolicyDenied, PolicyInvalid
from corral.runtime.runtime import Runtime
from corral.spec.policy import PolicyManifest
from tests.conftest import manifest

SUBS = [{"subject": "news.*", "handler": "on_news"}]


def policy(name: str, text: str) -> PolicyManifest:
    return PolicyManifest.model_validate({
        "apiVersion": "corral/v1", "kind": "Policy", "metadata": {"name": name},
        "spec": {"policy": text}}).with_origin(f"test:{name}", ".")


def inproc(name: str, cls: str = "Echo", **spec: Any) -> Any:
    return manifest(name, cls, isolation="inproc", **spec)


async def kinds(rt: Runtime, **filters: Any) -> list[tuple[str, str]]:
    return [(r["kind"], r["outcome"]) for r in await rt.query_audit(limit=10_000, **filters)]


async def until(cond: Any, timeout: float = 15.0) -> None:
    async with asyncio.timeout(timeout):
        while not cond():
            await asyncio.sleep(0.02)


# ------------------------------------------------------------------ hooks before acting


async def test_agent_create_is_checked_and_a_denial_applies_nothing(rt: Runtime) -> None:
    await rt.apply([policy("no-untrusted", 'forbid (principal, action == Action::"agent.create",'
                          ' resource) when { resource.hasTag("tier") && '
                          'resource.getTag("tier") == "untrusted" };')])
    shady = manifest("shady", isolation="inproc")
    shady.metadata.labels["tier"] = "untrusted"
    with pytest.raises(PolicyDenied, match=r"agent\.create") as info:
        await rt.apply([inproc("fine"), shady])
    assert info.value.policies and rt.list() == []  # the allowed one was not applied either
    await rt.apply([inproc("fine")], wait=True, timeout=20)
    assert [a["name"] for a in rt.list()] == ["fine"]
    assert ("policy.decision", "deny") in await kinds(rt, agent="shady")


async def test_resource_allocation_is_checked(rt: Runtime) -> None:
    await rt.apply([policy("small", 'forbid (principal, action == Action::"resource.allocate", '
                           'resource) when { context.memoryBytes > 536870912 };')])
    with pytest.raises(PolicyDenied, match=r"resource\.allocate"):
        await rt.apply([inproc("big", resources={"memory": "1Gi"})])
    await rt.apply([inproc("small", resources={"memory": "256Mi"})], wait=True, timeout=20)
    assert ("resource.allocate", "ok") in await kinds(rt, agent="small")


async def test_manifest_subscriptions_are_checked(rt: Runtime) -> None:
    await rt.apply([policy("no-news", 'forbid (principal, action == Action::"topic.subscribe", '
                           'resource == Topic::"news.*");')])
    with pytest.raises(PolicyDenied, match=r"topic\.subscribe"):
        await rt.apply([inproc("listener", "Listener", subscriptions=SUBS)])


async def test_client_send_request_publish_and_terminate_are_checked(rt: Runtime) -> None:
    await rt.apply([inproc("echo")], wait=True, timeout=20)
    assert (await rt.request("echo", 1, handler="echo"))["echo"] == 1
    await rt.apply([policy("lockdown", '''
        forbid (principal == User::"client", action == Action::"agent.request", resource)
          when { context.payloadSize > 100 };
        forbid (principal == User::"client", action == Action::"message.send", resource);
        forbid (principal, action == Action::"topic.publish", resource == Topic::"secret.x");
        forbid (principal, action == Action::"agent.terminate", resource == Agent::"echo");
    ''')])
    assert (await rt.request("echo", "short", handler="echo"))["echo"] == "short"
    with pytest.raises(PolicyDenied, match=r"agent\.request"):
        await rt.request("echo", "x" * 200, handler="echo")  # payloadSize is in the context
    with pytest.raises(PolicyDenied, match=r"message\.send"):
        await rt.send("echo", 1, handler="echo")
    with pytest.raises(PolicyDenied, match=r"topic\.publish"):
        await rt.publish("secret.x", 1)
    await rt.publish("public.x", 1)
    with pytest.raises(PolicyDenied, match=r"agent\.terminate"):
        await rt.delete("echo")
    assert "echo" in rt.agents
    denied = [r for r in await rt.query_audit(action="policy.decision", outcome="deny")]
    assert {r["data"]["action"] for r in denied} == {"agent.request", "message.send",
                                                     "topic.publish", "agent.terminate"}
    assert all(r["data"]["policies"] for r in denied)


async def test_strict_mode_denies_what_no_policy_permits(tmp_path: Path) -> None:
    async with Runtime(home=tmp_path / "home", policy_strict=True) as rt:
        with pytest.raises(PolicyDenied, match="strict mode denies by default"):
            await rt.apply([inproc("echo")])
        await rt.apply([policy("ops", 'permit (principal == User::"client", action, resource);'
                               '\npermit (principal, action == Action::"resource.allocate", '
                               'resource);')])
        await rt.apply([inproc("echo")], wait=True, timeout=20)
        assert (await rt.request("echo", 2, handler="echo"))["echo"] == 2


async def test_an_invalid_policy_applies_nothing_and_names_line_and_column(rt: Runtime) -> None:
    await rt.apply([policy("good", 'forbid (principal, action == Action::"message.send", '
                           'resource == Agent::"vault");')])
    with pytest.raises(PolicyInvalid) as info:
        await rt.apply([policy("bad", 'permit (principal, action == Action::"topic.publsh", '
                               'resource);'), inproc("echo")])
    problem = info.value.problems[0]
    assert problem["line"] == 1 and problem["column"] > 1
    assert "echo" not in rt.agents and list(rt.policy_manifests) == ["default/good"]


# ------------------------------------------------------------------ Suspended at run time


async def test_a_violation_suspends_the_agent_until_the_policy_allows(rt: Runtime) -> None:
    await rt.apply([inproc("caller", "Listener"), inproc("listener", "Listener",
                                                          subscriptions=SUBS)],
                   wait=True, timeout=20)
    await rt.apply([policy("quiet", 'forbid (principal == Agent::"caller", '
                           'action == Action::"topic.publish", resource);')])
    assert await rt.request("caller", "hi", handler="shout") == "published"  # fire and forget
    inst = next(iter(rt.agents["caller"].instances.values()))
    await until(lambda: inst.state is State.SUSPENDED)
    with pytest.raises(TimeoutError):  # no new work is dispatched while suspended
        await asyncio.wait_for(rt.request("caller", "again", handler="items"), 0.5)
    assert ("lifecycle", "Suspended") in await kinds(rt, agent="caller")
    await rt.delete_policy("quiet")  # the policy allows again: back to work
    await until(lambda: inst.state in (State.RUNNING, State.READY, State.COMPLETED))
    assert await rt.request("caller", "now", handler="shout") == "published"


async def test_override_terminates_a_suspended_agent(rt: Runtime) -> None:
    await rt.apply([inproc("caller", "Caller"), inproc("echo")], wait=True, timeout=20)
    await rt.apply([policy("no-calls", 'forbid (principal == Agent::"caller", '
                           'action == Action::"agent.request", resource == Agent::"echo");')])
    with pytest.raises(PolicyDenied):  # the agent's own request to echo, refused
        await rt.request("caller", 1, handler="relay")
    inst = next(iter(rt.agents["caller"].instances.values()))
    await until(lambda: inst.state is State.SUSPENDED)
    assert await rt.resume("caller") == 1  # still forbidden
    await rt.override("caller")
    assert inst.state is State.TERMINATED and rt.agents["caller"].stopped
    assert ("agent.override", "ok") in await kinds(rt, agent="caller")


# ------------------------------------------------------------------ the audit trail


async def test_the_trail_records_what_happened_and_verifies(tmp_path: Path) -> None:
    home = tmp_path / "home"
    async with Runtime(home=home, audit_seal_every=10) as rt:
        await rt.apply([inproc("echo")], wait=True, timeout=20)
        await rt.request("echo", {"card": "4111-1111"}, handler="echo")
        await rt.publish("news.eu", "hello")
        got = await kinds(rt)
        assert {("agent.apply", "created"), ("resource.allocate", "ok"),
                ("agent.request", "ok"), ("topic.publish", "ok"),
                ("lifecycle", "Ready")} <= set(got)
        (req,) = await rt.query_audit(action="agent.request")
        assert len(req["data"]["payload_sha256"]) == 64 and "4111" not in str(req)
        report = await rt.verify_audit()
        assert report["ok"] and report["seals"] >= 1
        anchor = f"{report['head_seq']}:{report['head_hash']}"
    async with Runtime(home=home) as rt:  # a restart continues the same chain
        report = await rt.verify_audit(anchor)
        assert report["ok"] and report["records"] > int(anchor.split(":")[0])
    assert b"4111-1111" not in (home / "audit.db").read_bytes()


async def test_an_edited_record_is_found(tmp_path: Path) -> None:
    home = tmp_path / "home"
    async with Runtime(home=home) as rt:
        await rt.apply([inproc("echo")], wait=True, timeout=20)
    db = sqlite3.connect(home / "audit.db")
    (seq, body) = db.execute("SELECT seq, body FROM records ORDER BY seq LIMIT 1 OFFSET 2").fetchone()
    db.execute("UPDATE records SET body = ? WHERE seq = ?",
               (bytes(body).replace(b'"', b"'", 1), seq))
    db.commit()
    db.close()
    async with Runtime(home=home) as rt:
        report = await rt.verify_audit()
        assert not report["ok"] and report["first_bad_seq"] == seq


async def test_an_unwritable_trail_refuses_the_action(rt: Runtime) -> None:
    await rt.apply([inproc("echo")], wait=True, timeout=20)
    audit = rt.guard.audit
    assert audit is not None

    def cap(conn: sqlite3.Connection) -> None:
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        conn.execute(f"PRAGMA max_page_count = {pages}")  # SQLITE_FULL: a full disk, for real

    await audit._run_in_writer(cap)
    done = rt.agents["echo"].tasks_ok
    with pytest.raises(AuditUnavailable):
        for i in range(1000):  # the last page fills up within a few records
            await rt.request("echo", i, handler="echo")
            done += 1
    assert rt.agents["echo"].tasks_ok == done  # the refused one never ran
    await audit._run_in_writer(lambda c: c.execute("PRAGMA max_page_count = 1073741823"))
    assert (await rt.request("echo", "ok", handler="echo"))["echo"] == "ok"
    assert (await rt.verify_audit())["ok"]


async def test_eval_reads_entities_in_short_and_cedar_form(rt: Runtime) -> None:
    await rt.apply([policy("quiet", 'forbid (principal, action == Action::"topic.publish", '
                           'resource == Topic::"secret.x");')])
    for resource in ("topic:secret.x", 'Topic::"secret.x"'):
        d = rt.eval_policy("user:client", "topic.publish", resource, {"payloadSize": 1})
        assert d["resource"] == 'Topic::"secret.x"' and d["decision"] == "deny"
