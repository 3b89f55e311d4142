"""NATS specifics of NatsBackend; the shared contract is in test_contract.py.

Needs NATS with JetStream at 127.0.0.1:4222 (shared/services.sh): without it the server tests
skip with the reason, and fail instead when CORRAL_REQUIRE_SERVICES=1. Every stream a test
creates is deleted at teardown.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from corral.bus.backends.nats import NatsBackend, consumer_name
from corral.errors import BackendUnavailable, BusError
from tests.conftest import REQUIRE_SERVICES

URL = "nats://127.0.0.1:4222"
ROOT = Path(__file__).resolve().parents[2]

Make = Callable[..., Awaitable[NatsBackend]]


def _free_port() -> int:
    """A port nothing listens on (bound, then closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _nats_up() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 4222), timeout=0.5):
            return True
    except OSError:
        return False


@pytest.fixture
async def make() -> AsyncIterator[Make]:
    """Started backends (a fresh prefix each unless given); streams purged, all closed at the end."""
    if not _nats_up():
        msg = "nats is not running on 127.0.0.1:4222 (start it: shared/services.sh)"
        if REQUIRE_SERVICES:
            pytest.fail(msg + "; required because CORRAL_REQUIRE_SERVICES=1")
        pytest.skip(msg)
    opened: list[NatsBackend] = []

    async def started(prefix: str | None = None, **kw: Any) -> NatsBackend:
        b = NatsBackend(URL, prefix or f"t{uuid.uuid4().hex[:10]}", **kw)
        await b.start()
        opened.append(b)
        return b

    yield started
    for b in opened:
        await b.aclose()
    for prefix in {b.prefix for b in opened}:
        cleaner = NatsBackend(URL, prefix)
        await cleaner.start()
        await cleaner.purge()
        await cleaner.aclose()


# -- no server needed ------------------------------------------------------------------------


async def test_unreachable_url_raises_backend_unavailable_with_what_to_do() -> None:
    url = f"nats://127.0.0.1:{_free_port()}"
    b = NatsBackend(url, "t", connect_timeout=0.5)
    started = time.monotonic()
    with pytest.raises(BackendUnavailable) as info:
        await b.start()
    assert time.monotonic() - started < 3
    text = str(info.value)
    assert f"start NATS with JetStream at {url} (shared/services.sh)" in text
    assert "ConnectionRefusedError" in text  # the cause is named, and chained
    assert isinstance(info.value.__cause__, OSError)


async def test_use_before_start_says_to_start() -> None:
    b = NatsBackend(URL, "t")
    with pytest.raises(BusError, match="not started"):
        await b.publish("a", b"x")
    with pytest.raises(BusError, match="not started"):
        await b.subscribe("s", "a")


def test_consumer_names_are_legal_injective_and_readable() -> None:
    legal = re.compile(r"[A-Za-z0-9_-]+")
    names = ["billing", "Billing-2", "orders.eu", "orders_eu", "orders_2Eeu", "a b", "a*b",
             "a>b", "a/b", "a\\b", "é", "日本", "a\tb", "", "x" * 500, "x" * 499 + "y"]
    names.remove("")
    got = [consumer_name(n) for n in names]
    assert len(set(got)) == len(names)  # no two names share a consumer
    for n, c in zip(names, got, strict=True):
        assert legal.fullmatch(c), (n, c)
        assert len(c) <= 128
    assert consumer_name("billing") == "billing"  # legal names are kept
    assert consumer_name("orders.eu") == "orders_2Eeu"
    assert consumer_name("orders_eu") == "orders_5Feu"
    assert consumer_name("é") == "_C3_A9"
    assert "__" in consumer_name("x" * 500) and "__" not in consumer_name("a.b_c d")
    with pytest.raises(BusError):
        consumer_name("")


def test_prefix_must_be_a_plain_subject() -> None:
    for bad in ("", "a b", "a.*", "a.>", "a..b"):
        with pytest.raises(BusError):
            NatsBackend(URL, bad)
    assert NatsBackend(URL, "corral.dev").stream == "corral_2Edev"


async def test_missing_nats_py_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    for mod in ("nats", "nats.aio", "nats.aio.client"):
        monkeypatch.setitem(sys.modules, mod, None)
    with pytest.raises(BackendUnavailable, match=re.escape("pip install 'corral[nats]'")):
        await NatsBackend(URL, "t").start()


def test_module_imports_without_nats_py() -> None:
    code = ("import sys; sys.modules['nats'] = None; "
            "import corral.bus.backends.nats as m; m.NatsBackend(); print('ok')")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert out.stdout.strip() == "ok", out.stderr


async def test_server_without_jetstream_says_to_enable_it() -> None:
    binary = shutil.which("nats-server") or "/usr/sbin/nats-server"
    if not os.access(binary, os.X_OK):
        pytest.skip("nats-server is not installed")
    port = _free_port()
    proc = subprocess.Popen([binary, "-a", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        async with asyncio.timeout(5):
            while True:
                try:
                    with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                        break
                except OSError:
                    await asyncio.sleep(0.05)
        with pytest.raises(BackendUnavailable, match="JetStream enabled"):
            await NatsBackend(f"nats://127.0.0.1:{port}", "t").start()
    finally:
        proc.terminate()
        proc.wait(timeout=10)


# -- against the server ----------------------------------------------------------------------


async def test_prefixes_are_isolated(make: Make) -> None:
    a = await make()
    b = await make()
    sa = await a.subscribe("same", ">")
    sb = await b.subscribe("same", ">")  # same name, other prefix: another consumer
    await a.publish("news.eu", b"for a")
    got = await sa.fetch(10, timeout=2)
    assert [(m.subject, m.data) for m in got] == [("news.eu", b"for a")]
    await got[0].ack()
    assert await sb.fetch(10, timeout=0.5) == []
    await b.publish("news.eu", b"for b")
    assert [m.data for m in await sb.fetch(10, timeout=2)] == [b"for b"]
    assert await sa.fetch(10, timeout=0.5) == []


async def test_overlapping_prefix_is_refused_with_advice(make: Make) -> None:
    outer = await make()
    with pytest.raises(BusError, match="another prefix"):
        await make(f"{outer.prefix}.inner")


async def test_names_that_need_sanitizing_work_end_to_end(make: Make) -> None:
    b = await make()
    subs = {n: await b.subscribe(n, "jobs.*") for n in ("agent.inbox", "agent_inbox", "a b*>/é")}
    await b.publish("jobs.x", b"j")
    for sub in subs.values():
        got = await sub.fetch(5, timeout=2)
        assert [m.data for m in got] == [b"j"]  # each name is its own subscription
        await got[0].ack()
    await b.unsubscribe("a b*>/é")
    assert await b.subscribe("a b*>/é", "jobs.*") is not None


async def test_fetch_returns_as_soon_as_a_message_arrives(make: Make) -> None:
    b = await make()
    sub = await b.subscribe("s", "q")
    started = time.monotonic()
    assert await sub.fetch(10, timeout=0.3) == []
    assert 0.25 < time.monotonic() - started < 1.0

    async def later() -> None:
        await asyncio.sleep(0.2)
        await b.publish("q", b"late")

    task = asyncio.ensure_future(later())
    started = time.monotonic()
    got = await sub.fetch(100, timeout=5)  # waits for the first, not for 100
    assert [m.data for m in got] == [b"late"]
    assert time.monotonic() - started < 1.5
    await task


async def test_a_new_filter_or_ack_wait_updates_the_subscription(make: Make) -> None:
    b = await make()
    await b.subscribe("s", "a.*", ack_wait=5)
    sub = await b.subscribe("s", "b.*", ack_wait=1)
    await b.publish("a.x", b"old filter")
    await b.publish("b.x", b"new filter")
    first = await sub.fetch(10, timeout=2)
    assert [m.data for m in first] == [b"new filter"]
    again = await sub.fetch(10, timeout=4)  # ack_wait is now 1s
    assert [(m.data, m.delivered) for m in again] == [(b"new filter", 2)]
    await again[0].ack()


async def test_non_durable_publish_is_delivered_too(make: Make) -> None:
    b = await make()
    sub = await b.subscribe("s", "fast.>")
    for i in range(20):
        await b.publish("fast.x", str(i).encode(), durable=False)
    got: list[bytes] = []
    async with asyncio.timeout(5):
        while len(got) < 20:
            for m in await sub.fetch(20, timeout=0.5):
                got.append(m.data)
                await m.ack()
    assert got == [str(i).encode() for i in range(20)]


async def test_bad_subjects_headers_and_sizes_are_bus_errors(make: Make) -> None:
    b = await make()
    for subject in ("", "a b", "a.*", "a.>", "a..b", "a\r\nPUB x 1"):
        with pytest.raises(BusError):
            await b.publish(subject, b"x")
    for filt in ("", "a.>.b", "a*", "a b"):
        with pytest.raises(BusError):
            await b.subscribe("s", filt)
    with pytest.raises(BusError):
        await b.publish("a", b"x", {"bad key": "v"})
    limit = b._max_payload
    with pytest.raises(BusError, match="at most"):
        await b.publish("a", b"x" * (limit - 4), {"k": "v"})  # payload fits, headers do not
    with pytest.raises(BusError, match="at most"):
        await b.publish("a", b"x" * (limit + 1))
    await b.publish("a", b"still connected")


async def test_unsubscribe_elsewhere_ends_a_waiting_fetch(make: Make) -> None:
    b = await make()
    other = await make(b.prefix)
    sub = await b.subscribe("s", "q")
    fetch = asyncio.ensure_future(sub.fetch(10, timeout=5))
    await asyncio.sleep(0.3)
    await other.unsubscribe("s")
    with pytest.raises(BusError, match="deleted"):
        await fetch


async def test_close_hands_back_messages_it_never_returned(make: Make) -> None:
    b = await make()
    sub = await b.subscribe("s", "q", ack_wait=30)
    await b.publish("q", b"m")
    # A delivery that arrives after its fetch gave up waits in the handle; make one with a
    # pull request that no fetch waits for.
    assert b._nc is not None
    await b._nc.publish(sub._next, b'{"batch": 1, "no_wait": true}', reply=f"{sub._inbox}.x")
    async with asyncio.timeout(2):
        while not sub._ready:
            await asyncio.sleep(0.01)
    await sub.close()
    with pytest.raises(BusError, match="closed"):
        await sub.fetch(1, timeout=0.1)
    again = await b.subscribe("s", "q", ack_wait=30)
    got = await again.fetch(1, timeout=2)  # back at once, not after ack_wait
    assert [(m.data, m.delivered) for m in got] == [(b"m", 2)]


async def test_purge_deletes_everything_and_start_recreates(make: Make) -> None:
    b = await make()
    await b.subscribe("s", "q")
    await b.publish("q", b"x")
    await b.purge()
    with pytest.raises(BackendUnavailable, match="deleted"):
        await b.publish("q", b"x")  # no stream captures the subject any more
    await b.aclose()
    b2 = await make(b.prefix)
    sub = await b2.subscribe("s", "q")
    await b2.publish("q", b"y")
    assert [m.data for m in await sub.fetch(5, timeout=2)] == [b"y"]


async def test_aclose_flushes_acks(make: Make) -> None:
    b = await make()
    sub = await b.subscribe("s", "q", ack_wait=1)
    for i in range(50):
        await b.publish("q", str(i).encode())
    got: list[Any] = []
    async with asyncio.timeout(5):
        while len(got) < 50:
            got += await sub.fetch(50, timeout=0.5)
    for m in got:
        await m.ack()
    await b.aclose()  # acks are fire-and-forget; closing must not lose them
    b2 = await make(b.prefix)
    again = await b2.subscribe("s", "q", ack_wait=1)
    assert await again.fetch(50, timeout=2.0) == []


async def test_aclose_waits_for_publishes_in_flight(make: Make) -> None:
    b = await make()
    sub = await b.subscribe("s", "q")
    sends = [asyncio.ensure_future(b.publish("q", str(i).encode())) for i in range(200)]
    await asyncio.sleep(0)  # they are on the wire, waiting for their PubAcks
    await b.aclose()
    await asyncio.gather(*sends)  # every one was acknowledged, none failed
    await sub.close()
    b2 = await make(b.prefix)
    again = await b2.subscribe("s", "q")
    got: list[bytes] = []
    async with asyncio.timeout(5):
        while len(got) < 200:
            for m in await again.fetch(200, timeout=0.5):
                got.append(m.data)
                await m.ack()
    assert got == [str(i).encode() for i in range(200)]
