"""Run agents from Python, without the CLI: `python examples/sdk_quickstart.py`."""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

from corral import Runtime

HERE = Path(__file__).parent


async def main() -> None:
    with tempfile.TemporaryDirectory() as home:
        async with Runtime(home=home) as rt:
            await rt.apply([HERE / "hello", HERE / "pipeline"], wait=True, timeout=30)
            print(await rt.request("hello", {"name": "ada"}))
            print(await rt.request("ingest", {"text": "Corral runs agents. It supervises them."}))
            for row in rt.list():
                print(row["name"], row["status"], row["ready"])
            print(rt.stats()["tasks_executed"], "tasks executed")


if __name__ == "__main__":
    asyncio.run(main())
