"""Redis specifics: errors, prefixes, the routing registry across instances, delays, group commit.

The shared behaviour is in test_contract.py. These tests need Redis at 127.0.0.1:6379 (except
the group-commit and no-library ones); without it they skip, or fail with
CORRAL_REQUIRE_SERVICES=1.
"""

from __future__ import annotations

import asyncio
import socket
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from corral.bus.backends.redis import RedisBackend, _GroupCommit
from corral.errors import BackendUnavailable, BusError
from tests.conftest import REQUIRE_SERVICES

URL = "redis://127.0.0.1:6379/0"
Make = Callable[..., Awaitable[RedisBackend]]


def _redis_up() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 6379), timeout=0.5):
            return True
    except OSError:
        return False


@pytest.fixture
async def make() -> AsyncIterator[Make]:
    """Started backends; one fresh prefix per test unless given; keys purged and closed after."""
    if not _redis_up():
        msg = "redis is not running on 127.0.0.1:6379 (start it: shared/services.sh)"
        if REQUIRE_SERVICES:
            pytest.fail(msg + "; required because CORRAL_REQUIRE_SERVICES=1")
        pytest.skip(msg)
    default = f"t{uuid.uuid4().hex[:10]}"
    opened: list[RedisBackend] = []
    prefixes = {default}

    async def started(prefix: str = default) -> RedisBackend:
        b = RedisBackend(url=URL, prefix=prefix)
        await b.start()
        opened.append(b)
        prefixes.add(prefix)
        return b

    yield started
    for b in opened:
        await b.aclose()
    for prefix in prefixes:
        async with RedisBackend(url=URL, prefix=prefix) as cleaner:
            await cleaner.purge()


async def _keys(b: RedisBackend) -> list[bytes]:
    return sorted([k async for k in b._client.scan_iter(match=f"{b.prefix}:*")])


# -- errors --------------------------------------------------------------------------------------

async def test_unreachable_url_is_backend_unavailable() -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    b = RedisBackend(url=f"redis://:s3cret@127.0.0.1:{port}/0")
    with pytest.raises(BackendUnavailable) as info:
        await b.start()
    text = str(info.value)
    assert f"start Redis at redis://:***@127.0.0.1:{port}/0 (shared/services.sh)" in text
    assert "s3cret" not in text
    assert info.value.__cause__ is not None


async def test_missing_library_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    for mod in [m for m in sys.modules if m == "redis" or m.startswith("redis.")]:
        monkeypatch.delitem(sys.modules, mod)
    monkeypatch.setitem(sys.modules, "redis", None)
    with pytest.raises(BackendUnavailable, match=r"pip install 'corral\[redis\]'"):
        await RedisBackend().start()


async def test_not_started_and_bad_names_are_bus_errors(make: Make) -> None:
    with pytest.raises(BusError, match="not started"):
        await RedisBackend().publish("a", b"")
    b = await make()
    for subject in ("", "a..b", "a.*", "a.>"):
        with pytest.raises(BusError, match="invalid subject"):
            await b.publish(subject, b"x")
    for filter in ("", "a.>.b", "a..b"):
        with pytest.raises(BusError, match="invalid filter"):
            await b.subscribe("s", filter)


async def test_fetch_after_unsubscribe_is_a_bus_error(make: Make) -> None:
    b = await make()
    sub = await b.subscribe("s", "q")
    await b.unsubscribe("s")
    with pytest.raises(BusError, match="subscribe again"):
        await sub.fetch(1, timeout=0.1)


# -- namespaces and the registry -------------------------------------------------------------

async def test_prefixes_are_isolated_and_purge_stays_inside_its_own(make: Make) -> None:
    a = await make()
    other = await make(f"t{uuid.uuid4().hex[:10]}")
    sa = await a.subscribe("s", "ev.>")
    so = await other.subscribe("s", "ev.>")
    await a.publish("ev.1", b"for a")
    assert [m.data for m in await sa.fetch(10, timeout=1)] == [b"for a"]
    assert await so.fetch(10, timeout=0.3) == []
    assert await a.purge() > 0
    assert await _keys(a) == []
    assert await _keys(other) != []


async def test_publisher_sees_a_subscription_made_by_a_later_instance(make: Make) -> None:
    a = await make()
    await a.subscribe("early", "ev.>")
    await a.publish("ev.1", b"routed with the old registry")  # a has cached the registry
    b = await make()
    sub = await b.subscribe("late", "ev.*")
    await a.publish("ev.2", b"new")
    got = await sub.fetch(10, timeout=1)
    assert [(m.subject, m.data) for m in got] == [("ev.2", b"new")]


async def test_publisher_does_not_recreate_a_subscription_deleted_elsewhere(make: Make) -> None:
    a = await make()
    b = await make()
    await b.subscribe("gone", "ev.>")
    await a.publish("ev.1", b"x")  # a routes to 'gone'
    await b.unsubscribe("gone")
    await a.publish("ev.2", b"y")
    assert b"%s:sub:gone" % a.prefix.encode() not in await _keys(a)


async def test_unsubscribe_removes_every_key_of_the_subscription(make: Make) -> None:
    b = await make()
    sub = await b.subscribe("s", "q")
    await b.publish("q", b"1")
    [m] = await sub.fetch(1, timeout=1)
    await m.nack(delay=60)
    await b.unsubscribe("s")
    names = [k.decode() for k in await _keys(b)]
    assert not [k for k in names if k.endswith(":s")], names


# -- delivery details ------------------------------------------------------------------------

async def test_nack_delay_longer_than_ack_wait_counts_once(make: Make) -> None:
    b = await make()
    sub = await b.subscribe("s", "jobs", ack_wait=0.3)
    await b.publish("jobs", b"j")
    [first] = await sub.fetch(1, timeout=1)
    await first.nack(delay=1.2)
    assert await sub.fetch(1, timeout=0.9) == []  # ack_wait passed, the delay did not
    [again] = await sub.fetch(1, timeout=3)
    assert again.delivered == 2
    await again.ack()


async def test_delayed_message_survives_a_new_instance(make: Make) -> None:
    b = await make()
    sub = await b.subscribe("s", "jobs")
    await b.publish("jobs", b"later", {"trace": "t1"})
    [m] = await sub.fetch(1, timeout=1)
    await m.nack(delay=0.5)
    await sub.close()
    await b.aclose()
    b2 = await make()
    sub2 = await b2.subscribe("s", "jobs")
    [again] = await sub2.fetch(1, timeout=3)
    assert (again.data, again.headers, again.delivered) == (b"later", {"trace": "t1"}, 2)
    await again.ack()


async def test_concurrent_publishes_keep_their_order(make: Make) -> None:
    b = await make()
    sub = await b.subscribe("s", "seq")
    await asyncio.gather(*(b.publish("seq", b"%d" % i) for i in range(2000)))
    got: list[bytes] = []
    while len(got) < 2000:
        batch = await sub.fetch(500, timeout=1)
        assert batch
        got += [m.data for m in batch]
        await asyncio.gather(*(m.ack() for m in batch))
    assert got == [b"%d" % i for i in range(2000)]
    assert await sub.fetch(1, timeout=0.2) == []


async def test_resubscribing_with_a_new_filter_takes_it(make: Make) -> None:
    b = await make()
    await b.subscribe("s", "old")
    sub = await b.subscribe("s", "new")
    await b.publish("old", b"o")
    await b.publish("new", b"n")
    assert [m.data for m in await sub.fetch(10, timeout=1)] == [b"n"]


# -- group commit (no Redis) ----------------------------------------------------------------

async def test_group_commit_batches_in_order_one_at_a_time() -> None:
    batches: list[list[int]] = []
    in_flight = 0

    async def flush(items: list[int]) -> None:
        nonlocal in_flight
        in_flight += 1
        assert in_flight == 1
        await asyncio.sleep(0.01)
        batches.append(items)
        in_flight -= 1

    gc: _GroupCommit[int] = _GroupCommit(flush, max_items=10)
    await asyncio.gather(*(gc.submit(i) for i in range(25)))
    assert [i for b in batches for i in b] == list(range(25))
    assert batches[0] == [0] and max(map(len, batches)) == 10


async def test_group_commit_survives_cancelled_leaders_and_waiters() -> None:
    sent: list[int] = []
    gate = asyncio.Event()

    async def flush(items: list[int]) -> None:
        await gate.wait()
        sent.extend(items)

    gc: _GroupCommit[int] = _GroupCommit(flush, max_items=100)
    leader = asyncio.create_task(gc.submit(0))
    await asyncio.sleep(0)
    waiters = [asyncio.create_task(gc.submit(i)) for i in (1, 2, 3)]
    await asyncio.sleep(0)
    waiters[1].cancel()  # item 2 is dropped before it is sent
    leader.cancel()  # item 0 was in flight: outcome unknown; leadership passes to item 1
    await asyncio.sleep(0)
    gate.set()
    await asyncio.gather(waiters[0], waiters[2])
    assert sent == [1, 3]
    assert leader.cancelled() and waiters[1].cancelled()


async def test_group_commit_reports_flush_errors_to_every_caller() -> None:
    async def flush(items: list[int]) -> None:
        raise BusError("boom")

    gc: _GroupCommit[int] = _GroupCommit(flush, max_items=100)
    results = await asyncio.gather(*(gc.submit(i) for i in range(3)), return_exceptions=True)
    assert all(isinstance(r, BusError) for r in results)
    await asyncio.wait_for(asyncio.gather(gc.submit(9), return_exceptions=True), 1)  # not stuck


async def test_group_commit_fail_pending_after_a_hand_off_does_not_hang() -> None:
    class Closing(_GroupCommit[int]):
        def _hand_off(self) -> None:
            super()._hand_off()
            self.fail_pending(BusError("closed"))  # as aclose() right after a hand-off

    gate = asyncio.Event()

    async def flush(items: list[int]) -> None:
        await gate.wait()

    gc = Closing(flush, max_items=100)
    first = asyncio.create_task(gc.submit(0))
    await asyncio.sleep(0)
    second = asyncio.create_task(gc.submit(1))
    await asyncio.sleep(0)
    gate.set()
    await first
    with pytest.raises(BusError, match="closed"):
        await asyncio.wait_for(second, 1)


async def test_scripts_are_reloaded_after_redis_forgot_them(make: Make) -> None:
    b = await make()
    sub = await b.subscribe("s", "q")
    await b._client.script_flush()  # as after a Redis restart
    await b.publish("q", b"1")
    await b._client.script_flush()
    [m] = await sub.fetch(1, timeout=1)
    await b._client.script_flush()
    await m.ack()
    assert await sub.fetch(1, timeout=0.2) == []


async def test_a_cancelled_ack_does_not_stall_later_acks() -> None:
    """Regression: an ack cancelled while it lingered made later acks wait forever."""
    import asyncio
    import uuid

    from corral.bus.backends.redis import RedisBackend

    b = RedisBackend(prefix=f"t{uuid.uuid4().hex[:8]}")
    try:
        await b.start()
    except Exception as exc:
        import os

        import pytest

        if os.environ.get("CORRAL_REQUIRE_SERVICES") == "1":
            raise
        pytest.skip(f"redis unavailable: {exc}")
    try:
        sub = await b.subscribe("s", "q")
        await b.publish("q", b"1")
        await b.publish("q", b"2")
        got: list = []
        async with asyncio.timeout(5):
            while len(got) < 2:
                got += await sub.fetch(2, timeout=0.5)
        first = asyncio.ensure_future(got[0].ack())
        await asyncio.sleep(0)
        first.cancel()
        async with asyncio.timeout(5):
            await got[1].ack()  # stalled forever before the fix
    finally:
        await b.purge()
        await b.aclose()
