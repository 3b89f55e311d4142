"""Corral's embedded store: events, memory, tasks, logs, dead letters and metadata in one file."""

from corral.store.records import (
    PENDING_STATUSES,
    DeadLetterRecord,
    LogRecord,
    StoredEvent,
    TaskRecord,
)
from corral.store.sqlite import MIGRATIONS, SCHEMA_VERSION, SQLiteStore

__all__ = [
    "MIGRATIONS",
    "PENDING_STATUSES",
    "SCHEMA_VERSION",
    "DeadLetterRecord",
    "LogRecord",
    "SQLiteStore",
    "StoredEvent",
    "TaskRecord",
]
