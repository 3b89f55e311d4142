"""Bus cryptography: per-agent signatures, canonical envelopes, AES-GCM sealing, key files."""

from __future__ import annotations

import json
import logging
import os
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from corral.bus.crypto import (
    CANONICAL_PREFIX,
    NONCE_SIZE,
    AgentKeys,
    Keyring,
    Sealed,
    canonical,
    envelope_aad,
    key_id_of,
)
from corral.bus.envelope import Envelope
from corral.errors import BusError, MessageRejected

FAST = settings(max_examples=200, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def flip(data: bytes, pos: int, mask: int) -> bytes:
    b = bytearray(data)
    b[pos % len(b)] ^= mask
    return bytes(b)


def envelope(**over: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "id": "01J9ZK3M4N", "sender": "alice", "subject": "agents.bob.inbox", "kind": "direct",
        "created": 1_730_000_000.125, "ttl": 60.0, "reply_to": "agents.alice.replies",
        "correlation_id": None, "headers": {"trace": "abc", "priority": "high"},
        "encrypted": False, "payload": b"\x00payload\xff",
    }
    fields.update(over)
    return fields


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> AgentKeys:
    return AgentKeys(tmp_path_factory.mktemp("k") / "keys")


@pytest.fixture(scope="module")
def ring(tmp_path_factory: pytest.TempPathFactory) -> Keyring:
    return Keyring(tmp_path_factory.mktemp("r") / "ring" / "payload.keys")


# ------------------------------------------------------------------------- canonical


def test_canonical_is_deterministic_and_sorted() -> None:
    a = envelope()
    b = dict(reversed(list(a.items())))
    b["headers"] = {"priority": "high", "trace": "abc"}
    assert canonical(a) == canonical(b)
    out = canonical(a)
    assert out.startswith(CANONICAL_PREFIX)
    doc = json.loads(out[len(CANONICAL_PREFIX):])
    assert list(doc) == sorted(doc)
    assert doc["payload"] == {"$b64": "AHBheWxvYWT/"}
    assert b" " not in out[len(CANONICAL_PREFIX):]


def test_canonical_distinguishes_bytes_from_their_base64_text() -> None:
    assert canonical(envelope(payload=b"abc")) != canonical(envelope(payload="YWJj"))
    assert canonical(envelope(payload=[1, 2])) == canonical(envelope(payload=(1, 2)))
    assert canonical(envelope(payload=1)) != canonical(envelope(payload=1.0))


@pytest.mark.parametrize("bad, error", [
    ({"signature": b"x"}, ValueError),
    ({"payload": float("nan")}, ValueError),
    ({"headers": {"$b64": "x"}}, ValueError),
    ({"headers": {1: "x"}}, TypeError),
    ({"payload": {1, 2}}, TypeError),
    ({"created": object()}, TypeError),
])
def test_canonical_refuses(bad: dict[str, Any], error: type[Exception]) -> None:
    with pytest.raises(error):
        canonical(envelope(**bad))


def test_canonical_requires_identity_fields() -> None:
    fields = envelope()
    del fields["sender"]
    with pytest.raises(ValueError, match="lack sender"):
        canonical(fields)


@pytest.mark.parametrize("name, value", [
    ("id", "01J9ZK3M4O"), ("sender", "mallory"), ("subject", "agents.eve.inbox"),
    ("kind", "publish"), ("created", 1_730_000_000.126), ("ttl", 6000.0), ("ttl", None),
    ("reply_to", "agents.eve.replies"), ("correlation_id", "x"), ("encrypted", True),
    ("headers", {"trace": "abd", "priority": "high"}), ("headers", {"trace": "abc"}),
    ("payload", b"\x00payload\xfe"), ("payload", None),
])
def test_tampering_with_any_covered_field_fails(keys: AgentKeys, name: str, value: Any) -> None:
    kid, sig = keys.sign("alice", canonical(envelope()))
    with pytest.raises(MessageRejected) as info:
        keys.verify("alice", canonical(envelope(**{name: value})), kid, sig)
    assert info.value.reason == "bad_signature"


def test_canonical_accepts_the_bus_envelope(keys: AgentKeys) -> None:
    env = Envelope.new("agents.bob.inbox", "alice", b"sealed bytes", kind="direct",
                       headers={"trace": "t1"})
    kid, sig = keys.sign("alice", canonical(env.signed_fields()))
    keys.verify("alice", canonical(env.signed_fields()), kid, sig)
    changes: list[dict[str, Any]] = [{"sender": "bob"}, {"ttl": 1.0}, {"guarantee": "at-least-once"},
                                     {"idempotency_key": "k"}, {"headers": {}},
                                     {"payload": b"other"}]
    for change in changes:
        forged = msgspec.structs.replace(env, **change)
        with pytest.raises(MessageRejected):
            keys.verify("alice", canonical(forged.signed_fields()), kid, sig)


# ------------------------------------------------------------------------ signatures


def test_sign_verify_round_trip(keys: AgentKeys) -> None:
    data = canonical(envelope())
    kid, sig = keys.sign("alice", data)
    assert kid == key_id_of(keys.public_key("alice")) and len(kid) == 16 and len(sig) == 64
    keys.verify("alice", data, kid, sig)


def test_each_agent_has_its_own_key(keys: AgentKeys) -> None:
    assert keys.public_key("alice") != keys.public_key("bob")
    assert keys.key_for("alice").key_id != keys.key_for("bob").key_id


def test_spoofed_sender_is_rejected(keys: AgentKeys) -> None:
    data = canonical(envelope(sender="bob"))
    kid, sig = keys.sign("alice", data)  # alice signs a message that claims to be from bob
    with pytest.raises(MessageRejected) as info:
        keys.verify("bob", data, kid, sig)  # alice's key id is not bob's
    assert info.value.reason == "unknown_key"
    with pytest.raises(MessageRejected) as info:
        keys.verify("bob", data, keys.key_for("bob").key_id, sig)  # claims bob's key id
    assert info.value.reason == "bad_signature"


def test_unknown_agent_and_bad_names_are_unknown_key(keys: AgentKeys) -> None:
    kid, sig = keys.sign("alice", b"x")
    for agent in ("nobody", "../alice", "", ".lock"):
        with pytest.raises(MessageRejected) as info:
            keys.verify(agent, b"x", kid, sig)
        assert info.value.reason == "unknown_key"
    with pytest.raises(ValueError, match="invalid agent name"):
        keys.key_for("../etc")


@FAST
@given(pos=st.integers(0, 10_000), mask=st.integers(1, 255),
       part=st.sampled_from(["data", "key_id", "signature"]))
def test_any_flipped_byte_is_rejected(keys: AgentKeys, pos: int, mask: int, part: str) -> None:
    data = canonical(envelope())
    kid, sig = keys.sign("alice", data)
    if part == "data":
        data = flip(data, pos, mask)
    elif part == "signature":
        sig = flip(sig, pos, mask)
    else:
        kid = flip(kid.encode(), pos, mask).decode("latin-1")
    with pytest.raises(MessageRejected) as info:
        keys.verify("alice", data, kid, sig)
    assert info.value.reason == ("unknown_key" if part == "key_id" else "bad_signature")


def test_truncated_signature_is_rejected(keys: AgentKeys) -> None:
    kid, sig = keys.sign("alice", b"x")
    with pytest.raises(MessageRejected, match="malformed") as info:
        keys.verify("alice", b"x", kid, sig[:-1])
    assert info.value.reason == "bad_signature"


def test_rotation_keeps_old_messages_verifiable(tmp_path: Path) -> None:
    keys = AgentKeys(tmp_path / "keys")
    old_kid, old_sig = keys.sign("carol", b"before")
    new_kid = keys.rotate("carol")
    assert new_kid != old_kid
    kid, sig = keys.sign("carol", b"after")
    assert kid == new_kid == keys.key_for("carol").key_id
    keys.verify("carol", b"before", old_kid, old_sig)
    keys.verify("carol", b"after", kid, sig)
    # the old private key is destroyed, its public half kept
    doc = json.loads((tmp_path / "keys" / "carol.json").read_text())
    assert doc["current"] == new_kid and set(doc["public"]) == {old_kid, new_kid}
    assert keys.export_public()["carol"] == doc["public"]
    # a fresh instance verifies both too
    again = AgentKeys(tmp_path / "keys")
    again.verify("carol", b"before", old_kid, old_sig)
    # revocation: the old key stops verifying; the current key can't be revoked
    with pytest.raises(ValueError, match="rotate first"):
        keys.revoke("carol", new_kid)
    keys.revoke("carol", old_kid)
    with pytest.raises(MessageRejected) as info:
        again.verify("carol", b"before", old_kid, old_sig)  # seen through the file
    assert info.value.reason == "unknown_key"


def test_keys_persist_with_private_modes(tmp_path: Path) -> None:
    folder = tmp_path / "keys"
    old = os.umask(0o022)
    try:
        keys = AgentKeys(folder)
        kid, sig = keys.sign("dave", b"hello")
    finally:
        os.umask(old)
    assert mode(folder) == 0o700
    assert mode(folder / "dave.json") == 0o600
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]
    again = AgentKeys(folder)
    assert again.key_for("dave").key_id == kid
    again.verify("dave", b"hello", kid, sig)
    assert again.sign("dave", b"hello") == (kid, sig)  # Ed25519 is deterministic


def test_readable_key_file_is_refused(tmp_path: Path) -> None:
    keys = AgentKeys(tmp_path / "keys")
    keys.key_for("erin")
    os.chmod(tmp_path / "keys" / "erin.json", 0o644)
    with pytest.raises(BusError, match="accessible by other users"):
        AgentKeys(tmp_path / "keys").key_for("erin")


def test_remote_keys_by_trust(tmp_path: Path) -> None:
    node_a, node_b = AgentKeys(tmp_path / "a"), AgentKeys(tmp_path / "b")
    kid, sig = node_a.sign("frank", b"hi")
    node_b.key_for("bob")
    with pytest.raises(MessageRejected, match="trust"):
        node_b.verify("frank", b"hi", kid, sig)
    for agent, ids in node_a.export_public().items():
        for key_id, pub in ids.items():
            node_b.trust(agent, key_id, pub)
    node_b.verify("frank", b"hi", kid, sig)
    node_b.trust("frank", kid, node_a.public_key("frank"))  # idempotent
    assert "frank" not in node_b.export_public()
    assert "frank" in node_b.export_public(include_trusted=True)
    with pytest.raises(BusError, match="remote agent"):
        node_b.sign("frank", b"forged")
    raw = node_a.public_key("frank")
    with pytest.raises(ValueError, match="does not match"):
        node_b.trust("frank", "0" * 16, raw)
    with pytest.raises(ValueError, match="runs on this node"):
        node_b.trust("bob", kid, raw)  # a remote key may not speak for a local agent


# ---------------------------------------------------------------------- encryption

AAD = envelope_aad("alice", "agents.bob.inbox", "01J9ZK3M4N")


def test_envelope_aad_is_unambiguous() -> None:
    assert envelope_aad("ab", "c", "d") != envelope_aad("a", "bc", "d")
    assert envelope_aad("a", "b", "c") != envelope_aad("a", "b", "d")


def test_encrypt_round_trip_and_ciphertext_hides_plaintext(ring: Keyring) -> None:
    plaintext = b"ATTACK AT DAWN -- recognisable plaintext " * 100
    sealed = ring.encrypt(plaintext, AAD)
    assert sealed.key_id == ring.current_id and len(sealed.nonce) == NONCE_SIZE
    assert len(sealed.ciphertext) == len(plaintext) + 16
    wire = sealed.to_bytes()
    for needle in (plaintext, plaintext[:16], b"ATTACK AT DAWN"):
        assert needle not in sealed.ciphertext and needle not in wire
    assert ring.decrypt(sealed, AAD) == plaintext
    assert ring.decrypt(wire, AAD) == plaintext
    assert Sealed.from_bytes(wire) == sealed


def test_same_plaintext_encrypts_differently(ring: Keyring) -> None:
    seals = [ring.encrypt(b"same", AAD) for _ in range(50)]
    assert len({s.nonce for s in seals}) == 50
    assert len({s.ciphertext for s in seals}) == 50


@FAST
@given(pos=st.integers(0, 10_000), mask=st.integers(1, 255),
       part=st.sampled_from(["ciphertext", "nonce", "aad", "wire"]))
def test_any_tampering_fails_to_decrypt(ring: Keyring, pos: int, mask: int, part: str) -> None:
    sealed = ring.encrypt(b"x" * 100, AAD)
    aad = AAD
    blob: Sealed | bytes = sealed
    if part == "ciphertext":
        blob = Sealed(sealed.key_id, sealed.nonce, flip(sealed.ciphertext, pos, mask))
    elif part == "nonce":
        blob = Sealed(sealed.key_id, flip(sealed.nonce, pos, mask), sealed.ciphertext)
    elif part == "aad":
        aad = flip(AAD, pos, mask)
    else:
        blob = flip(sealed.to_bytes(), pos, mask)
    with pytest.raises(MessageRejected) as info:
        ring.decrypt(blob, aad)
    assert info.value.reason in ({"decrypt_failed", "unknown_key"} if part == "wire"
                                 else {"decrypt_failed"})


@FAST
@given(pos=st.integers(0, 15), mask=st.integers(1, 255))
def test_tampered_key_id_is_rejected(ring: Keyring, pos: int, mask: int) -> None:
    sealed = ring.encrypt(b"secret", AAD)
    kid = flip(sealed.key_id.encode(), pos, mask).decode("latin-1")
    with pytest.raises(MessageRejected) as info:
        ring.decrypt(Sealed(kid, sealed.nonce, sealed.ciphertext), AAD)
    assert info.value.reason == "unknown_key"


def test_ciphertext_cannot_move_to_another_envelope_or_key(tmp_path: Path) -> None:
    ring = Keyring(tmp_path / "k")
    sealed = ring.encrypt(b"for bob", AAD)
    for other in (envelope_aad("mallory", "agents.bob.inbox", "01J9ZK3M4N"),
                  envelope_aad("alice", "agents.eve.inbox", "01J9ZK3M4N"),
                  envelope_aad("alice", "agents.bob.inbox", "01J9ZK3M4O")):
        with pytest.raises(MessageRejected, match="another envelope"):
            ring.decrypt(sealed, other)
    other_kid = ring.rotate()  # relabel under another existing key: still refused
    with pytest.raises(MessageRejected) as info:
        ring.decrypt(Sealed(other_kid, sealed.nonce, sealed.ciphertext), AAD)
    assert info.value.reason == "decrypt_failed"


def test_rotation_and_retirement(tmp_path: Path) -> None:
    ring = Keyring(tmp_path / "k")
    first = ring.current_id
    old = ring.encrypt(b"old", AAD)
    second = ring.rotate()
    assert ring.current_id == second != first and ring.key_ids == [first, second]
    new = ring.encrypt(b"new", AAD)
    assert new.key_id == second
    assert ring.decrypt(old, AAD) == b"old" and ring.decrypt(new, AAD) == b"new"
    with pytest.raises(ValueError, match="rotate"):
        ring.retire(second)
    ring.retire(first)
    with pytest.raises(KeyError):
        ring.retire(first)
    for sealed in (old, Sealed("0123456789abcdef", new.nonce, new.ciphertext)):
        with pytest.raises(MessageRejected) as info:
            ring.decrypt(sealed, AAD)
        assert info.value.reason == "unknown_key"
    assert ring.decrypt(new, AAD) == b"new"


def test_keyring_persists_with_mode_0600(tmp_path: Path) -> None:
    path = tmp_path / "home" / "bus.keys"
    old_umask = os.umask(0o022)
    try:
        ring = Keyring(path)
        sealed = ring.encrypt(b"kept", AAD)
    finally:
        os.umask(old_umask)
    assert mode(path) == 0o600 and mode(path.parent) == 0o700
    again = Keyring(path)
    assert again.current_id == ring.current_id
    assert again.decrypt(sealed, AAD) == b"kept"
    # another instance's rotate/retire is seen through the file
    new = again.rotate()
    again.retire(sealed.key_id)
    with pytest.raises(MessageRejected) as info:
        ring.decrypt(sealed, AAD)
    assert info.value.reason == "unknown_key"
    assert ring.encrypt(b"x", AAD).key_id == new
    os.chmod(path, 0o640)
    with pytest.raises(BusError, match="accessible by other users"):
        Keyring(path)


def test_nonce_budget_auto_rotates(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    ring = Keyring(tmp_path / "k", rotate_after=5, reserve_block=2)
    first = ring.current_id
    with caplog.at_level(logging.WARNING, "corral.bus.crypto"):
        seals = [ring.encrypt(b"m", AAD) for _ in range(6)]
    assert [s.key_id for s in seals] == [first] * 5 + [ring.current_id]
    assert ring.current_id != first and ring.used(first) == 5
    assert "reached 5 encryptions; rotating" in caplog.text
    assert all(ring.decrypt(s, AAD) == b"m" for s in seals)


def test_counter_is_persistent_and_conservative(tmp_path: Path) -> None:
    path = tmp_path / "k"
    ring = Keyring(path, rotate_after=100, reserve_block=10)
    ring.encrypt(b"m", AAD)
    assert ring.used(ring.current_id) == 10  # the reserved block is on disk before use
    again = Keyring(path, rotate_after=100, reserve_block=10)
    again.encrypt(b"m", AAD)
    assert again.used(again.current_id) == 20  # two instances never share a count range


def test_nonce_budget_hard_limit_without_auto_rotate(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    ring = Keyring(tmp_path / "k", rotate_after=3, auto_rotate=False, reserve_block=2)
    with caplog.at_level(logging.WARNING, "corral.bus.crypto"):
        for _ in range(6):
            ring.encrypt(b"m", AAD)
        with pytest.raises(BusError, match="refusing to encrypt"):
            ring.encrypt(b"m", AAD)
    assert "rotate it before 6" in caplog.text
    ring.rotate()
    ring.encrypt(b"m", AAD)
    with pytest.raises(ValueError):
        Keyring(tmp_path / "k2", rotate_after=2**31 + 1)


@pytest.mark.parametrize("blob", [b"", b"\x02\x10", b"\x01\x10" + b"a" * 20, b"\x01\x02\xff\xfe" + b"n" * 40])
def test_malformed_sealed_bytes(ring: Keyring, blob: bytes) -> None:
    with pytest.raises(MessageRejected) as info:
        ring.decrypt(blob, AAD)
    assert info.value.reason == "decrypt_failed"


# ---------------------------------------------------------------------- throughput


def _rate(fn: Callable[[], object], seconds: float = 0.3) -> float:
    n, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        for _ in range(100):
            fn()
        n += 100
    return n / elapsed


def test_throughput_report(keys: AgentKeys, ring: Keyring, capsys: pytest.CaptureFixture[str]) -> None:
    """Measured, not asserted: 512-byte messages on this machine."""
    msg = os.urandom(512)
    kid, sig = keys.sign("alice", msg)
    sealed = ring.encrypt(msg, AAD)
    fields = envelope(payload=msg)
    rates = {
        "sign/s": _rate(lambda: keys.sign("alice", msg)),
        "verify/s": _rate(lambda: keys.verify("alice", msg, kid, sig)),
        "encrypt/s": _rate(lambda: ring.encrypt(msg, AAD)),
        "decrypt/s": _rate(lambda: ring.decrypt(sealed, AAD)),
        "canonical/s": _rate(lambda: canonical(fields)),
    }
    with capsys.disabled():
        print("\n512-byte messages: " + ", ".join(f"{k} {v:,.0f}" for k, v in rates.items()))
