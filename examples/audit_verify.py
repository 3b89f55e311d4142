#!/usr/bin/env python3
"""Verify a Corral audit export on its own: Python's standard library plus ``cryptography``.

This script does not import Corral. It follows docs/audit-format.md and nothing else, so
it doubles as a check that the document is complete.

Usage::

    python examples/audit_verify.py EXPORT.jsonl [--trust KEY_ID]... [--anchor SEQ:HASH]

It prints a summary and exits 0 when the export verifies, 1 when a record is bad (naming
the first one), and 2 when the file can't be read as an export or the arguments are wrong.

Trust: the export's header lists the public keys. Anyone who can edit the file can swap
them, so pass ``--trust KEY_ID`` with the audit key id you know (``corral`` prints it, and it
is in CORRAL_HOME/keys/audit/audit-key.json); the trail's first key must be one of them.
Without ``--trust`` the header's keys are believed, and the script says so.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import sys
from collections.abc import Iterator
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

EXPORT_FORMAT = "corral-audit-export"
SEAL_CONTEXT = b"corral-audit-seal-v1\x00"
FIELDS = {"seq": int, "ts": int, "kind": str, "actor": str, "agent": str, "resource": str,
          "outcome": str, "data": dict}


class Bad(Exception):
    """A record that fails verification: its seq and why."""

    def __init__(self, seq: int, reason: str) -> None:
        super().__init__(f"record {seq}: {reason}")
        self.seq, self.reason = seq, reason


class Unreadable(Exception):
    """The file is not an export at all."""


def key_id_of(public_key: bytes) -> str:
    """First 16 hex chars of SHA-256 of the raw 32-byte Ed25519 public key."""
    return hashlib.sha256(public_key).hexdigest()[:16]


def read_export(path: str) -> tuple[dict[str, Any], Iterator[tuple[int, dict[str, Any]]]]:
    """The header, and an iterator of (line number, record line) over the rest."""
    # Binary: a line that is not UTF-8 is a bad record, not a crash of the reader.
    f = open(path, "rb")  # noqa: SIM115 - closed by the generator below
    first = f.readline()
    try:
        header = json.loads(first)
    except ValueError as exc:
        f.close()
        raise Unreadable(f"line 1 is not JSON: {exc}") from None
    if not isinstance(header, dict) or header.get("format") != EXPORT_FORMAT:
        f.close()
        raise Unreadable(f"line 1 is not a {EXPORT_FORMAT} header")
    if header.get("version") != 1:
        f.close()
        raise Unreadable(f"export version {header.get('version')!r} is not supported (1 is)")

    def lines() -> Iterator[tuple[int, dict[str, Any]]]:
        with f:
            for number, text in enumerate(f, start=2):
                try:
                    entry = json.loads(text)
                except ValueError:
                    entry = None
                yield number, entry if isinstance(entry, dict) else {}
    return header, lines()


def body_bytes(entry: dict[str, Any]) -> bytes | None:
    """The record's exact stored bytes: ``body`` as UTF-8, or ``body_b64`` decoded."""
    body = entry.get("body")
    if isinstance(body, str):
        try:
            return body.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate: no bytes were ever hashed as that
            return None
    if isinstance(entry.get("body_b64"), str):
        try:
            return base64.b64decode(entry["body_b64"], validate=True)
        except ValueError:
            return None
    return None


def load_key(key_id: Any, public_hex: Any, header_keys: dict[str, Any], seq: int,
             trusted: set[str] | None, root: bool) -> Ed25519PublicKey:
    """The key a genesis or rotation record introduces, checked against its id and the header."""
    try:
        raw = bytes.fromhex(public_hex)
        key = Ed25519PublicKey.from_public_bytes(raw)
    except (TypeError, ValueError):
        raise Bad(seq, f"malformed public key for key {key_id!r}") from None
    if key_id_of(raw) != key_id:
        raise Bad(seq, f"the public key does not match key id {key_id!r}")
    listed = header_keys.get(key_id)
    if listed is not None and listed != raw.hex():
        raise Bad(seq, f"key {key_id} differs from the header's copy")
    if root:
        if listed is None:
            raise Bad(seq, f"the trail's first key {key_id} is not in the header's public keys")
        if trusted is not None and key_id not in trusted:
            raise Bad(seq, f"the trail's first key {key_id} is not one you trust "
                           f"({', '.join(sorted(trusted))})")
    return key


def record_of(body: bytes, seq: int) -> dict[str, Any]:
    """Decode and type-check a body: exactly the eight fields, with the right JSON types."""
    try:
        rec = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise Bad(seq, f"the body is not JSON: {exc}") from None
    if not isinstance(rec, dict) or set(rec) != set(FIELDS):
        raise Bad(seq, "the body does not have exactly the record fields")
    for name, typ in FIELDS.items():
        if not isinstance(rec[name], typ) or (typ is int and isinstance(rec[name], bool)):
            raise Bad(seq, f"field {name!r} of the body is not a {typ.__name__}")
    return rec


def verify(header: dict[str, Any], lines: Iterator[tuple[int, dict[str, Any]]],
           trusted: set[str] | None, anchor: tuple[int, bytes] | None) -> dict[str, Any]:
    """Walk every record; raise Bad at the first one that fails, else return a summary."""
    header_keys = header.get("public_keys")
    if not isinstance(header_keys, dict):
        raise Unreadable("the header has no public_keys object")
    # The header's head is an anchor too: it catches a file cut short (but not a forger who
    # rewrote the header as well; that takes an anchor of your own).
    anchors: dict[int, tuple[bytes, str]] = {}
    head = header.get("head") or {}
    try:
        if isinstance(head.get("seq"), int) and head["seq"] > 0:
            anchors[head["seq"]] = (bytes.fromhex(head["hash"]), "the header's head")
    except (TypeError, ValueError):
        raise Unreadable("the header's head is malformed") from None
    if anchor is not None:
        anchors[anchor[0]] = (anchor[1], "the anchor")  # yours wins over the header's
    expected, prev = 1, bytes(32)
    key_id, key = "", None
    pending: tuple[int, str, Ed25519PublicKey] | None = None
    last_sealed, seals, key_ids = 0, 0, []
    for number, entry in lines:
        seq = entry.get("seq")
        if not isinstance(seq, int) or isinstance(seq, bool):
            raise Bad(expected, f"line {number} is not a record line")
        if seq != expected:
            raise Bad(expected, f"line {number} holds record {seq} where record {expected} "
                                "belongs: a record was deleted, inserted or moved")
        body = body_bytes(entry)
        if body is None:
            raise Bad(seq, "the line has no readable body")
        digest = hashlib.sha256(prev + body).digest()
        if entry.get("hash") != digest.hex():
            raise Bad(seq, "its hash is not sha256(previous hash || body): the record was "
                           "edited, or one was inserted before it")
        rec = record_of(body, seq)
        if rec["seq"] != seq:
            raise Bad(seq, f"its body says it is record {rec['seq']}")
        kind, data = rec["kind"], rec["data"]
        if pending is not None and kind != "audit.seal":
            raise Bad(seq, f"the key rotation in record {pending[0]} is not followed by a seal")
        if seq == 1 or kind == "audit.genesis":
            if seq != 1 or kind != "audit.genesis":
                raise Bad(seq, "only record 1 is, and must be, the genesis record")
            if data.get("format") != 1:
                raise Bad(seq, f"record format {data.get('format')!r} is not supported (1 is)")
            key_id = data.get("key_id")
            key = load_key(key_id, data.get("public_key"), header_keys, seq, trusted, True)
            key_ids.append(key_id)
        elif kind == "audit.seal":
            if data.get("sealed_seq") != seq - 1 or data.get("head") != prev.hex():
                raise Bad(seq, "the seal does not name the record before it")
            if data.get("key_id") != key_id or key is None:
                raise Bad(seq, f"sealed with key {data.get('key_id')!r}, but {key_id} was in force")
            message = SEAL_CONTEXT + (seq - 1).to_bytes(8, "big") + prev
            try:
                key.verify(bytes.fromhex(data.get("signature", "")), message)
            except (InvalidSignature, TypeError, ValueError):
                first = last_sealed + 1
                raise Bad(first, f"the seal in record {seq} does not verify under key {key_id}: "
                                 f"records {first}..{seq - 1} were rewritten, or the seal "
                                 "was forged") from None
            last_sealed, seals = seq, seals + 1
            if pending is not None:
                _, key_id, key = pending
                key_ids.append(key_id)
                pending = None
        elif kind == "audit.key_rotated":
            if data.get("previous_key_id") != key_id or data.get("key_id") == key_id:
                raise Bad(seq, f"the rotation does not replace the key in force ({key_id})")
            pending = (seq, data.get("key_id"), load_key(
                data.get("key_id"), data.get("public_key"), header_keys, seq, trusted, False))
        elif kind.startswith("audit."):
            raise Bad(seq, f"unknown chain record kind {kind!r}")
        if seq in anchors and digest != anchors[seq][0]:
            raise Bad(seq, f"its hash differs from {anchors[seq][1]}: the trail was rewritten "
                           "from here or earlier")
        prev, expected = digest, expected + 1
    last = expected - 1
    if pending is not None:
        raise Bad(last + 1, f"the key rotation in record {pending[0]} is not followed by "
                            "its seal: the export was cut short")
    for seq, (_, what) in sorted(anchors.items()):
        if seq > last:
            raise Bad(last + 1, f"the export ends at record {last}, before {what} "
                                f"(record {seq}): records were cut off")
    return {"records": last, "seals": seals, "head_seq": last, "head_hash": prev.hex(),
            "unsealed_tail": last - last_sealed, "key_ids": key_ids}


def parse_anchor(text: str) -> tuple[int, bytes]:
    """``SEQ:HASH`` -> (seq, hash bytes)."""
    seq, _, digest = text.partition(":")
    raw = bytes.fromhex(digest)
    if len(raw) != 32:
        raise ValueError("the hash must be 64 hex chars")
    return int(seq), raw


def main(argv: list[str] | None = None) -> int:
    """Run the verifier; return the exit code."""
    parser = argparse.ArgumentParser(description="Verify a Corral audit export (JSONL).")
    parser.add_argument("export", help="the file `AuditLog.export` wrote")
    parser.add_argument("--trust", action="append", metavar="KEY_ID",
                        help="a key id the trail's first key must match (repeatable)")
    parser.add_argument("--anchor", metavar="SEQ:HASH",
                        help="a (seq, hash) published earlier: detects truncation and rewrites")
    args = parser.parse_args(argv)
    try:
        anchor = parse_anchor(args.anchor) if args.anchor else None
    except ValueError as exc:
        print(f"error: --anchor must be SEQ:HASH ({exc})", file=sys.stderr)
        return 2
    trusted = set(args.trust) if args.trust else None
    try:
        header, lines = read_export(args.export)
        summary = verify(header, lines, trusted, anchor)
    except (OSError, Unreadable) as exc:
        print(f"error: can't read {args.export} as an audit export: {exc}", file=sys.stderr)
        return 2
    except Bad as bad:
        print(f"TAMPERED: record {bad.seq}: {bad.reason}")
        return 1
    print(f"OK: {summary['records']} records, {summary['seals']} seals, head "
          f"{summary['head_seq']}:{summary['head_hash']}")
    print(f"keys: {' -> '.join(summary['key_ids']) or 'none'}"
          + ("" if trusted else " (believed from the header; pass --trust KEY_ID to pin)"))
    if summary["unsealed_tail"]:
        print(f"warning: the last {summary['unsealed_tail']} records are not sealed "
              "(only their hashes vouch for them)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
