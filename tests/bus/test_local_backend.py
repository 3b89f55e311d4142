"""What is specific to the local (SQLite outbox) backend; tests/bus/test_contract.py has the rest."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from corral.bus.backends.local import (
    LocalBackend,
    split_filter,
    split_subject,
    tokens_match,
)
from corral.errors import BackendUnavailable, BusError

ROOT = Path(__file__).resolve().parents[2]

Make = Callable[..., Awaitable[LocalBackend]]


@pytest.fixture
async def make(tmp_path: Path) -> AsyncIterator[Make]:
    """Started backends over tmp_path/bus.db; every one still open is closed at the end."""
    opened: list[LocalBackend] = []

    async def started(prefix: str = "t", **kw: Any) -> LocalBackend:
        b = LocalBackend(tmp_path / "bus.db", prefix, **kw)
        await b.start()
        opened.append(b)
        return b

    yield started
    for b in opened:
        await b.aclose()


async def drain(sub: Any, *, idle: float = 0.3) -> list[Any]:
    """Everything fetchable until a fetch waits ``idle`` seconds for nothing."""
    got: list[Any] = []
    while batch := await sub.fetch(500, timeout=idle):
        got += batch
    return got


def rows(path: Path, prefix: str = "t") -> int:
    with sqlite3.connect(path) as conn:
        return int(conn.execute("SELECT COUNT(*) FROM bus_messages WHERE prefix = ?",
                                (prefix,)).fetchone()[0])


# ------------------------------------------------------------------------------ matcher

@pytest.mark.parametrize(("filter", "subject", "expected"), [
    ("a", "a", True),
    ("a", "b", False),
    ("a", "a.b", False),
    ("a.b", "a", False),
    ("*", "a", True),
    ("*", "a.b", False),
    (">", "a", True),
    (">", "a.b.c", True),
    ("a.>", "a", False),
    ("a.>", "a.b", True),
    ("a.>", "a.b.c", True),
    ("a.*", "a.b", True),
    ("a.*", "a.b.c", False),
    ("*.b", "a.b", True),
    ("*.b", "a.c", False),
    ("*.*", "a", False),
    ("a.*.c", "a.b.c", True),
    ("a.*.c", "a.b.d", False),
    ("*.>", "a", False),
    ("*.>", "a.b", True),
    ("a.*.>", "a.b", False),
    ("a.*.>", "a.b.c.d", True),
    ("A.b", "a.b", False),  # case-sensitive
    ("a-1.b_2", "a-1.b_2", True),
])
def test_tokens_match(filter: str, subject: str, expected: bool) -> None:
    assert tokens_match(split_filter(filter), split_subject(subject)) is expected


@pytest.mark.parametrize("subject", ["", ".", "a.", ".a", "a..b", "a.*", ">", "a.>", "a b", "a*",
                                     "a.b\n", "é"])
def test_invalid_subjects(subject: str) -> None:
    with pytest.raises(BusError, match="invalid subject"):
        split_subject(subject)


@pytest.mark.parametrize("filter", ["", "a.", "a..b", ">.a", "a.>.b", "a*", "a.b>", "**", "> "])
def test_invalid_filters(filter: str) -> None:
    with pytest.raises(BusError, match="invalid filter"):
        split_filter(filter)


async def test_publish_and_subscribe_validate(make: Make) -> None:
    b = await make()
    with pytest.raises(BusError, match="invalid subject"):
        await b.publish("a.*", b"x")
    with pytest.raises(BusError, match="invalid filter"):
        await b.subscribe("s", "a.>.b")
    with pytest.raises(ValueError):
        await b.subscribe("s", "a", ack_wait=0)


# ------------------------------------------------------------------------------ durability

_CHILD = """
import asyncio, sys
from corral.bus.backends.local import LocalBackend

async def main() -> None:
    b = LocalBackend(sys.argv[1], "k9")
    await b.start()
    await b.subscribe("s", "k.>")
    print("ready", flush=True)

    async def publisher(p: int) -> None:
        for i in range(1_000_000):
            await b.publish(f"k.{p}", f"{p}:{i}".encode())
            print(f"{p}:{i}", flush=True)  # only once publish() returned

    async with asyncio.TaskGroup() as tg:
        for p in range(8):
            tg.create_task(publisher(p))

asyncio.run(main())
"""


async def test_kill_9_loses_no_published_message(tmp_path: Path, make: Make) -> None:
    db = tmp_path / "bus.db"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _CHILD, str(db), stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.stdout is not None
    confirmed: list[str] = []
    try:
        async with asyncio.timeout(60):
            assert (await proc.stdout.readline()).strip() == b"ready"
            while len(confirmed) < 2000:
                line = await proc.stdout.readline()
                assert line, "the child exited early"
                confirmed.append(line.decode().strip())
    finally:
        proc.send_signal(signal.SIGKILL)
        rest, _ = await proc.communicate()
    confirmed += rest.decode().split()  # printed before the kill, still in the pipe
    assert proc.returncode == -signal.SIGKILL

    b = await make("k9")
    sub = await b.subscribe("s", "k.>")
    got = [m.data.decode() for m in await drain(sub)]
    assert len(got) == len(set(got)), "a message was stored twice"
    missing = set(confirmed) - set(got)
    assert not missing, f"{len(missing)} confirmed messages lost, e.g. {sorted(missing)[:5]}"
    for p in range(8):  # per publisher (= per subject here), in publish order
        mine = [int(x.split(":")[1]) for x in got if x.startswith(f"{p}:")]
        assert mine == sorted(mine) and mine == list(range(len(mine)))


async def test_non_durable_messages_are_not_persisted(tmp_path: Path, make: Make) -> None:
    b = await make()
    sub = await b.subscribe("s", "e.*")
    for i in range(100):
        await b.publish("e.x", str(i).encode(), durable=False)
    await b.flush()
    assert rows(tmp_path / "bus.db") == 0
    assert b.stats["publishes"] == 0 and b.stats["rows"] == 0
    assert len(await drain(sub)) == 100  # still delivered in memory, in order
    await b.publish("e.x", b"lost", durable=False)
    await b.aclose()  # as good as a crash for durable=False

    b2 = await make()
    assert await (await b2.subscribe("s", "e.*")).fetch(10, timeout=0.3) == []


async def test_concurrent_publishers_share_commits(tmp_path: Path, make: Make) -> None:
    b = await make()
    sub = await b.subscribe("s", "c.>")

    async def publisher(p: int) -> None:
        for i in range(20):
            await b.publish(f"c.{p}", f"{p}:{i}".encode())

    async with asyncio.TaskGroup() as tg:
        for p in range(100):
            tg.create_task(publisher(p))
    st = b.stats
    assert st["publishes"] == 2000 and st["rows"] == 2000
    assert st["batches"] <= 200, st  # 100 publishers waiting together share one commit
    assert st["largest_batch"] >= 50, st
    got = await drain(sub)
    assert len(got) == 2000
    for p in range(100):
        assert [m.data for m in got if m.subject == f"c.{p}"] == [
            f"{p}:{i}".encode() for i in range(20)]
    assert rows(tmp_path / "bus.db") == 2000  # still pending: none acked


async def test_fan_out_stores_one_row_per_subscription(tmp_path: Path, make: Make) -> None:
    b = await make()
    subs = [await b.subscribe(f"s{i}", "f.*") for i in range(3)]
    await b.subscribe("other", "g.*")
    await b.publish("f.x", b"m", {"h": "1"})
    assert rows(tmp_path / "bus.db") == 3
    for s in subs:
        [m] = await drain(s)
        assert (m.data, m.headers) == (b"m", {"h": "1"})
        await m.ack()
    await b.flush()
    assert rows(tmp_path / "bus.db") == 0


# ------------------------------------------------------------------------------ restarts

async def test_delivered_count_and_nack_delay_survive_a_restart(make: Make) -> None:
    b = await make()
    sub = await b.subscribe("s", "j", ack_wait=60)
    await b.publish("j", b"a")
    await b.publish("j", b"b")
    first, second = await sub.fetch(2, timeout=1)
    assert (first.delivered, second.delivered) == (1, 1)
    await second.nack(delay=30)  # must stay hidden after the restart
    await b.aclose()  # ``first`` is still in flight: visible at once in the next process

    b2 = await make()
    sub2 = await b2.subscribe("s", "j", ack_wait=60)
    got = await drain(sub2)
    assert [(m.data, m.delivered) for m in got] == [(b"a", 2)]
    # nack(delay) wakes a waiting fetcher on time, not by polling
    await got[0].nack(delay=0.3)
    started = time.monotonic()
    [again] = await sub2.fetch(1, timeout=5)
    assert 0.25 < time.monotonic() - started < 1.0
    assert (again.data, again.delivered) == (b"a", 3)


async def test_subscription_collects_while_nobody_fetches(make: Make) -> None:
    b = await make()
    await b.subscribe("s", "q.*")
    await b.aclose()

    b2 = await make()  # the subscription is known without calling subscribe()
    await b2.publish("q.a", b"1")
    await b2.publish("q.a", b"2", durable=False)
    await b2.publish("q.a", b"3")
    assert b2.stats["subscriptions"] == 1
    sub = await b2.subscribe("s", "q.*")
    assert [m.data for m in await drain(sub)] == [b"1", b"2", b"3"]


async def test_loading_a_subscription_under_concurrent_publishes(make: Make) -> None:
    b = await make()
    await b.subscribe("s", "r.*")
    await b.aclose()
    b2 = await make()

    async def publisher(p: int) -> None:
        for i in range(200):
            await b2.publish(f"r.{p}", f"{p}:{i}".encode())

    async with asyncio.TaskGroup() as tg:
        for p in range(10):
            tg.create_task(publisher(p))
        await asyncio.sleep(0.01)
        sub = await b2.subscribe("s", "r.*")  # loads rows while publishes commit around it
    got = [m.data.decode() for m in await drain(sub)]
    assert len(got) == 2000 and len(set(got)) == 2000
    for p in range(10):
        assert [x for x in got if x.startswith(f"{p}:")] == [f"{p}:{i}" for i in range(200)]


async def test_prefixes_share_a_file_but_nothing_else(make: Make) -> None:
    a = await make("a")
    z = await make("z")
    sa = await a.subscribe("s", "x")
    sz = await z.subscribe("s", "x")
    await a.publish("x", b"from a")
    assert [m.data for m in await drain(sa)] == [b"from a"]
    assert await sz.fetch(1, timeout=0.2) == []
    await z.unsubscribe("s")
    assert len(await drain(sa, idle=0.1)) == 0  # in flight, untouched by z's unsubscribe
    assert a.stats["pending"] == 1


async def test_resubscribe_with_a_new_filter_replaces_it(make: Make) -> None:
    b = await make()
    await b.subscribe("s", "old")
    sub = await b.subscribe("s", "new")
    await b.publish("old", b"o")
    await b.publish("new", b"n")
    [n] = await drain(sub)
    assert n.data == b"n"
    await n.ack()
    await b.aclose()
    b2 = await make()
    await b2.publish("old", b"o2")
    await b2.publish("new", b"n2")
    assert [m.data for m in await drain(await b2.subscribe("s", "new"))] == [b"n2"]


# ------------------------------------------------------------------------------ fetchers

async def test_waiting_fetcher_wakes_on_publish(make: Make) -> None:
    b = await make()
    sub = await b.subscribe("s", "w")
    waiting = asyncio.ensure_future(sub.fetch(10, timeout=5))
    await asyncio.sleep(0.05)
    started = time.monotonic()
    await b.publish("w", b"now", durable=False)
    got = await waiting
    assert [m.data for m in got] == [b"now"] and time.monotonic() - started < 0.1


async def test_late_ack_after_ack_wait_still_settles(make: Make) -> None:
    b = await make()
    sub = await b.subscribe("s", "l", ack_wait=0.2)
    await b.publish("l", b"slow")
    [m] = await sub.fetch(1, timeout=1)
    await asyncio.sleep(0.3)  # expired, back in the queue but not fetched yet
    await m.ack()
    assert await sub.fetch(1, timeout=0.4) == []
    # a stale nack (an older delivery) is ignored
    await b.publish("l", b"again")
    [m1] = await sub.fetch(1, timeout=1)
    [m2] = await sub.fetch(1, timeout=1)  # redelivered after ack_wait
    await m1.nack()
    assert m2.delivered == 2 and await sub.fetch(1, timeout=0.1) == []
    await m2.ack()


async def test_close_unsubscribe_and_aclose_end_waiting_fetches(make: Make) -> None:
    b = await make()
    one = await b.subscribe("s", "c")
    two = await b.subscribe("s", "c")
    w1 = asyncio.ensure_future(one.fetch(1, timeout=10))
    await asyncio.sleep(0.02)
    await one.close()
    assert await w1 == []
    with pytest.raises(BusError, match="closed"):
        await one.fetch(1, timeout=0)

    w2 = asyncio.ensure_future(two.fetch(1, timeout=10))
    await asyncio.sleep(0.02)
    await b.unsubscribe("s")
    with pytest.raises(BusError, match="deleted"):
        await w2

    three = await b.subscribe("t", "c")
    w3 = asyncio.ensure_future(three.fetch(1, timeout=10))
    await asyncio.sleep(0.02)
    async with asyncio.timeout(2):
        await b.aclose()
        assert await w3 == []
    with pytest.raises(BusError, match="closed"):
        await b.publish("c", b"x")
    with pytest.raises(BusError, match="closed"):
        await three.fetch(1, timeout=0)


async def test_writer_failure_is_fail_stop(make: Make) -> None:
    b = await make()
    await b.subscribe("s", "f")
    with pytest.raises(BusError, match="rolled back"):
        await b._call(lambda conn: conn.execute("INSERT INTO nowhere VALUES (1)"), lambda _: None)
    with pytest.raises(BusError, match="write failed"):
        await b.publish("f", b"x")
    assert b.stats["failed"] == 1


async def test_unopenable_file_is_backend_unavailable(tmp_path: Path) -> None:
    (tmp_path / "dir.db").mkdir()
    b = LocalBackend(tmp_path / "dir.db")
    with pytest.raises(BackendUnavailable, match="can't open"):
        await b.start()
    await b.aclose()
