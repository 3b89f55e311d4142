"""Envelope: one message on the bus, as every backend stores it.

The runtime fills ``sender`` from the channel the message came in on (an agent's own
connection, or an authenticated client); a sender named inside the payload is never read.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

import msgspec

__all__ = ["Envelope", "Guarantee", "Kind", "decode", "encode"]

Kind = Literal["direct", "publish", "request", "reply", "broadcast"]
Guarantee = Literal["at-most-once", "at-least-once", "effectively-once"]


class Envelope(msgspec.Struct, frozen=True, omit_defaults=True):
    """A message: routing, guarantees, and the (possibly sealed) payload."""

    id: str
    subject: str
    sender: str
    kind: Kind = "publish"
    payload: Any = None
    created: float = 0.0
    #: Seconds the message may live; past it, it goes to the DLQ with reason "ttl expired".
    ttl: float | None = None
    guarantee: Guarantee = "at-most-once"
    #: Effectively-once: deliveries with a key seen within the dedup window are dropped.
    idempotency_key: str | None = None
    #: Request/response: where the reply goes, and the id it answers.
    reply_to: str | None = None
    correlation_id: str | None = None
    headers: dict[str, str] = {}
    #: AES-256-GCM: payload holds Sealed.to_bytes() and this is True.
    encrypted: bool = False
    #: Ed25519, set when the message crosses a trust boundary (another node, a client).
    signer_key_id: str | None = None
    signature: bytes | None = None

    @property
    def expires_at(self) -> float | None:
        """Absolute expiry time, or None."""
        return None if self.ttl is None else self.created + self.ttl

    def signed_fields(self) -> dict[str, Any]:
        """Everything a signature covers: all fields but the signature itself."""
        fields = msgspec.structs.asdict(self)
        fields.pop("signature", None)
        fields.pop("signer_key_id", None)
        return fields

    @classmethod
    def new(cls, subject: str, sender: str, payload: Any = None, **fields: Any) -> Envelope:
        """A fresh envelope with a unique id and the current time."""
        return cls(id=uuid.uuid4().hex, subject=subject, sender=sender, payload=payload,
                   created=time.time(), **fields)


_ENC = msgspec.msgpack.Encoder()
_DEC = msgspec.msgpack.Decoder(Envelope)


def encode(env: Envelope) -> bytes:
    """The bytes a backend stores."""
    return _ENC.encode(env)


def decode(data: bytes) -> Envelope:
    """Bytes from a backend back to an Envelope (raises msgspec.DecodeError on garbage)."""
    return _DEC.decode(data)
