"""SQLiteStore: every table round-trips, commit() is a barrier, group commit batches, failures surface."""

from __future__ import annotations

import asyncio
import sqlite3
import stat
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from corral.errors import StoreError
from corral.store import SCHEMA_VERSION, SQLiteStore, TaskRecord


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SQLiteStore]:
    s = SQLiteStore(tmp_path / "home" / "corral.db")
    await s.open()
    try:
        yield s
    finally:
        await s.close()


def _task(id: str, created: float, status: str = "queued", **kw: object) -> TaskRecord:
    return TaskRecord(id=id, agent="a", handler="h", payload={"n": id}, priority=0, kind="call",
                      sender="cli", status=status, created=created, **kw)  # type: ignore[arg-type]


async def _hold_writer(store: SQLiteStore) -> tuple[threading.Event, asyncio.Future[object]]:
    """Park the writer thread inside a batch; it resumes when the returned event is set."""
    entered, release = threading.Event(), threading.Event()

    def hold(conn: sqlite3.Connection) -> None:
        entered.set()
        release.wait(10)

    held = asyncio.ensure_future(store._run_in_writer(hold))
    assert await asyncio.to_thread(entered.wait, 10)
    return release, held


# ---------------------------------------------------------------- each table


async def test_events_round_trip_in_order_with_filters(store: SQLiteStore) -> None:
    for i in range(20):
        store.append_event("a" if i % 2 else "b", "odd" if i % 2 else "even", {"i": i, "l": [i]},
                           ts=100.0 + i)
    await store.commit()

    every = await store.events()
    assert [e.seq for e in every] == list(range(1, 21))
    assert [e.data["i"] for e in every] == list(range(20))
    assert every[3].ts == 103.0 and every[3].agent == "a" and every[3].data == {"i": 3, "l": [3]}

    assert [e.data["i"] for e in await store.events(agent="a")] == list(range(1, 20, 2))
    assert [e.data["i"] for e in await store.events(after=15)] == [15, 16, 17, 18, 19]
    assert [e.data["i"] for e in await store.events(kinds=["even"], limit=3)] == [0, 2, 4]
    assert [e.data["i"] for e in await store.events(kinds="odd", limit=2)] == [1, 3]
    assert await store.events(kinds=[]) == []


async def test_ts_is_taken_at_enqueue_time(store: SQLiteStore) -> None:
    release, held = await _hold_writer(store)
    before = time.time()
    store.append_event("a", "k", {})
    after = time.time()
    release.set()
    await held
    await store.commit()
    (event,) = await store.events()
    assert before <= event.ts <= after


async def test_memory_put_overwrite_and_clear(store: SQLiteStore) -> None:
    store.put_memory("a", "k1", {"deep": [1, 2]}, ts=1.0)
    store.put_memory("a", "k2", "v2", ts=2.0)
    store.put_memory("a", "k1", "new", ts=3.0)
    store.put_memory("b", "k1", None, ts=4.0)
    await store.commit()
    assert await store.memory("a") == {"k1": ("new", 3.0), "k2": ("v2", 2.0)}
    assert await store.memory("b") == {"k1": (None, 4.0)}

    store.clear_memory("a")
    await store.commit()
    assert await store.memory("a") == {}
    assert await store.memory("b") == {"k1": (None, 4.0)}


async def test_tasks_lifecycle_pending_and_prune(store: SQLiteStore) -> None:
    store.put_task(_task("t2", created=2.0))
    store.put_task(_task("t1", created=1.0))
    store.put_task(_task("t3", created=3.0))
    store.set_task_status("t1", "running", attempts=1)
    store.set_task_status("t3", "running")
    store.finish_task("t2", "succeeded", result={"ok": True}, ts=10.0)
    await store.commit()

    assert [t.id for t in await store.pending_tasks()] == ["t1", "t3"]
    t1 = await store.task("t1")
    assert t1 == _task("t1", created=1.0, status="running", attempts=1)
    t3 = await store.task("t3")
    assert t3 is not None and t3.status == "running" and t3.attempts == 0
    t2 = await store.task("t2")
    assert t2 is not None
    assert (t2.status, t2.result, t2.error, t2.finished) == ("succeeded", {"ok": True}, None, 10.0)
    assert t2.payload == {"n": "t2"}
    assert await store.task("missing") is None

    store.finish_task("t1", "failed", error="boom", ts=20.0)
    await store.commit()
    t1 = await store.task("t1")
    assert t1 is not None and (t1.status, t1.error, t1.result) == ("failed", "boom", None)

    # Only finished tasks older than the cutoff go; t3 is still running and stays.
    assert await store.prune_finished_tasks(older_than=15.0) == 1
    assert await store.task("t2") is None
    assert await store.task("t1") is not None
    assert await store.prune_finished_tasks(older_than=100.0) == 1
    assert [t.id for t in await store.pending_tasks()] == ["t3"]


async def test_put_task_replaces(store: SQLiteStore) -> None:
    store.put_task(_task("t", created=1.0))
    store.put_task(_task("t", created=1.0, status="cancelled", error="stop"))
    await store.commit()
    t = await store.task("t")
    assert t is not None and (t.status, t.error) == ("cancelled", "stop")
    assert await store.pending_tasks() == []


async def test_logs_filters(store: SQLiteStore) -> None:
    for i in range(10):
        store.append_log("a", f"a-{i % 2}", "info", f"line {i}", ts=float(i))
    store.append_log("b", "b-0", "error", "other agent")
    await store.commit()

    lines = await store.logs("a")
    assert [r.message for r in lines] == [f"line {i}" for i in range(10)]
    assert lines[0].instance == "a-0" and lines[0].level == "info" and lines[0].ts == 0.0
    assert [r.message for r in await store.logs("a", instance="a-1", limit=2)] == ["line 1", "line 3"]
    assert [r.message for r in await store.logs("a", after=lines[7].seq)] == ["line 8", "line 9"]
    assert [r.message for r in await store.logs("b")] == ["other agent"]


async def test_meta(store: SQLiteStore) -> None:
    assert await store.get_meta("nope") is None
    store.put_meta("boot", {"n": 1})
    store.put_meta("boot", {"n": 2})
    await store.commit()
    assert await store.get_meta("boot") == {"n": 2}


# ---------------------------------------------------------------- commit semantics


async def test_writes_are_visible_only_after_commit(store: SQLiteStore) -> None:
    release, held = await _hold_writer(store)
    store.append_event("a", "k", {"i": 1})
    store.put_meta("m", 1)
    # The writer is parked in a transaction that has not committed: readers see nothing.
    assert await store.events() == []
    assert await store.get_meta("m") is None
    release.set()
    await store.commit()
    await held
    assert [e.data for e in await store.events()] == [{"i": 1}]
    assert await store.get_meta("m") == 1


async def test_commit_is_a_barrier_for_everything_before_it(store: SQLiteStore) -> None:
    # Interleave commits from many tasks: each sees at least the writes queued before its call.
    async def writer(n: int) -> None:
        for i in range(50):
            store.append_event(f"w{n}", "k", {"i": i})
            if i % 10 == 9:
                await store.commit()
                mine = await store.events(agent=f"w{n}")
                assert [e.data["i"] for e in mine][: i + 1] == list(range(i + 1))

    async with asyncio.TaskGroup() as tg:
        for n in range(8):
            tg.create_task(writer(n))
    assert len(await store.events()) == 400


async def test_commit_on_idle_store_returns(store: SQLiteStore) -> None:
    await store.commit()
    await store.commit()
    assert store.stats["batches"] == 0  # barriers alone open no transaction


async def test_cancelled_commit_does_not_disturb_the_writer(store: SQLiteStore) -> None:
    release, held = await _hold_writer(store)
    store.append_event("a", "k", {})
    waiter = asyncio.ensure_future(store.commit())
    await asyncio.sleep(0)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    release.set()
    await held
    await store.commit()
    assert len(await store.events()) == 1


async def test_group_commit_batches(tmp_path: Path) -> None:
    async with SQLiteStore(tmp_path / "s.db") as store:
        release, held = await _hold_writer(store)
        # Queue everything while the writer is parked, so the batching is deterministic.
        for i in range(10_000):
            store.append_event("a", "tick", {"i": i})
        assert store.stats["queue_depth"] >= 10_000
        release.set()
        await held
        await store.commit()
        stats = store.stats
        assert stats["ops"] == 10_000
        assert stats["batches"] <= 10_000 // 2000 + 2
        assert stats["largest_batch"] <= 2000
        assert stats["queue_depth"] == 0
        events = await store.events()
        assert [e.data["i"] for e in events] == list(range(10_000))
        assert [e.seq for e in events] == list(range(1, 10_001))


async def test_batch_max_is_honoured(tmp_path: Path) -> None:
    async with SQLiteStore(tmp_path / "s.db", batch_max=100) as store:
        release, held = await _hold_writer(store)
        for i in range(1000):
            store.append_event("a", "tick", {"i": i})
        release.set()
        await held
        await store.commit()
        assert store.stats["largest_batch"] <= 100
        assert store.stats["batches"] >= 10


# ---------------------------------------------------------------- durability and schema


async def test_reopen_sees_everything(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    async with SQLiteStore(path, synchronous="FULL") as store:
        for i in range(100):
            store.append_event("a", "k", {"i": i})
        store.put_memory("a", "k", [1, 2, 3], ts=5.0)
        store.put_task(_task("t", created=1.0))
        store.append_log("a", "a-0", "info", "hello")
        store.put_meta("version", "x")
        # No commit(): close() must flush.

    async with SQLiteStore(path) as again:
        assert [e.data["i"] for e in await again.events()] == list(range(100))
        assert await again.memory("a") == {"k": ([1, 2, 3], 5.0)}
        assert [t.id for t in await again.pending_tasks()] == ["t"]
        assert [r.message for r in await again.logs("a")] == ["hello"]
        assert await again.get_meta("version") == "x"
        again.append_event("a", "k", {"i": 100})
        await again.commit()
        assert (await again.events(after=100))[0].seq == 101

    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()


async def test_open_creates_private_folder_and_file(tmp_path: Path) -> None:
    path = tmp_path / "new" / "home" / "corral.db"
    async with SQLiteStore(path):
        pass
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


async def test_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    store = SQLiteStore(path)
    with pytest.raises(StoreError, match="newer"):
        await store.open()
    await store.close()  # a no-op after a failed open


async def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        SQLiteStore("x.db", synchronous="sometimes")
    with pytest.raises(ValueError):
        SQLiteStore("x.db", batch_max=0)


# ---------------------------------------------------------------- failures


async def test_constraint_violation_fails_commit_and_stops_writes(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    store = SQLiteStore(path)
    await store.open()
    store.append_event("a", "k", {"i": 0})
    await store.commit()

    release, held = await _hold_writer(store)
    store.append_event("a", "k", {"i": 1})  # same batch as the bad insert: rolled back with it
    store._execute("INSERT INTO meta (key, value) VALUES (?, ?)", ("dup", b""))
    store._execute("INSERT INTO meta (key, value) VALUES (?, ?)", ("dup", b""))
    pending = [asyncio.ensure_future(store.commit()) for _ in range(3)]
    await asyncio.sleep(0)
    release.set()
    async with asyncio.timeout(10):
        await held  # its batch held only the parking call; the writes form the next one
        for fut in pending:
            with pytest.raises(StoreError, match="UNIQUE constraint") as info:
                await fut
            assert isinstance(info.value.__cause__, sqlite3.IntegrityError)
        with pytest.raises(StoreError, match="rolled back"):
            await store.commit()
    with pytest.raises(StoreError):
        store.append_event("a", "k", {"i": 2})
    assert store.stats["failed"] == 1
    # Reads still work, and show only what committed.
    assert [e.data["i"] for e in await store.events()] == [0]
    await store.close()  # the failure was already reported: close does not raise again

    async with SQLiteStore(path) as again:
        assert [e.data["i"] for e in await again.events()] == [0]


async def test_connection_closed_under_the_writer(store: SQLiteStore) -> None:
    store.append_event("a", "k", {})
    async with asyncio.timeout(10):
        # The batch's COMMIT then finds the connection gone.
        with pytest.raises(StoreError, match="closed database") as info:
            await store._run_in_writer(lambda conn: conn.close())
        assert isinstance(info.value.__cause__, sqlite3.ProgrammingError)
        with pytest.raises(StoreError, match="closed database"):
            await store.commit()
    with pytest.raises(StoreError):
        store.append_event("a", "k", {})


async def test_unreported_failure_is_raised_by_close(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "s.db")
    await store.open()
    store._execute("INSERT INTO no_such_table VALUES (1)")
    # No commit() ever hears of the failure, so close(), which flushes, has to report it.
    async with asyncio.timeout(10):
        with pytest.raises(StoreError, match="no_such_table"):
            await store.close()


async def test_unencodable_value_raises_at_the_call(store: SQLiteStore) -> None:
    with pytest.raises(StoreError, match="event 'k' data"):
        store.append_event("a", "k", {"x": object()})
    with pytest.raises(StoreError):
        store.put_memory("a", "k", [object()])
    await store.commit()  # nothing was queued, nothing broke
    assert store.stats["failed"] == 0


async def test_use_outside_open_and_close(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "s.db")
    with pytest.raises(StoreError, match="not open"):
        store.append_event("a", "k", {})
    with pytest.raises(StoreError, match="not open"):
        await store.events()
    await store.open()
    with pytest.raises(StoreError, match="already"):
        await store.open()
    await store.close()
    await store.close()  # idempotent
    with pytest.raises(StoreError, match="closed"):
        store.put_meta("k", 1)
    with pytest.raises(StoreError, match="closed"):
        await store.commit()
    with pytest.raises(StoreError, match="closed"):
        await store.memory("a")


async def test_close_is_bounded_when_the_writer_is_stuck(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "s.db", close_timeout=0.2)
    await store.open()
    release, held = await _hold_writer(store)
    store.append_event("a", "k", {})
    try:
        async with asyncio.timeout(5):  # a generous outer bound: close() must give up well before
            with pytest.raises(StoreError, match="did not stop"):
                await store.close()
    finally:
        release.set()
    # Once unstuck, the writer still flushes what it had and exits.
    await held
    writer = store._writer
    assert writer is not None
    await asyncio.to_thread(writer.join, 5)
    assert not writer.is_alive()


# ---------------------------------------------------------------- the loop never touches SQLite


async def test_sqlite_work_happens_off_the_loop_thread(store: SQLiteStore) -> None:
    loop_thread = threading.get_ident()
    writer_threads: set[int] = set()
    reader_threads: set[int] = set()

    def trace(conn: sqlite3.Connection) -> int:
        conn.set_trace_callback(lambda sql: writer_threads.add(threading.get_ident()))
        return threading.get_ident()

    writer_ident = await store._run_in_writer(trace)

    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    async with asyncio.TaskGroup() as tg:
        tick_task = tg.create_task(ticker())
        for i in range(50_000):
            store.append_event("a", "bulk", {"i": i})
        await asyncio.sleep(0)
        seen_before_commit = ticks
        await store.commit()
        assert ticks > seen_before_commit  # the loop kept running while the writer committed
        tick_task.cancel()

    events = await store._read(lambda conn: (reader_threads.add(threading.get_ident()),
                                             conn.execute("SELECT count(*) FROM events")
                                             .fetchone()[0])[1])
    assert events == 50_000
    assert writer_threads == {writer_ident}
    assert loop_thread not in writer_threads
    assert reader_threads and loop_thread not in reader_threads
    assert writer_ident not in reader_threads


async def test_writes_from_other_threads_keep_per_thread_order(store: SQLiteStore) -> None:
    def produce(name: str) -> None:
        for i in range(500):
            store.append_event(name, "k", {"i": i})

    await asyncio.gather(*(asyncio.to_thread(produce, f"t{n}") for n in range(4)))
    await store.commit()
    for n in range(4):
        assert [e.data["i"] for e in await store.events(agent=f"t{n}")] == list(range(500))
