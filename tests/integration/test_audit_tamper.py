"""Tampering with the SQLite file directly: every edit is found and the first bad record named."""

from __future__ import annotations

import hashlib
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

from corral.audit import AuditLog, Report, canonical, decode, link, verify_trail
from corral.errors import AuditTampered

ROOT = Path(__file__).parents[2]
SEAL_EVERY = 10
RECORDS = 50


def make(home: Path) -> AuditLog:
    return AuditLog(home / "audit.db", home / "keys", seal_every=SEAL_EVERY, seal_interval=3600)


@pytest.fixture
async def trail(tmp_path: Path) -> tuple[Path, tuple[int, str]]:
    """A closed trail of 50 records (seals every 10) and its published anchor."""
    async with make(tmp_path) as log:
        for i in range(RECORDS):
            await log.append("tool.call", actor=f"agent:a{i % 2}", agent=f"a{i % 2}",
                             outcome="ok", data={"i": i})
        await log.seal()
        anchor = log.anchor()
    return tmp_path, anchor


def edit(home: Path, change: Callable[[sqlite3.Connection], object]) -> None:
    with sqlite3.connect(home / "audit.db") as conn:
        change(conn)


def body_of(conn: sqlite3.Connection, seq: int) -> bytes:
    return bytes(conn.execute("SELECT body FROM records WHERE seq = ?", (seq,)).fetchone()[0])


def first_call(home: Path, after: int) -> int:
    """Seq of the first ordinary record after ``after`` (not a seal)."""
    with sqlite3.connect(home / "audit.db") as conn:
        return int(conn.execute("SELECT min(seq) FROM records WHERE kind = 'tool.call' AND "
                                "seq > ?", (after,)).fetchone()[0])


async def found(home: Path, seq: int, *words: str, anchor: tuple[int, str] | None = None
                ) -> Report:
    """Both the read-only verifier and an opened log report ``seq`` first."""
    report = await verify_trail(home / "audit.db", home / "keys", anchor=anchor)
    assert not report.ok and report.first_bad_seq == seq, report.reason
    for w in words:
        assert w in report.reason
    with pytest.raises(AuditTampered, match=f"audit record {seq} is bad"):
        report.check()
    async with make(home) as log:
        again = await log.verify(anchor)
    assert again.first_bad_seq == seq
    return report


async def test_the_untouched_trail_verifies(trail: tuple[Path, tuple[int, str]]) -> None:
    home, anchor = trail
    report = await verify_trail(home / "audit.db", home / "keys", anchor=anchor)
    assert report.ok and report.records == anchor[0] and report.unsealed_tail == 0


async def test_an_edited_body(trail: tuple[Path, tuple[int, str]]) -> None:
    home, _ = trail
    k = first_call(home, 20)

    def deny(conn: sqlite3.Connection) -> None:
        body = body_of(conn, k).replace(b'"ok"', b'"deny"')
        conn.execute("UPDATE records SET body = ? WHERE seq = ?", (body, k))
    edit(home, deny)
    await found(home, k, "hash does not match")


async def test_a_body_rewritten_as_text(trail: tuple[Path, tuple[int, str]]) -> None:
    home, _ = trail
    k = first_call(home, 5)
    edit(home, lambda c: c.execute(
        "UPDATE records SET body = replace(body, '\"ok\"', '\"no\"') WHERE seq = ?", (k,)))
    await found(home, k)


async def test_an_edited_hash(trail: tuple[Path, tuple[int, str]]) -> None:
    home, _ = trail
    edit(home, lambda c: c.execute("UPDATE records SET hash = ? WHERE seq = 17",
                                   (hashlib.sha256(b"x").digest(),)))
    await found(home, 17)


async def test_an_edited_index_column(trail: tuple[Path, tuple[int, str]]) -> None:
    home, _ = trail
    k = first_call(home, 30)
    edit(home, lambda c: c.execute("UPDATE records SET agent = 'nobody' WHERE seq = ?", (k,)))
    async with make(home) as log:  # a query over the edited column notices too
        with pytest.raises(AuditTampered, match=f"audit record {k}"):
            await log.query(agent="nobody")
    await found(home, k, "index columns")


async def test_a_deleted_record(trail: tuple[Path, tuple[int, str]]) -> None:
    home, _ = trail
    edit(home, lambda c: c.execute("DELETE FROM records WHERE seq = 23"))
    await found(home, 23, "missing")


async def test_a_deleted_seal(trail: tuple[Path, tuple[int, str]]) -> None:
    home, _ = trail
    with sqlite3.connect(home / "audit.db") as conn:
        seal = conn.execute("SELECT min(seq) FROM records WHERE kind = 'audit.seal' AND seq > 2"
                            ).fetchone()[0]
    edit(home, lambda c: c.execute("DELETE FROM records WHERE seq = ?", (seal,)))
    await found(home, seal, "missing")


def shift_up(conn: sqlite3.Connection, k: int) -> None:
    """Renumber seq >= k to seq + 1 (two steps: seq is the primary key)."""
    conn.execute("UPDATE records SET seq = -seq WHERE seq >= ?", (k,))
    conn.execute("UPDATE records SET seq = 1 - seq WHERE seq < 0")


async def test_an_inserted_record(trail: tuple[Path, tuple[int, str]]) -> None:
    home, _ = trail
    k = 31

    def insert(conn: sqlite3.Connection) -> None:
        shift_up(conn, k)
        rec = decode(body_of(conn, k + 1))
        body = canonical(type(rec)(**{**rec.to_dict(), "seq": k, "outcome": "forged"}))
        conn.execute("INSERT INTO records VALUES (?, ?, ?, ?, ?, ?, ?)",
                     (k, rec.ts, rec.kind, rec.agent, "forged", body, hashlib.sha256(body).digest()))
    edit(home, insert)
    await found(home, k)


async def test_a_correctly_linked_insertion_breaks_the_next_link(
        trail: tuple[Path, tuple[int, str]]) -> None:
    home, _ = trail
    k = 31

    def insert(conn: sqlite3.Connection) -> None:
        prev = bytes(conn.execute("SELECT hash FROM records WHERE seq = ?", (k - 1,)).fetchone()[0])
        shift_up(conn, k)
        rec = decode(body_of(conn, k + 1))
        body = canonical(type(rec)(**{**rec.to_dict(), "seq": k}))
        conn.execute("INSERT INTO records VALUES (?, ?, ?, ?, ?, ?, ?)",
                     (k, rec.ts, rec.kind, rec.agent, rec.outcome, body, link(prev, body)))
    edit(home, insert)
    await found(home, k + 1, "inserted before it")


async def test_two_records_with_swapped_seqs(trail: tuple[Path, tuple[int, str]]) -> None:
    home, _ = trail

    def swap(conn: sqlite3.Connection) -> None:
        conn.execute("UPDATE records SET seq = -1 WHERE seq = 12")
        conn.execute("UPDATE records SET seq = 12 WHERE seq = 40")
        conn.execute("UPDATE records SET seq = 40 WHERE seq = -1")
    edit(home, swap)
    await found(home, 12)


async def test_a_truncated_tail_is_found_against_the_anchor(
        trail: tuple[Path, tuple[int, str]]) -> None:
    home, anchor = trail
    cut = anchor[0] - 6
    edit(home, lambda c: c.execute("DELETE FROM records WHERE seq > ?", (cut,)))
    plain = await verify_trail(home / "audit.db", home / "keys")
    assert plain.ok  # a clean cut leaves a consistent prefix: only an anchor shows it
    report = await verify_trail(home / "audit.db", home / "keys", anchor=anchor)
    assert report.first_bad_seq == cut + 1 and "cut off" in report.reason
    # Reopening seals the shortened trail, but the anchor still tells.
    async with make(home) as log:
        again = await log.verify(anchor)
    assert not again.ok and again.first_bad_seq is not None and again.first_bad_seq <= anchor[0]


async def test_a_rewrite_with_recomputed_hashes_fails_at_the_next_seal(
        trail: tuple[Path, tuple[int, str]]) -> None:
    """An attacker without the key edits a record and recomputes every hash after it."""
    home, _ = trail
    with sqlite3.connect(home / "audit.db") as conn:
        seals = [s for (s,) in conn.execute(
            "SELECT seq FROM records WHERE kind = 'audit.seal' ORDER BY seq")]
    k = seals[2] + 3  # a record between two seals

    def rewrite(conn: sqlite3.Connection) -> None:
        prev = bytes(conn.execute("SELECT hash FROM records WHERE seq = ?", (k - 1,)).fetchone()[0])
        rows = conn.execute("SELECT seq, body FROM records WHERE seq >= ? ORDER BY seq", (k,))
        for seq, body in list(rows):
            rec = decode(bytes(body)).to_dict()
            if seq == k:
                rec["outcome"] = "deny"
            if rec["kind"] == "audit.seal":  # point the seal at the new head; can't re-sign
                rec["data"] = {**rec["data"], "head": prev.hex()}
            new = canonical(type(decode(bytes(body)))(**rec))
            prev = link(prev, new)
            conn.execute("UPDATE records SET body = ?, hash = ?, outcome = ? WHERE seq = ?",
                         (new, prev, rec["outcome"], seq))
    edit(home, rewrite)
    report = await found(home, seals[2] + 1, f"seal in record {seals[3]}", "rewritten")
    assert report.head_seq == seals[2]


async def test_a_tampered_unsealed_tail_is_refused_at_open(tmp_path: Path) -> None:
    script = textwrap.dedent(f"""
        import asyncio, os
        from corral.audit import AuditLog
        async def main():
            log = AuditLog({str(tmp_path / "audit.db")!r}, {str(tmp_path / "keys")!r},
                           seal_every=1000, seal_interval=3600)
            await log.open()
            for i in range(5):
                await log.append("tool.call", actor="runtime", outcome="ok")
            os._exit(0)  # killed before any seal covered the five records
        asyncio.run(main())
    """)
    subprocess.run([sys.executable, "-c", script], check=True, cwd=ROOT, timeout=60)
    edit(tmp_path, lambda c: c.execute(
        "UPDATE records SET body = CAST(replace(CAST(body AS TEXT), 'ok', 'no') AS BLOB) "
        "WHERE seq = 5"))
    with pytest.raises(AuditTampered, match=r"audit record 5 .* is bad.*refusing to seal"):
        await make(tmp_path).open()
    report = await verify_trail(tmp_path / "audit.db", tmp_path / "keys")
    assert report.first_bad_seq == 5
