"""Guarantees and security of the Bus, on every backend."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import msgspec
import pytest

from corral.bus.bus import Bus, BusConfig
from corral.bus.crypto import AgentKeys, Keyring
from corral.bus.envelope import Envelope, decode, encode
from corral.core.backoff import BackoffPolicy
from corral.core.delivery import DeliveryPolicy
from corral.errors import BusError, MessageRejected

FAST = DeliveryPolicy(max_deliver=3, backoff=BackoffPolicy(initial=0.05, max=0.1, jitter=0.0))


class Letters:
    """Dead letters kept in a list: the sink the runtime backs with its store."""

    def __init__(self) -> None:
        self.items: list[tuple[str, Envelope | None, str, int]] = []

    async def dead_letter(self, subscription: str, env: Envelope | None, data: bytes,
                          reason: str, delivered: int) -> None:
        self.items.append((subscription, env, reason, delivered))


async def run_consumer(bus: Bus, name: str, filt: str, handler: Any, **kw: Any) -> asyncio.Task[None]:
    # Create the durable subscription first, so it exists before anything is published
    # however slowly the consumer task starts (a sleep here raced on a loaded machine).
    await (await bus.backend.subscribe(name, filt, ack_wait=kw.get("ack_wait", 30.0))).close()
    task = asyncio.ensure_future(bus.consume(name, filt, handler, **kw))
    await asyncio.sleep(0.05)  # let it start fetching
    return task


async def until(cond: Any, timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not cond():
            await asyncio.sleep(0.02)


async def stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_at_least_once_retries_then_dead_letters(make) -> None:
    letters = Letters()
    bus = Bus(await make(), BusConfig(policy=FAST), dead_letters=letters)
    calls: dict[str, int] = {"flaky": 0, "poison": 0}

    async def handler(env: Envelope) -> None:
        calls[env.payload] += 1
        if env.payload == "poison" or calls["flaky"] < 3:
            raise ValueError(f"cannot handle {env.payload}")

    task = await run_consumer(bus, "w", "jobs.*", handler, ack_wait=5.0)
    await bus.publish("client", "jobs.a", "flaky", guarantee="at-least-once")
    await bus.publish("client", "jobs.a", "poison", guarantee="at-least-once")
    await until(lambda: calls["flaky"] == 3 and letters.items)
    await stop(task)
    assert bus.delivered["w"] == 1
    (sub, env, reason, delivered), = letters.items
    assert sub == "w" and env is not None and env.payload == "poison"
    assert "maxDeliver=3" in reason and "ValueError" in reason and delivered == 3


async def test_at_most_once_never_repeats(make) -> None:
    bus = Bus(await make(), dead_letters=Letters())
    seen: list[Any] = []

    async def handler(env: Envelope) -> None:
        seen.append(env.payload)
        raise RuntimeError("lost")

    task = await run_consumer(bus, "w", "t", handler)
    await bus.publish("client", "t", 1)
    await until(lambda: seen == [1])
    await asyncio.sleep(0.5)
    await stop(task)
    assert seen == [1]


async def test_ttl_expired_goes_to_dlq_with_reason(make) -> None:
    letters = Letters()
    bus = Bus(await make(), dead_letters=letters)
    b = bus.backend
    sub = await b.subscribe("late", "t")
    await sub.close()
    await bus.publish("client", "t", "stale", guarantee="at-least-once", ttl=0.05)
    await asyncio.sleep(0.2)
    got: list[Any] = []

    async def handler(env: Envelope) -> None:
        got.append(env)

    task = await run_consumer(bus, "late", "t", handler)
    await until(lambda: bool(letters.items))
    await stop(task)
    assert got == [] and letters.items[0][2] == "ttl expired"


async def test_effectively_once_drops_repeats(make) -> None:
    bus = Bus(await make(), dead_letters=Letters())
    seen: list[Any] = []

    async def handler(env: Envelope) -> None:
        seen.append(env.payload)

    task = await run_consumer(bus, "w", "pay", handler)
    for _ in range(3):
        await bus.publish("client", "pay", "charge 10", guarantee="effectively-once",
                          idempotency_key="order-7")
    await bus.publish("client", "pay", "charge 20", guarantee="effectively-once",
                      idempotency_key="order-8")
    await until(lambda: len(seen) == 2)
    await asyncio.sleep(0.3)
    await stop(task)
    assert seen == ["charge 10", "charge 20"] and bus.rejected["duplicate"] == 2


async def test_encrypted_subject_is_ciphertext_on_the_wire(make, tmp_path: Path) -> None:
    secret = "the launch code is 0000-1234-SECRET"
    bus = Bus(await make(), BusConfig(encrypted=["vault.>"]), dead_letters=Letters(),
              keyring=Keyring(tmp_path / "keys.json"))
    raw = await bus.backend.subscribe("raw", "vault.>")
    got: list[Any] = []

    async def handler(env: Envelope) -> None:
        got.append(env.payload)

    task = await run_consumer(bus, "reader", "vault.>", handler)
    await bus.publish("client", "vault.codes", {"code": secret})
    (wire,) = await raw.fetch(1, timeout=5)
    assert secret.encode() not in wire.data  # on the wire and at rest: ciphertext
    env = decode(wire.data)
    assert env.encrypted and secret.encode() not in env.payload
    await until(lambda: got == [{"code": secret}])
    await stop(task)


async def test_tampered_ciphertext_is_rejected_and_counted(make, tmp_path: Path) -> None:
    letters = Letters()
    keyring = Keyring(tmp_path / "keys.json")
    bus = Bus(await make(), BusConfig(encrypted=["vault.>"]), dead_letters=letters,
              keyring=keyring)
    raw = await bus.backend.subscribe("raw", "vault.>")
    await bus.publish("client", "vault.a", "hello")
    (wire,) = await raw.fetch(1, timeout=5)
    env = decode(wire.data)
    flipped = bytearray(env.payload)
    flipped[-1] ^= 1
    forged = msgspec.structs.replace(env, payload=bytes(flipped))
    got: list[Any] = []

    async def handler(e: Envelope) -> None:
        got.append(e)

    task = await run_consumer(bus, "reader", "vault.>", handler)
    await bus.backend.publish("vault.a", encode(forged))
    await until(lambda: bool(letters.items))
    await stop(task)
    assert got == [] and bus.rejected["decrypt_failed"] == 1
    assert "rejected" in letters.items[0][2]


async def test_signatures_detect_forgery_and_spoofing(make, tmp_path: Path) -> None:
    letters = Letters()
    keys = AgentKeys(tmp_path / "agent-keys")
    bus = Bus(await make(), dead_letters=letters, signer=keys)
    keys.key_for("alice"), keys.key_for("bob")
    raw = await bus.backend.subscribe("raw", "chat")
    got: list[Any] = []

    async def handler(env: Envelope) -> None:
        got.append((env.sender, env.payload))

    task = await run_consumer(bus, "r", "chat", handler, require_signature=True)
    await bus.publish("alice", "chat", "hi", sign=True)
    (wire,) = await raw.fetch(1, timeout=5)
    env = decode(wire.data)
    await bus.backend.publish("chat", encode(msgspec.structs.replace(env, payload="pay me")))
    await bus.backend.publish("chat", encode(msgspec.structs.replace(env, sender="bob")))
    await bus.publish("mallory", "chat", "unsigned")  # not signed: refused where required
    await until(lambda: len(letters.items) == 3)
    await stop(task)
    assert got == [("alice", "hi")]
    assert bus.rejected["bad_signature"] + bus.rejected["unknown_key"] == 2
    assert bus.rejected["unsigned"] == 1


async def test_oversize_rate_limit_and_bad_subject(make) -> None:
    bus = Bus(await make(), BusConfig(max_message_size=1024, rate=5, burst=3),
              dead_letters=Letters())
    with pytest.raises(MessageRejected, match="limit") as exc:
        await bus.publish("a", "t", "x" * 5000)
    assert exc.value.reason == "too_large"
    accepted = 0
    with pytest.raises(MessageRejected) as flood:
        for _ in range(20):
            await bus.publish("a", "t", "m")
            accepted += 1
    assert flood.value.reason == "rate_limited" and accepted <= 4
    await bus.publish("b", "t", "other senders are not affected")
    with pytest.raises(BusError, match="subject"):
        await bus.publish("a", "bad..subject", 1)
    assert bus.rejected["too_large"] == 1 and bus.rejected["rate_limited"] == 1


async def test_effectively_once_still_retries_a_failed_attempt(make) -> None:
    bus = Bus(await make(), BusConfig(policy=FAST), dead_letters=Letters())
    attempts: list[int] = []

    async def handler(env: Envelope) -> None:
        attempts.append(1)
        if len(attempts) == 1:
            raise RuntimeError("transient")

    task = await run_consumer(bus, "w", "pay", handler)
    await bus.publish("client", "pay", "charge", guarantee="effectively-once",
                      idempotency_key="order-9")
    await until(lambda: len(attempts) == 2)
    await bus.publish("client", "pay", "charge", guarantee="effectively-once",
                      idempotency_key="order-9")  # a true repeat, after success: dropped
    await asyncio.sleep(0.5)
    await stop(task)
    assert len(attempts) == 2 and bus.delivered["w"] == 1 and bus.rejected["duplicate"] == 1


async def test_subscription_guarantee_overrides_the_message(make) -> None:
    """An at-least-once subscription retries an at-most-once message; an at-most-once one
    never retries an at-least-once message."""
    bus = Bus(await make(), BusConfig(policy=FAST), dead_letters=Letters())
    sure: list[Any] = []
    loose: list[Any] = []

    async def fails_once(env: Envelope) -> None:
        sure.append(env.payload)
        if len(sure) == 1:
            raise RuntimeError("transient")

    async def always_fails(env: Envelope) -> None:
        loose.append(env.payload)
        raise RuntimeError("lost")

    t1 = await run_consumer(bus, "sure", "ev.a", fails_once, guarantee="at-least-once")
    t2 = await run_consumer(bus, "loose", "ev.b", always_fails, guarantee="at-most-once")
    await bus.publish("client", "ev.a", "x")  # at-most-once by the message
    await bus.publish("client", "ev.b", "y", guarantee="at-least-once")
    await until(lambda: len(sure) == 2 and len(loose) == 1)
    await asyncio.sleep(0.4)
    await stop(t1)
    await stop(t2)
    assert sure == ["x", "x"] and loose == ["y"]
    assert bus.delivered["sure"] == 1


async def test_effectively_once_subscription_dedups_by_message_id(make) -> None:
    """Without an idempotency key, the message id is the key: a re-published copy of the
    same envelope (a redelivery by another path) is dropped."""
    backend = await make()
    bus = Bus(backend, dead_letters=Letters())
    seen: list[Any] = []

    async def handler(env: Envelope) -> None:
        seen.append(env.payload)

    task = await run_consumer(bus, "w", "pay", handler, guarantee="effectively-once")
    env = await bus.publish("client", "pay", "charge")
    await until(lambda: seen == ["charge"])
    await backend.publish("pay", encode(env))  # the very same message again
    await bus.publish("client", "pay", "charge")  # a new message with equal payload
    await until(lambda: len(seen) == 2)
    await asyncio.sleep(0.3)
    await stop(task)
    assert seen == ["charge", "charge"] and bus.rejected["duplicate"] == 1


async def test_acking_subscription_makes_publishes_durable(make) -> None:
    """A publish that asked for at-most-once still survives a restart of the backend when
    an at-least-once subscription of this bus matches it."""
    backend = await make()
    bus = Bus(backend, dead_letters=Letters())
    sub = await backend.subscribe("w", "orders.*")
    await sub.close()
    bus.require_durable("orders.*")
    await bus.publish("client", "orders.new", "keep me")
    await bus.publish("client", "other", "may go")
    await backend.aclose()  # the process goes away; only durable messages remain

    bus2 = Bus(await make(), dead_letters=Letters())
    got: list[Any] = []

    async def handler(env: Envelope) -> None:
        got.append(env.payload)

    task = await run_consumer(bus2, "w", "orders.*", handler, guarantee="at-least-once")
    await until(lambda: got == ["keep me"])
    await stop(task)
