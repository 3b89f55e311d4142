"""One contract, every backend: local (SQLite), NATS JetStream, Redis Streams.

Services: NATS at 127.0.0.1:4222 and Redis at 127.0.0.1:6379. Without them these tests skip
with the reason; with CORRAL_REQUIRE_SERVICES=1 (CI) they fail instead.
"""

from __future__ import annotations

import asyncio
from typing import Any

from corral.bus.backend import Incoming


async def drain(sub: Any, want: int, *, timeout: float = 5.0) -> list[Incoming]:
    """Fetch until ``want`` deliveries arrived (or the deadline passed)."""
    got: list[Incoming] = []
    async with asyncio.timeout(timeout):
        while len(got) < want:
            got += await sub.fetch(want - len(got), timeout=0.5)
    return got


async def test_only_messages_after_creation_are_delivered(make) -> None:
    b = await make()
    await b.publish("orders.new", b"before")
    sub = await b.subscribe("s1", "orders.*")
    await b.publish("orders.new", b"after")
    got = await drain(sub, 1)
    assert [m.data for m in got] == [b"after"]
    assert got[0].subject == "orders.new" and got[0].delivered == 1
    await got[0].ack()
    assert await sub.fetch(10, timeout=0.3) == []


async def test_wildcards(make) -> None:
    b = await make()
    one = await b.subscribe("one", "news.*")
    many = await b.subscribe("many", "news.>")
    exact = await b.subscribe("exact", "news.eu")
    for s in ("news.eu", "news.eu.fr", "news", "sports.eu"):
        await b.publish(s, s.encode())
    assert sorted(m.subject for m in await drain(one, 1)) == ["news.eu"]
    assert sorted(m.subject for m in await drain(many, 2)) == ["news.eu", "news.eu.fr"]
    assert [m.subject for m in await drain(exact, 1)] == ["news.eu"]


async def test_no_extra_deliveries_on_wildcards(make) -> None:
    b = await make()
    one = await b.subscribe("one", "news.*")
    for s in ("news.eu", "news.eu.fr", "news", "sports.eu"):
        await b.publish(s, s.encode())
    got = await drain(one, 1)
    for m in got:
        await m.ack()
    assert await one.fetch(10, timeout=0.5) == []


async def test_order_binary_headers_and_large(make) -> None:
    b = await make()
    sub = await b.subscribe("s", "data.>")
    payloads = [bytes([i % 256]) * (i % 7) + b"\x00\xff" for i in range(300)]
    for p in payloads:
        await b.publish("data.x", p, {"k": "v", "n": "1"})
    big = bytes(range(256)) * 4096  # 1 MiB
    await b.publish("data.big", big)
    got = await drain(sub, 301)
    assert [m.data for m in got[:300]] == payloads
    assert got[300].data == big
    assert got[0].headers.get("k") == "v"
    for m in got:
        await m.ack()


async def test_nack_redelivers_and_counts(make) -> None:
    b = await make()
    sub = await b.subscribe("s", "jobs")
    await b.publish("jobs", b"j")
    first = (await drain(sub, 1))[0]
    await first.nack()
    second = (await drain(sub, 1))[0]
    assert second.data == b"j" and second.delivered == 2
    await second.nack(delay=1.0)
    assert await sub.fetch(1, timeout=0.4) == []  # not before its delay
    third = (await drain(sub, 1, timeout=5))[0]
    assert third.delivered == 3
    await third.ack()


async def test_unacked_is_redelivered_after_ack_wait(make) -> None:
    b = await make()
    sub = await b.subscribe("s", "jobs", ack_wait=1.0)
    await b.publish("jobs", b"j")
    first = (await drain(sub, 1))[0]
    assert first.delivered == 1
    again = (await drain(sub, 1, timeout=6))[0]  # never acked: back after ack_wait
    assert again.data == b"j" and again.delivered == 2
    await again.ack()


async def test_term_drops_for_good(make) -> None:
    b = await make()
    sub = await b.subscribe("s", "jobs", ack_wait=1.0)
    await b.publish("jobs", b"poison")
    await (await drain(sub, 1))[0].term()
    assert await sub.fetch(1, timeout=1.5) == []


async def test_durable_resume_in_a_new_backend_instance(make) -> None:
    b = await make()
    sub = await b.subscribe("worker", "tasks.*", ack_wait=1.0)
    for i in range(4):
        await b.publish("tasks.a", str(i).encode())
    got = await drain(sub, 4)
    await got[0].ack()
    await got[1].ack()
    await sub.close()
    await b.aclose()
    b2 = await make()  # as after a restart of the runtime
    sub2 = await b2.subscribe("worker", "tasks.*", ack_wait=1.0)
    await b2.publish("tasks.a", b"4")
    rest = await drain(sub2, 3, timeout=8)
    assert sorted(m.data for m in rest) == [b"2", b"3", b"4"]
    for m in rest:
        await m.ack()
    assert await sub2.fetch(10, timeout=1.5) == []


async def test_competing_fetchers_share_one_subscription(make) -> None:
    b = await make()
    a = await b.subscribe("pool", "work")
    c = await b.subscribe("pool", "work")
    for i in range(50):
        await b.publish("work", str(i).encode())
    seen: list[bytes] = []
    async with asyncio.timeout(10):
        while len(seen) < 50:
            for s in (a, c):
                for m in await s.fetch(7, timeout=0.2):
                    seen.append(m.data)
                    await m.ack()
    assert sorted(seen) == sorted(str(i).encode() for i in range(50))  # each exactly once


async def test_each_subscription_gets_its_own_copy(make) -> None:
    b = await make()
    x = await b.subscribe("x", "ev.*")
    y = await b.subscribe("y", "ev.>")
    await b.publish("ev.1", b"e")
    assert [m.data for m in await drain(x, 1)] == [b"e"]
    assert [m.data for m in await drain(y, 1)] == [b"e"]


async def test_unsubscribe_deletes_state(make) -> None:
    b = await make()
    sub = await b.subscribe("gone", "q")
    await b.publish("q", b"old")
    await sub.close()
    await b.unsubscribe("gone")
    again = await b.subscribe("gone", "q")
    await b.publish("q", b"new")
    assert [m.data for m in await drain(again, 1)] == [b"new"]
