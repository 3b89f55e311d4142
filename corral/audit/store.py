"""The audit trail's SQLite file: one table of rows, written in whole batches, read on the side.

Why this shape:

- Each row keeps the record's canonical bytes (``body``) and chain hash exactly as written,
  so verification is ``sha256(prev || body)`` per row with no re-encoding. The columns
  ``ts, kind, agent, outcome`` are copies of body fields, indexed for ``query``; verification
  checks that they still agree with the body.
- A batch of rows is one transaction (``BEGIN IMMEDIATE`` ... ``COMMIT``): it is on disk
  whole or not at all, which is what lets the caller roll its chain state back on failure.
- One writing connection, used by one thread at a time (the log's writer thread), and an
  exclusive ``flock`` on ``<db>.lock`` for as long as the store is open, so no second process
  can append to the same chain behind our back. Reads open their own read-only connections;
  WAL lets them run next to the writer and they see only committed batches.
- ``synchronous=FULL`` by default: a committed batch survives a power cut, not only a crash,
  at one fsync per batch (group commit spreads it over every record in the batch).
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from corral.audit.chain import GENESIS, GENESIS_HASH, KEY_ROTATED, SEAL, Row, decode
from corral.errors import AuditTampered, AuditUnavailable

__all__ = ["SCHEMA_VERSION", "AuditStore", "Tail"]

#: ``PRAGMA user_version`` of an audit database written by this code.
SCHEMA_VERSION: Final = 1

_SCHEMA: Final = (
    """CREATE TABLE records (
        seq INTEGER PRIMARY KEY,
        ts INTEGER NOT NULL,
        kind TEXT NOT NULL,
        agent TEXT NOT NULL,
        outcome TEXT NOT NULL,
        body BLOB NOT NULL,
        hash BLOB NOT NULL)""",
    # (column, seq) so a filtered query comes back in seq order without a sort.
    "CREATE INDEX records_agent ON records (agent, seq)",
    "CREATE INDEX records_kind ON records (kind, seq)",
    "CREATE INDEX records_ts ON records (ts)",
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
)
_INSERT: Final = ("INSERT INTO records (seq, ts, kind, agent, outcome, body, hash)"
                  " VALUES (?, ?, ?, ?, ?, ?, ?)")
_SYNCHRONOUS: Final = frozenset({"OFF", "NORMAL", "FULL", "EXTRA"})
_BUSY_TIMEOUT_S: Final = 5.0


@dataclass(frozen=True, slots=True)
class Tail:
    """Where a stored trail ends: what the chain needs to carry on from it."""

    seq: int
    head: bytes
    #: Seq of the last seal record (0 if none).
    last_seal: int
    #: Body of the last genesis or rotation record: it names the key in force.
    key_body: bytes | None
    trail_id: str

    def key_id(self, path: Path) -> str:
        """Id of the key the trail says is in force; AuditTampered if it can't say."""
        try:
            if self.key_body is None:
                raise ValueError("no genesis record")
            return str(decode(self.key_body).data["key_id"])
        except (ValueError, KeyError) as exc:
            raise AuditTampered(
                f"audit trail {path} does not say which key signs it ({exc})",
                hint="its genesis or rotation record was tampered with; keep the file for "
                     "forensics and move it aside to start a new trail") from exc


def _blob(value: object) -> bytes:
    # A hand-edited row may hold TEXT or a number; keep it comparable, never crash on it.
    if isinstance(value, bytes):
        return value
    return str(value).encode("utf-8", "surrogatepass")


class AuditStore:
    """The SQLite file of one audit trail."""

    def __init__(self, path: str | Path, *, synchronous: str = "FULL") -> None:
        sync = synchronous.upper()
        if sync not in _SYNCHRONOUS:
            raise ValueError(f"synchronous must be one of {sorted(_SYNCHRONOUS)}, got {synchronous!r}")
        self.path = Path(os.path.abspath(os.path.expanduser(path)))
        self._synchronous = sync
        self._conn: sqlite3.Connection | None = None
        self._lock_fd: int | None = None

    # ------------------------------------------------------------------ writer side

    def open(self) -> None:
        """Lock the trail, create the file (0600) and schema if new, and connect the writer."""
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._lock_fd = os.open(f"{self.path}.lock", os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise AuditUnavailable(
                    f"audit trail {self.path} is open in another process",
                    hint="only one runtime may write a trail; stop the other one or use "
                         "another CORRAL_HOME") from None
            # Create the file ourselves so it is private from the start; SQLite gives -wal and
            # -shm the same mode.
            os.close(os.open(self.path, os.O_CREAT | os.O_RDWR, 0o600))
            conn = sqlite3.connect(self.path, isolation_level=None, timeout=_BUSY_TIMEOUT_S,
                                   check_same_thread=False)
            try:
                mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
                if str(mode).lower() != "wal":
                    raise AuditUnavailable(f"can't put {self.path} in WAL mode (got {mode!r})",
                                           hint="keep CORRAL_HOME on a local disk")
                conn.execute(f"PRAGMA synchronous={self._synchronous}")  # checked in __init__
                self._migrate(conn)
            except BaseException:
                conn.close()
                raise
            self._conn = conn
        except (OSError, sqlite3.Error) as exc:
            self.close()
            raise AuditUnavailable(f"can't open audit trail {self.path}: {exc}") from exc
        except BaseException:
            self.close()
            raise

    def _migrate(self, conn: sqlite3.Connection) -> None:
        conn.execute("BEGIN IMMEDIATE")
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise AuditUnavailable(
                    f"audit trail {self.path} has schema version {version}, newer than this "
                    f"Corral's {SCHEMA_VERSION}", hint="upgrade Corral to write to this trail")
            if version == 0:
                for statement in _SCHEMA:
                    conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def close(self) -> None:
        """Close the writer connection and release the lock."""
        if self._conn is not None:
            conn, self._conn = self._conn, None
            try:
                conn.close()
            except sqlite3.Error:
                pass  # committed data is safe; nothing useful to do with this
        if self._lock_fd is not None:
            fd, self._lock_fd = self._lock_fd, None
            os.close(fd)  # releases the flock

    @property
    def writer(self) -> sqlite3.Connection:
        """The writing connection; only the thread that owns the store may use it."""
        if self._conn is None:
            raise AuditUnavailable(f"audit trail {self.path} is not open",
                                   hint="open the audit log before appending")
        return self._conn

    def write(self, rows: Sequence[Row], meta: dict[str, str] | None = None) -> None:
        """Insert ``rows`` (and ``meta``) in one transaction; on any error nothing is written."""
        conn = self.writer
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.executemany(_INSERT, rows)
            if meta:
                conn.executemany("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                                 meta.items())
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error:
                    pass  # SQLite already rolled back; the original error is what matters
            raise

    def tail(self) -> Tail:
        """Last record, last seal and key record of the stored trail (read on the writer)."""
        conn = self.writer
        last = conn.execute("SELECT seq, hash FROM records ORDER BY seq DESC LIMIT 1").fetchone()
        seal = conn.execute("SELECT max(seq) FROM records WHERE kind = ?", (SEAL,)).fetchone()
        key = conn.execute("SELECT body FROM records WHERE kind IN (?, ?) ORDER BY seq DESC "
                           "LIMIT 1", (GENESIS, KEY_ROTATED)).fetchone()
        trail = conn.execute("SELECT value FROM meta WHERE key = 'trail_id'").fetchone()
        return Tail(seq=last[0] if last else 0, head=_blob(last[1]) if last else GENESIS_HASH,
                    last_seal=seal[0] or 0, key_body=_blob(key[0]) if key else None,
                    trail_id=trail[0] if trail else "")

    def rows_from(self, seq: int) -> list[tuple[int, bytes, bytes]]:
        """Rows with seq >= ``seq`` as (seq, body, hash), in order (read on the writer)."""
        return [(s, b, h) for s, b, h in self.writer.execute(
            "SELECT seq, body, hash FROM records WHERE seq >= ? ORDER BY seq", (seq,))]

    def hash_of(self, seq: int) -> bytes | None:
        """Stored hash of record ``seq`` (read on the writer)."""
        row = self.writer.execute("SELECT hash FROM records WHERE seq = ?", (seq,)).fetchone()
        return None if row is None else _blob(row[0])

    # ------------------------------------------------------------------ readers (any thread)

    @contextmanager
    def reader(self) -> Iterator[sqlite3.Connection]:
        """A read-only connection of its own; WAL shows it only committed batches."""
        try:
            conn = sqlite3.connect(f"{self.path.as_uri()}?mode=ro", uri=True,
                                   isolation_level=None, timeout=_BUSY_TIMEOUT_S)
        except sqlite3.Error as exc:
            raise AuditUnavailable(f"can't read audit trail {self.path}: {exc}") from exc
        with closing(conn):
            try:
                yield conn
            except sqlite3.Error as exc:
                raise AuditUnavailable(f"can't read audit trail {self.path}: {exc}",
                                       hint="check that the file exists and is readable") from exc

    @staticmethod
    def verify_rows(conn: sqlite3.Connection, batch: int = 4096
                    ) -> Iterator[tuple[int, bytes, bytes, int, str, str, str]]:
        """Every row in seq order as (seq, body, hash, ts, kind, agent, outcome)."""
        cur = conn.execute("SELECT seq, body, hash, ts, kind, agent, outcome FROM records "
                           "ORDER BY seq")
        while True:
            chunk = cur.fetchmany(batch)
            if not chunk:
                return
            yield from chunk

    @staticmethod
    def select(conn: sqlite3.Connection, *, agent: str | None = None,
               action: str | None = None, since: int | None = None, until: int | None = None,
               outcome: str | None = None, after: int = 0, limit: int = 1000
               ) -> list[tuple[int, bytes, bytes, int, str, str, str]]:
        """Rows matching every filter given, in seq order (``action`` may end in ``.*``)."""
        sql = "SELECT seq, body, hash, ts, kind, agent, outcome FROM records WHERE seq > ?"
        params: list[Any] = [after]
        if agent is not None:
            sql += " AND agent = ?"
            params.append(agent)
        if action is not None:
            if action.endswith(".*"):  # a prefix: a range on the kind index, not a LIKE scan
                prefix = action[:-1]
                sql += " AND kind >= ? AND kind < ?"
                params += [prefix, prefix[:-1] + chr(ord(prefix[-1]) + 1)]
            else:
                sql += " AND kind = ?"
                params.append(action)
        if since is not None:
            sql += " AND ts >= ?"
            params.append(since)
        if until is not None:
            sql += " AND ts < ?"
            params.append(until)
        if outcome is not None:
            sql += " AND outcome = ?"
            params.append(outcome)
        sql += " ORDER BY seq LIMIT ?"
        params.append(limit)
        return conn.execute(sql, params).fetchall()
