"""Message-bus cryptography: per-agent Ed25519 signatures and AES-256-GCM payload sealing.

What this module guarantees, and how it differs from the seed system (see
``/work/shared/research/seed-origins.md``):

* **Every agent has its own signing key.** ``AgentKeys`` keeps one Ed25519 key per agent
  (never one key for the whole bus), and ``verify(agent, ...)`` checks a signature only
  against the public keys recorded *for that agent*: a message signed by agent A and
  presented as agent B fails. A key id names one public key (first 16 hex chars of the
  SHA-256 of the raw 32-byte public key); an id that is not one of the claimed sender's
  keys is ``MessageRejected(reason="unknown_key")``, a signature that does not verify is
  ``reason="bad_signature"``.
* **Signatures cover a canonical encoding.** ``canonical(fields)`` turns the envelope's
  fields into deterministic bytes; every field passed in is covered (see its docstring).
  Signatures are taken over ``SIGNATURE_CONTEXT + data`` so a bus signature can never be
  replayed as a signature for another protocol that might reuse the key.
* **Encryption is real.** ``Keyring.encrypt`` runs AES-256-GCM with a fresh random
  96-bit nonce from ``os.urandom``; the result (``Sealed``) holds only the key id, the
  nonce and the ciphertext+tag. The AAD given by the caller (``envelope_aad(sender,
  subject, id)``) binds the ciphertext to its envelope, and the key id and format version
  are bound too, so any change to ciphertext, nonce, AAD or key id fails to decrypt.

Nonce budget: random 96-bit nonces stay collision-safe (probability below 2^-32) for up to
2^32 encryptions under one key (NIST SP 800-38D, 8.3). ``Keyring`` counts encryptions per
key, persistently and conservatively (it reserves blocks of the count in the key file, so
a crash can only over-count, never under-count), rotates to a new key at ``rotate_after``
(2^31 by default) and, if auto-rotation is off, refuses to encrypt at twice that (2^32).

Files: keys are written atomically (temp file in the same folder, fsync, rename) with mode
0600, key folders are 0700, and a key file readable by group or others is refused (like
ssh does) rather than trusted. Cross-process updates are serialised with ``flock``. These
file rules live in ``corral.keyfile``, shared with the audit key.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import math
import os
import re
import struct
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from corral.errors import BusError, CorralError, MessageRejected
from corral.keyfile import (
    Stamp,
    corrupt,
    file_stamp,
    flock,
    key_id_of,
    private_dir,
    read_secret,
    write_atomic,
)

__all__ = [
    "CANONICAL_PREFIX",
    "NONCE_SIZE",
    "REQUIRED_FIELDS",
    "ROTATE_AFTER",
    "SIGNATURE_CONTEXT",
    "AgentKeys",
    "Keyring",
    "Sealed",
    "SigningKey",
    "canonical",
    "envelope_aad",
    "key_id_of",
]

log = logging.getLogger("corral.bus.crypto")

#: Prepended to the signed bytes: domain separation from any other use of the key.
SIGNATURE_CONTEXT = b"corral.bus.signature.v1\x00"
#: First bytes of every ``canonical()`` output; a new encoding gets a new prefix.
CANONICAL_PREFIX = b"corral.envelope.v1\n"
#: Fields ``canonical()`` insists on, so an envelope can't be signed without its identity.
#: Names follow ``corral.bus.envelope.Envelope``.
REQUIRED_FIELDS = frozenset({"id", "sender", "subject", "created", "payload"})
#: AES-GCM nonce length: 96 bits is the size GCM is specified and analysed for.
NONCE_SIZE = 12
#: Default encryptions per key before rotation: half the 2^32 random-nonce bound.
ROTATE_AFTER = 2**31
#: Count reserved in the key file at a time; keeps disk writes off the hot path.
RESERVE_BLOCK = 2**16

_SEAL_CONTEXT = b"corral.bus.seal.v1\x00"
_AAD_CONTEXT = b"corral.bus.aad.v1"
_SEALED_VERSION = 1
_TAG_SIZE = 16
_KEY_ID = re.compile(r"[0-9a-f]{16}")
# A file name, not a path: no "/", no leading "." (temp and lock files start with one).
_AGENT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


# ---------------------------------------------------------------------------- helpers


def _check_agent(agent: str) -> str:
    if not isinstance(agent, str) or not _AGENT_NAME.fullmatch(agent):
        raise ValueError(f"invalid agent name {agent!r}: expected letters, digits, '.', '_' "
                         "or '-', starting with a letter or digit, at most 128 chars")
    return agent


def _read_secret(path: Path) -> tuple[dict[str, Any], Stamp] | None:
    """Parse a key file; None if missing; BusError if others can read it or it is corrupt."""
    return read_secret(path, BusError)


def _corrupt(path: Path, what: str) -> CorralError:
    return corrupt(path, what, BusError)


# -------------------------------------------------------------------------- canonical


def canonical(envelope_fields: Mapping[str, Any]) -> bytes:
    """Deterministic bytes to sign for an envelope; every field passed in is covered.

    Coverage is exactly the mapping given: every key and every value, recursively, so the
    caller must pass every field a receiver acts on. ``REQUIRED_FIELDS`` (``id``,
    ``sender``, ``subject``, ``created``, ``payload``) must be present. For
    ``Envelope.signed_fields()`` that is all of: id, subject, sender, kind, payload,
    created, ttl, guarantee, idempotency_key, reply_to, correlation_id, headers, encrypted
    (a field left at its default is still covered, with its default value). ``payload`` is
    what travels: the ``Sealed.to_bytes()`` ciphertext when encrypted, else the plaintext.
    Not covered: ``signature`` (refused: it can't cover itself) and the signing key id
    (swapping it selects another key, which then fails to verify); also leave out
    per-delivery counters such as ``delivered`` that legitimately change in transit.

    Encoding: ``CANONICAL_PREFIX`` + JSON with keys sorted by code point, separators
    ``,``/``:``, ASCII-only escapes, no NaN/Infinity. ``bytes`` become ``{"$b64": base64}``
    (tagged, so a bytes value and a str of the same base64 text encode differently; keys
    starting with ``$`` are therefore refused). Tuples encode as lists. Accepted values:
    None, bool, int, finite float, str, bytes, lists/tuples, mappings with str keys;
    anything else (datetime, sets, ...) is a TypeError -- convert timestamps to int ns or
    ISO strings first.
    """
    if not isinstance(envelope_fields, Mapping):
        raise TypeError(f"envelope fields must be a mapping, got {type(envelope_fields).__name__}")
    missing = REQUIRED_FIELDS - envelope_fields.keys()
    if missing:
        raise ValueError(f"envelope fields lack {', '.join(sorted(missing))}; "
                         f"canonical() needs {', '.join(sorted(REQUIRED_FIELDS))}")
    if "signature" in envelope_fields:
        raise ValueError("pass the envelope fields without 'signature': a signature can't cover itself")
    body = json.dumps(_plain(envelope_fields, "envelope"), sort_keys=True, separators=(",", ":"),
                      ensure_ascii=True, allow_nan=False)
    return CANONICAL_PREFIX + body.encode("ascii")


def _plain(value: Any, where: str) -> Any:
    """``value`` as JSON-able data with bytes tagged; TypeError/ValueError on anything else."""
    if value is None or isinstance(value, bool | str | int):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{where}: {value!r} has no canonical encoding")
        return value
    if isinstance(value, bytes | bytearray | memoryview):
        return {"$b64": base64.b64encode(bytes(value)).decode("ascii")}
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"{where}: keys must be str, got {type(k).__name__} {k!r}")
            if k.startswith("$"):
                raise ValueError(f"{where}: key {k!r} starts with '$', reserved for tagged values")
            out[k] = _plain(v, f"{where}.{k}")
        return out
    if isinstance(value, list | tuple):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    raise TypeError(f"{where}: can't sign a {type(value).__name__}; "
                    "use None, bool, int, float, str, bytes, list or dict")


# ------------------------------------------------------------------------ agent keys


@dataclass(frozen=True, slots=True)
class SigningKey:
    """One agent's current Ed25519 private key and its id."""

    agent: str
    key_id: str
    private_key: Ed25519PrivateKey = field(repr=False)
    public_key: bytes

    def sign(self, data: bytes) -> bytes:
        """64-byte signature over ``SIGNATURE_CONTEXT + data``."""
        return self.private_key.sign(SIGNATURE_CONTEXT + data)


@dataclass(slots=True)
class _AgentRecord:
    """The keys of one agent as stored in ``<dir>/<agent>.json``."""

    agent: str
    #: "local": this node holds the private key; "trusted": public keys of a remote node.
    origin: str
    public: dict[str, bytes]
    signer: SigningKey | None = None
    stamp: Stamp = (0, 0, 0)
    verifiers: dict[str, Ed25519PublicKey] = field(default_factory=dict)

    def copy(self) -> _AgentRecord:
        """A copy to modify, so a failed write leaves the cached record as it was on disk."""
        return _AgentRecord(self.agent, self.origin, dict(self.public), self.signer)

    def to_json(self) -> bytes:
        doc: dict[str, Any] = {
            "version": 1, "agent": self.agent, "origin": self.origin,
            "public": {kid: pub.hex() for kid, pub in self.public.items()},
        }
        if self.signer is not None:
            # Only the current private key is kept: after rotation the old one is destroyed,
            # its public half stays so earlier messages still verify.
            doc["current"] = self.signer.key_id
            doc["private"] = self.signer.private_key.private_bytes_raw().hex()
        return json.dumps(doc, indent=1).encode()


def _new_signer(agent: str) -> SigningKey:
    priv = Ed25519PrivateKey.generate()
    pub = priv.public_key().public_bytes_raw()
    return SigningKey(agent, key_id_of(pub), priv, pub)


class AgentKeys:
    """Per-agent Ed25519 signing keys, persisted one file per agent in ``dir`` (0700)."""

    def __init__(self, dir: Path) -> None:
        self.dir = Path(dir)
        private_dir(self.dir)
        self._lockfile = self.dir / ".lock"
        self._lock = threading.RLock()
        self._cache: dict[str, _AgentRecord] = {}

    # -- public API

    def key_for(self, agent: str) -> SigningKey:
        """The agent's current signing key, created (and persisted) on first use."""
        _check_agent(agent)
        with self._lock:
            rec = self._record(agent)
            if rec is None:
                with flock(self._lockfile):
                    rec = self._record(agent)  # another process may have just created it
                    if rec is None:
                        rec = _AgentRecord(agent, "local", {})
                        signer = _new_signer(agent)
                        self._install(rec, signer)
                        log.info("created signing key %s for agent %s", signer.key_id, agent)
            if rec.signer is None:
                raise BusError(f"agent {agent!r} is a remote agent: this node only trusts its "
                               "public keys and can't sign for it",
                               hint="sign on the node that runs the agent")
            return rec.signer

    def public_key(self, agent: str) -> bytes:
        """Raw 32-byte public key of the agent's current signing key."""
        return self.key_for(agent).public_key

    def sign(self, agent: str, data: bytes) -> tuple[str, bytes]:
        """Sign ``data`` as ``agent``: (key id, 64-byte signature)."""
        key = self.key_for(agent)
        return key.key_id, key.sign(data)

    def verify(self, agent: str, data: bytes, key_id: str, signature: bytes) -> None:
        """Check that ``agent``'s own key ``key_id`` signed ``data``; MessageRejected if not."""
        rec = None
        if isinstance(agent, str) and _AGENT_NAME.fullmatch(agent):
            with self._lock:
                rec = self._record(agent)
        if rec is None:
            raise MessageRejected(f"no signing keys are known for agent {agent!r}",
                                  reason="unknown_key",
                                  hint="trust the sender's public keys (AgentKeys.trust) first")
        pub = rec.verifiers.get(key_id) if isinstance(key_id, str) else None
        if pub is None:
            raise MessageRejected(f"key {key_id!r} is not one of agent {agent!r}'s keys",
                                  reason="unknown_key")
        if not isinstance(signature, bytes | bytearray) or len(signature) != 64:
            raise MessageRejected(f"malformed signature from agent {agent!r}",
                                  reason="bad_signature")
        try:
            pub.verify(bytes(signature), SIGNATURE_CONTEXT + bytes(data))
        except InvalidSignature:
            raise MessageRejected(f"signature by agent {agent!r} (key {key_id}) does not verify",
                                  reason="bad_signature") from None

    def rotate(self, agent: str) -> str:
        """Give the agent a new signing key; old public keys stay for verification."""
        _check_agent(agent)
        with self._lock, flock(self._lockfile):
            old = self._record(agent)
            rec = old.copy() if old is not None else _AgentRecord(agent, "local", {})
            if rec.origin != "local":
                raise BusError(f"agent {agent!r} is a remote agent; rotate it on its own node")
            signer = _new_signer(agent)
            self._install(rec, signer)
            log.info("rotated signing key of agent %s to %s", agent, signer.key_id)
            return signer.key_id

    def revoke(self, agent: str, key_id: str) -> None:
        """Forget one old public key: messages signed with it stop verifying."""
        _check_agent(agent)
        with self._lock, flock(self._lockfile):
            old = self._record(agent)
            if old is None or key_id not in old.public:
                raise KeyError(f"agent {agent!r} has no key {key_id!r}")
            rec = old.copy()
            if rec.signer is not None and rec.signer.key_id == key_id:
                raise ValueError(f"{key_id} is agent {agent!r}'s current key; rotate first")
            del rec.public[key_id]
            if rec.public:
                self._install(rec, rec.signer)
            else:
                (self.dir / f"{agent}.json").unlink()
                self._cache.pop(agent, None)

    @staticmethod
    def trustable(agent: str, key_id: str, public_key: bytes | str) -> bytes:
        """The raw key if ``public_key`` (raw or hex) is an Ed25519 key with id ``key_id``."""
        _check_agent(agent)
        pub = bytes.fromhex(public_key) if isinstance(public_key, str) else bytes(public_key)
        if len(pub) != 32:
            raise ValueError(f"an Ed25519 public key is 32 bytes, got {len(pub)}")
        if key_id_of(pub) != key_id:
            raise ValueError(f"key id {key_id!r} does not match the public key "
                             f"(its key id is {key_id_of(pub)})")
        Ed25519PublicKey.from_public_bytes(pub)  # refuse bytes that are not a key now, not later
        return pub

    def trust(self, agent: str, key_id: str, public_key: bytes | str) -> None:
        """Accept a remote node's public key (raw bytes or hex) for ``agent``."""
        pub = self.trustable(agent, key_id, public_key)
        with self._lock, flock(self._lockfile):
            rec = self._record(agent)
            if rec is not None and key_id in rec.public:
                return
            if rec is not None and rec.origin == "local":
                # Otherwise a remote node could sign as one of this node's own agents.
                raise ValueError(f"agent {agent!r} runs on this node; refusing to trust a "
                                 "remote key for it")
            rec = rec.copy() if rec is not None else _AgentRecord(agent, "trusted", {})
            rec.public[key_id] = pub
            self._install(rec, None)

    def export_public(self, *, include_trusted: bool = False) -> dict[str, dict[str, str]]:
        """{agent: {key_id: public_key_hex}} of this node's agents, for trust distribution."""
        out: dict[str, dict[str, str]] = {}
        for path in sorted(self.dir.glob("*.json")):
            if not _AGENT_NAME.fullmatch(path.stem):
                continue
            with self._lock:
                rec = self._record(path.stem)
            if rec is not None and (rec.origin == "local" or include_trusted):
                out[rec.agent] = {kid: pub.hex() for kid, pub in rec.public.items()}
        return out

    # -- storage

    def _install(self, rec: _AgentRecord, signer: SigningKey | None) -> None:
        """Make ``signer`` current, persist ``rec`` and cache it (caller holds both locks)."""
        if signer is not None:
            rec.public[signer.key_id] = signer.public_key
        rec.signer = signer
        path = self.dir / f"{rec.agent}.json"
        write_atomic(path, rec.to_json())
        rec.stamp = file_stamp(os.stat(path))
        rec.verifiers = {kid: Ed25519PublicKey.from_public_bytes(p) for kid, p in rec.public.items()}
        self._cache[rec.agent] = rec

    def _record(self, agent: str) -> _AgentRecord | None:
        """The agent's keys, re-read when another instance or process changed the file."""
        path = self.dir / f"{agent}.json"
        try:
            stamp = file_stamp(os.stat(path))
        except FileNotFoundError:
            self._cache.pop(agent, None)
            return None
        cached = self._cache.get(agent)
        if cached is not None and cached.stamp == stamp:
            return cached
        loaded = _read_secret(path)
        if loaded is None:
            self._cache.pop(agent, None)
            return None
        doc, stamp = loaded
        rec = self._parse(path, agent, doc)
        rec.stamp = stamp
        self._cache[agent] = rec
        return rec

    @staticmethod
    def _parse(path: Path, agent: str, doc: dict[str, Any]) -> _AgentRecord:
        if doc.get("agent") != agent or doc.get("origin") not in ("local", "trusted"):
            raise _corrupt(path, "agent name or origin does not match the file")
        try:
            public = {str(kid): bytes.fromhex(pub) for kid, pub in dict(doc["public"]).items()}
        except (KeyError, TypeError, ValueError) as exc:
            raise _corrupt(path, f"bad public keys ({exc})") from exc
        for kid, pub in public.items():
            if len(pub) != 32 or key_id_of(pub) != kid:
                raise _corrupt(path, f"public key {kid} does not match its id")
        rec = _AgentRecord(agent, doc["origin"], public)
        if rec.origin == "local":
            try:
                priv = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(doc["private"]))
            except (KeyError, TypeError, ValueError) as exc:
                raise _corrupt(path, f"bad private key ({exc})") from exc
            pub = priv.public_key().public_bytes_raw()
            if key_id_of(pub) != doc.get("current") or public.get(key_id_of(pub)) != pub:
                raise _corrupt(path, "the private key does not match the current key id")
            rec.signer = SigningKey(agent, key_id_of(pub), priv, pub)
        rec.verifiers = {kid: Ed25519PublicKey.from_public_bytes(p) for kid, p in public.items()}
        return rec


# -------------------------------------------------------------------------- sealing


def envelope_aad(sender: str, subject: str, message_id: str) -> bytes:
    """AAD binding a ciphertext to its envelope: length-prefixed sender, subject, id."""
    parts = [_AAD_CONTEXT]
    for s in (sender, subject, message_id):
        b = s.encode("utf-8")
        parts.append(struct.pack(">I", len(b)) + b)  # length prefix: no ambiguous splits
    return b"".join(parts)


@dataclass(frozen=True, slots=True)
class Sealed:
    """An AES-256-GCM ciphertext (tag included) with the key id and nonce to open it."""

    key_id: str
    nonce: bytes
    ciphertext: bytes

    def to_bytes(self) -> bytes:
        """Wire form: version(1) | len(key_id)(1) | key_id ascii | nonce(12) | ciphertext+tag."""
        kid = self.key_id.encode("ascii")
        return bytes((_SEALED_VERSION, len(kid))) + kid + self.nonce + self.ciphertext

    @classmethod
    def from_bytes(cls, data: bytes) -> Sealed:
        """Parse ``to_bytes()`` output; MessageRejected(decrypt_failed) if malformed."""
        data = bytes(data)
        if len(data) < 2 or data[0] != _SEALED_VERSION:
            raise MessageRejected("sealed payload has an unknown version", reason="decrypt_failed")
        n = data[1]
        if len(data) < 2 + n + NONCE_SIZE + _TAG_SIZE:
            raise MessageRejected("sealed payload is truncated", reason="decrypt_failed")
        try:
            kid = data[2:2 + n].decode("ascii")
        except UnicodeDecodeError:
            raise MessageRejected("sealed payload has a malformed key id",
                                  reason="decrypt_failed") from None
        return cls(kid, data[2 + n:2 + n + NONCE_SIZE], data[2 + n + NONCE_SIZE:])


@dataclass(slots=True)
class _DataKey:
    key: bytes = field(repr=False)
    created: float
    #: Encryptions reserved in the file (an upper bound on encryptions done).
    used: int
    aead: AESGCM = field(repr=False, init=False)

    def __post_init__(self) -> None:
        self.aead = AESGCM(self.key)


def _gcm_aad(key_id: str, aad: bytes) -> bytes:
    # Binds the format version and key id as well as the caller's AAD.
    return _SEAL_CONTEXT + key_id.encode("ascii") + b"\x00" + aad


class Keyring:
    """Persistent (0600) AES-256-GCM keys with ids; encrypts with the current one."""

    def __init__(self, path: Path, *, rotate_after: int = ROTATE_AFTER,
                 auto_rotate: bool = True, reserve_block: int = RESERVE_BLOCK) -> None:
        if not 0 < rotate_after <= ROTATE_AFTER:
            raise ValueError(f"rotate_after must be in 1..2**31, got {rotate_after}")
        if reserve_block < 1:
            raise ValueError(f"reserve_block must be positive, got {reserve_block}")
        self.path = Path(path)
        self.rotate_after = rotate_after
        #: Hard stop per key when auto-rotation is off: 2^32 encryptions by default.
        self.limit = 2 * rotate_after
        self.auto_rotate = auto_rotate
        self.reserve_block = reserve_block
        if not self.path.parent.exists():
            private_dir(self.path.parent)
        self._lockfile = self.path.with_name(f".{self.path.name}.lock")
        self._lock = threading.RLock()
        self._keys: dict[str, _DataKey] = {}
        self._current = ""
        self._stamp: Stamp = (0, 0, 0)
        # Encryptions this instance may still do under self._budget_id without touching disk.
        self._budget_id = ""
        self._left = 0
        self._warned: set[str] = set()
        with self._lock, flock(self._lockfile):
            if not self._load():
                self._add_key()
                self._save()

    @property
    def current_id(self) -> str:
        """Id of the key new encryptions use."""
        return self._current

    @property
    def key_ids(self) -> list[str]:
        """Ids of all keys that can still decrypt, oldest first."""
        return list(self._keys)

    def used(self, key_id: str) -> int:
        """Encryptions counted against ``key_id`` (an upper bound: counts are reserved ahead)."""
        self._refresh()
        return self._keys[key_id].used

    def rotate(self) -> str:
        """Make a new key current; old keys still decrypt until retired. Returns the new id."""
        with self._lock, flock(self._lockfile):
            self._load()
            kid = self._add_key()
            self._save()
            log.info("keyring %s rotated to key %s", self.path, kid)
            return kid

    def retire(self, key_id: str) -> None:
        """Destroy a non-current key: what it encrypted can no longer be decrypted."""
        with self._lock, flock(self._lockfile):
            self._load()
            if key_id not in self._keys:
                raise KeyError(f"keyring {self.path} has no key {key_id!r}")
            if key_id == self._current:
                raise ValueError(f"{key_id} is the current key; rotate() before retiring it")
            del self._keys[key_id]
            self._save()

    def encrypt(self, plaintext: bytes, aad: bytes) -> Sealed:
        """AES-256-GCM under the current key with a fresh random 96-bit nonce."""
        with self._lock:
            if self._left <= 0 or self._budget_id != self._current:
                self._reserve()
            self._left -= 1
            kid = self._budget_id
            aead = self._keys[kid].aead
        nonce = os.urandom(NONCE_SIZE)
        return Sealed(kid, nonce, aead.encrypt(nonce, bytes(plaintext), _gcm_aad(kid, bytes(aad))))

    def decrypt(self, sealed: Sealed | bytes, aad: bytes) -> bytes:
        """Plaintext of ``sealed``; MessageRejected (decrypt_failed / unknown_key) otherwise."""
        if not isinstance(sealed, Sealed):
            sealed = Sealed.from_bytes(sealed)
        self._refresh()  # pick up rotate/retire done by another instance or process
        key = self._keys.get(sealed.key_id)
        if key is None:
            raise MessageRejected(f"payload key {sealed.key_id!r} is unknown or retired",
                                  reason="unknown_key")
        if len(sealed.nonce) != NONCE_SIZE:
            raise MessageRejected("sealed payload has a malformed nonce", reason="decrypt_failed")
        try:
            return key.aead.decrypt(sealed.nonce, sealed.ciphertext,
                                    _gcm_aad(sealed.key_id, bytes(aad)))
        except InvalidTag:
            raise MessageRejected("payload failed authentication: tampered, or sealed for "
                                  "another envelope", reason="decrypt_failed") from None

    # -- storage

    def _reserve(self) -> None:
        """Claim the next block of the current key's nonce budget in the file (locks held)."""
        with flock(self._lockfile):
            self._load()
            kid = self._current
            key = self._keys[kid]
            if key.used >= self.rotate_after:
                if self.auto_rotate:
                    log.warning("key %s of keyring %s reached %d encryptions; rotating",
                                kid, self.path, key.used)
                    kid = self._add_key()
                    key = self._keys[kid]
                elif key.used >= self.limit:
                    raise BusError(f"key {kid} of keyring {self.path} reached {key.used} "
                                   "encryptions, the safe limit for random nonces; refusing to encrypt",
                                   hint="rotate the keyring (Keyring.rotate)")
                elif kid not in self._warned:
                    self._warned.add(kid)
                    log.warning("key %s of keyring %s reached %d encryptions; rotate it before "
                                "%d", kid, self.path, key.used, self.limit)
            cap = self.rotate_after if key.used < self.rotate_after else self.limit
            block = min(self.reserve_block, cap - key.used)
            key.used += block
            self._save()
            self._budget_id, self._left = kid, block

    def _add_key(self) -> str:
        """Generate a new current key in memory (caller saves)."""
        kid = os.urandom(8).hex()  # random, not derived from the secret: ids leak nothing
        self._keys[kid] = _DataKey(os.urandom(32), time.time(), 0)
        self._current = kid
        return kid

    def _refresh(self) -> None:
        try:
            stamp = file_stamp(os.stat(self.path))
        except FileNotFoundError:
            return
        if stamp != self._stamp:
            with self._lock:
                self._load()

    def _load(self) -> bool:
        """Read the file into memory; False if it does not exist yet."""
        loaded = _read_secret(self.path)
        if loaded is None:
            return False
        doc, stamp = loaded
        keys: dict[str, _DataKey] = {}
        try:
            for kid, entry in dict(doc["keys"]).items():
                raw = base64.b64decode(entry["key"], validate=True)
                if not _KEY_ID.fullmatch(kid) or len(raw) != 32:
                    raise ValueError(f"key {kid!r} is malformed")
                old = self._keys.get(kid)
                keys[kid] = old if old is not None and old.key == raw else _DataKey(
                    raw, float(entry["created"]), int(entry["used"]))
                keys[kid].used = int(entry["used"])
            current = str(doc["current"])
        except (KeyError, TypeError, ValueError, binascii.Error) as exc:
            raise _corrupt(self.path, str(exc)) from exc
        if current not in keys:
            raise _corrupt(self.path, f"current key {current!r} is missing")
        self._keys, self._current, self._stamp = keys, current, stamp
        return True

    def _save(self) -> None:
        doc = {"version": 1, "current": self._current, "keys": {
            kid: {"key": base64.b64encode(k.key).decode(), "created": k.created, "used": k.used}
            for kid, k in self._keys.items()}}
        write_atomic(self.path, json.dumps(doc, indent=1).encode())
        self._stamp = file_stamp(os.stat(self.path))
