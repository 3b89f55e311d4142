"""The inproc tier: agents as asyncio actors inside the runtime."""

from __future__ import annotations

import os

import pytest

from corral.errors import TaskFailed, TaskTimeout
from corral.runtime.runtime import Runtime
from tests.conftest import manifest


async def test_inproc_request_error_and_timeout(rt: Runtime) -> None:
    await rt.apply([manifest("echo", isolation="inproc", resources={"taskTimeout": "200ms"})],
                   wait=True, timeout=10)
    out = await rt.request("echo", [1, 2], handler="echo")
    assert out["echo"] == [1, 2] and out["pid"] == os.getpid()
    with pytest.raises(TaskFailed, match="bad input"):
        await rt.request("echo", 1, handler="boom")
    with pytest.raises(TaskTimeout):
        await rt.request("echo", 5, handler="nap")
    assert (await rt.request("echo", 3, handler="echo"))["echo"] == 3
    limits = (await rt.describe("echo"))["limits"]
    assert all(not row["enforced"] for row in limits)


async def test_inproc_many_replicas_answer(rt: Runtime) -> None:
    await rt.apply([manifest("echo", isolation="inproc", replicas=200)], wait=True, timeout=10)
    assert rt.get("echo")["ready"] == "200/200"
    outs = [await rt.request("echo", i, handler="echo") for i in range(400)]
    assert [o["echo"] for o in outs] == list(range(400))


async def test_inproc_and_process_agents_talk(rt: Runtime) -> None:
    await rt.apply([manifest("echo"), manifest("caller", "Caller", isolation="inproc")],
                   wait=True, timeout=20)
    out = await rt.request("caller", "hi", handler="relay")
    assert out == {"relayed": "hi", "via": "caller"}


async def test_inproc_init_failure_is_supervised(rt: Runtime) -> None:
    restart = {"maxRestarts": 1, "window": "30s", "backoff": {"initial": "10ms", "max": "20ms"}}
    await rt.apply([manifest("initfail", "InitFail", isolation="inproc", restart=restart)])
    import asyncio

    async with asyncio.timeout(10):
        while rt.get("initfail")["status"] != "GaveUp":
            await asyncio.sleep(0.02)
