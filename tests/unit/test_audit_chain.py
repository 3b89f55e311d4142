"""The audit chain and verifier, pure: encoding, links, seals, rotation, and every tampering."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from corral.audit.chain import (
    GENESIS,
    GENESIS_HASH,
    KEY_ROTATED,
    SEAL,
    AuditRecord,
    Chain,
    ChainState,
    Row,
    canonical,
    decode,
    draft,
    link,
    seal_message,
)
from corral.audit.keys import AuditSigner
from corral.audit.verify import Report, check_links, verify
from corral.errors import AuditTampered

SIGNER = AuditSigner.generate()
TRUSTED = {SIGNER.key_id: SIGNER.public_key}
T0 = 1_730_000_000_000_000

text = st.text(st.characters(codec="utf-8"), max_size=12)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3),
    max_leaves=8)
records = st.builds(
    AuditRecord, seq=st.integers(1, 2**40), ts=st.integers(0, 2**62),
    kind=text.filter(bool), actor=text.filter(bool), agent=text, resource=text, outcome=text,
    data=st.dictionaries(text, json_values, max_size=4))


def make_chain(n: int, *, seal_every: int = 5, rotate_at: int | None = None,
               signer: AuditSigner = SIGNER) -> tuple[list[Row], dict[str, bytes]]:
    """A trail of genesis + n records (sealed every ``seal_every``), closed by a final seal."""
    chain = Chain(ChainState(signer), seal_every=seal_every, seal_interval=3600)
    rows = chain.start("trail-1", T0, 0.0)
    keys = {signer.key_id: signer.public_key}
    for i in range(n):
        if rotate_at is not None and i == rotate_at:
            new = AuditSigner.generate()
            keys[new.key_id] = new.public_key
            rows += chain.rotate(new, T0 + i, 0.0)
        rows += chain.append(draft("tool.call", actor=f"agent:a{i % 3}", ts=T0 + i,
                                   agent=f"a{i % 3}", outcome="ok", data={"i": i}), 0.0)
    rows += chain.seal(T0 + n, 0.0)
    return rows, keys


def triples(rows: list[Row]) -> list[tuple[int, bytes, bytes]]:
    return [(r.seq, r.body, r.hash) for r in rows]


# ------------------------------------------------------------------------------ encoding


@given(records)
def test_canonical_round_trips_and_is_stable(rec: AuditRecord) -> None:
    body = canonical(rec)
    assert decode(body) == rec
    assert canonical(decode(body)) == body
    # The reference definition, spelled out: sorted keys, compact, UTF-8.
    assert body == json.dumps(rec.to_dict(), sort_keys=True, separators=(",", ":"),
                              ensure_ascii=False).encode("utf-8")


@given(records)
def test_draft_fast_path_equals_canonical(rec: AuditRecord) -> None:
    d = draft(rec.kind, actor=rec.actor, ts=rec.ts, agent=rec.agent, resource=rec.resource,
              outcome=rec.outcome, data=rec.data)
    assert d.body(rec.seq) == canonical(rec)


@pytest.mark.parametrize(("data", "error", "words"), [
    ({"cpu": 0.5}, TypeError, "float"),
    ({1: "x"}, TypeError, "keys must be str"),
    ({"big": 2**64}, ValueError, "64 bits"),
    ({"raw": b"\x00"}, TypeError, "hex-encode bytes"),
    ({"nested": [{"f": float("nan")}]}, TypeError, "data.nested[0].f"),
])
def test_values_without_one_encoding_are_refused(data: dict[Any, Any], error: type[Exception],
                                                 words: str) -> None:
    with pytest.raises(error, match=words.replace("[", r"\[").replace("]", r"\]")):
        draft("tool.call", actor="agent:a", ts=T0, data=data)


def test_mappings_and_subclasses_encode_as_plain_json() -> None:
    from enum import IntEnum, StrEnum
    from types import MappingProxyType

    class Mode(StrEnum):
        A = "a"

    class Level(IntEnum):
        HIGH = 3
    d = draft("k.x", actor="a", ts=T0, data=MappingProxyType({"m": Mode.A, "l": Level.HIGH}))
    assert decode(d.body(1)).data == {"m": "a", "l": 3}
    with pytest.raises(TypeError, match=r"data\.inner"):
        draft("k.x", actor="a", ts=T0, data={"inner": MappingProxyType({})})


def test_fields_are_checked() -> None:
    with pytest.raises(ValueError, match="kind and an actor"):
        draft("", actor="agent:a", ts=T0)
    with pytest.raises(TypeError, match="agent must be a str"):
        draft("k", actor="a", ts=T0, agent=3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="microseconds"):
        draft("k", actor="a", ts=1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="reserved"):
        Chain(ChainState(SIGNER)).append(draft(SEAL, actor="a", ts=T0), 0.0)


def test_decode_refuses_non_records() -> None:
    for body in (b"not json", b"[]", b'{"seq":1}', b"\xff"):
        with pytest.raises(ValueError):
            decode(body)


def test_link_is_sha256_of_prev_and_body() -> None:
    assert link(GENESIS_HASH, b"abc") == hashlib.sha256(bytes(32) + b"abc").digest()
    assert seal_message(258, b"h" * 32) == b"corral-audit-seal-v1\x00" + bytes(
        [0, 0, 0, 0, 0, 0, 1, 2]) + b"h" * 32


# -------------------------------------------------------------------------------- chain


def test_genesis_then_seal_every_n() -> None:
    rows, _ = make_chain(12, seal_every=5)
    kinds = [r.kind for r in rows]
    assert kinds[:2] == [GENESIS, SEAL]
    # 12 records: sealed after 5 and 10 (counting genesis+seal as sealed), then the final seal.
    assert [r.seq for r in rows if r.kind == SEAL] == [2, 8, 14, 17]
    assert [r.seq for r in rows] == list(range(1, len(rows) + 1))
    prev = GENESIS_HASH
    for r in rows:
        assert r.hash == link(prev, r.body)
        prev = r.hash
    seal = decode(rows[7].body)
    assert seal.data["sealed_seq"] == 7 and seal.data["head"] == rows[6].hash.hex()


def test_timed_seal_is_due_after_the_interval() -> None:
    chain = Chain(ChainState(SIGNER, last_seal=100.0), seal_every=1000, seal_interval=1.0)
    assert chain.due_in(100.5) is None  # nothing unsealed: no timer at all
    chain.append(draft("k.x", actor="a", ts=T0), 100.5)
    assert chain.due_in(100.5) == pytest.approx(0.5)
    assert chain.tick(T0, 100.9) == []
    sealed = chain.tick(T0, 101.0)
    assert [r.kind for r in sealed] == [SEAL]
    assert chain.due_in(101.0) is None and chain.state.unsealed == 0


def test_restore_undoes_rows_that_were_not_written() -> None:
    chain = Chain(ChainState(SIGNER), seal_every=2)
    chain.start("t", T0, 0.0)
    mark = chain.state
    chain.append(draft("k.x", actor="a", ts=T0), 0.0)
    chain.rotate(AuditSigner.generate(), T0, 0.0)
    chain.restore(mark)
    again = chain.append(draft("k.x", actor="a", ts=T0), 0.0)
    assert again[0].seq == mark.seq + 1 and chain.state.signer is SIGNER


def test_rotation_is_recorded_and_sealed_by_the_old_key() -> None:
    rows, keys = make_chain(6, seal_every=100, rotate_at=3)
    rot = next(i for i, r in enumerate(rows) if r.kind == KEY_ROTATED)
    new_id = decode(rows[rot].body).data["key_id"]
    assert decode(rows[rot + 1].body).data["key_id"] == SIGNER.key_id  # old key seals it
    assert decode(rows[-1].body).data["key_id"] == new_id  # the new key signs afterwards
    report = verify(triples(rows), keys)
    assert report.ok and report.key_ids == (SIGNER.key_id, new_id)
    # The new key comes from the sealed rotation record: trusting the root is enough.
    assert verify(triples(rows), TRUSTED).ok


def test_a_rotation_not_sealed_by_the_old_key_is_refused() -> None:
    rows, keys = make_chain(6, seal_every=100, rotate_at=3)
    rot = next(i for i, r in enumerate(rows) if r.kind == KEY_ROTATED)
    # Drop the old key's seal and relink everything after it (an attacker with no key).
    forged = rows[:rot + 1] + relinked(rows[rot + 2:], rows[rot].hash, rot + 2)
    report = verify(triples(forged), keys)
    assert not report.ok and report.first_bad_seq == rot + 2
    assert "not followed by a seal" in report.reason


def relinked(rows: list[Row], prev: bytes, first_seq: int) -> list[Row]:
    """Renumber and rehash ``rows`` to link after ``prev``: all a forger without the key can do."""
    out = []
    for i, r in enumerate(rows):
        seq = first_seq + i
        rec = decode(r.body).to_dict()
        if rec["kind"] == SEAL:  # point the seal at the new head; its signature can't follow
            rec["data"] = {**rec["data"], "sealed_seq": seq - 1, "head": prev.hex()}
        body = canonical(AuditRecord(**{**rec, "seq": seq}))
        prev = link(prev, body)
        out.append(r._replace(seq=seq, body=body, hash=prev))
    return out


# ------------------------------------------------------------------------------- verify


def test_a_whole_trail_verifies() -> None:
    rows, keys = make_chain(20)
    report = verify(triples(rows), keys, anchor=(rows[-1].seq, rows[-1].hash.hex()))
    assert report == Report(True, len(rows), 5, None, "", 0, len(rows), rows[-1].hash.hex(),
                            (SIGNER.key_id,))
    assert report.check() is report


def test_the_unsealed_tail_is_a_warning_not_tampering() -> None:
    rows, keys = make_chain(8, seal_every=100)
    report = verify(triples(rows[:-1]), keys)  # drop the final seal
    assert report.ok and report.unsealed_tail == 8


def test_an_empty_trail_is_ok_until_an_anchor_says_otherwise() -> None:
    assert verify([], TRUSTED).ok
    bad = verify([], TRUSTED, anchor=(3, "00" * 32))
    assert bad.first_bad_seq == 1 and "cut off the end" in bad.reason


def test_the_root_key_must_be_trusted() -> None:
    rows, _ = make_chain(3)
    other = AuditSigner.generate()
    report = verify(triples(rows), {other.key_id: other.public_key})
    assert report.first_bad_seq == 1 and "not among the trusted" in report.reason
    forged = {SIGNER.key_id: other.public_key}  # right id, wrong bytes
    assert verify(triples(rows), forged).first_bad_seq == 1


def test_a_trail_signed_by_another_key_fails_at_its_seals() -> None:
    mallory = AuditSigner.generate()
    rows, _ = make_chain(4, signer=mallory)
    # Swap in a genesis naming the trusted key but keep mallory's seals (relinked).
    genesis = draft(GENESIS, actor="runtime", ts=T0, data={
        "format": 1, "trail_id": "trail-1", "key_id": SIGNER.key_id,
        "public_key": SIGNER.public_key.hex()}).body(1)
    forged = [Row(1, T0, GENESIS, "", "", genesis, link(GENESIS_HASH, genesis))]
    forged += relinked(rows[1:], forged[0].hash, 2)
    report = verify(triples(forged), TRUSTED)
    assert not report.ok and report.first_bad_seq == 2 and "sealed with key" in report.reason


def test_index_columns_must_agree_with_the_body() -> None:
    rows, keys = make_chain(6)
    full = [(r.seq, r.body, r.hash, r.ts, r.kind, r.agent, r.outcome) for r in rows]
    assert verify(full, keys).ok
    full[4] = (*full[4][:5], "someone-else", full[4][6])
    report = verify(full, keys)
    assert report.first_bad_seq == 5 and "index columns" in report.reason


def test_a_rewrite_with_recomputed_hashes_is_caught_by_the_next_seal() -> None:
    rows, keys = make_chain(20, seal_every=5)
    seals = [r.seq for r in rows if r.kind == SEAL]  # [2, 8, 14, 20, 26]
    k = 10  # between the seals at 8 and 14
    rec = decode(rows[k - 1].body)
    edited = canonical(AuditRecord(**{**rec.to_dict(), "outcome": "deny"}))
    forged = rows[:k - 1] + relinked([rows[k - 1]._replace(body=edited), *rows[k:]],
                                     rows[k - 2].hash, k)
    report = verify(triples(forged), keys)
    assert not report.ok
    assert report.first_bad_seq == seals[1] + 1  # the first record after the last good seal
    assert f"seal in record {seals[2]}" in report.reason
    assert report.head_seq == seals[1] and report.head_hash == rows[seals[1] - 1].hash.hex()
    with pytest.raises(AuditTampered, match=f"audit record {seals[1] + 1} is bad"):
        report.check()


# ------------------------------------------------- any single tampering, at the right seq

# Genesis, its seal, 20 records and a seal after every 5: 26 rows.
BASE, BASE_KEYS = make_chain(20, seal_every=5)
ANCHOR = (BASE[-1].seq, BASE[-1].hash.hex())


def check(rows: list[tuple[int, bytes, bytes]], bad_seq: int, *words: str) -> None:
    report = verify(rows, BASE_KEYS, anchor=ANCHOR)
    assert not report.ok
    assert report.first_bad_seq == bad_seq, report.reason
    for w in words:
        assert w in report.reason
    assert report.records == bad_seq - 1


@given(st.integers(0, len(BASE) - 1), st.integers(0, 10_000), st.integers(1, 255))
def test_any_edited_body_is_found(i: int, pos: int, mask: int) -> None:
    rows = triples(BASE)
    seq, body, h = rows[i]
    b = bytearray(body)
    b[pos % len(b)] ^= mask
    rows[i] = (seq, bytes(b), h)
    check(rows, seq, "hash does not match")


@given(st.integers(0, len(BASE) - 1), st.integers(0, 31))
def test_any_edited_hash_is_found(i: int, pos: int) -> None:
    rows = triples(BASE)
    seq, body, h = rows[i]
    rows[i] = (seq, body, h[:pos] + bytes([h[pos] ^ 1]) + h[pos + 1:])
    check(rows, seq)


@given(st.integers(0, len(BASE) - 1))
def test_any_deleted_record_is_found(i: int) -> None:
    rows = triples(BASE)
    del rows[i]
    check(rows, i + 1)  # the last one too: the anchor shows the cut


@given(st.integers(0, len(BASE) - 1))
def test_any_deleted_and_renumbered_record_is_found(i: int) -> None:
    rows = triples(BASE)
    del rows[i]
    rows = [(n, b, h) for n, (_, b, h) in enumerate(rows, start=1)]
    check(rows, i + 1)


@given(st.integers(0, len(BASE)), st.binary(min_size=1, max_size=64))
def test_any_inserted_record_is_found(i: int, junk: bytes) -> None:
    rows = triples(BASE)
    body = draft("tool.call", actor="agent:x", ts=T0).body(i + 1) + junk
    rows.insert(i, (i + 1, body, hashlib.sha256(junk).digest()))
    rows = [(n, b, h) for n, (_, b, h) in enumerate(rows, start=1)]
    check(rows, i + 1)


@given(st.integers(0, len(BASE)))
def test_a_correctly_linked_insertion_is_found_at_the_record_it_displaces(i: int) -> None:
    rows = triples(BASE)
    prev = rows[i - 1][2] if i else GENESIS_HASH
    body = draft("tool.call", actor="agent:x", ts=T0).body(i + 1)
    rows.insert(i, (i + 1, body, link(prev, body)))
    rows = [(n, b, h) for n, (_, b, h) in enumerate(rows, start=1)]
    if i == 0:
        check(rows, 1, "genesis")
    elif i == len(BASE):  # appended after the final seal: links fine, but is unsealed
        report = verify(rows, BASE_KEYS, anchor=ANCHOR)
        assert report.ok and report.unsealed_tail == 1
    elif i + 1 == ANCHOR[0]:  # it took the anchored record's place
        check(rows, i + 1, "anchor")
    else:
        check(rows, i + 2, "inserted before it")


@given(st.integers(0, len(BASE) - 1), st.integers(0, len(BASE) - 1))
def test_any_two_swapped_rows_are_found(i: int, j: int) -> None:
    if i == j:
        return
    i, j = min(i, j), max(i, j)
    rows = triples(BASE)
    rows[i], rows[j] = rows[j], rows[i]  # moved: each row keeps its own seq
    check(rows, i + 1, "where")
    rows = triples(BASE)
    (si, bi, hi), (sj, bj, hj) = rows[i], rows[j]
    rows[i], rows[j] = (si, bj, hj), (sj, bi, hi)  # seqs swapped: read back in seq order
    check(rows, si)


@given(st.integers(1, len(BASE) - 1))
def test_truncation_is_found_against_an_anchor(keep: int) -> None:
    rows = triples(BASE)[:keep]
    assert verify(rows, BASE_KEYS).ok  # without an anchor a cut is invisible
    check(rows, keep + 1, "cut off")


def test_an_anchor_that_no_longer_matches_names_its_record() -> None:
    rows, keys = make_chain(5)
    report = verify(triples(rows), keys, anchor=(4, "ab" * 32))
    assert report.first_bad_seq == 4 and "anchor" in report.reason


def test_check_links_checks_a_tail() -> None:
    rows = triples(BASE)
    assert check_links(rows[10:], 10, rows[9][2]) is None
    rows[12] = (rows[12][0], rows[12][1] + b" ", rows[12][2])
    assert check_links(rows[10:], 10, rows[9][2]) == (13, "its hash does not match "
                                                      "sha256(previous hash || body)")
    assert check_links(rows[11:], 10, rows[9][2])[0] == 11  # type: ignore[index]
