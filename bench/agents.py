"""The tiny agents the Corral benchmarks run (entrypoints ``bench.agents:Echo`` / ``:WhoAmI``).

Kept free of heavy imports: every process-tier worker imports this module after its fork.
"""

from __future__ import annotations

from typing import Any

from corral import Agent, Message, handler


@Agent(name="bench-echo", version="1.0.0")
class Echo:
    """Answers every request with its own payload."""

    @handler
    async def echo(self, msg: Message) -> Any:
        return msg.content


@Agent(name="bench-whoami", version="1.0.0")
class WhoAmI:
    """Answers with the instance name, so a benchmark can check that every replica answered."""

    @handler
    async def whoami(self, msg: Message) -> Any:
        return self.ctx.instance  # type: ignore[attr-defined]
