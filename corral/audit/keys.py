"""The audit signing key: one Ed25519 key in a 0600 file, with its id and the keys it replaced.

The file (``<keys_dir>/audit-key.json``, written through ``corral.keyfile``) holds::

    {"version": 1, "purpose": "corral-audit", "current": KEY_ID, "pending": KEY_ID | null,
     "keys": {KEY_ID: {"public": HEX, "private": HEX | null, "created": ISO-8601}}}

Only the current key (and a pending one, mid-rotation) keeps its private half; a rotated-out
key keeps only its public half, so the seals it made still verify and a stolen copy of the
file can't forge them. A key id is the first 16 hex chars of SHA-256 of the raw public key.

Rotation is crash-safe in three steps: ``begin_rotation`` stores the new key as *pending*
(the old one still current), the caller commits the rotation to the trail, then
``finish_rotation`` makes the new key current and drops the old private key. If the process
dies in between, ``activate(id)`` with the key the trail names as current finishes or
abandons the rotation, so the file and the trail always end up agreeing.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from corral.errors import AuditKeyError
from corral.keyfile import corrupt, flock, key_id_of, private_dir, read_secret, write_atomic

__all__ = ["KEY_FILE", "AuditKey", "AuditSigner"]

log = logging.getLogger("corral.audit.keys")

#: Name of the key file inside the keys folder.
KEY_FILE = "audit-key.json"
_PURPOSE = "corral-audit"


@dataclass(frozen=True, slots=True)
class AuditSigner:
    """One Ed25519 private key with its id: what the chain signs seals with."""

    key_id: str
    public_key: bytes
    private_key: Ed25519PrivateKey = field(repr=False)

    def sign(self, message: bytes) -> bytes:
        """64-byte Ed25519 signature over ``message``."""
        return self.private_key.sign(message)

    @staticmethod
    def generate() -> AuditSigner:
        """A fresh random key."""
        priv = Ed25519PrivateKey.generate()
        pub = priv.public_key().public_bytes_raw()
        return AuditSigner(key_id_of(pub), pub, priv)


@dataclass(slots=True)
class _Entry:
    public: bytes
    signer: AuditSigner | None
    created: str


class AuditKey:
    """The audit key file: load or create it, hand out the signer, rotate crash-safely."""

    def __init__(self, dir: Path, current: str, pending: str | None,
                 entries: dict[str, _Entry]) -> None:
        self.dir = dir
        self.path = dir / KEY_FILE
        self._lock = threading.Lock()
        self._current = current
        self._pending = pending
        self._entries = entries

    @classmethod
    def open(cls, dir: str | Path, *, create: bool) -> AuditKey:
        """Load the key file; create a new key only when ``create`` (an empty trail)."""
        dir = Path(dir)
        try:
            private_dir(dir)
            with flock(dir / ".audit-key.lock"):
                loaded = read_secret(dir / KEY_FILE, AuditKeyError)
                if loaded is not None:
                    return cls._parse(dir, loaded[0])
                if not create:
                    raise AuditKeyError(
                        f"audit key file {dir / KEY_FILE} is missing, but the trail has records "
                        "signed by it", hint="restore the key file from backup; a new key can "
                        "only start a new trail (move audit.db aside to start one)")
                signer = AuditSigner.generate()
                key = cls(dir, signer.key_id, None, {signer.key_id: _Entry(
                    signer.public_key, signer, _now())})
                key._save()
                log.info("created audit signing key %s in %s", signer.key_id, key.path)
                return key
        except OSError as exc:
            raise AuditKeyError(f"can't read or write the audit key in {dir}: {exc}",
                                hint="check that the keys folder exists, is a folder and is "
                                     "writable by this user") from exc

    @classmethod
    def read_public(cls, dir: str | Path) -> dict[str, bytes]:
        """The public keys in the key file, read without locking or creating anything."""
        path = Path(dir) / KEY_FILE
        try:
            loaded = read_secret(path, AuditKeyError)
        except OSError as exc:
            raise AuditKeyError(f"can't read the audit key file {path}: {exc}") from exc
        if loaded is None:
            raise AuditKeyError(f"audit key file {path} is missing",
                                hint="restore it from backup, or verify an export with the "
                                     "public key you trust (examples/audit_verify.py --trust)")
        return cls._parse(Path(dir), loaded[0]).public_keys

    @property
    def current(self) -> AuditSigner:
        """The key that signs seals now."""
        signer = self._entries[self._current].signer
        assert signer is not None  # _parse and every write keep the current private key
        return signer

    @property
    def public_keys(self) -> dict[str, bytes]:
        """Every key id this file knows, current and rotated-out, with its raw public key."""
        return {kid: e.public for kid, e in self._entries.items()}

    def activate(self, key_id: str) -> AuditSigner:
        """Make ``key_id`` (the key the trail says is in force) current, settling a half rotation."""
        with self._lock:
            if key_id == self._current:
                if self._pending is not None:  # the rotation never reached the trail
                    log.warning("dropping audit key %s: its rotation was never recorded",
                                self._pending)
                    self._drop_pending()
                return self.current
            if key_id == self._pending:  # the trail has the rotation; the file had not caught up
                log.warning("finishing the rotation to audit key %s interrupted earlier", key_id)
                self._promote(key_id)
                return self.current
            raise AuditKeyError(
                f"the trail is signed by key {key_id}, but {self.path} holds key "
                f"{self._current}", hint="restore the key file that belongs to this trail from "
                "backup; a different key can only start a new trail")

    def begin_rotation(self) -> AuditSigner:
        """Create the next key and persist it as pending; the current key stays in force."""
        with self._lock:
            if self._pending is not None:
                self._drop_pending()
            signer = AuditSigner.generate()
            self._entries[signer.key_id] = _Entry(signer.public_key, signer, _now())
            self._pending = signer.key_id
            self._save_or_undo(lambda: self._forget(signer.key_id))
            return signer

    def finish_rotation(self, key_id: str) -> None:
        """The trail recorded the rotation: make ``key_id`` current, destroy the old private key."""
        with self._lock:
            if self._pending != key_id:
                raise AuditKeyError(f"key {key_id} is not the pending audit key",
                                    hint="this is a bug in Corral; please report it")
            self._promote(key_id)

    def abort_rotation(self, key_id: str) -> None:
        """The trail did not record the rotation: forget the pending key."""
        with self._lock:
            if self._pending == key_id:
                self._drop_pending()

    # -- storage

    def _promote(self, key_id: str) -> None:
        old = self._entries[self._current]
        old_signer, old_current = old.signer, self._current
        old.signer = None  # rotated out: only its public half is kept
        self._current, self._pending = key_id, None

        def undo() -> None:
            old.signer = old_signer
            self._current, self._pending = old_current, key_id
        self._save_or_undo(undo)

    def _drop_pending(self) -> None:
        pending = self._pending
        assert pending is not None
        entry = self._entries.pop(pending)
        self._pending = None

        def undo() -> None:
            self._entries[pending] = entry
            self._pending = pending
        self._save_or_undo(undo)

    def _forget(self, key_id: str) -> None:
        self._entries.pop(key_id, None)
        self._pending = None

    def _save_or_undo(self, undo: Callable[[], None]) -> None:
        try:
            with flock(self.dir / ".audit-key.lock"):
                self._save()
        except OSError as exc:
            undo()
            raise AuditKeyError(f"can't write the audit key file {self.path}: {exc}",
                                hint="free disk space or fix the permissions of the keys "
                                     "folder, then retry") from exc

    def _save(self) -> None:
        doc = {"version": 1, "purpose": _PURPOSE, "current": self._current,
               "pending": self._pending, "keys": {
                   kid: {"public": e.public.hex(),
                         "private": None if e.signer is None
                         else e.signer.private_key.private_bytes_raw().hex(),
                         "created": e.created}
                   for kid, e in self._entries.items()}}
        write_atomic(self.path, json.dumps(doc, indent=1).encode())

    @classmethod
    def _parse(cls, dir: Path, doc: dict[str, Any]) -> AuditKey:
        path = dir / KEY_FILE
        if doc.get("purpose") != _PURPOSE:
            raise corrupt(path, "it is not an audit key file", AuditKeyError)
        entries: dict[str, _Entry] = {}
        try:
            for kid, e in dict(doc["keys"]).items():
                public = bytes.fromhex(e["public"])
                if len(public) != 32 or key_id_of(public) != kid:
                    raise ValueError(f"public key {kid} does not match its id")
                signer = None
                if e.get("private") is not None:
                    priv = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(e["private"]))
                    if priv.public_key().public_bytes_raw() != public:
                        raise ValueError(f"the private key of {kid} does not match its public key")
                    signer = AuditSigner(kid, public, priv)
                entries[str(kid)] = _Entry(public, signer, str(e.get("created", "")))
            current = str(doc["current"])
            pending = doc.get("pending")
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise corrupt(path, str(exc), AuditKeyError) from exc
        for name, kid in (("current", current), ("pending", pending)):
            if kid is not None and (kid not in entries or entries[kid].signer is None):
                raise corrupt(path, f"the {name} key {kid!r} has no private key", AuditKeyError)
        return cls(dir, current, None if pending is None else str(pending), entries)


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
