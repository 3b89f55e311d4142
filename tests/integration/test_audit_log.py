"""The audit log on real SQLite files: group commit, seals, keys, queries, export, faults."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import sqlite3
import stat
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from corral.audit import KEY_FILE, AuditKey, AuditLog, decode, verify_trail
from corral.errors import AuditKeyError, AuditUnavailable

ROOT = Path(__file__).parents[2]
VERIFIER = ROOT / "examples" / "audit_verify.py"


class Clock:
    """Wall and monotonic time the test moves by hand."""

    def __init__(self) -> None:
        self.wall = 1_730_000_000.0
        self.mono = 1000.0

    def advance(self, seconds: float) -> None:
        self.wall += seconds
        self.mono += seconds


def make(tmp_path: Path, clock: Clock | None = None, **kw: Any) -> AuditLog:
    # Timed seals only where a test asks for them: a slow machine must not add seals.
    kw.setdefault("seal_interval", 3600.0)
    if clock is not None:
        kw.update(clock=lambda: clock.wall, monotonic=lambda: clock.mono)
    return AuditLog(tmp_path / "audit.db", tmp_path / "keys" / "audit", **kw)


@pytest.fixture
async def log(tmp_path: Path) -> AsyncIterator[AuditLog]:
    async with make(tmp_path) as audit:
        yield audit


def rows(tmp_path: Path) -> list[tuple[int, str, bytes]]:
    with sqlite3.connect(tmp_path / "audit.db") as conn:
        return [(s, k, bytes(b)) for s, k, b in conn.execute(
            "SELECT seq, kind, body FROM records ORDER BY seq")]


def run_verifier(export: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run examples/audit_verify.py with Corral made unimportable: it must stand alone."""
    block = ("import runpy, sys; sys.modules['corral'] = None; sys.argv = sys.argv[1:]; "
             "runpy.run_path(sys.argv[0], run_name='__main__')")
    return subprocess.run([sys.executable, "-I", "-c", block, str(VERIFIER), str(export), *args],
                          capture_output=True, text=True, cwd="/", timeout=60)


# --------------------------------------------------------------------------- appending


async def test_append_returns_committed_seqs(log: AuditLog, tmp_path: Path) -> None:
    seq = await log.append("tool.call", actor="agent:a", agent="a", resource="search",
                           outcome="ok", data={"args_sha256": "ab" * 32})
    assert seq == 3  # after the genesis record and its seal
    assert log.anchor()[0] == 3
    stored = rows(tmp_path)
    assert [k for _, k, _ in stored] == ["audit.genesis", "audit.seal", "tool.call"]
    assert decode(stored[2][2]).data == {"args_sha256": "ab" * 32}


async def test_concurrent_appends_share_commits(tmp_path: Path) -> None:
    async with make(tmp_path, seal_every=50) as log:
        seqs = await asyncio.gather(*(log.append("message.sent", actor="agent:a", agent="a",
                                                 data={"n": i}) for i in range(500)))
        stats = log.stats
        report = await log.verify()
    assert len(set(seqs)) == 500 and seqs == sorted(seqs)  # queued in call order
    assert stats["records"] == 500 and stats["batches"] < 500
    assert report.ok and report.records == 2 + 500 + stats["seals"]
    assert report.seals == stats["seals"] + 1  # plus the genesis seal


async def test_a_seal_follows_every_n_records(tmp_path: Path) -> None:
    async with make(tmp_path, seal_every=10) as log:
        for i in range(25):
            await log.append("tool.call", actor="runtime", data={"i": i})
    kinds = [k for _, k, _ in rows(tmp_path)]
    seals = [i + 1 for i, k in enumerate(kinds) if k == "audit.seal"]
    assert seals[:3] == [2, 13, 24]
    assert kinds[-1] == "audit.seal"  # close wrote the final one


async def test_a_seal_is_written_when_the_interval_passes(tmp_path: Path) -> None:
    clock = Clock()
    async with make(tmp_path, clock, seal_every=1000, seal_interval=2.0) as log:
        await log.append("tool.call", actor="runtime")
        await log.flush()
        assert rows(tmp_path)[-1][1] == "tool.call"  # not due yet
        clock.advance(2.5)
        await log.flush()
        last = rows(tmp_path)[-1]
        assert last[1] == "audit.seal" and decode(last[2]).data["sealed_seq"] == 3
        assert decode(last[2]).ts == int(clock.wall * 1_000_000)


async def test_reopening_carries_on_the_same_chain(tmp_path: Path) -> None:
    async with make(tmp_path) as log:
        await log.append("tool.call", actor="runtime")
        trail, key = log.trail_id, log.key_id
    async with make(tmp_path) as log:
        assert (log.trail_id, log.key_id) == (trail, key)
        assert await log.append("tool.call", actor="runtime") == 5
    report = await log.verify()  # after close: its final seal covers record 5
    assert report.ok and report.unsealed_tail == 0 and report.records == 6


async def test_a_crash_leaves_an_unsealed_tail_that_the_next_open_seals(tmp_path: Path) -> None:
    script = textwrap.dedent(f"""
        import asyncio, os
        from corral.audit import AuditLog
        async def main():
            log = AuditLog({str(tmp_path / "audit.db")!r}, {str(tmp_path / "keys" / "audit")!r},
                           seal_every=1000, seal_interval=3600)
            await log.open()
            for i in range(7):
                await log.append("tool.call", actor="runtime", data={{"i": i}})
            os._exit(0)  # no close: as if killed
        asyncio.run(main())
    """)
    subprocess.run([sys.executable, "-c", script], check=True, cwd=ROOT, timeout=60)
    report = await verify_trail(tmp_path / "audit.db", tmp_path / "keys" / "audit")
    assert report.ok and report.unsealed_tail == 7
    async with make(tmp_path) as log:
        report = await log.verify()
        assert report.ok and report.unsealed_tail == 0 and report.records == 10


async def test_cancelled_appenders_leave_a_sound_trail(tmp_path: Path) -> None:
    async with make(tmp_path, seal_every=20) as log:
        tasks = [asyncio.ensure_future(log.append("tool.call", actor="runtime", data={"i": i}))
                 for i in range(200)]
        await asyncio.sleep(0)  # let them queue
        for t in tasks[::3]:
            t.cancel()
        done = await asyncio.gather(*tasks, return_exceptions=True)
        assert all(isinstance(d, int | asyncio.CancelledError) for d in done)
        # A cancelled caller's record may still be committed: the trail errs towards recording.
        assert await log.append("tool.call", actor="runtime") > max(
            d for d in done if isinstance(d, int))
        assert (await log.verify()).ok


async def test_a_writer_too_far_behind_refuses(tmp_path: Path) -> None:
    async with make(tmp_path, max_pending=1) as log:
        results = await asyncio.gather(
            *(log.append("tool.call", actor="runtime") for _ in range(200)),
            return_exceptions=True)
        refused = [r for r in results if isinstance(r, AuditUnavailable)]
        assert refused and "behind" in str(refused[0])
        assert all(isinstance(r, int | AuditUnavailable) for r in results)
        assert (await log.verify()).ok


async def test_rotation_amid_concurrent_appends(tmp_path: Path) -> None:
    async with make(tmp_path, seal_every=25) as log:
        async def appender(n: int) -> None:
            for i in range(50):
                await log.append("tool.call", actor=f"agent:a{n}", data={"i": i})
        results = await asyncio.gather(*(appender(n) for n in range(8)),
                                       log.rotate_key(), log.rotate_key())
        report = await log.verify()
        known = set(log.public_keys)
    assert report.ok and len(report.key_ids) == 3 and report.key_ids[-1] == results[-1]
    assert set(report.key_ids) == known  # every key that signed is in the key file


async def test_refused_records_and_closed_logs(tmp_path: Path) -> None:
    log = make(tmp_path)
    with pytest.raises(AuditUnavailable, match="not open"):
        await log.append("tool.call", actor="runtime")
    async with log:
        with pytest.raises(TypeError, match="float"):
            await log.append("tool.call", actor="runtime", data={"cpu": 0.5})
        with pytest.raises(ValueError, match="reserved"):
            await log.append("audit.seal", actor="runtime")
        with pytest.raises(AuditUnavailable, match="another process"):
            await make(tmp_path).open()  # the trail is locked while open
        assert log.anchor()[0] == 2  # nothing of the refused records was written
    with pytest.raises(AuditUnavailable, match="closed"):
        await log.append("tool.call", actor="runtime")
    assert (await log.verify()).ok  # reads still work after close


# --------------------------------------------------------------------------------- keys


async def test_the_key_file_is_private(tmp_path: Path, log: AuditLog) -> None:
    path = tmp_path / "keys" / "audit" / KEY_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    doc = json.loads(path.read_text())
    assert doc["current"] == log.key_id and doc["keys"][log.key_id]["private"]


async def test_rotation_is_recorded_and_verifies(tmp_path: Path) -> None:
    async with make(tmp_path) as log:
        old = log.key_id
        await log.append("tool.call", actor="runtime")
        new = await log.rotate_key()
        assert log.key_id == new != old
        await log.append("tool.call", actor="runtime")
        report = await log.verify()
        assert report.ok and report.key_ids == (old, new)
        rotations = await log.query(action="audit.key_rotated")
        assert rotations[0]["data"]["previous_key_id"] == old
        assert rotations[0]["data"]["key_id"] == new
    doc = json.loads((tmp_path / "keys" / "audit" / KEY_FILE).read_text())
    assert doc["current"] == new and doc["pending"] is None
    assert doc["keys"][old]["private"] is None  # the old private key is destroyed
    async with make(tmp_path) as log:  # and the trail reopens under the new key
        assert log.key_id == new and (await log.verify()).ok


async def test_a_rotation_interrupted_before_the_key_file_caught_up(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(self: AuditKey, key_id: str) -> None:
        raise AuditKeyError("disk trouble")
    async with make(tmp_path) as log:
        monkeypatch.setattr(AuditKey, "finish_rotation", fail)
        new = await log.rotate_key()
        await log.append("tool.call", actor="runtime")
    monkeypatch.undo()
    assert json.loads((tmp_path / "keys" / "audit" / KEY_FILE).read_text())["pending"] == new
    async with make(tmp_path) as log:
        assert log.key_id == new and (await log.verify()).ok
    assert json.loads((tmp_path / "keys" / "audit" / KEY_FILE).read_text())["current"] == new


async def test_a_missing_key_file_refuses_an_existing_trail(tmp_path: Path) -> None:
    async with make(tmp_path) as log:
        await log.append("tool.call", actor="runtime")
    (tmp_path / "keys" / "audit" / KEY_FILE).unlink()
    with pytest.raises(AuditKeyError, match="missing") as exc:
        await make(tmp_path).open()
    assert "restore the key file" in str(exc.value)
    assert not (tmp_path / "keys" / "audit" / KEY_FILE).exists()  # no new key was made


@pytest.mark.parametrize(("content", "words"), [
    (b"{not json", "not valid JSON"),
    (b'{"version": 1, "purpose": "corral-audit", "current": "x", "keys": {}}', "corrupt"),
    (b'{"version": 2}', "unknown format"),
])
async def test_a_corrupt_key_file_is_refused(tmp_path: Path, content: bytes, words: str) -> None:
    async with make(tmp_path):
        pass
    path = tmp_path / "keys" / "audit" / KEY_FILE
    path.write_bytes(content)
    with pytest.raises(AuditKeyError, match=words):
        await make(tmp_path).open()


async def test_a_key_file_others_can_read_is_refused(tmp_path: Path) -> None:
    async with make(tmp_path):
        pass
    os.chmod(tmp_path / "keys" / "audit" / KEY_FILE, 0o644)
    with pytest.raises(AuditKeyError, match="chmod 600"):
        await make(tmp_path).open()


async def test_another_trails_key_is_refused(tmp_path: Path) -> None:
    async with make(tmp_path / "one"):
        pass
    async with make(tmp_path / "two"):
        pass
    os.replace(tmp_path / "two" / "keys" / "audit" / KEY_FILE,
               tmp_path / "one" / "keys" / "audit" / KEY_FILE)
    with pytest.raises(AuditKeyError, match="belongs to this trail"):
        await make(tmp_path / "one").open()


# ------------------------------------------------------------------------------- query


async def test_query_filters_by_agent_action_time_and_outcome(tmp_path: Path) -> None:
    clock = Clock()
    async with make(tmp_path, clock) as log:
        for i in range(12):
            clock.advance(10)
            await log.append("policy.decision" if i % 2 else "tool.call",
                             actor=f"agent:a{i % 3}", agent=f"a{i % 3}",
                             outcome="deny" if i % 4 == 1 else "allow", data={"i": i})
        start = clock.wall - 12 * 10
        by_agent = await log.query(agent="a1")
        assert [r["data"]["i"] for r in by_agent] == [1, 4, 7, 10]
        assert {r["actor"] for r in by_agent} == {"agent:a1"}
        denied = await log.query(action="policy.decision", outcome="deny")
        assert [r["data"]["i"] for r in denied] == [1, 5, 9]
        assert len(await log.query(action="policy.*")) == 6
        assert len(await log.query(action="audit.*")) >= 2  # genesis and seals
        window = await log.query(since=start + 30, until=start + 60)
        assert [r["data"]["i"] for r in window] == [2, 3, 4]
        aware = dt.datetime.fromtimestamp(start + 30, dt.UTC)
        assert [r["data"]["i"] for r in await log.query(since=aware, limit=2)] == [2, 3]
        page = await log.query(agent="a0", after=by_agent[0]["seq"], limit=1)
        assert page[0]["data"]["i"] == 3
        assert all(len(r["hash"]) == 64 for r in by_agent)


# ------------------------------------------------------------------------------ export


async def test_export_verifies_with_the_standalone_script(tmp_path: Path) -> None:
    async with make(tmp_path, seal_every=7) as log:
        for i in range(30):
            await log.append("tool.call", actor="agent:ü", agent="ü", data={"i": i, "s": "é"})
        await log.rotate_key()
        for _ in range(5):
            await log.append("tool.call", actor="runtime")
        info = await log.export(tmp_path / "trail.jsonl")
        first_key = next(iter(log.public_keys))
        anchor = log.anchor()
    assert info["records"] == anchor[0] and info["head_hash"] == anchor[1]
    assert len(info["public_keys"]) == 2
    lines = (tmp_path / "trail.jsonl").read_text(encoding="utf-8").splitlines()
    assert json.loads(lines[0])["format"] == "corral-audit-export"
    assert len(lines) == anchor[0] + 1
    assert stat.S_IMODE((tmp_path / "trail.jsonl").stat().st_mode) == 0o600

    ok = run_verifier(tmp_path / "trail.jsonl", "--trust", first_key,
                      "--anchor", f"{anchor[0]}:{anchor[1]}")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert f"OK: {anchor[0]} records" in ok.stdout

    wrong = run_verifier(tmp_path / "trail.jsonl", "--trust", "0123456789abcdef")
    assert wrong.returncode == 1 and "TAMPERED: record 1" in wrong.stdout


@contextmanager
def edited(path: Path, index: int, change: Any) -> Iterator[Path]:
    """A copy of the export with line ``index`` (0 = header) changed by ``change``."""
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    out = path.with_name("tampered.jsonl")
    lines = change(lines, index)
    out.write_text("".join(lines), encoding="utf-8")
    yield out


def _edit_body(lines: list[str], i: int) -> list[str]:
    entry = json.loads(lines[i])
    entry["body"] = entry["body"].replace('"ok"', '"deny"')
    lines[i] = json.dumps(entry) + "\n"
    return lines


async def test_a_tampered_export_fails_the_standalone_script(tmp_path: Path) -> None:
    async with make(tmp_path, seal_every=5) as log:
        for i in range(20):
            await log.append("tool.call", actor="runtime", outcome="ok", data={"i": i})
        await log.export(tmp_path / "trail.jsonl")
        anchor = log.anchor()
    cases: list[tuple[Any, int, str]] = [
        (_edit_body, 10, "TAMPERED: record 10"),
        (lambda ls, i: ls[:i] + ls[i + 1:], 10, "TAMPERED: record 10"),  # deleted
        (lambda ls, i: [*ls[:i], ls[i + 1], ls[i], *ls[i + 2:]], 10, "TAMPERED: record 10"),
        (lambda ls, i: ls[:i], 20, "TAMPERED: record 20"),  # cut off: the header knows
    ]
    for change, index, expect in cases:
        with edited(tmp_path / "trail.jsonl", index, change) as bad:
            out = run_verifier(bad)
            assert out.returncode == 1 and expect in out.stdout, (expect, out.stdout)
    # A cut that also fixes the header is caught by the published anchor.
    lines = (tmp_path / "trail.jsonl").read_text().splitlines(keepends=True)[:20]
    header = json.loads(lines[0])
    header["records"], header["head"] = 19, {"seq": 19, "hash": json.loads(lines[19])["hash"]}
    (tmp_path / "cut.jsonl").write_text(json.dumps(header) + "\n" + "".join(lines[1:]))
    assert run_verifier(tmp_path / "cut.jsonl").returncode == 0
    out = run_verifier(tmp_path / "cut.jsonl", "--anchor", f"{anchor[0]}:{anchor[1]}")
    assert out.returncode == 1 and "TAMPERED: record 20" in out.stdout
    # A header whose head disagrees with the records is caught at that record.
    lines = (tmp_path / "trail.jsonl").read_text().splitlines(keepends=True)
    header = json.loads(lines[0])
    header["head"]["hash"] = "00" * 32
    (tmp_path / "head.jsonl").write_text(json.dumps(header) + "\n" + "".join(lines[1:]))
    out = run_verifier(tmp_path / "head.jsonl")
    assert out.returncode == 1 and f"TAMPERED: record {anchor[0]}" in out.stdout
    (tmp_path / "junk.jsonl").write_text("hello\n")
    assert run_verifier(tmp_path / "junk.jsonl").returncode == 2


# ------------------------------------------------------------------------------ faults


async def assert_fail_closed(log: AuditLog, tmp_path: Path, fault: Any, clear: Any) -> None:
    """Under ``fault`` appends are refused and nothing is written; after ``clear`` all is well."""
    acknowledged = [await log.append("tool.call", actor="runtime", data={"n": i})
                    for i in range(5)]
    before = log.anchor()
    stored_before = rows(tmp_path)
    await fault()
    results = await asyncio.gather(
        *(log.append("tool.call", actor="runtime", data={"pad": "x" * 5000, "n": i})
          for i in range(20)), return_exceptions=True)
    assert all(isinstance(r, AuditUnavailable) for r in results), results
    assert "the action was refused" in str(results[0])
    assert log.anchor() == before  # the head did not move
    assert rows(tmp_path) == stored_before  # nothing half-written, nothing lost
    await clear()
    seq = await log.append("tool.call", actor="runtime", data={"after": True})
    assert seq == before[0] + 1  # the chain carries on from the same head
    report = await log.verify()
    assert report.ok and report.records == seq
    assert set(acknowledged) <= {r["seq"] for r in await log.query(action="tool.call")}


async def test_a_full_database_refuses_and_recovers(tmp_path: Path) -> None:
    async with make(tmp_path) as log:
        def cap(conn: sqlite3.Connection) -> None:
            pages = conn.execute("PRAGMA page_count").fetchone()[0]
            conn.execute(f"PRAGMA max_page_count = {pages}")  # SQLITE_FULL on the next page

        async def fault() -> None:
            await log._run_in_writer(cap)

        async def clear() -> None:
            await log._run_in_writer(lambda c: c.execute("PRAGMA max_page_count = 1073741823"))
        await assert_fail_closed(log, tmp_path, fault, clear)


async def test_a_read_only_database_refuses_and_recovers(tmp_path: Path) -> None:
    async with make(tmp_path) as log:
        async def fault() -> None:  # SQLite's own read-only mode: SQLITE_READONLY on write
            await log._run_in_writer(lambda c: c.execute("PRAGMA query_only = ON"))

        async def clear() -> None:
            await log._run_in_writer(lambda c: c.execute("PRAGMA query_only = OFF"))
        await assert_fail_closed(log, tmp_path, fault, clear)


@contextmanager
def small_disk(path: Path, size: str) -> Iterator[Path]:
    """A real, small file system (tmpfs) at ``path``; skips where mounting is not allowed."""
    path.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"can't mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(path: Path) -> None:
    """Write a file until the file system is full."""
    with open(path, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
        try:
            os.fsync(f.fileno())
        except OSError:
            pass


async def test_a_full_disk_refuses_and_recovers(tmp_path: Path) -> None:
    with small_disk(tmp_path / "disk", "4m") as disk:
        async with make(disk) as log:
            acknowledged = [await log.append("tool.call", actor="runtime", data={"n": i})
                            for i in range(5)]
            fill(disk / "filler")
            error: AuditUnavailable | None = None
            for _ in range(2000):  # the WAL may still have room: write until it has none
                head = log.anchor()
                try:
                    acknowledged.append(await log.append("tool.call", actor="runtime",
                                                         data={"pad": "x" * 3000}))
                except AuditUnavailable as exc:
                    error = exc
                    break
            assert error is not None, "the disk never filled up"
            assert "full" in str(error) and "refused" in str(error)
            assert log.anchor() == head  # the refused record moved nothing
            with pytest.raises(AuditUnavailable):  # still full: still refused
                await log.append("tool.call", actor="runtime", data={"pad": "x" * 3000})
            (disk / "filler").unlink()
            seq = await log.append("tool.call", actor="runtime", data={"after": True})
            assert seq == head[0] + 1
            acknowledged.append(seq)
            report = await log.verify()
            assert report.ok and report.records == seq
            # Every acknowledged record is there, and nothing else of kind tool.call.
            stored = [s for s, kind, _ in rows(disk) if kind == "tool.call"]
            assert stored == acknowledged


async def test_a_read_only_file_system_refuses_to_open(tmp_path: Path) -> None:
    with small_disk(tmp_path / "disk", "4m") as disk:
        async with make(disk) as log:
            await log.append("tool.call", actor="runtime")
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        with pytest.raises(AuditUnavailable, match=r"Read-only file system|readonly"):
            await make(disk).open()
        subprocess.run(["mount", "-o", "remount,rw", str(disk)], check=True)
        async with make(disk) as log:
            assert await log.append("tool.call", actor="runtime") == 5
            assert (await log.verify()).ok
