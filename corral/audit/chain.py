"""The audit chain, sans-IO: canonical record bytes, SHA-256 links, seals and key rotation.

Rules (everything that decides which bytes enter the trail lives in this file):

1. A record's body is ``canonical(record)``: JSON of its eight fields with keys sorted,
   separators ``,``/``:``, UTF-8, no floats, timestamps as integer microseconds.
2. ``hash(n) = sha256(hash(n - 1) || body(n))`` and ``hash(0)`` is 32 zero bytes, so each
   record commits to every record before it.
3. A seal is itself a record (kind ``audit.seal``). Its data names the record before it
   (``sealed_seq``, ``head``) and carries an Ed25519 signature over
   ``SEAL_CONTEXT || sealed_seq (8 bytes, big-endian) || head``. A seal is due after
   ``seal_every`` records or ``seal_interval`` seconds, whichever comes first.
4. Record 1 is ``audit.genesis`` (trail id, first key); a seal follows it at once.
5. Rotation is a record (``audit.key_rotated``, the new key id and public key) followed at
   once by a seal of the OLD key; the new key signs every later seal.

Nothing here reads a clock or touches a file: callers pass ``ts`` (wall time, integer
microseconds, recorded in the body) and ``now`` (monotonic seconds, only for seal timing).
``Chain`` is a small state machine over an immutable ``ChainState``; a caller that fails
to persist the rows a call returned puts the previous state back with ``restore``.
See docs/audit-format.md for the format as a verifier sees it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple, Protocol

__all__ = [
    "FORMAT_VERSION",
    "GENESIS",
    "GENESIS_HASH",
    "KEY_ROTATED",
    "RESERVED_PREFIX",
    "SEAL",
    "SEAL_CONTEXT",
    "AuditRecord",
    "Chain",
    "ChainState",
    "Draft",
    "Row",
    "Signer",
    "canonical",
    "decode",
    "draft",
    "link",
    "seal_message",
]

#: Version of the record format; recorded in the genesis record.
FORMAT_VERSION = 1
#: ``hash(0)``: what record 1 links to.
GENESIS_HASH = bytes(32)
#: Domain separation: a seal signature can't be replayed as a signature of anything else.
SEAL_CONTEXT = b"corral-audit-seal-v1\x00"
#: Kinds written by the chain itself; callers may not use the ``audit.`` prefix.
GENESIS = "audit.genesis"
SEAL = "audit.seal"
KEY_ROTATED = "audit.key_rotated"
RESERVED_PREFIX = "audit."

_RUNTIME = "runtime"
_INT64 = 2**63
_dumps = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                          allow_nan=False).encode


class Signer(Protocol):
    """What the chain needs of a signing key: its id, raw public key, and a sign function."""

    @property
    def key_id(self) -> str: ...

    @property
    def public_key(self) -> bytes: ...

    def sign(self, message: bytes) -> bytes: ...


@dataclass(frozen=True, slots=True)
class AuditRecord:
    """One decoded audit record."""

    seq: int
    #: Wall-clock time, integer microseconds since the Unix epoch (UTC).
    ts: int
    #: What happened, dotted: "lifecycle.transition", "policy.decision", "tool.call", ...
    kind: str
    #: Who did it: "agent:NAME", "user:NAME", "runtime".
    actor: str
    agent: str = ""
    resource: str = ""
    #: "allow", "deny", "ok", "error", ... ("" when it has none).
    outcome: str = ""
    data: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The record as the plain dict its body encodes."""
        return {"seq": self.seq, "ts": self.ts, "kind": self.kind, "actor": self.actor,
                "agent": self.agent, "resource": self.resource, "outcome": self.outcome,
                "data": dict(self.data)}


class Row(NamedTuple):
    """One record as stored: index columns, canonical body and chain hash."""

    seq: int
    ts: int
    kind: str
    agent: str
    outcome: str
    body: bytes
    hash: bytes


@dataclass(frozen=True, slots=True)
class Draft:
    """A record encoded in full except for its seq, which the chain assigns."""

    kind: str
    agent: str
    outcome: str
    ts: int
    #: The canonical body up to and including ``"seq":``.
    prefix: bytes
    #: The rest of the body after the seq digits: ``,"ts":<ts>}``.
    suffix: bytes

    def body(self, seq: int) -> bytes:
        """The canonical body of this record at ``seq``."""
        return self.prefix + b"%d" % seq + self.suffix


# ------------------------------------------------------------------------------ encoding


def _check(value: Any, where: str) -> None:
    """Refuse anything without one obvious JSON encoding (floats, non-str keys, big ints)."""
    t = type(value)
    # Exact-type fast paths first: this runs for every value of every record appended.
    if t is str or t is bool or value is None:
        return
    if t is int:
        if not -_INT64 <= value < _INT64:
            raise ValueError(f"{where}: {value} does not fit in 64 bits; store it as a str")
        return
    if t is dict or isinstance(value, dict):  # json encodes dicts, not other Mappings
        for k, v in value.items():
            if type(k) is not str and not isinstance(k, str):
                raise TypeError(f"{where}: keys must be str, got {type(k).__name__} {k!r}")
            tv = type(v)
            if tv is not str and tv is not bool and v is not None:
                _check(v, f"{where}.{k}")
        return
    if t is list or t is tuple or isinstance(value, list | tuple):
        for i, v in enumerate(value):
            _check(v, f"{where}[{i}]")
        return
    if isinstance(value, str | bool):
        return
    if isinstance(value, int):
        _check(int(value), where)
        return
    if isinstance(value, float):
        raise TypeError(f"{where}: float {value!r} has no canonical encoding; "
                        "record it as an int (e.g. milli-units) or a str")
    raise TypeError(f"{where}: can't record a {type(value).__name__}; "
                    "use None, bool, int, str, list or dict (hex-encode bytes)")


def _check_fields(kind: str, actor: str, agent: str, resource: str, outcome: str,
                  data: Mapping[str, Any], ts: int) -> None:
    if not (type(kind) is str and type(actor) is str and type(agent) is str
            and type(resource) is str and type(outcome) is str):
        for name, value in (("kind", kind), ("actor", actor), ("agent", agent),
                            ("resource", resource), ("outcome", outcome)):
            if not isinstance(value, str):
                raise TypeError(f"{name} must be a str, got {type(value).__name__}")
    if not kind or not actor:
        raise ValueError("an audit record needs a kind and an actor")
    if not isinstance(data, Mapping):
        raise TypeError(f"data must be a mapping, got {type(data).__name__}")
    if type(ts) is not int or not 0 <= ts < _INT64:
        raise ValueError(f"ts must be integer microseconds since the epoch, got {ts!r}")
    _check(data, "data")


def canonical(record: AuditRecord) -> bytes:
    """The canonical body of ``record``: sorted-key compact JSON in UTF-8 (the reference form)."""
    if not isinstance(record.data, Mapping):
        raise TypeError(f"data must be a mapping, got {type(record.data).__name__}")
    _check_fields(record.kind, record.actor, record.agent, record.resource, record.outcome,
                  dict(record.data), record.ts)
    if type(record.seq) is not int or record.seq < 1:
        raise ValueError(f"seq must be a positive int, got {record.seq!r}")
    return _dumps(record.to_dict()).encode("utf-8")


def draft(kind: str, *, actor: str, ts: int, agent: str = "", resource: str = "",
          outcome: str = "", data: Mapping[str, Any] | None = None) -> Draft:
    """Validate and encode a record whose seq is not known yet; TypeError/ValueError if it can't be."""
    data = {} if data is None else data if type(data) is dict else dict(data)
    _check_fields(kind, actor, agent, resource, outcome, data, ts)
    # Sorted keys put "seq" and "ts" last (after "resource"), so the body splices around the seq.
    head = _dumps({"actor": actor, "agent": agent, "data": data, "kind": kind,
                   "outcome": outcome, "resource": resource})
    return Draft(kind, agent, outcome, ts, (head[:-1] + ',"seq":').encode("utf-8"),
                 b',"ts":%d}' % ts)


def decode(body: bytes) -> AuditRecord:
    """Parse a body back into a record; ValueError if it is not a well-formed record."""
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"not JSON: {exc}") from exc
    if not isinstance(doc, dict) or set(doc) != _FIELDS:
        raise ValueError("not an audit record: wrong set of fields")
    try:
        rec = AuditRecord(**doc)
        if type(rec.seq) is not int or type(rec.ts) is not int or not isinstance(rec.data, dict):
            raise TypeError("seq and ts must be ints and data an object")
        _check_fields(rec.kind, rec.actor, rec.agent, rec.resource, rec.outcome, rec.data,
                      rec.ts)
    except TypeError as exc:
        raise ValueError(str(exc)) from exc
    return rec


_FIELDS = frozenset({"seq", "ts", "kind", "actor", "agent", "resource", "outcome", "data"})


def link(prev_hash: bytes, body: bytes) -> bytes:
    """The chain hash of a record: SHA-256 of the previous record's hash followed by its body."""
    return hashlib.sha256(prev_hash + body).digest()


def seal_message(sealed_seq: int, head: bytes) -> bytes:
    """The bytes a seal signs: context, the sealed record's seq (8 bytes BE), its hash."""
    return SEAL_CONTEXT + sealed_seq.to_bytes(8, "big") + head


# --------------------------------------------------------------------------------- chain


@dataclass(frozen=True, slots=True)
class ChainState:
    """Where the chain stands: the last record and what is not sealed yet."""

    signer: Signer
    #: Seq of the last record written (0 before genesis).
    seq: int = 0
    #: Hash of that record.
    head: bytes = GENESIS_HASH
    #: Records after the last seal.
    unsealed: int = 0
    #: ``now`` (monotonic seconds) of the last seal.
    last_seal: float = 0.0


class Chain:
    """Turns records into stored rows and decides when seals are due; does no I/O."""

    def __init__(self, state: ChainState, *, seal_every: int = 1000,
                 seal_interval: float = 1.0) -> None:
        if seal_every < 1 or seal_interval <= 0:
            raise ValueError("seal_every must be at least 1 and seal_interval positive")
        self.seal_every = seal_every
        self.seal_interval = seal_interval
        self._state = state

    @property
    def state(self) -> ChainState:
        """The current state; hand it to ``restore`` to undo rows that were not persisted."""
        return self._state

    def restore(self, state: ChainState) -> None:
        """Go back to ``state`` (the rows returned since then were not written)."""
        self._state = state

    def start(self, trail_id: str, ts: int, now: float) -> list[Row]:
        """Genesis record and its seal, for an empty trail."""
        if self._state.seq != 0:
            raise ValueError(f"the trail already has {self._state.seq} records; "
                             "genesis starts an empty one")
        signer = self._state.signer
        rows = [self._emit(GENESIS, ts, {
            "format": FORMAT_VERSION, "trail_id": trail_id, "key_id": signer.key_id,
            "public_key": signer.public_key.hex()})]
        return rows + self._seal(ts, now)

    def append(self, record: Draft, now: float) -> list[Row]:
        """The record's row, followed by a seal's when ``seal_every`` records are unsealed."""
        if record.kind.startswith(RESERVED_PREFIX):
            raise ValueError(f"kind {record.kind!r}: the 'audit.' prefix is reserved for the "
                             "chain's own records; choose another kind")
        rows = [self._row(record)]
        if self._state.unsealed >= self.seal_every:
            rows += self._seal(record.ts, now)
        return rows

    def seal(self, ts: int, now: float) -> list[Row]:
        """A seal over everything written, or nothing when nothing is unsealed."""
        return self._seal(ts, now) if self._state.unsealed else []

    def due_in(self, now: float) -> float | None:
        """Seconds until a timed seal is due (0 if now), or None while nothing is unsealed."""
        s = self._state
        if not s.unsealed:
            return None
        return max(0.0, s.last_seal + self.seal_interval - now)

    def tick(self, ts: int, now: float) -> list[Row]:
        """A seal if one is due by time, else nothing."""
        due = self.due_in(now)
        return self._seal(ts, now) if due is not None and due <= 0 else []

    def rotate(self, signer: Signer, ts: int, now: float) -> list[Row]:
        """Record a new key, seal that with the old key, then sign with the new one."""
        old = self._state.signer
        if signer.key_id == old.key_id:
            raise ValueError(f"key {signer.key_id} is already the chain's key")
        rows = [self._emit(KEY_ROTATED, ts, {
            "key_id": signer.key_id, "public_key": signer.public_key.hex(),
            "previous_key_id": old.key_id})]
        rows += self._seal(ts, now)
        self._state = replace(self._state, signer=signer)
        return rows

    # -- internals

    def _emit(self, kind: str, ts: int, data: dict[str, Any]) -> Row:
        return self._row(draft(kind, actor=_RUNTIME, ts=ts, data=data))

    def _row(self, record: Draft) -> Row:
        s = self._state
        seq = s.seq + 1
        body = record.body(seq)
        digest = hashlib.sha256(s.head + body).digest()
        # The constructor, not dataclasses.replace: this runs once per record.
        self._state = ChainState(s.signer, seq, digest, s.unsealed + 1, s.last_seal)
        return Row(seq, record.ts, record.kind, record.agent, record.outcome, body, digest)

    def _seal(self, ts: int, now: float) -> list[Row]:
        s = self._state
        signature = s.signer.sign(seal_message(s.seq, s.head))
        row = self._emit(SEAL, ts, {"sealed_seq": s.seq, "head": s.head.hex(),
                                    "key_id": s.signer.key_id, "signature": signature.hex()})
        self._state = replace(self._state, unsealed=0, last_seal=now)
        return [row]
