"""The dead-letter queue: its table (and migration), DeadLetters over a real store, bus and
backend, and the dlq.* control ops."""

from __future__ import annotations

import asyncio
import shutil
import sqlite3
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from corral.bus.backends.local import LocalBackend
from corral.bus.bus import Bus, BusConfig
from corral.bus.crypto import Keyring
from corral.bus.envelope import Envelope, encode
from corral.cli.client import Client
from corral.core.backoff import BackoffPolicy
from corral.core.delivery import DeliveryPolicy
from corral.errors import BusError, CorralError, StoreError
from corral.runtime.control import ControlServer
from corral.runtime.dlq import DeadLetters, reason_kind
from corral.store import MIGRATIONS, SCHEMA_VERSION, DeadLetterRecord, SQLiteStore

pytestmark = pytest.mark.timeout(60)

FAST = DeliveryPolicy(max_deliver=2, backoff=BackoffPolicy(initial=0.02, max=0.05, jitter=0.0))


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SQLiteStore]:
    s = SQLiteStore(tmp_path / "home" / "corral.db")
    await s.open()
    try:
        yield s
    finally:
        await s.close()


@pytest.fixture
async def backend(tmp_path: Path) -> AsyncIterator[LocalBackend]:
    b = LocalBackend(tmp_path / "bus.db", "t")
    await b.start()
    try:
        yield b
    finally:
        await b.aclose()


async def until(cond: Any, timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not await cond():
            await asyncio.sleep(0.02)


async def consuming(bus: Bus, name: str, filt: str, handler: Any) -> asyncio.Task[None]:
    task = asyncio.ensure_future(bus.consume(name, filt, handler))
    await asyncio.sleep(0.2)  # the subscription exists before anything is published
    return task


async def stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


# ---------------------------------------------------------------- the table


async def test_existing_database_migrates(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path, isolation_level=None)
    for statement in MIGRATIONS[0]:  # the schema before dead letters existed
        conn.execute(statement)
    conn.execute("PRAGMA user_version = 1")
    conn.execute("INSERT INTO events (ts, agent, kind, data) VALUES (1.0, 'a', 'k', x'80')")
    conn.close()
    assert SCHEMA_VERSION == 2

    async with SQLiteStore(path) as s:
        assert [e.kind for e in await s.events()] == ["k"]  # old rows survive
        assert await s.dead_letters() == [] and await s.last_dead_letter_seq() == 0
        s.put_dead_letter("sub", b"\x01", "ttl expired", 1, subject="a.b")
        await s.commit()
        [rec] = await s.dead_letters()
        assert (rec.seq, rec.subject, rec.data) == (1, "a.b", b"\x01")

    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    indexes = {r[1] for r in conn.execute("PRAGMA index_list(dead_letters)")}
    assert "dead_letters_subscription_seq" in indexes
    conn.close()


async def test_store_round_trip_filters_delete_purge(store: SQLiteStore) -> None:
    for i in range(6):
        store.put_dead_letter("even" if i % 2 == 0 else "odd", bytes([i]), f"r{i}", i + 1,
                              message_id=f"m{i}", subject=f"s.{i}", sender="alice", ts=10.0 + i)
    store.put_dead_letter("odd", bytearray(b"raw"), "undecodable message", 1)
    await store.commit()

    every = await store.dead_letters()
    assert [r.seq for r in every] == [1, 2, 3, 4, 5, 6, 7]
    assert every[2] == DeadLetterRecord(3, 12.0, "even", "m2", "s.2", "alice", "r2", 3, b"\x02")
    assert every[6].message_id is None and every[6].subject is None and every[6].data == b"raw"
    assert [r.seq for r in await store.dead_letters(subscription="odd")] == [2, 4, 6, 7]
    assert [r.seq for r in await store.dead_letters(after=2, limit=2)] == [3, 4]
    assert [r.seq for r in await store.dead_letters(after=1, before=4)] == [2, 3]
    assert (await store.dead_letter(5)) == every[4]
    assert await store.dead_letter(99) is None

    store.delete_dead_letters([1, 3, 99])
    await store.commit()
    assert [r.seq for r in await store.dead_letters(subscription="even")] == [5]
    assert await store.purge_dead_letters("odd") == 4
    assert await store.purge_dead_letters() == 1
    assert await store.dead_letters() == []
    assert await store.last_dead_letter_seq() == 7  # seqs are never reused

    with pytest.raises(StoreError, match="must be bytes"):
        store.put_dead_letter("x", "text", "r", 1)  # type: ignore[arg-type]


# ---------------------------------------------------------------- through a real bus


async def test_poison_message_is_dead_lettered_shown_replayed_and_consumed(
        store: SQLiteStore, backend: LocalBackend) -> None:
    dlq = DeadLetters(store)
    bus = Bus(backend, BusConfig(policy=FAST), dead_letters=dlq)
    broken = True
    calls: list[tuple[str, Any]] = []

    async def handler(env: Envelope) -> None:
        calls.append((env.id, env.payload))
        if broken:
            raise ValueError("cannot handle it")

    task = await consuming(bus, "worker", "jobs.>", handler)
    sent = await bus.publish("alice", "jobs.resize", {"img": "cat.png", "w": 64},
                             guarantee="at-least-once", ttl=3600, headers={"trace": "t-1"})

    async def one() -> bool:
        return len(await dlq.ls()) == 1
    await until(one)
    [row] = await dlq.ls()
    assert (row["subscription"], row["subject"], row["sender"], row["message_id"],
            row["delivered"]) == ("worker", "jobs.resize", "alice", sent.id, 2)
    assert row["reason"].startswith("delivered 2 times (maxDeliver=2): ValueError: cannot")
    assert "data" not in row and row["size"] > 0
    assert dlq.stats()["by_reason"] == {"max_deliver": 1}
    assert len(calls) == 2

    shown = await dlq.show(row["seq"])
    env = shown["envelope"]
    assert (env["id"], env["subject"], env["sender"], env["guarantee"], env["ttl"],
            env["headers"]) == (sent.id, "jobs.resize", "alice", "at-least-once", 3600,
                                {"trace": "t-1"})
    assert env["created"] == sent.created and env["expires_at"] == sent.created + 3600
    assert env["payload"] == '{"img": "cat.png", "w": 64}' and env["signed"] is False

    broken = False
    assert await dlq.replay(backend.publish, [row["seq"]]) == 1
    await until(lambda: _true(len(calls) == 3))
    assert calls[2] == (sent.id, {"img": "cat.png", "w": 64})  # the very same message
    assert await dlq.ls() == [] and await store.dead_letter(row["seq"]) is None
    assert dlq.stats()["replayed"] == 1
    await stop(task)


async def _true(value: bool) -> bool:
    return value


async def test_ttl_expired_replay_all_is_a_snapshot(store: SQLiteStore,
                                                    backend: LocalBackend) -> None:
    dlq = DeadLetters(store)
    bus = Bus(backend, BusConfig(policy=FAST), dead_letters=dlq)
    got: list[Any] = []

    async def handler(env: Envelope) -> None:
        got.append(env.payload)

    sub = await backend.subscribe("late", "news.*")
    await sub.close()
    for i in range(3):
        await bus.publish("bob", f"news.{i}", i, guarantee="at-least-once", ttl=0.05)
    await asyncio.sleep(0.2)
    task = await consuming(bus, "late", "news.*", handler)

    async def three() -> bool:
        return len(await dlq.ls()) == 3
    await until(three)
    assert got == [] and {r["reason"] for r in await dlq.ls()} == {"ttl expired"}
    assert dlq.stats() == {"dead_lettered": 3, "by_reason": {"ttl_expired": 3},
                           "replayed": 0, "purged": 0}

    # Still expired, so each comes straight back; the replay must not chase them forever.
    assert await dlq.replay(backend.publish, everything=True) == 3
    await until(three)
    assert [r["seq"] for r in await dlq.ls()] == [4, 5, 6]
    assert dlq.stats()["dead_lettered"] == 6
    await stop(task)

    assert await dlq.purge("other") == 0
    assert await dlq.purge("late") == 3 and await dlq.ls() == []
    assert dlq.stats()["purged"] == 3


async def test_encrypted_payload_is_not_shown(store: SQLiteStore, backend: LocalBackend,
                                              tmp_path: Path) -> None:
    dlq = DeadLetters(store)
    bus = Bus(backend, BusConfig(policy=FAST, encrypted=["vault.>"]), dead_letters=dlq,
              keyring=Keyring(tmp_path / "keys.json"))

    async def fail(env: Envelope) -> None:
        raise RuntimeError("no")

    task = await consuming(bus, "v", "vault.>", fail)
    await bus.publish("alice", "vault.k", "the secret", guarantee="at-least-once")

    async def one() -> bool:
        return len(await dlq.ls()) == 1
    await until(one)
    await stop(task)
    [row] = await dlq.ls()
    shown = await dlq.show(row["seq"])
    assert shown["envelope"]["encrypted"] is True
    assert shown["envelope"]["payload"].startswith("<encrypted, ")
    assert "the secret" not in repr(shown)


# ---------------------------------------------------------------- replay edge cases


async def _fill(dlq: DeadLetters, n: int, subscription: str = "s") -> list[Envelope]:
    envs = [Envelope.new(f"a.{i}", "carol", i, guarantee="at-least-once") for i in range(n)]
    for env in envs:
        await dlq.dead_letter(subscription, env, encode(env), "delivered 5 times", 5)
    return envs


async def test_dead_letter_is_durable_when_it_returns(store: SQLiteStore) -> None:
    dlq = DeadLetters(store)
    await dlq.dead_letter("s", None, b"\xc1garbage", "undecodable message", 1)
    # No commit() here: dead_letter already waited for it (reads see committed rows only).
    [rec] = await store.dead_letters()
    assert rec.data == b"\xc1garbage" and rec.subject is None
    shown = await dlq.show(rec.seq)
    assert shown["envelope"] is None and shown["decode_error"]
    assert shown["data_preview"].startswith("<8 bytes> c1")
    assert reason_kind("undecodable message") == "undecodable"


async def test_replay_checks_its_arguments_before_publishing(store: SQLiteStore) -> None:
    dlq = DeadLetters(store)
    await _fill(dlq, 2)
    await dlq.dead_letter("s", None, b"junk", "undecodable message", 1)  # seq 3
    published: list[tuple[str, bytes]] = []

    async def publish(subject: str, data: bytes) -> None:
        published.append((subject, data))

    with pytest.raises(CorralError, match="say which"):
        await dlq.replay(publish)
    with pytest.raises(CorralError, match="only one"):
        await dlq.replay(publish, [1], subscription="s")
    with pytest.raises(CorralError, match="no dead letter with seq 9"):
        await dlq.replay(publish, [1, 9])
    with pytest.raises(CorralError, match="could not be decoded"):
        await dlq.replay(publish, [1, 3])
    with pytest.raises(CorralError, match="no dead letter with seq 42"):
        await dlq.show(42)
    assert published == [] and len(await dlq.ls()) == 3

    # By subscription, the undecodable one is left where it is.
    assert await dlq.replay(publish, subscription="s") == 2
    assert [s for s, _ in published] == ["a.0", "a.1"]
    assert [r["seq"] for r in await dlq.ls()] == [3]


async def test_replay_stops_at_a_failed_publish_and_keeps_the_rest(store: SQLiteStore) -> None:
    dlq = DeadLetters(store)
    envs = await _fill(dlq, 4)
    published: list[bytes] = []

    async def publish(subject: str, data: bytes) -> None:
        if len(published) == 2:
            raise BusError("backend down")
        published.append(data)

    with pytest.raises(BusError, match=r"stopped at dead letter 3 after 2 of 3 were"):
        await dlq.replay(publish, [1, 2, 3])
    assert [r["seq"] for r in await dlq.ls()] == [3, 4]
    assert [r["message_id"] for r in await dlq.ls()] == [envs[2].id, envs[3].id]
    assert dlq.stats()["replayed"] == 2


async def test_replay_pages_through_a_large_subscription(store: SQLiteStore) -> None:
    dlq = DeadLetters(store)
    await _fill(dlq, 450, "big")
    await _fill(dlq, 3, "small")
    n = 0

    async def publish(subject: str, data: bytes) -> None:
        nonlocal n
        n += 1

    assert await dlq.replay(publish, subscription="big") == 450 and n == 450
    assert [r["subscription"] for r in await dlq.ls()] == ["small"] * 3
    with pytest.raises(CorralError, match="limit"):
        await dlq.ls(limit=0)


# ---------------------------------------------------------------- control ops


async def test_control_ops() -> None:
    home = tempfile.mkdtemp(prefix="corral-dlq-")  # short: AF_UNIX paths are limited
    try:
        async with SQLiteStore(Path(home) / "corral.db") as s:
            dlq = DeadLetters(s)
            envs = await _fill(dlq, 3)
            published: list[tuple[str, bytes]] = []

            async def republish(subject: str, data: bytes) -> None:
                published.append((subject, data))

            rt = SimpleNamespace(dlq=dlq, republish=republish)
            server = ControlServer(rt, Path(home) / "corral.sock")  # type: ignore[arg-type]
            ready = asyncio.Event()
            client = Client(server.path, timeout=10)

            async def call(op: str, **args: Any) -> Any:
                return await asyncio.to_thread(client.call, op, **args)

            async with asyncio.TaskGroup() as tg:
                serving = tg.create_task(server.serve(ready=ready))
                await ready.wait()
                try:
                    rows = await call("dlq.ls", limit=2)
                    assert [r["seq"] for r in rows] == [1, 2]
                    assert [r["seq"] for r in await call("dlq.ls", after=2)] == [3]
                    shown = await call("dlq.show", seq=2)
                    assert shown["envelope"]["id"] == envs[1].id
                    with pytest.raises(CorralError, match="no dead letter with seq 7"):
                        await call("dlq.show", seq=7)
                    assert await call("dlq.replay", seqs=[2]) == {"replayed": 1}
                    assert published[0][0] == "a.1"
                    with pytest.raises(CorralError, match="say which"):
                        await call("dlq.replay")
                    assert await call("dlq.purge", subscription="s") == {"purged": 2}
                    assert await call("dlq.ls") == []
                finally:
                    serving.cancel()
    finally:
        shutil.rmtree(home, ignore_errors=True)
