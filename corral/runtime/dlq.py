"""The dead-letter queue: messages the bus gave up on, kept in the store until replayed or purged.

``DeadLetters`` is the Bus's ``DeadLetterSink``. ``dead_letter`` returns only once the record
is committed: the Bus terms the message after it returns, so a crash in between leaves the
message in the backend (it is delivered again) instead of losing it.

``replay`` republishes the ORIGINAL bytes (envelope id, sender, signature, seal, TTL and
idempotency key untouched) to the original subject, through the callable it is given (the
runtime passes its backend's ``publish``), and deletes each record only after its republish
returned. What that implies:

- every subscription matching the subject gets the message again, not only the one that
  dead-lettered it;
- a message dead-lettered because its TTL ran out is still expired and comes straight back;
- an effectively-once message within the dedup window is dropped as a duplicate;
- a crash between a republish and the commit of its delete replays it again next time
  (at-least-once);
- records that could not be decoded have no subject and are never replayed (purge them).

``corral dlq ls|show|replay|purge`` reach these methods through the control socket.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import msgspec

from corral.bus.envelope import Envelope, decode
from corral.errors import BusError, CorralError
from corral.store.records import DeadLetterRecord
from corral.store.sqlite import SQLiteStore

__all__ = ["DeadLetters", "Publish", "reason_kind"]

#: Republishes raw bytes to a subject (the runtime passes its backend's ``publish``).
Publish = Callable[[str, bytes], Awaitable[None]]

_PAGE = 200  # records read at a time while replaying a whole subscription
_PREVIEW = 500  # characters of payload shown by show()


def reason_kind(reason: str) -> str:
    """The family of a dead-letter reason, for counters (reasons themselves carry details)."""
    if reason == "ttl expired":
        return "ttl_expired"
    if reason.startswith("ttl would expire"):
        return "ttl_would_expire"
    if reason.startswith("delivered "):
        return "max_deliver"
    if reason.startswith("rejected"):
        return "rejected"
    if reason.startswith("undecodable"):
        return "undecodable"
    return "other"


class DeadLetters:
    """The runtime's DeadLetterSink, and what ``corral dlq`` does with what it holds."""

    def __init__(self, store: SQLiteStore) -> None:
        self.store = store
        #: Messages dead-lettered since start, by reason_kind().
        self.by_reason: Counter[str] = Counter()
        self.replayed = 0
        self.purged = 0
        # One replay or purge at a time: two concurrent replays would publish twice.
        self._lock = asyncio.Lock()

    # ------------------------------------------------------------------ the sink

    async def dead_letter(self, subscription: str, env: Envelope | None, data: bytes,
                          reason: str, delivered: int) -> None:
        """Record one dead letter and wait until it is committed."""
        self.store.put_dead_letter(
            subscription, data, reason, delivered,
            message_id=None if env is None else env.id,
            subject=None if env is None else env.subject,
            sender=None if env is None else env.sender)
        await self.store.commit()
        self.by_reason[reason_kind(reason)] += 1

    # ------------------------------------------------------------------ corral dlq

    async def ls(self, subscription: str | None = None, limit: int = 100,
                 after: int = 0) -> list[dict[str, Any]]:
        """Dead letters with ``seq > after``, oldest first: everything but the data."""
        if limit < 1:
            raise CorralError(f"limit must be at least 1, got {limit}", hint="pass --limit N")
        recs = await self.store.dead_letters(subscription=subscription, after=after, limit=limit)
        return [_summary(r) for r in recs]

    async def show(self, seq: int) -> dict[str, Any]:
        """One dead letter with its envelope decoded (payload as a preview)."""
        rec = await self.store.dead_letter(seq)
        if rec is None:
            raise _missing([seq])
        out = _summary(rec)
        try:
            env = decode(rec.data)
        except msgspec.DecodeError as exc:
            out["envelope"] = None
            out["decode_error"] = str(exc)
            out["data_preview"] = _bytes_preview(rec.data)
        else:
            out["envelope"] = _envelope(env)
        return out

    async def replay(self, publish: Publish, seqs: Sequence[int] | None = None, *,
                     subscription: str | None = None, everything: bool = False) -> int:
        """Republish the given dead letters, or those of ``subscription``, or ``everything``.

        Returns how many were republished (and deleted). Specific ``seqs`` are checked first:
        if one is missing or has no subject, nothing is published. If a publish fails, the
        ones before it stay replayed and BusError says how far it got.
        """
        chosen = sum((bool(seqs), subscription is not None, everything))
        if chosen != 1:
            raise CorralError("say which dead letters to replay: some seqs, a subscription, "
                              "or all of them" + (" (only one of these)" if chosen else ""),
                              hint="corral dlq replay SEQ... | --subscription S | --all")
        async with self._lock:
            if seqs:
                recs = await self._exact(seqs)
                return await self._republish(publish, recs, total=len(recs))
            # A snapshot: whatever is dead-lettered meanwhile (a replayed message expiring
            # again, say) waits for the next replay instead of looping forever.
            before = await self.store.last_dead_letter_seq() + 1
            done, after = 0, 0
            while True:
                page = await self.store.dead_letters(subscription=subscription, after=after,
                                                     before=before, limit=_PAGE)
                if not page:
                    return done
                after = page[-1].seq
                done += await self._republish(
                    publish, [r for r in page if r.subject is not None], total=None,
                    done_before=done)

    async def purge(self, subscription: str | None = None) -> int:
        """Delete every dead letter (of ``subscription``); return how many."""
        async with self._lock:
            n = await self.store.purge_dead_letters(subscription)
        self.purged += n
        return n

    def stats(self) -> dict[str, Any]:
        """Counters since start: dead-lettered (total and by reason), replayed, purged."""
        return {"dead_lettered": sum(self.by_reason.values()),
                "by_reason": dict(self.by_reason), "replayed": self.replayed,
                "purged": self.purged}

    # ------------------------------------------------------------------ inside

    async def _exact(self, seqs: Sequence[int]) -> list[DeadLetterRecord]:
        unique = list(dict.fromkeys(seqs))
        found = [await self.store.dead_letter(s) for s in unique]
        missing = [s for s, r in zip(unique, found, strict=True) if r is None]
        if missing:
            raise _missing(missing)
        recs = [r for r in found if r is not None]
        blind = [r.seq for r in recs if r.subject is None]
        if blind:
            raise CorralError(
                f"dead letter(s) {_seqs(blind)} could not be decoded, so their subject is "
                "unknown and they cannot be replayed; nothing was replayed",
                hint="look at them with `corral dlq show SEQ`, then `corral dlq purge`")
        return recs

    async def _republish(self, publish: Publish, recs: list[DeadLetterRecord], *,
                         total: int | None, done_before: int = 0) -> int:
        done: list[int] = []
        try:
            for rec in recs:
                assert rec.subject is not None
                await publish(rec.subject, rec.data)
                # Deleted only once its republish returned; committed below, with the rest.
                self.store.delete_dead_letters([rec.seq])
                done.append(rec.seq)
        except Exception as exc:
            await self._settle(done)
            of = f" of {total}" if total is not None else ""
            detail = exc.message if isinstance(exc, CorralError) else f"{type(exc).__name__}: {exc}"
            raise BusError(
                f"replay stopped at dead letter {rec.seq} after {done_before + len(done)}{of} "
                f"were republished: {detail}",
                hint="the rest are still in the dead-letter queue; fix the cause and replay "
                     "again") from exc
        await self._settle(done)
        return len(done)

    async def _settle(self, done: list[int]) -> None:
        if done:
            await self.store.commit()
            self.replayed += len(done)


def _missing(seqs: list[int]) -> CorralError:
    return CorralError(f"no dead letter with seq {_seqs(seqs)}",
                       hint="list them with `corral dlq ls`")


def _seqs(seqs: list[int]) -> str:
    return ", ".join(str(s) for s in seqs)


def _summary(rec: DeadLetterRecord) -> dict[str, Any]:
    return {"seq": rec.seq, "ts": rec.ts, "subscription": rec.subscription,
            "message_id": rec.message_id, "subject": rec.subject, "sender": rec.sender,
            "reason": rec.reason, "delivered": rec.delivered, "size": len(rec.data)}


def _envelope(env: Envelope) -> dict[str, Any]:
    if env.encrypted:
        payload = f"<encrypted, {len(env.payload) if isinstance(env.payload, bytes) else '?'} bytes>"
    else:
        payload = _preview(env.payload)
    return {"id": env.id, "subject": env.subject, "sender": env.sender, "kind": env.kind,
            "guarantee": env.guarantee, "created": env.created, "ttl": env.ttl,
            "expires_at": env.expires_at, "headers": dict(env.headers),
            "idempotency_key": env.idempotency_key, "reply_to": env.reply_to,
            "correlation_id": env.correlation_id, "encrypted": env.encrypted,
            "signed": env.signature is not None, "signer_key_id": env.signer_key_id,
            "payload": payload}


def _preview(value: Any) -> str:
    """The payload as JSON (bytes as base64), cut to _PREVIEW characters."""
    if isinstance(value, bytes):
        return _bytes_preview(value)
    try:
        text = json.dumps(value, ensure_ascii=False, default=_json_default)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= _PREVIEW else text[:_PREVIEW] + f"... ({len(text)} chars)"


def _json_default(obj: Any) -> Any:
    if isinstance(obj, bytes):
        return {"base64": base64.b64encode(obj).decode()}
    raise TypeError(type(obj).__name__)


def _bytes_preview(data: bytes) -> str:
    head = data[:_PREVIEW // 2]
    more = f"... ({len(data)} bytes)" if len(data) > len(head) else ""
    return f"<{len(data)} bytes> {head.hex()}{more}"
