"""Backends for the bus tests: every test that takes `make` runs on local, NATS and Redis."""

from __future__ import annotations

import socket
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from corral.bus.backend import BusBackend
from tests.conftest import REQUIRE_SERVICES

BACKENDS = ["local", "nats", "redis"]
PORTS = {"nats": 4222, "redis": 6379}


def _up(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _factory(kind: str, tmp: Path) -> Callable[[], BusBackend]:
    prefix = f"t{uuid.uuid4().hex[:10]}"
    if kind == "local":
        from corral.bus.backends.local import LocalBackend

        return lambda: LocalBackend(path=tmp / "bus.db", prefix=prefix)
    if not _up(PORTS[kind]):
        msg = f"{kind} is not running on 127.0.0.1:{PORTS[kind]} (start it: shared/services.sh)"
        if REQUIRE_SERVICES:
            pytest.fail(msg + "; required because CORRAL_REQUIRE_SERVICES=1")
        pytest.skip(msg)
    if kind == "nats":
        from corral.bus.backends.nats import NatsBackend

        return lambda: NatsBackend(url="nats://127.0.0.1:4222", prefix=prefix)
    from corral.bus.backends.redis import RedisBackend

    return lambda: RedisBackend(url="redis://127.0.0.1:6379/0", prefix=prefix)


@pytest.fixture(params=BACKENDS)
async def make(request: Any, tmp_path: Path) -> AsyncIterator[Callable[[], BusBackend]]:
    """A factory of started backends sharing one (isolated) namespace; all closed at the end."""
    factory = _factory(request.param, tmp_path)
    opened: list[BusBackend] = []

    async def started() -> BusBackend:
        b = factory()
        await b.start()
        opened.append(b)
        return b

    yield started  # type: ignore[misc]
    if opened and hasattr(opened[-1], "purge"):
        await opened[-1].purge()  # NATS streams and Redis keys outlive the test otherwise
    for b in opened:
        await b.aclose()
