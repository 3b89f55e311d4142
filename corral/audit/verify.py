"""Verifying a trail, sans-IO: walk the rows once and name the first record that is wrong.

``verify(rows, public_keys, anchor=...)`` takes rows in seq order as ``(seq, body, hash)``
(optionally followed by the index columns ``ts, kind, agent, outcome``, which must then agree
with the body) and checks, record by record:

- seqs run 1, 2, 3, ... with no gap or repeat (a deleted, inserted or reordered row);
- ``hash == sha256(previous hash || body)`` (an edited body or hash, or a broken link);
- the body decodes as a record and names its own seq (a row moved or renumbered);
- record 1 is the genesis record and its key is one of ``public_keys`` (the trust root);
- each seal names the record before it and its signature verifies under the key in force
  (the genesis key, then each key introduced by a rotation record once the old key sealed
  it); a bad signature means a record since the previous good seal was rewritten with its
  hashes recomputed, so the report names the first record after that seal;
- an anchor ``(seq, hash)`` published earlier is still there with that hash (else the trail
  was truncated or rewritten).

Records after the last seal are counted in ``unsealed_tail``: a warning, not tampering (a
crash can leave them), because only hashes, not a signature, vouch for them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass

import msgspec
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from corral.audit.chain import (
    GENESIS,
    GENESIS_HASH,
    KEY_ROTATED,
    RESERVED_PREFIX,
    SEAL,
    seal_message,
)
from corral.errors import AuditTampered
from corral.keyfile import key_id_of

__all__ = ["Report", "VerifyRow", "check_links", "verify"]

#: ``(seq, body, hash)``, or that followed by the index columns ``(ts, kind, agent, outcome)``.
VerifyRow = tuple[int, bytes, bytes] | tuple[int, bytes, bytes, int, str, str, str]


@dataclass(frozen=True, slots=True)
class Report:
    """What ``verify`` found; when ``ok`` is False, ``first_bad_seq`` names the first bad record."""

    ok: bool
    #: Records that checked out (all of them when ``ok``).
    records: int
    #: Seals whose signature verified.
    seals: int
    first_bad_seq: int | None
    #: Why that record is bad ("" when ok).
    reason: str
    #: Records after the last good seal: vouched for by hashes only.
    unsealed_tail: int
    #: The last good record: publish ``(head_seq, head_hash)`` as an anchor.
    head_seq: int
    head_hash: str
    #: Ids of the keys that signed the trail, in order.
    key_ids: tuple[str, ...] = ()

    def check(self) -> Report:
        """Return self if ok; raise AuditTampered naming the first bad record otherwise."""
        if not self.ok:
            raise AuditTampered(f"audit record {self.first_bad_seq} is bad: {self.reason}")
        return self

    def to_dict(self) -> dict[str, object]:
        """A JSON-able form (for the CLI and the API)."""
        d = asdict(self)
        d["key_ids"] = list(self.key_ids)
        return d


class _Head(msgspec.Struct, forbid_unknown_fields=True):
    seq: int
    ts: int
    kind: str
    actor: str
    agent: str
    resource: str
    outcome: str
    data: msgspec.Raw


class _Genesis(msgspec.Struct):
    format: int
    trail_id: str
    key_id: str
    public_key: str


class _Rotated(msgspec.Struct):
    key_id: str
    public_key: str
    previous_key_id: str


class _Seal(msgspec.Struct):
    sealed_seq: int
    head: str
    key_id: str
    signature: str


_decode_head = msgspec.json.Decoder(_Head).decode
_decode_genesis = msgspec.json.Decoder(_Genesis).decode
_decode_rotated = msgspec.json.Decoder(_Rotated).decode
_decode_seal = msgspec.json.Decoder(_Seal).decode


def _as_bytes(value: object) -> bytes:
    """A body read back with another type (TEXT after a hand edit) as the bytes it stands for."""
    if isinstance(value, str):
        return value.encode("utf-8", "surrogatepass")
    if isinstance(value, bytearray | memoryview):
        return bytes(value)
    return repr(value).encode()  # NULL or a number: hashes to nothing that was ever written


class _Bad(Exception):
    def __init__(self, seq: int, reason: str) -> None:
        self.seq, self.reason = seq, reason


def _key(key_id: str, public_hex: str, trusted: Mapping[str, bytes], seq: int,
         root: bool) -> Ed25519PublicKey:
    """The public key a genesis or rotation record introduces, checked against its id."""
    try:
        raw = bytes.fromhex(public_hex)
        key = Ed25519PublicKey.from_public_bytes(raw)
    except ValueError as exc:
        raise _Bad(seq, f"malformed public key for key {key_id}: {exc}") from None
    if key_id_of(raw) != key_id:
        raise _Bad(seq, f"public key does not match key id {key_id}")
    known = trusted.get(key_id)
    if known is not None and bytes(known) != raw:
        raise _Bad(seq, f"public key {key_id} differs from the trusted copy")
    if root and known is None:
        raise _Bad(seq, f"the trail's first key {key_id} is not among the trusted public keys "
                        f"({', '.join(sorted(trusted)) or 'none given'})")
    return key


def verify(rows: Iterable[VerifyRow], public_keys: Mapping[str, bytes], *,
           anchor: tuple[int, str] | None = None) -> Report:
    """Check a whole trail from record 1; the report names the first bad record, if any."""
    expected = 1
    prev = GENESIS_HASH
    key_id = ""
    key: Ed25519PublicKey | None = None
    pending: tuple[int, str, Ed25519PublicKey] | None = None  # rotation awaiting its seal
    last_sealed, sealed_hash = 0, GENESIS_HASH
    seals = 0
    key_ids: list[str] = []
    anchor_seq, anchor_hash = (anchor[0], bytes.fromhex(anchor[1])) if anchor else (0, b"")
    sha256 = hashlib.sha256
    try:
        for row in rows:
            seq, body, stored = row[0], row[1], row[2]
            if type(body) is not bytes:  # only a hand-edited row has another type
                body = _as_bytes(body)
            if seq != expected:
                if type(seq) is not int:
                    raise _Bad(expected, f"record {expected} has a seq of type "
                                         f"{type(seq).__name__}: the row was edited")
                if seq > expected:
                    raise _Bad(expected, f"record {expected} is missing where it belongs (the "
                                         f"next row is record {seq}): it was deleted or moved")
                raise _Bad(expected, f"record {seq} found where record {expected} belongs: "
                                     "records were inserted or moved")
            digest = sha256(prev + body).digest()
            if digest != stored:
                raise _Bad(seq, "its hash does not match sha256(previous hash || body): the "
                                "record was edited, or a record was inserted before it")
            try:
                head = _decode_head(body)
            except msgspec.DecodeError as exc:
                raise _Bad(seq, f"its body is not a well-formed record: {exc}") from None
            if head.seq != seq:
                raise _Bad(seq, f"its body says it is record {head.seq}: records were "
                                "reordered or renumbered")
            if len(row) > 3 and (row[3], row[4], row[5], row[6]) != (
                    head.ts, head.kind, head.agent, head.outcome):
                raise _Bad(seq, "its index columns (ts, kind, agent, outcome) differ from its "
                                "body: they were edited")
            kind = head.kind
            if pending is not None and kind != SEAL:
                raise _Bad(seq, f"the key rotation in record {pending[0]} is not followed by "
                                "a seal of the old key")
            if seq == 1 or kind == GENESIS:
                if seq != 1 or kind != GENESIS:
                    raise _Bad(seq, "only record 1 is, and must be, the genesis record")
                try:
                    g = _decode_genesis(head.data)
                except msgspec.DecodeError as exc:
                    raise _Bad(seq, f"malformed genesis record: {exc}") from None
                key = _key(g.key_id, g.public_key, public_keys, seq, root=True)
                key_id = g.key_id
                key_ids.append(key_id)
            elif kind == SEAL:
                try:
                    s = _decode_seal(head.data)
                    signature = bytes.fromhex(s.signature)
                except (msgspec.DecodeError, ValueError) as exc:
                    raise _Bad(seq, f"malformed seal: {exc}") from None
                if s.sealed_seq != seq - 1 or s.head != prev.hex():
                    raise _Bad(seq, "the seal does not name the record before it")
                if s.key_id != key_id or key is None:
                    raise _Bad(seq, f"sealed with key {s.key_id}, but key {key_id} was in force")
                try:
                    key.verify(signature, seal_message(seq - 1, prev))
                except InvalidSignature:
                    first = last_sealed + 1
                    raise _Bad(first, f"the seal in record {seq} does not verify under key "
                                      f"{key_id}: records {first}..{seq - 1} were rewritten "
                                      "(with their hashes recomputed) or the seal was forged"
                               ) from None
                last_sealed, sealed_hash = seq, digest
                seals += 1
                if pending is not None:
                    _, key_id, key = pending
                    key_ids.append(key_id)
                    pending = None
            elif kind == KEY_ROTATED:
                try:
                    r = _decode_rotated(head.data)
                except msgspec.DecodeError as exc:
                    raise _Bad(seq, f"malformed key rotation: {exc}") from None
                if r.previous_key_id != key_id or r.key_id == key_id:
                    raise _Bad(seq, f"the rotation replaces key {r.previous_key_id}, but key "
                                    f"{key_id} was in force")
                pending = (seq, r.key_id, _key(r.key_id, r.public_key, public_keys, seq,
                                               root=False))
            elif kind.startswith(RESERVED_PREFIX):
                raise _Bad(seq, f"unknown chain record kind {kind!r}")
            if seq == anchor_seq and digest != anchor_hash:
                raise _Bad(seq, "its hash differs from the published anchor: the trail was "
                                "rewritten from here or earlier")
            prev = digest
            expected += 1
        last = expected - 1
        if pending is not None:
            raise _Bad(pending[0] + 1, f"the key rotation in record {pending[0]} is not "
                                       "followed by its seal: the trail was truncated")
        if anchor_seq > last:
            raise _Bad(last + 1, f"the trail ends at record {last} but the published anchor "
                                 f"is record {anchor_seq}: records were cut off the end")
    except _Bad as bad:
        # The good prefix ends just before the bad record: at the last good seal when a
        # signature failed, else at the record before the one being checked.
        good_hash = sealed_hash if bad.seq == last_sealed + 1 else prev
        return Report(False, bad.seq - 1, seals, bad.seq, bad.reason, 0, bad.seq - 1,
                      good_hash.hex(), tuple(key_ids))
    return Report(True, last, seals, None, "", last - last_sealed, last, prev.hex(),
                  tuple(key_ids))


def check_links(rows: Iterable[VerifyRow], after_seq: int, after_hash: bytes
                ) -> tuple[int, str] | None:
    """Check seqs, links and body seqs of the rows after ``after_seq``: (seq, why) of the first bad one."""
    expected, prev = after_seq + 1, after_hash
    for row in rows:
        seq, body, stored = row[0], row[1], row[2]
        if type(body) is not bytes:
            body = _as_bytes(body)
        if seq != expected:
            return expected, f"record {expected} is missing or out of order (found {seq})"
        digest = hashlib.sha256(prev + body).digest()
        if digest != stored:
            return seq, "its hash does not match sha256(previous hash || body)"
        try:
            if _decode_head(body).seq != seq:
                return seq, "its body names another seq"
        except msgspec.DecodeError as exc:
            return seq, f"its body is not a well-formed record: {exc}"
        prev, expected = digest, expected + 1
    return None
