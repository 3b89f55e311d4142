"""Corral's embedded store: events, memory, tasks, logs and metadata in one SQLite file."""

from corral.store.records import PENDING_STATUSES, LogRecord, StoredEvent, TaskRecord
from corral.store.sqlite import MIGRATIONS, SCHEMA_VERSION, SQLiteStore

__all__ = [
    "MIGRATIONS",
    "PENDING_STATUSES",
    "SCHEMA_VERSION",
    "LogRecord",
    "SQLiteStore",
    "StoredEvent",
    "TaskRecord",
]
