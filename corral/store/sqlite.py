"""The embedded store: SQLite in WAL mode behind one writer thread that does group commit.

Why this shape:

- The asyncio loop must never wait on SQLite. A write is a small ``(sql, params)`` tuple put on a
  ``queue.SimpleQueue``; the call returns at once. One writer thread drains the queue and applies up to
  ``batch_max`` ops in ONE transaction, so a single commit (and, under ``synchronous=FULL``, a single
  fsync) covers the whole batch. That is group commit: throughput grows with load instead of dropping.
- Exactly one connection writes, so our own writes never contend for SQLite's lock and they are applied
  in the order they were queued.
- ``commit()`` is a barrier: a marker rides the queue behind the caller's writes and its future is
  resolved (through ``loop.call_soon_threadsafe``) only once the transaction holding them committed.
- Failure is fail-stop. A batch that fails is rolled back, the error is kept, and every pending and later
  ``commit()`` and every later write raises StoreError. Carrying on after a lost batch would leave holes
  in the event log that replay could not see.
- Reads use their own read-only connections on a small thread pool. WAL lets them run next to the
  writer, and they only ever see committed transactions.

Durability: with ``synchronous=NORMAL`` a committed batch survives the process being killed (``kill -9``);
the last batches may be lost if the machine loses power. ``synchronous=FULL`` survives that as well, at
one fsync per batch.
"""

from __future__ import annotations

import asyncio
import os
import queue
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import Any, Final, TypeVar

import msgspec

from corral.errors import StoreError
from corral.store.records import (
    PENDING_STATUSES,
    DeadLetterRecord,
    LogRecord,
    StoredEvent,
    TaskRecord,
)

__all__ = ["MIGRATIONS", "SCHEMA_VERSION", "SQLiteStore"]

_T = TypeVar("_T")

# Module-level codecs: building them once is what makes msgspec fast, and they hold no per-call state.
_ENCODER: Final = msgspec.msgpack.Encoder()
_DECODER: Final = msgspec.msgpack.Decoder()

#: ``MIGRATIONS[v]`` moves a database from ``user_version`` v to v + 1. Append only; never edit one
#: that has shipped, since databases in the field already ran it.
MIGRATIONS: Final[tuple[tuple[str, ...], ...]] = (
    (
        """CREATE TABLE events (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            ts REAL NOT NULL,
            agent TEXT NOT NULL,
            kind TEXT NOT NULL,
            data BLOB NOT NULL)""",
        "CREATE INDEX events_agent_seq ON events (agent, seq)",
        """CREATE TABLE memory (
            agent TEXT NOT NULL,
            key TEXT NOT NULL,
            value BLOB NOT NULL,
            ts REAL NOT NULL,
            PRIMARY KEY (agent, key)) WITHOUT ROWID""",
        """CREATE TABLE tasks (
            id TEXT PRIMARY KEY,
            agent TEXT NOT NULL,
            handler TEXT NOT NULL,
            payload BLOB,
            priority INTEGER NOT NULL,
            kind TEXT NOT NULL,
            sender TEXT NOT NULL,
            status TEXT NOT NULL,
            created REAL NOT NULL,
            attempts INTEGER NOT NULL DEFAULT 0,
            result BLOB,
            error TEXT,
            finished REAL)""",
        # (status, created) serves both "WHERE status IN pending" and its "ORDER BY created".
        "CREATE INDEX tasks_status ON tasks (status, created)",
        """CREATE TABLE logs (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            ts REAL NOT NULL,
            agent TEXT NOT NULL,
            instance TEXT NOT NULL,
            level TEXT NOT NULL,
            message TEXT NOT NULL)""",
        "CREATE INDEX logs_agent_seq ON logs (agent, seq)",
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value BLOB)",
    ),
    (
        # Messages the bus gave up on (corral/runtime/dlq.py). message_id, subject and sender
        # are NULL when the message could not be decoded; data is exactly what was delivered.
        """CREATE TABLE dead_letters (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            ts REAL NOT NULL,
            subscription TEXT NOT NULL,
            message_id TEXT,
            subject TEXT,
            sender TEXT,
            reason TEXT NOT NULL,
            delivered INTEGER NOT NULL,
            data BLOB NOT NULL)""",
        "CREATE INDEX dead_letters_subscription_seq ON dead_letters (subscription, seq)",
    ),
)
SCHEMA_VERSION: Final = len(MIGRATIONS)

_SYNCHRONOUS: Final = frozenset({"OFF", "NORMAL", "FULL", "EXTRA"})
_BUSY_TIMEOUT_MS: Final = 5000

_INSERT_EVENT: Final = "INSERT INTO events (ts, agent, kind, data) VALUES (?, ?, ?, ?)"
_PUT_MEMORY: Final = "INSERT OR REPLACE INTO memory (agent, key, value, ts) VALUES (?, ?, ?, ?)"
_CLEAR_MEMORY: Final = "DELETE FROM memory WHERE agent = ?"
_PUT_TASK: Final = (
    "INSERT OR REPLACE INTO tasks (id, agent, handler, payload, priority, kind, sender, status,"
    " created, attempts, result, error, finished) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_SET_STATUS: Final = "UPDATE tasks SET status = ? WHERE id = ?"
_SET_STATUS_ATTEMPTS: Final = "UPDATE tasks SET status = ?, attempts = ? WHERE id = ?"
_FINISH_TASK: Final = "UPDATE tasks SET status = ?, result = ?, error = ?, finished = ? WHERE id = ?"
_INSERT_LOG: Final = (
    "INSERT INTO logs (ts, agent, instance, level, message) VALUES (?, ?, ?, ?, ?)"
)
_PUT_META: Final = "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)"
_INSERT_DEAD_LETTER: Final = (
    "INSERT INTO dead_letters (ts, subscription, message_id, subject, sender, reason, delivered,"
    " data) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)
_DELETE_DEAD_LETTER: Final = "DELETE FROM dead_letters WHERE seq = ?"
_DEAD_LETTER_COLUMNS: Final = (
    "seq, ts, subscription, message_id, subject, sender, reason, delivered, data"
)
_PENDING_SQL: Final = ", ".join(f"'{s}'" for s in PENDING_STATUSES)
_TASK_COLUMNS: Final = (
    "id, agent, handler, payload, priority, kind, sender, status, created, attempts, result,"
    " error, finished"
)


class _Call:
    """A marker in the write queue: run ``fn`` inside the batch (if any), answer after the commit."""

    __slots__ = ("fn", "future", "loop", "result")

    def __init__(self, loop: asyncio.AbstractEventLoop, future: asyncio.Future[Any],
                 fn: Callable[[sqlite3.Connection], Any] | None = None) -> None:
        self.loop = loop
        self.future = future
        self.fn = fn
        self.result: Any = None


_STOP: Final = object()  # tells the writer to finish the batch it is in and exit


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    # Runs on the future's loop. The caller may have been cancelled meanwhile; that is fine.
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def _post(loop: asyncio.AbstractEventLoop, future: asyncio.Future[Any], result: Any,
          error: BaseException | None) -> None:
    """Answer an asyncio future from the writer thread."""
    try:
        loop.call_soon_threadsafe(_settle, future, result, error)
    except RuntimeError:
        pass  # the loop is closed: nobody is left to wait for this answer


def _encode(value: Any, what: str) -> bytes:
    try:
        return _ENCODER.encode(value)
    except (TypeError, msgspec.EncodeError) as exc:
        raise StoreError(f"can't store {what}: {exc}",
                         hint="store only msgpack-able values (dict, list, str, int, float, "
                              "bool, None, bytes)") from exc


def _decode(blob: bytes | None) -> Any:
    return None if blob is None else _DECODER.decode(blob)


def _task_from_row(row: tuple[Any, ...]) -> TaskRecord:
    (id_, agent, handler, payload, priority, kind, sender, status, created, attempts, result,
     error, finished) = row
    return TaskRecord(id=id_, agent=agent, handler=handler, payload=_decode(payload),
                      priority=priority, kind=kind, sender=sender, status=status,
                      created=created, attempts=attempts, result=_decode(result), error=error,
                      finished=finished)


def _describe(sql: str) -> str:
    # "INSERT OR REPLACE INTO memory (..." -> "INSERT memory": enough to say what failed.
    table = re.search(r"\b(?:INTO|FROM|UPDATE)\s+(\w+)", sql, re.IGNORECASE)
    verb = sql.split(maxsplit=1)[0].upper() if sql.strip() else "?"
    return f"{verb} {table.group(1)}" if table else verb


class SQLiteStore:
    """All durable runtime state in one SQLite file; writes never block the event loop."""

    def __init__(self, path: str | Path, *, synchronous: str = "NORMAL", batch_max: int = 2000,
                 readers: int = 2, close_timeout: float = 30.0) -> None:
        sync = synchronous.upper()
        if sync not in _SYNCHRONOUS:
            raise ValueError(f"synchronous must be one of {sorted(_SYNCHRONOUS)}, got {synchronous!r}")
        if batch_max < 1 or readers < 1:
            raise ValueError("batch_max and readers must be at least 1")
        # abspath, not resolve(): no file-system access on the caller's (maybe the loop's) thread.
        self.path = Path(os.path.abspath(os.path.expanduser(path)))
        self._synchronous = sync
        self._batch_max = batch_max
        self._n_readers = readers
        self._close_timeout = close_timeout

        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        # Guards the accepting flag together with queue.put, so nothing is queued after the writer
        # has drained the queue for the last time (a barrier put then would wait forever).
        self._lock = threading.Lock()
        self._accepting = False
        self._state = "new"  # new -> opening -> open -> closing -> closed
        self._failure: tuple[str, BaseException] | None = None
        self._failure_reported = False

        self._writer: threading.Thread | None = None
        self._writer_exited: asyncio.Future[None] | None = None
        self._readers: ThreadPoolExecutor | None = None
        self._reader_local = threading.local()
        self._reader_conns: list[sqlite3.Connection] = []

        self._batches = 0
        self._ops = 0
        self._largest_batch = 0
        self._last_commit_ms = 0.0

    # ------------------------------------------------------------------ lifecycle

    async def open(self) -> None:
        """Create the folder (0700), the file (0600) and the schema, then start the writer."""
        if self._state != "new":
            raise StoreError(f"store {self.path} was already opened", hint="open a store once")
        self._state = "opening"  # readers wait for "open": the file may not exist yet
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = loop.create_future()
        self._writer_exited = loop.create_future()
        self._readers = ThreadPoolExecutor(self._n_readers, thread_name_prefix="corral-store-read")
        # Daemon: a writer stuck in SQLite must not keep the interpreter alive; committed data is safe.
        self._writer = threading.Thread(target=self._writer_main, args=(loop, ready),
                                        name="corral-store-writer", daemon=True)
        with self._lock:
            self._accepting = True
        self._writer.start()
        try:
            await ready
        except BaseException:
            # Failed or cancelled before ready: don't leave an ownerless thread behind.
            with self._lock:
                if self._accepting:
                    self._accepting = False
                    self._queue.put(_STOP)
            self._state = "closed"
            self._readers.shutdown(wait=False)
            raise
        self._state = "open"

    async def close(self) -> None:
        """Flush queued writes, stop the writer and close every connection, within a time bound."""
        if self._state != "open":
            return
        self._state = "closing"
        limit = self._close_timeout
        with self._lock:
            if self._accepting:
                self._accepting = False
                self._queue.put(_STOP)
        try:
            assert self._writer_exited is not None and self._readers is not None
            try:
                async with asyncio.timeout(limit):
                    # Readers first, so the writer's close can checkpoint and remove the WAL file.
                    await asyncio.to_thread(self._readers.shutdown, wait=True)
                    # Only now: never close a connection a reader thread may still be using.
                    with self._lock:
                        conns, self._reader_conns = self._reader_conns, []
                    for conn in conns:
                        conn.close()
                    await asyncio.shield(self._writer_exited)
            except TimeoutError:
                raise StoreError(
                    f"the store writer did not stop within {limit}s with "
                    f"{self._queue.qsize()} ops still queued; uncommitted writes may be lost",
                    hint="the disk may be hung; check it, then restart the runtime") from None
        finally:
            self._state = "closed"
        if self._failure is not None and not self._failure_reported:
            # Writes were lost and nobody has been told yet: close() is the last chance.
            raise self._failure_error()

    async def __aenter__(self) -> SQLiteStore:
        await self.open()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    # ------------------------------------------------------------------ writes (never block)

    def append_event(self, agent: str, kind: str, data: dict[str, Any],
                     ts: float | None = None) -> None:
        """Queue an event; it gets its ``seq`` and becomes durable at the next group commit."""
        self._put((_INSERT_EVENT, (time.time() if ts is None else ts, agent, kind,
                                   _encode(data, f"event {kind!r} data"))))

    def put_memory(self, agent: str, key: str, value: Any, ts: float | None = None) -> None:
        """Queue setting one memory key of an agent."""
        self._put((_PUT_MEMORY, (agent, key, _encode(value, f"memory key {key!r}"),
                                 time.time() if ts is None else ts)))

    def clear_memory(self, agent: str) -> None:
        """Queue removing every memory key of an agent."""
        self._put((_CLEAR_MEMORY, (agent,)))

    def put_task(self, task: TaskRecord) -> None:
        """Queue inserting (or replacing) a task record."""
        self._put((_PUT_TASK, (
            task.id, task.agent, task.handler, _encode(task.payload, f"task {task.id} payload"),
            task.priority, task.kind, task.sender, task.status, task.created, task.attempts,
            None if task.result is None else _encode(task.result, f"task {task.id} result"),
            task.error, task.finished)))

    def set_task_status(self, id: str, status: str, *, attempts: int | None = None) -> None:
        """Queue a status change (and optionally the attempt count) of a task."""
        if attempts is None:
            self._put((_SET_STATUS, (status, id)))
        else:
            self._put((_SET_STATUS_ATTEMPTS, (status, attempts, id)))

    def finish_task(self, id: str, status: str, result: Any = None, error: str | None = None,
                    ts: float | None = None) -> None:
        """Queue a task's outcome: final status, result or error, and when it finished."""
        blob = None if result is None else _encode(result, f"task {id} result")
        self._put((_FINISH_TASK, (status, blob, error, time.time() if ts is None else ts, id)))

    def append_log(self, agent: str, instance: str, level: str, message: str,
                   ts: float | None = None) -> None:
        """Queue one log line of an agent instance."""
        self._put((_INSERT_LOG, (time.time() if ts is None else ts, agent, instance, level,
                                 message)))

    def put_meta(self, key: str, value: Any) -> None:
        """Queue setting a runtime-wide metadata value."""
        self._put((_PUT_META, (key, _encode(value, f"meta {key!r}"))))

    def put_dead_letter(self, subscription: str, data: bytes, reason: str, delivered: int, *,
                        message_id: str | None = None, subject: str | None = None,
                        sender: str | None = None, ts: float | None = None) -> None:
        """Queue one dead letter; ``await commit()`` to know it is durable."""
        if not isinstance(data, bytes | bytearray | memoryview):
            raise StoreError(f"a dead letter's data must be bytes, got {type(data).__name__}",
                             hint="pass the message exactly as the backend delivered it")
        self._put((_INSERT_DEAD_LETTER, (time.time() if ts is None else ts, subscription,
                                         message_id, subject, sender, reason, int(delivered),
                                         bytes(data))))

    def delete_dead_letters(self, seqs: Iterable[int]) -> None:
        """Queue deleting dead letters by ``seq`` (unknown ones are ignored)."""
        for seq in seqs:
            self._put((_DELETE_DEAD_LETTER, (int(seq),)))

    async def purge_dead_letters(self, subscription: str | None = None) -> int:
        """Delete every dead letter (of one subscription); return how many, once committed."""
        def purge(conn: sqlite3.Connection) -> int:
            if subscription is None:
                return conn.execute("DELETE FROM dead_letters").rowcount
            return conn.execute("DELETE FROM dead_letters WHERE subscription = ?",
                                (subscription,)).rowcount
        count: int = await self._run_in_writer(purge)
        return count

    async def commit(self) -> None:
        """Wait until every write queued before this call is committed; raise StoreError if not."""
        await self._run_in_writer(None)

    async def prune_finished_tasks(self, older_than: float) -> int:
        """Delete finished tasks whose ``finished`` time is before ``older_than``; return how many."""
        def prune(conn: sqlite3.Connection) -> int:
            cur = conn.execute(
                f"DELETE FROM tasks WHERE status NOT IN ({_PENDING_SQL})"
                " AND finished IS NOT NULL AND finished < ?", (older_than,))
            return cur.rowcount
        # Through the writer, not a reader: there is one writing connection, by design.
        count: int = await self._run_in_writer(prune)
        return count

    @property
    def stats(self) -> dict[str, int | float]:
        """Writer counters: batches, ops, largest batch, queue depth, last commit time (ms)."""
        return {
            "batches": self._batches,
            "ops": self._ops,
            "largest_batch": self._largest_batch,
            "queue_depth": self._queue.qsize(),
            "last_commit_ms": self._last_commit_ms,
            "failed": int(self._failure is not None),
        }

    def _put(self, item: object) -> None:
        with self._lock:
            if self._accepting:
                self._queue.put(item)
                return
        raise self._refusal()

    def _execute(self, sql: str, params: tuple[Any, ...] = ()) -> None:
        """Queue a raw statement (private hook, for tests and future migrations of data)."""
        self._put((sql, params))

    async def _run_in_writer(self, fn: Callable[[sqlite3.Connection], _T] | None) -> _T:
        """Run ``fn`` on the writer connection, in order with queued writes; answer after commit."""
        loop = asyncio.get_running_loop()
        call = _Call(loop, loop.create_future(), fn)
        self._put(call)
        result: _T = await call.future
        return result

    def _refusal(self) -> StoreError:
        if self._failure is not None:
            return self._failure_error()
        if self._state == "new":
            return StoreError(f"store {self.path} is not open", hint="await store.open() first")
        return StoreError(f"store {self.path} is closed", hint="this is a bug in the caller: "
                          "it wrote after shutdown")

    def _failure_error(self) -> StoreError:
        # A fresh exception per raise: one instance raised in many places would pile up tracebacks.
        assert self._failure is not None
        message, cause = self._failure
        self._failure_reported = True
        err = StoreError(message)
        err.__cause__ = cause
        return err

    # ------------------------------------------------------------------ the writer thread

    def _writer_main(self, loop: asyncio.AbstractEventLoop, ready: asyncio.Future[None]) -> None:
        conn: sqlite3.Connection | None = None
        try:
            try:
                conn = self._connect_writer()
            except BaseException as exc:
                err = exc if isinstance(exc, StoreError) else StoreError(
                    f"can't open store {self.path}: {exc}")
                if err is not exc:
                    err.__cause__ = exc
                _post(loop, ready, None, err)
                return
            _post(loop, ready, None, None)
            try:
                self._write_loop(conn)
            except BaseException as exc:  # a bug in this module; fail loudly rather than hang
                self._record_failure(f"the store writer crashed: {exc!r}", exc)
        finally:
            self._shutdown_writer(conn)
            if self._writer_exited is not None:
                _post(loop, self._writer_exited, None, None)

    def _connect_writer(self) -> sqlite3.Connection:
        if not self.path.parent.exists():
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        # Create the file ourselves so it is private from the start; SQLite gives -wal and -shm the
        # same mode as the database file.
        os.close(os.open(self.path, os.O_CREAT | os.O_RDWR, 0o600))
        conn = sqlite3.connect(self.path, isolation_level=None,
                               timeout=_BUSY_TIMEOUT_MS / 1000)
        try:
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise StoreError(f"can't put store {self.path} in WAL mode (got {mode!r})",
                                 hint="keep CORRAL_HOME on a local disk, not a network share")
            conn.execute(f"PRAGMA synchronous={self._synchronous}")  # validated in __init__
            conn.execute("PRAGMA foreign_keys=OFF")
            conn.execute(f"PRAGMA busy_timeout={_BUSY_TIMEOUT_MS}")
            self._migrate(conn)
        except BaseException:
            conn.close()
            raise
        return conn

    def _migrate(self, conn: sqlite3.Connection) -> None:
        while True:
            # IMMEDIATE + re-reading the version inside: two processes opening one fresh file
            # must not both run a migration.
            conn.execute("BEGIN IMMEDIATE")
            try:
                version = conn.execute("PRAGMA user_version").fetchone()[0]
                if version > SCHEMA_VERSION:
                    raise StoreError(
                        f"store {self.path} has schema version {version}, newer than this "
                        f"Corral's {SCHEMA_VERSION}", hint="upgrade Corral, or use another CORRAL_HOME")
                if version == SCHEMA_VERSION:
                    conn.execute("COMMIT")
                    return
                for statement in MIGRATIONS[version]:
                    conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {version + 1}")
                conn.execute("COMMIT")
            except BaseException:
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error:
                    pass  # already rolled back by SQLite; the original error is the one to report
                raise

    def _write_loop(self, conn: sqlite3.Connection) -> None:
        get, get_nowait, batch_max = self._queue.get, self._queue.get_nowait, self._batch_max
        while True:
            batch = [get()]  # sleep until there is work
            while len(batch) < batch_max:
                try:
                    batch.append(get_nowait())
                except queue.Empty:
                    break
            if not self._apply(conn, batch):
                return

    def _apply(self, conn: sqlite3.Connection, batch: list[Any]) -> bool:
        """Run one batch in one transaction; False when the writer should exit."""
        started = time.perf_counter()
        calls: list[_Call] = []
        writes = 0
        stop = False
        in_tx = False
        step = "BEGIN"
        try:
            i, n = 0, len(batch)
            while i < n:
                item = batch[i]
                if type(item) is tuple:
                    sql = item[0]
                    # Consecutive writes of one statement go through executemany: far fewer
                    # round trips into the sqlite3 module for bursts like 10k events.
                    j = i + 1
                    while j < n:
                        nxt = batch[j]
                        if type(nxt) is not tuple or nxt[0] != sql:
                            break
                        j += 1
                    if not in_tx:
                        conn.execute("BEGIN IMMEDIATE")
                        in_tx = True
                    step = _describe(sql)
                    if j - i == 1:
                        conn.execute(sql, item[1])
                    else:
                        conn.executemany(sql, [w[1] for w in batch[i:j]])
                    writes += j - i
                    i = j
                    continue
                if isinstance(item, _Call):
                    if item.fn is not None:
                        if not in_tx:
                            conn.execute("BEGIN IMMEDIATE")
                            in_tx = True
                        step = getattr(item.fn, "__name__", "a writer call")
                        item.result = item.fn(conn)
                    calls.append(item)
                else:  # _STOP: the last item ever queued
                    stop = True
                i += 1
            if in_tx:
                step = "COMMIT"
                conn.execute("COMMIT")
        except Exception as exc:
            if in_tx:
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error:
                    pass  # the transaction is gone either way; the original error is what matters
            total = sum(1 for item in batch if type(item) is tuple)
            self._record_failure(
                f"store write failed in {step}: {exc}; the batch of {total} writes was rolled back "
                "and the store takes no more writes", exc)
            # Every waiter in the batch hears about it, including those queued after the failing
            # write: their writes were rolled back too. Each gets its own exception object.
            for item in batch:
                if isinstance(item, _Call):
                    _post(item.loop, item.future, None, self._failure_error())
            return False
        if in_tx:
            self._batches += 1
            self._ops += writes
            self._largest_batch = max(self._largest_batch, writes)
            self._last_commit_ms = (time.perf_counter() - started) * 1000
        for call in calls:
            _post(call.loop, call.future, call.result, None)
        return not stop

    def _record_failure(self, message: str, cause: BaseException) -> None:
        with self._lock:
            self._accepting = False
            if self._failure is None:
                self._failure = (message, cause)

    def _shutdown_writer(self, conn: sqlite3.Connection | None) -> None:
        with self._lock:
            self._accepting = False
        # Nothing can be queued any more; answer whatever is left so no caller waits forever.
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, _Call):
                _post(item.loop, item.future, None, self._refusal())
        if conn is not None:
            try:
                conn.close()
            except sqlite3.Error:
                pass  # closing can't lose committed data; nothing useful to do with this

    # ------------------------------------------------------------------ reads (off the loop)

    async def events(self, *, after: int = 0, agent: str | None = None,
                     kinds: Sequence[str] | None = None, limit: int | None = None
                     ) -> list[StoredEvent]:
        """Committed events with ``seq > after``, oldest first, optionally filtered."""
        sql = "SELECT seq, ts, agent, kind, data FROM events WHERE seq > ?"
        params: list[Any] = [after]
        if agent is not None:
            sql += " AND agent = ?"
            params.append(agent)
        if kinds is not None:
            if isinstance(kinds, str):  # a bare str is a Sequence[str] of letters; mean one kind
                kinds = (kinds,)
            if not kinds:
                return []
            sql += f" AND kind IN ({', '.join('?' * len(kinds))})"
            params.extend(kinds)
        sql += " ORDER BY seq"
        if limit is not None:
            sql += " LIMIT ?"
            params.append(limit)

        def read(conn: sqlite3.Connection) -> list[StoredEvent]:
            return [StoredEvent(seq, ts, ag, kind, _DECODER.decode(data))
                    for seq, ts, ag, kind, data in conn.execute(sql, params)]
        return await self._read(read)

    async def memory(self, agent: str) -> dict[str, tuple[Any, float]]:
        """An agent's memory: key -> (value, time it was last set)."""
        def read(conn: sqlite3.Connection) -> dict[str, tuple[Any, float]]:
            rows = conn.execute("SELECT key, value, ts FROM memory WHERE agent = ?", (agent,))
            return {key: (_DECODER.decode(value), ts) for key, value, ts in rows}
        return await self._read(read)

    async def pending_tasks(self) -> list[TaskRecord]:
        """Tasks still queued or running, oldest first: what to resume after a restart."""
        def read(conn: sqlite3.Connection) -> list[TaskRecord]:
            rows = conn.execute(f"SELECT {_TASK_COLUMNS} FROM tasks WHERE status IN "
                                f"({_PENDING_SQL}) ORDER BY created, rowid")
            return [_task_from_row(row) for row in rows]
        return await self._read(read)

    async def task(self, id: str) -> TaskRecord | None:
        """One task by id, or None."""
        def read(conn: sqlite3.Connection) -> TaskRecord | None:
            row = conn.execute(f"SELECT {_TASK_COLUMNS} FROM tasks WHERE id = ?", (id,)).fetchone()
            return None if row is None else _task_from_row(row)
        return await self._read(read)

    async def logs(self, agent: str, *, after: int = 0, limit: int = 1000,
                   instance: str | None = None) -> list[LogRecord]:
        """An agent's log lines with ``seq > after``, oldest first, at most ``limit``."""
        sql = "SELECT seq, ts, agent, instance, level, message FROM logs WHERE agent = ? AND seq > ?"
        params: list[Any] = [agent, after]
        if instance is not None:
            sql += " AND instance = ?"
            params.append(instance)
        sql += " ORDER BY seq LIMIT ?"
        params.append(limit)

        def read(conn: sqlite3.Connection) -> list[LogRecord]:
            return [LogRecord(*row) for row in conn.execute(sql, params)]
        return await self._read(read)

    async def dead_letters(self, *, subscription: str | None = None, after: int = 0,
                           limit: int = 100, before: int | None = None
                           ) -> list[DeadLetterRecord]:
        """Committed dead letters with ``after < seq`` (``< before``), oldest first, at most ``limit``."""
        sql = f"SELECT {_DEAD_LETTER_COLUMNS} FROM dead_letters WHERE seq > ?"
        params: list[Any] = [after]
        if before is not None:
            sql += " AND seq < ?"
            params.append(before)
        if subscription is not None:
            sql += " AND subscription = ?"
            params.append(subscription)
        sql += " ORDER BY seq LIMIT ?"
        params.append(limit)

        def read(conn: sqlite3.Connection) -> list[DeadLetterRecord]:
            return [DeadLetterRecord(*row) for row in conn.execute(sql, params)]
        return await self._read(read)

    async def dead_letter(self, seq: int) -> DeadLetterRecord | None:
        """One committed dead letter by ``seq``, or None."""
        def read(conn: sqlite3.Connection) -> DeadLetterRecord | None:
            row = conn.execute(f"SELECT {_DEAD_LETTER_COLUMNS} FROM dead_letters WHERE seq = ?",
                               (seq,)).fetchone()
            return None if row is None else DeadLetterRecord(*row)
        return await self._read(read)

    async def last_dead_letter_seq(self) -> int:
        """The largest ``seq`` any committed dead letter has had so far (0 if none ever)."""
        def read(conn: sqlite3.Connection) -> int:
            # AUTOINCREMENT keeps the high-water mark here even after the rows are deleted.
            row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'dead_letters'"
                               ).fetchone()
            return 0 if row is None else int(row[0])
        return await self._read(read)

    async def get_meta(self, key: str) -> Any:
        """A metadata value, or None if it was never set."""
        def read(conn: sqlite3.Connection) -> Any:
            row = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
            return None if row is None else _decode(row[0])
        return await self._read(read)

    async def _read(self, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        """Run ``fn`` with a read-only connection on a reader thread."""
        if self._state != "open" or self._readers is None:
            # Reads stay allowed after a write failure: they help to find out what happened.
            state = "not open" if self._state in ("new", "opening") else "closed"
            raise StoreError(f"store {self.path} is {state}",
                             hint="read between `await store.open()` and `await store.close()`")
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._readers, self._run_read, fn)
        except (sqlite3.Error, msgspec.DecodeError) as exc:
            raise StoreError(f"store read failed: {exc}") from exc

    def _run_read(self, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        conn: sqlite3.Connection | None = getattr(self._reader_local, "conn", None)
        if conn is None:
            # mode=ro: a reader can never write by mistake, so the single-writer rule holds.
            # check_same_thread=False only so close() can close it from the loop's thread.
            conn = sqlite3.connect(f"{self.path.as_uri()}?mode=ro", uri=True,
                                   isolation_level=None, check_same_thread=False,
                                   timeout=_BUSY_TIMEOUT_MS / 1000)
            self._reader_local.conn = conn
            with self._lock:
                self._reader_conns.append(conn)
        return fn(conn)
