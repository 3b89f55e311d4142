"""Every example applies from its folder and does what its README says."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest

from corral.errors import AgentUnavailable
from corral.runtime.runtime import Runtime
from tests.conftest import REQUIRE_SERVICES

EXAMPLES = Path(__file__).parents[2] / "examples"


async def test_hello_and_pipeline(rt: Runtime) -> None:
    await rt.apply([EXAMPLES / "hello", EXAMPLES / "pipeline"], wait=True, timeout=30)
    assert (await rt.request("hello", {"name": "ada"}))["greeting"] == "hello, ada!"
    out = await rt.request("ingest", {"text": "One. Two!  Three?"})
    assert out["summary"] == "One." and out["sentences"] == 3 and out["tally"]["documents"] == 1


async def test_crasher_backs_off_then_runs(rt: Runtime) -> None:
    await rt.apply([EXAMPLES / "crasher"])
    async with asyncio.timeout(20):
        while rt.get("crasher")["status"] != "Running":
            await asyncio.sleep(0.05)
    assert rt.agents["crasher"].restarts == 3
    assert (await rt.request("crasher", handler="work"))["restarts"] == 3
    with pytest.raises(AgentUnavailable):
        await rt.request("crasher", handler="crash")
    async with asyncio.timeout(20):
        while rt.get("crasher")["status"] != "Running":
            await asyncio.sleep(0.05)
    assert rt.agents["crasher"].restarts == 4
    # The backoff between the three start-up failures grew: 200ms, 400ms, 800ms (+-20%).
    events = [e for e in await rt.store.events(agent="crasher") if e.kind == "instance.transition"]
    fails = [e.ts for e in events if e.data["event"] == "InitFailed"]
    restarts = [e.ts for e in events if e.data["event"] == "Restart"]
    gaps = [r - f for f, r in zip(fails, restarts, strict=False)][:3]
    assert gaps[0] >= 0.15 and gaps[1] >= 0.3 and gaps[2] >= 0.6


async def test_node_agent(rt: Runtime) -> None:
    if shutil.which("node") is None:
        if REQUIRE_SERVICES:
            pytest.fail("node is required (CORRAL_REQUIRE_SERVICES=1) but not on PATH")
        pytest.skip("node is not on PATH; install nodejs to run the JavaScript example")
    await rt.apply([EXAMPLES / "node-echo"], wait=True, timeout=30)
    assert await rt.request("node-echo", {"text": "hi"}, handler="upper") == {"text": "HI"}


async def test_newsroom_talks_over_topics(rt: Runtime) -> None:
    await rt.apply([EXAMPLES / "newsroom"], wait=True, timeout=30)
    for i, desk in enumerate(["science", "science", "sport"]):
        await rt.request("reporter", {"id": i, "desk": desk, "headline": f"story {i}"},
                         handler="file")
    async with asyncio.timeout(20):
        while (await rt.request("archive", handler="count")) < 3:
            await asyncio.sleep(0.05)
        while True:
            desks = await rt.request("editor", handler="desks_report")
            if sum(d["stories"] for d in desks.values()) >= 3:
                break
            await asyncio.sleep(0.05)
    assert desks == {"science": {"stories": 2, "latest": "story 1"},
                     "sport": {"stories": 1, "latest": "story 2"}}
