"""The control socket in-process: a real Runtime, a real socket, the blocking Client in a thread."""

from __future__ import annotations

import asyncio
import shutil
import socket
import stat
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from corral.cli.client import Client
from corral.errors import AgentNotFound, ControlError, CorralError, SpecError
from corral.runtime.control import MAX_LINE, ControlServer
from corral.runtime.runtime import Runtime
from corral.spec.loader import load_paths

HELLO = Path(__file__).resolve().parents[2] / "examples" / "hello"

pytestmark = pytest.mark.timeout(60)


@asynccontextmanager
async def served() -> AsyncIterator[tuple[Runtime, ControlServer, Client]]:
    """A runtime serving its control socket; the home is short (AF_UNIX paths are limited)."""
    home = tempfile.mkdtemp(prefix="corral-ut-")
    try:
        async with Runtime(home=home, use_cgroups=False) as rt:
            server = ControlServer(rt)
            ready = asyncio.Event()
            async with asyncio.TaskGroup() as tg:
                serving = tg.create_task(server.serve(ready=ready))
                async with asyncio.timeout(5):
                    await ready.wait()
                try:
                    yield rt, server, Client(server.path, timeout=10)
                finally:
                    serving.cancel()
            assert not server.path.exists()  # the server removes its socket
    finally:
        shutil.rmtree(home, ignore_errors=True)


async def call(client: Client, op: str, **args: Any) -> Any:
    async with asyncio.timeout(30):
        return await asyncio.to_thread(client.call, op, **args)


async def test_ping_and_socket_modes() -> None:
    async with served() as (rt, server, client):
        result = await call(client, "ping")
        assert result["pong"] is True
        assert result["home"] == str(rt.config.home)
        assert stat.S_IMODE(server.path.stat().st_mode) == 0o600
        assert stat.S_IMODE(server.path.parent.stat().st_mode) == 0o700


async def test_apply_and_list() -> None:
    async with served() as (_rt, _server, client):
        assert await call(client, "list") == []
        items = [{"manifest": m.to_dict(), "source": m.source, "base_dir": m.base_dir}
                 for m in load_paths([HELLO])]
        outcomes = await call(client, "apply", manifests=items, wait=True, timeout=30)
        assert outcomes == [{"agent": "hello", "action": "created"}]
        [row] = await call(client, "list")
        assert (row["name"], row["status"], row["ready"]) == ("hello", "Running", "1/1")
        result = await call(client, "request", name="hello", payload={"name": "ada"})
        assert result["greeting"] == "hello, ada!"


async def test_errors_round_trip() -> None:
    async with served() as (rt, _server, client):
        with pytest.raises(AgentNotFound) as info:
            await call(client, "get", name="nope")
        assert "no agent named 'nope'" in str(info.value)
        assert "corral get agents" in info.value.hint

        with pytest.raises(ControlError, match="unknown op 'frobnicate'"):
            await call(client, "frobnicate")
        with pytest.raises(ControlError, match="bad arguments for 'scale'"):
            await call(client, "scale", name="x", replicas="many")
        with pytest.raises(SpecError, match="unknown priority"):
            await call(client, "send", name="x", priority="urgent")

        bad = {"manifest": {"apiVersion": "corral/v1", "kind": "Agent",
                            "metadata": {"name": "b"}, "spec": {"replcas": 1}},
               "source": "b.yaml", "base_dir": "/tmp"}
        with pytest.raises(SpecError, match="replcas"):
            await call(client, "apply", manifests=[bad])

        def boom() -> None:
            raise RuntimeError("kaboom")
        rt.stats = boom  # type: ignore[method-assign]
        with pytest.raises(ControlError, match="RuntimeError: kaboom") as internal:
            await call(client, "stats")
        assert internal.value.details["type"] == "InternalError"  # type: ignore[attr-defined]
        assert (await call(client, "ping"))["pong"]  # the server lives on


def _send_raw(path: Path, data: bytes) -> bytes:
    """Send ``data`` on a fresh connection and return everything the server answers."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(20)
        s.connect(str(path))
        try:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)  # no more requests: the server answers, then hangs up
        except OSError:
            pass  # the server refused the rest of the line and hung up
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
        return b"".join(chunks)


async def test_oversize_line_is_refused() -> None:
    async with served() as (_rt, server, client):
        answer = await asyncio.to_thread(_send_raw, server.path, b"x" * (MAX_LINE + 10))
        assert b'"ok":false' in answer
        assert b"over 16 MiB" in answer
        garbage = await asyncio.to_thread(_send_raw, server.path, b"not json\n")
        assert b"bad request" in garbage
        assert (await call(client, "ping"))["pong"]


async def test_second_server_refused_and_stale_socket_removed() -> None:
    async with served() as (rt, server, _client):
        with pytest.raises(ControlError, match="another runtime is already serving"):
            ControlServer(rt, server.path).bind()
    home = Path(tempfile.mkdtemp(prefix="corral-ut-"))
    try:
        stale = home / "corral.sock"
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.bind(str(stale))  # bound, never listening: nobody answers
        rt2 = Runtime(home=home)
        server2 = ControlServer(rt2)
        server2.bind()
        try:
            assert stat.S_IMODE(stale.stat().st_mode) == 0o600
        finally:
            server2.close()
        assert not stale.exists()
    finally:
        shutil.rmtree(home, ignore_errors=True)


def test_no_runtime_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(CorralError) as info:
        Client(tmp_path / "corral.sock", timeout=2).call("ping")
    assert type(info.value).__name__ == "RuntimeNotRunning"
    assert str(tmp_path / "corral.sock") in str(info.value)
    assert "corral up" in str(info.value)
