"""Bus: delivery guarantees and message security, once, over any BusBackend.

Publishing validates the subject, counts the sender against its rate limit, refuses
oversize messages, encrypts payloads of encrypted subjects (AES-256-GCM, bound to sender,
subject and id), and signs messages that leave this node. Consuming runs one loop per
subscription that checks, in order: decodable, TTL, signature, decryption, duplicate
(effectively-once), then hands the envelope to the handler and settles the delivery:

- at-most-once: acknowledged before the handler runs (a crash loses it, never repeats it);
- at-least-once: acknowledged after the handler returns; a failure or a lost consumer
  redelivers with backoff, and after ``max_deliver`` deliveries it is dead-lettered;
- effectively-once: at-least-once plus an idempotency-key window that drops repeats (the
  key is the message's idempotency key, or its id: a redelivered copy is a repeat too).

A subscription may set its own guarantee, which overrides each message's. Publishing on a
subject that an at-least-once (or effectively-once) subscription of this bus matches is
durable whatever the message asked for, so that subscriber cannot lose it to a crash.

Every refusal is counted by reason, and every dead letter records why.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import msgspec

from corral.bus.backend import BusBackend, Incoming
from corral.bus.envelope import Envelope, Guarantee, Kind, decode, encode
from corral.core.dedup import DedupWindow
from corral.core.delivery import DeadLetter, DeliveryPolicy, Nack, Redeliver, decide, expired
from corral.core.ratelimit import RateLimiter
from corral.core.subjects import SubjectTrie, validate_filter, validate_subject
from corral.errors import BusError, CorralError, MessageRejected

__all__ = ["Bus", "BusConfig", "DeadLetterSink", "Handler"]

Handler = Callable[[Envelope], Awaitable[None]]
_PAYLOAD = msgspec.msgpack.Encoder()
_UNPAYLOAD = msgspec.msgpack.Decoder()


class DeadLetterSink(Protocol):
    """Where dead letters go (the runtime's store); ``corral dlq`` reads them back."""

    async def dead_letter(self, subscription: str, env: Envelope | None, data: bytes,
                          reason: str, delivered: int) -> None:
        """Record one dead letter durably."""


@dataclass
class BusConfig:
    """Limits and security settings of a bus."""

    max_message_size: int = 1 << 20
    #: Messages per second per sender, and the burst allowed above it (0 = no limit).
    rate: float = 0.0
    burst: int = 100
    #: Subjects whose payloads are encrypted (filters, NATS-style).
    encrypted: list[str] = field(default_factory=list)
    dedup_window: float = 600.0
    dedup_keys: int = 100_000
    policy: DeliveryPolicy = field(default_factory=DeliveryPolicy)


class Bus:
    """Publish and consume with guarantees over one backend."""

    def __init__(self, backend: BusBackend, config: BusConfig | None = None, *,
                 dead_letters: DeadLetterSink | None = None, keyring: Any = None,
                 signer: Any = None, rng: random.Random | None = None) -> None:
        self.backend = backend
        self.config = cfg = config or BusConfig()
        self.dead_letters = dead_letters
        self.keyring = keyring  # corral.bus.crypto.Keyring, for encrypted subjects
        self.signer = signer  # corral.bus.crypto.AgentKeys, for messages leaving the node
        self.rng = rng or random.Random()
        self.rejected: Counter[str] = Counter()
        self.delivered: Counter[str] = Counter()
        self._limits = RateLimiter(cfg.rate, cfg.burst, 100_000) if cfg.rate > 0 else None
        self._dedup = DedupWindow(cfg.dedup_window, cfg.dedup_keys)
        #: id(bytes) -> (those bytes, their Envelope): the local backend hands one bytes
        #: object to every subscription, so a fan-out to 100 decodes once, not 100 times.
        self._decoded: dict[int, tuple[bytes, Envelope]] = {}
        self._encrypted: SubjectTrie[bool] = SubjectTrie()
        #: Agents with `encrypt: true`: whatever they publish is sealed.
        self._sealed_senders: set[str] = set()
        #: Filters of subscriptions that need every matching publish to be durable.
        self._durable: SubjectTrie[bool] = SubjectTrie()
        for f in cfg.encrypted:
            validate_filter(f)
            self._encrypted.add(f, True)
        if cfg.encrypted and keyring is None:
            raise BusError("encrypted subjects need a keyring",
                           hint="pass keyring=Keyring(path) or drop `encrypt: true`")

    def encrypt(self, filter: str) -> None:
        """From now on, encrypt payloads published on subjects matching ``filter``."""
        validate_filter(filter)
        if self.keyring is None:
            raise BusError(f"subjects {filter!r} are marked encrypt, but the bus has no keyring",
                           hint="pass keyring=Keyring(path)")
        self._encrypted.add(filter, True)

    def encrypt_sender(self, sender: str) -> None:
        """From now on, encrypt every payload ``sender`` publishes, whatever the subject."""
        if self.keyring is None:
            raise BusError(f"agent {sender!r} is marked encrypt, but the bus has no keyring",
                           hint="pass keyring=Keyring(path)")
        self._sealed_senders.add(sender)

    def require_durable(self, filter: str) -> None:
        """From now on, store every publish matching ``filter`` durably (an acking subscriber)."""
        validate_filter(filter)
        self._durable.add(filter, True)

    # ------------------------------------------------------------------ publish

    async def publish(self, sender: str, subject: str, payload: Any = None, *,
                      kind: Kind = "publish", guarantee: Guarantee = "at-most-once",
                      ttl: float | None = None, idempotency_key: str | None = None,
                      reply_to: str | None = None, correlation_id: str | None = None,
                      headers: dict[str, str] | None = None, sign: bool = False) -> Envelope:
        """Publish one message as ``sender`` (stamped by the caller from its channel)."""
        try:
            validate_subject(subject)
        except ValueError as exc:
            raise BusError(str(exc), hint="subjects are dot-separated tokens like news.eu") from exc
        now = time.time()
        env = Envelope.new(subject, sender, payload, kind=kind, guarantee=guarantee, ttl=ttl,
                           idempotency_key=idempotency_key, reply_to=reply_to,
                           correlation_id=correlation_id, headers=headers or {})
        if self._encrypted.match(subject) or sender in self._sealed_senders:
            sealed = self.keyring.encrypt(_PAYLOAD.encode(payload), _aad(env))
            env = msgspec.structs.replace(env, payload=sealed.to_bytes(), encrypted=True)
        if sign:
            if self.signer is None:
                raise BusError("signing needs agent keys", hint="pass signer=AgentKeys(dir)")
            key_id, sig = self.signer.sign(sender, _canonical(env))
            env = msgspec.structs.replace(env, signer_key_id=key_id, signature=sig)
        data = encode(env)
        if len(data) > self.config.max_message_size:
            self.rejected["too_large"] += 1
            raise MessageRejected(
                f"message of {len(data)} bytes is over the {self.config.max_message_size}-byte limit",
                reason="too_large", hint="send a reference to the data instead of the data")
        if self._limits is not None and not self._limits.take(sender, now):
            self.rejected["rate_limited"] += 1
            raise MessageRejected(f"{sender!r} is over its rate limit of {self.config.rate:g}/s",
                                  reason="rate_limited", hint="slow down or raise the limit")
        durable = guarantee != "at-most-once" or bool(self._durable.match(subject))
        await self.backend.publish(subject, data, durable=durable)
        return env

    # ------------------------------------------------------------------ consume

    async def consume(self, name: str, filter: str, handler: Handler, *,
                      ack_wait: float = 30.0, batch: int = 64,
                      require_signature: bool = False,
                      guarantee: Guarantee | None = None) -> None:
        """Deliver matching messages to ``handler`` until cancelled (run it in a TaskGroup).

        ``guarantee``, when set, overrides each message's own for this subscription.
        """
        validate_filter(filter)
        if guarantee is not None and guarantee != "at-most-once":
            self.require_durable(filter)
        sub = await self.backend.subscribe(name, filter, ack_wait=ack_wait)
        try:
            while True:
                handled: list[Incoming] = []
                for inc in await sub.fetch(batch, timeout=1.0):
                    await self._one(name, inc, handler, require_signature, guarantee, handled)
                await _ack_all(handled)
        finally:
            await sub.close()

    async def _one(self, name: str, inc: Incoming, handler: Handler, require_sig: bool,
                   chosen: Guarantee | None = None, handled: list[Incoming] | None = None
                   ) -> None:
        """Check and hand over one delivery; a handled one is acked now, or appended to
        ``handled`` for the caller to ack with the rest of its batch (one round trip on a
        networked backend instead of one per message: a crash before that redelivers them,
        as at-least-once allows)."""
        data = inc.data
        hit = self._decoded.get(id(data))
        if hit is not None and hit[0] is data:  # the entry keeps `data` alive: ids can't repeat
            env = hit[1]
        else:
            try:
                env = decode(data)
            except msgspec.DecodeError:
                await self._dead(name, inc, None, "undecodable message")
                return
            if len(data) <= _DECODED_SIZE:  # bounded: at most 256 x 16 KiB held
                if len(self._decoded) >= _DECODED_MAX:
                    del self._decoded[next(iter(self._decoded))]  # the oldest
                self._decoded[id(data)] = (data, env)
        now = time.time()
        if expired(now, env.expires_at):
            await self._dead(name, inc, env, "ttl expired")
            return
        limit = self.config.policy.max_deliver
        guarantee = chosen or env.guarantee
        if guarantee != "at-most-once" and inc.delivered > limit:
            # Its consumers kept dying (or timing out) before they could nack it.
            await self._dead(name, inc, env, f"delivered {inc.delivered - 1} times "
                                             f"(maxDeliver={limit}) without an ack")
            return
        try:
            env = self._open(env, require_sig)
        except MessageRejected as exc:
            self.rejected[exc.reason] += 1
            await self._dead(name, inc, env, f"rejected: {exc.message}")
            return
        once = guarantee == "effectively-once"
        key = f"{name}\0{env.idempotency_key or env.id}" if once else ""
        if once and self._dedup.contains(key, now):
            self.rejected["duplicate"] += 1
            await inc.ack()
            return
        if guarantee == "at-most-once":
            await inc.ack()
            await self._run(name, handler, env)
            return
        try:
            await handler(env)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the handler's failure decides redelivery, not the loop
            decision = decide(Nack(f"{type(exc).__name__}: {exc}"), delivered=inc.delivered,
                              now=time.time(), expires_at=env.expires_at,
                              policy=self.config.policy, rng=self.rng)
            if isinstance(decision, Redeliver):
                await inc.nack(decision.delay)
            elif isinstance(decision, DeadLetter):
                await self._dead(name, inc, env, decision.reason)
            return
        if once:
            # Recorded only once handled: a failed attempt must still be retried.
            self._dedup.seen(key, time.time())
        self.delivered[name] += 1
        if handled is None:
            await inc.ack()
        else:
            handled.append(inc)

    async def _run(self, name: str, handler: Handler, env: Envelope) -> None:
        try:
            await handler(env)
        except asyncio.CancelledError:
            raise
        except Exception:
            pass  # at-most-once: already acknowledged; the handler's error is its own
        else:
            self.delivered[name] += 1

    def _open(self, env: Envelope, require_sig: bool) -> Envelope:
        if env.signature is not None:
            if self.signer is None:
                raise MessageRejected("signed message but no keys to verify it", reason="unknown_key")
            self.signer.verify(env.sender, _canonical(env), env.signer_key_id, env.signature)
        elif require_sig:
            raise MessageRejected(f"unsigned message from {env.sender!r}", reason="unsigned")
        if env.encrypted:
            if self.keyring is None:
                raise MessageRejected("encrypted message but no keyring", reason="unknown_key")
            from corral.bus.crypto import Sealed

            plain = self.keyring.decrypt(Sealed.from_bytes(env.payload), _aad(env))
            env = msgspec.structs.replace(env, payload=_UNPAYLOAD.decode(plain), encrypted=False)
        return env

    async def _dead(self, name: str, inc: Incoming, env: Envelope | None, reason: str) -> None:
        if self.dead_letters is None:
            raise CorralError(f"message for {name!r} must be dead-lettered ({reason}) but the bus "
                              "has no dead-letter sink", hint="give the Bus a DeadLetterSink")
        # Record first, then drop: a crash in between redelivers rather than loses it.
        await self.dead_letters.dead_letter(name, env, inc.data, reason, inc.delivered)
        await inc.term()


_DECODED_MAX = 256
_DECODED_SIZE = 16 * 1024


async def _ack_all(handled: list[Incoming]) -> None:
    if len(handled) == 1:
        await handled[0].ack()
    elif handled:
        await asyncio.gather(*(inc.ack() for inc in handled))


def _aad(env: Envelope) -> bytes:
    # Binds a ciphertext to its envelope: replayed under another sender/subject/id it fails.
    from corral.bus.crypto import envelope_aad

    return envelope_aad(env.sender, env.subject, env.id)


def _canonical(env: Envelope) -> bytes:
    from corral.bus.crypto import canonical

    return canonical(env.signed_fields())
