"""Agents on the bus: subscriptions from manifests, ctx.publish, guarantees, dead letters."""

from __future__ import annotations

import asyncio
from pathlib import Path

import msgspec
import pytest

from corral.errors import AgentUnavailable
from corral.runtime.runtime import Runtime
from tests.conftest import manifest

SUBS = [{"subject": "news.*", "handler": "on_news", "ackWait": "2s"}]
FAST = {"maxRestarts": 5, "window": "30s", "backoff": {"initial": "20ms", "max": "100ms"}}


async def items(rt: Runtime, name: str = "listener") -> list[dict]:
    return await rt.request(name, handler="items")


async def wait_items(rt: Runtime, n: int, timeout: float = 20.0) -> list[dict]:
    got: list[dict] = []
    async with asyncio.timeout(timeout):
        while len(got) < n:
            try:
                got = await items(rt)
            except AgentUnavailable:
                pass  # the instance we asked died mid-request (on purpose); ask again
            await asyncio.sleep(0.05)
    return got


async def test_subscription_delivers_with_subject_and_stamped_sender(rt: Runtime) -> None:
    await rt.apply([manifest("listener", "Listener", subscriptions=SUBS),
                    manifest("caller", "Listener")], wait=True, timeout=20)
    await rt.publish("news.eu", "hello", guarantee="at-least-once")
    await rt.publish("sports.eu", "ignored", guarantee="at-least-once")
    got = await wait_items(rt, 1)
    assert got == [{"subject": "news.eu", "sender": "client", "content": "hello",
                    "kind": "publish"}]
    # An agent publishes: the sender is the agent the channel belongs to, whatever it claims.
    assert await rt.request("caller", {"sender": "root"}, handler="shout") == "published"
    got = await wait_items(rt, 2)
    assert got[1]["sender"] == "caller" and got[1]["content"] == {"sender": "root"}


async def test_subscriber_killed_mid_stream_loses_nothing(rt: Runtime) -> None:
    await rt.apply([manifest("listener", "Listener", subscriptions=SUBS, restart=FAST)],
                   wait=True, timeout=20)
    for i in range(10):
        await rt.publish("news.eu", "crash" if i == 4 else i, guarantee="at-least-once")
    got = await wait_items(rt, 10, timeout=30)
    contents = [g["content"] for g in got]
    # Every message arrived, the one that killed its first consumer included (redelivered).
    assert sorted(c for c in contents if c != "crash") == [0, 1, 2, 3, 5, 6, 7, 8, 9]
    assert "crash" in contents
    assert rt.agents["listener"].restarts == 1


async def test_poison_goes_to_the_dead_letter_queue(rt: Runtime) -> None:
    await rt.apply([manifest("listener", "Listener", subscriptions=SUBS)], wait=True, timeout=20)
    await rt.publish("news.eu", "poison", guarantee="at-least-once")
    await rt.publish("news.eu", "fine", guarantee="at-least-once")
    await wait_items(rt, 1)
    assert rt.dlq is not None
    async with asyncio.timeout(30):
        while not (letters := await rt.dlq.ls()):
            await asyncio.sleep(0.1)
    assert "cannot digest poison" in letters[0]["reason"] and letters[0]["subject"] == "news.eu"


async def test_queued_messages_survive_a_runtime_restart(tmp_path: Path) -> None:
    home = tmp_path / "home"
    async with Runtime(home=home, shutdown_grace=2.0) as rt:
        await rt.apply([manifest("listener", "Listener", subscriptions=SUBS)], wait=True,
                       timeout=20)
        await rt.stop("listener")  # not consuming now: messages wait in the durable outbox
        for i in range(3):
            await rt.publish("news.eu", i, guarantee="at-least-once")
    async with Runtime(home=home, shutdown_grace=2.0) as rt:
        await rt.scale("listener", 1)
        await rt.wait_ready(["listener"], timeout=20)
        got = await wait_items(rt, 3)
        assert [g["content"] for g in got] == [0, 1, 2]


async def test_a_subscription_chooses_its_own_guarantee(rt: Runtime) -> None:
    # The publisher asks for at-most-once; the subscriber's manifest asks for at-least-once,
    # so the message that killed its first consumer is redelivered, not lost.
    subs = [{**SUBS[0], "guarantee": "at-least-once"}]
    await rt.apply([manifest("listener", "Listener", subscriptions=subs, restart=FAST)],
                   wait=True, timeout=20)
    for i in ("a", "crash", "b"):
        await rt.publish("news.eu", i)
    got = await wait_items(rt, 3, timeout=30)
    assert sorted(g["content"] for g in got) == ["a", "b", "crash"]


@pytest.mark.parametrize("guarantee", ["at-most-once", "effectively-once"])
async def test_other_guarantees_reach_the_agent(rt: Runtime, guarantee: str) -> None:
    await rt.apply([manifest("listener", "Listener", subscriptions=SUBS)], wait=True, timeout=20)
    await rt.publish("news.eu", "x", guarantee=guarantee, idempotency_key="k1")  # type: ignore[arg-type]
    await rt.publish("news.eu", "x", guarantee=guarantee, idempotency_key="k1")  # type: ignore[arg-type]
    got = await wait_items(rt, 1)
    await asyncio.sleep(0.5)
    got = await items(rt)
    assert len(got) == (1 if guarantee == "effectively-once" else 2)


async def test_broadcast_reaches_selected_agents_but_not_the_sender(rt: Runtime) -> None:
    from corral.errors import SpecError
    from corral.spec.models import AgentManifest

    def labelled(name: str, labels: dict, namespace: str = "default") -> AgentManifest:
        m = manifest(name, "Listener")
        d = m.to_dict()
        d["metadata"] = {"name": name, "namespace": namespace, "labels": labels}
        return AgentManifest.model_validate(d).with_origin(name, m.base_dir)

    await rt.apply([labelled("nlp-a", {"team": "nlp"}), labelled("nlp-b", {"team": "nlp"}, "lab"),
                    labelled("vision", {"team": "vision"}),
                    manifest("announcer", "Announcer")], wait=True, timeout=30)
    assert await rt.request("announcer", "model v2 is out", handler="announce") == "announced"
    for name in ("nlp-a", "nlp-b"):
        got = await wait_items_of(rt, name, 1)
        assert got[0]["sender"] == "announcer" and got[0]["content"] == "model v2 is out"
    assert await rt.request("vision", handler="items") == []
    sent = await rt.broadcast("ns only", handler="on_news", namespace="lab")
    assert list(sent) == ["nlp-b"]
    everyone = await rt.broadcast("all", handler="on_news", sender="vision")
    assert set(everyone) == {"nlp-a", "nlp-b", "announcer"}  # the sender is left out
    with pytest.raises(SpecError, match="selector"):
        await rt.broadcast("x", selector="bad key=1")


async def wait_items_of(rt: Runtime, name: str, n: int) -> list[dict]:
    async with asyncio.timeout(20):
        while len(got := await rt.request(name, handler="items")) < n:
            await asyncio.sleep(0.05)
    return got


@pytest.mark.parametrize("backend", ["nats", "redis"])
async def test_the_backend_is_one_line_of_config(tmp_path: Path, backend: str) -> None:
    import uuid

    from tests.bus.conftest import PORTS, _up
    from tests.conftest import REQUIRE_SERVICES

    if not _up(PORTS[backend]):
        if REQUIRE_SERVICES:
            pytest.fail(f"{backend} is required (CORRAL_REQUIRE_SERVICES=1) but not running")
        pytest.skip(f"{backend} is not running on 127.0.0.1:{PORTS[backend]}")
    prefix = f"rt{uuid.uuid4().hex[:8]}"
    async with Runtime(home=tmp_path / "home", bus=backend, bus_prefix=prefix) as rt:
        await rt.apply([manifest("listener", "Listener", subscriptions=SUBS)], wait=True,
                       timeout=20)
        await rt.publish("news.eu", "over " + backend, guarantee="at-least-once")
        got = await wait_items(rt, 1)
        assert got[0]["content"] == "over " + backend and rt.stats()["bus"]["backend"] == backend
        await rt.bus.backend.purge()  # type: ignore[union-attr]


async def test_agents_direct_messages_obey_rate_and_size_limits(tmp_path: Path) -> None:
    from corral.bus.bus import BusConfig

    cfg = BusConfig(rate=20, burst=5, max_message_size=64 * 1024)
    async with Runtime(home=tmp_path / "home", bus_config=cfg, shutdown_grace=2.0) as rt:
        await rt.apply([manifest("echo"), manifest("announcer", "Announcer")], wait=True,
                       timeout=20)
        out = await rt.request("announcer", 30, handler="flood")
        refused = sum(v for k, v in out.items() if "rate limit" in k)
        assert out.get("ok", 0) >= 5 and refused >= 15, out  # a burst of 5, then ~20/s
        assert "too_large" not in str(out)
        said = await rt.request("announcer", 200_000, handler="big")
        assert said.startswith("MessageRejected") and "limit" in said
        rejected = rt.stats()["bus"]["rejected"]
        assert rejected["rate_limited"] >= 15 and rejected["too_large"] == 1


async def test_encrypted_topic_is_ciphertext_on_the_wire_and_at_rest(tmp_path: Path) -> None:
    secret = "the vault code is 7391-ALPHA-SECRET"
    subs = [{"subject": "vault.>", "handler": "on_news", "encrypt": True}]
    home = tmp_path / "home"
    async with Runtime(home=home, shutdown_grace=2.0) as rt:
        await rt.apply([manifest("listener", "Listener", subscriptions=subs)], wait=True,
                       timeout=20)
        raw = await rt.bus.backend.subscribe("raw-tap", "vault.>")  # type: ignore[union-attr]
        await rt.stop("listener")  # so the message stays at rest in the outbox for a while
        await rt.publish("vault.codes", {"code": secret}, guarantee="at-least-once")
        (wire,) = await raw.fetch(1, timeout=5)
        assert secret.encode() not in wire.data  # on the wire
        await rt.bus.backend.flush()  # type: ignore[union-attr]
        stored = [f for f in home.iterdir() if f.name.startswith("bus.db")]  # with -wal
        assert stored and all(secret.encode() not in f.read_bytes() for f in stored)  # at rest
        assert any(b"vault.codes" in f.read_bytes() for f in stored)  # the message is there
        old_key = rt.bus.keyring.current_id  # type: ignore[union-attr]
        assert rt.rotate_bus_key() != old_key  # rotation: the queued message still decrypts
        await rt.scale("listener", 1)
        got = await wait_items(rt, 1)
        assert got[0]["content"] == {"code": secret} and got[0]["subject"] == "vault.codes"


async def test_subscriptions_made_at_run_time_last_until_unsubscribed(tmp_path: Path) -> None:
    home = tmp_path / "home"
    async with Runtime(home=home, shutdown_grace=2.0) as rt:
        await rt.apply([manifest("listener", "Listener")], wait=True, timeout=20)
        assert await rt.request("listener", "alerts.*", handler="join") == "joined"
        async with asyncio.timeout(10):
            while "alerts.*" not in rt.agents["listener"].dynamic:
                await asyncio.sleep(0.02)
        await rt.publish("alerts.fire", "one", guarantee="at-least-once")
        assert [g["content"] for g in await wait_items(rt, 1)] == ["one"]
    async with Runtime(home=home, shutdown_grace=2.0) as rt:  # restored from the event log
        await rt.wait_ready(["listener"], timeout=20)
        assert "alerts.*" in rt.agents["listener"].dynamic
        await rt.publish("alerts.flood", "two", guarantee="at-least-once")
        assert [g["content"] for g in await wait_items(rt, 2)] == ["one", "two"]
        assert await rt.request("listener", "alerts.*", handler="leave") == "left"
        async with asyncio.timeout(10):
            while rt.agents["listener"].dynamic:
                await asyncio.sleep(0.02)
        await rt.publish("alerts.fire", "three", guarantee="at-least-once")
        await asyncio.sleep(0.5)
        assert [g["content"] for g in await items(rt)] == ["one", "two"]


def _files_hold(home: Path, prefix: str, needle: bytes) -> bool:
    return any(needle in f.read_bytes() for f in home.iterdir() if f.name.startswith(prefix))


async def _queue_behind_a_nap(home: Path, payload: str) -> str:
    """Send ``payload`` to an encrypted agent busy with a long nap; the runtime stops with
    the send still queued in the store."""
    async with Runtime(home=home, shutdown_grace=0.5) as rt:
        await rt.apply([manifest("vault", encrypt=True, concurrency=1)], wait=True, timeout=20)
        napping = asyncio.ensure_future(rt.request("vault", 60, handler="nap"))
        await asyncio.sleep(0.2)
        task_id = await rt.send("vault", payload, handler="echo")
        await rt.store.commit()
        napping.cancel()
    return task_id


async def test_encrypted_agent_keeps_its_direct_messages_sealed_at_rest(tmp_path: Path) -> None:
    secret, home = "launch code 0000-SEALED-SEND", tmp_path / "home"
    task_id = await _queue_behind_a_nap(home, secret)
    assert not _files_hold(home, "corral.db", secret.encode())  # queued: sealed
    async with Runtime(home=home, shutdown_grace=2.0) as rt:
        async with asyncio.timeout(20):
            while (rec := await rt.task(task_id)) is None or rec.status != "done":
                await asyncio.sleep(0.05)
        assert rec.payload == secret and rec.result["echo"] == secret  # opened for its owner
        await rt.store.commit()
        assert not _files_hold(home, "corral.db", secret.encode())  # done: result sealed too


async def test_a_tampered_sealed_message_is_refused_not_run(tmp_path: Path) -> None:
    import sqlite3

    home = tmp_path / "home"
    task_id = await _queue_behind_a_nap(home, "pay 10 to alice")
    db = sqlite3.connect(home / "corral.db")
    (blob,) = db.execute("SELECT payload FROM tasks WHERE id = ?", (task_id,)).fetchone()
    tampered = blob[:-1] + bytes([blob[-1] ^ 1])  # flip one bit of the GCM tag
    db.execute("UPDATE tasks SET payload = ? WHERE id = ?", (tampered, task_id))
    db.commit()
    db.close()
    async with Runtime(home=home, shutdown_grace=2.0) as rt:
        rec = await rt.store.task(task_id)
        assert rec is not None and rec.status == "failed" and "does not decrypt" in (rec.error or "")
        assert any("dropped" in line.message for line in await rt.logs("vault"))


async def test_an_encrypted_agent_publishes_ciphertext(tmp_path: Path) -> None:
    secret = "quarterly numbers 42-UNRELEASED"
    async with Runtime(home=tmp_path / "home", shutdown_grace=2.0) as rt:
        await rt.apply([manifest("caller", "Listener", encrypt=True),
                        manifest("listener", "Listener", subscriptions=SUBS)],
                       wait=True, timeout=20)
        raw = await rt.bus.backend.subscribe("raw-tap", "news.>")  # type: ignore[union-attr]
        assert await rt.request("caller", secret, handler="shout") == "published"
        (wire,) = await raw.fetch(1, timeout=5)
        assert secret.encode() not in wire.data
        got = await wait_items(rt, 1)
        assert got[0]["content"] == secret and got[0]["sender"] == "caller"


async def test_two_nodes_on_nats_sign_and_verify_per_agent(tmp_path: Path) -> None:
    """Two runtimes share a NATS server: a trust boundary. Messages are signed with the
    sending agent's key; the other node delivers them only once it trusts that key, and
    refuses unsigned and forged ones, each counted and dead-lettered with the reason."""
    import uuid

    from corral.bus.crypto import AgentKeys
    from corral.bus.envelope import Envelope, encode
    from tests.bus.conftest import PORTS, _up
    from tests.conftest import REQUIRE_SERVICES

    if not _up(PORTS["nats"]):
        if REQUIRE_SERVICES:
            pytest.fail("nats is required (CORRAL_REQUIRE_SERVICES=1) but not running")
        pytest.skip("nats is not running on 127.0.0.1:4222")
    prefix = f"rt{uuid.uuid4().hex[:8]}"
    async with Runtime(home=tmp_path / "a", bus="nats", bus_prefix=prefix) as a, \
            Runtime(home=tmp_path / "b", bus="nats", bus_prefix=prefix) as b:
        assert a.signing and b.signing
        await b.apply([manifest("listener", "Listener", subscriptions=SUBS)], wait=True,
                      timeout=20)
        await a.apply([manifest("caller", "Listener")], wait=True, timeout=20)
        assert b.dlq is not None and b.bus is not None

        async def letters(n: int) -> list[dict]:
            async with asyncio.timeout(20):
                while len(got := await b.dlq.ls()) < n:  # type: ignore[union-attr]
                    await asyncio.sleep(0.05)
            return got

        await a.request("caller", "before trust", handler="shout")
        assert "no signing keys are known for agent 'caller'" in (await letters(1))[0]["reason"]
        assert b.trust_keys(a.export_keys()) == 1
        await a.request("caller", "after trust", handler="shout")
        got = await wait_items(b, 1)
        assert [(g["content"], g["sender"]) for g in got] == [("after trust", "caller")]

        unsigned = Envelope.new("news.x", "caller", "unsigned", guarantee="at-least-once")
        await b.bus.backend.publish("news.x", encode(unsigned))
        mallory = AgentKeys(tmp_path / "mallory")
        forged = Envelope.new("news.x", "caller", "forged", guarantee="at-least-once")
        kid, sig = mallory.sign("caller", _canonical(forged))
        await b.bus.backend.publish("news.x", encode(msgspec.structs.replace(
            forged, signer_key_id=kid, signature=sig)))
        reasons = sorted(x["reason"] for x in await letters(3))
        assert "is not one of agent 'caller''s keys" in reasons[0]  # forged by mallory
        assert reasons[2] == "rejected: unsigned message from 'caller'"
        assert b.stats()["bus"]["rejected"] == {"unknown_key": 2, "unsigned": 1}
        assert [g["content"] for g in await items(b)] == ["after trust"]
        await b.bus.backend.purge()  # type: ignore[union-attr]


def _canonical(env: object) -> bytes:
    from corral.bus.crypto import canonical

    return canonical(env.signed_fields())  # type: ignore[attr-defined]
