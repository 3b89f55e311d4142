"""Bus backends: local (SQLite), nats (JetStream) and redis (Streams), chosen by name."""

from __future__ import annotations

from pathlib import Path

from corral.bus.backend import BusBackend
from corral.errors import BackendUnavailable

__all__ = ["BACKENDS", "open_backend"]

BACKENDS = ("local", "nats", "redis")


def open_backend(kind: str, *, home: Path, url: str | None = None,
                 prefix: str = "corral") -> BusBackend:
    """The backend named ``kind`` (not started yet); its library is imported only here."""
    if kind == "local":
        from corral.bus.backends.local import LocalBackend

        return LocalBackend(home / "bus.db", prefix=prefix)
    if kind == "nats":
        from corral.bus.backends.nats import NatsBackend

        return NatsBackend(url or "nats://127.0.0.1:4222", prefix=prefix)
    if kind == "redis":
        from corral.bus.backends.redis import RedisBackend

        return RedisBackend(url or "redis://127.0.0.1:6379/0", prefix=prefix)
    raise BackendUnavailable(f"unknown bus backend {kind!r}",
                             hint=f"set the runtime's bus to one of {', '.join(BACKENDS)}")
