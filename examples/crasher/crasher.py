"""An agent that crashes, to show supervision: restarts with exponential backoff.

It fails to start its first `failFirst` times (see ctx.restarts), then runs; its
`crash` handler kills its own process, and the supervisor brings it back.
"""

from __future__ import annotations

import os

from corral import Agent, Message, handler


@Agent(name="crasher", version="1.0.0")
class Crasher:
    async def on_start(self) -> None:
        fail_first = int(self.ctx.config.get("failFirst", 3))
        if self.ctx.restarts < fail_first:
            raise RuntimeError(f"simulated start-up failure {self.ctx.restarts + 1} of {fail_first}")
        self.ctx.log(f"started after {self.ctx.restarts} restart(s)")

    @handler
    async def work(self, msg: Message) -> dict:
        return {"ok": True, "restarts": self.ctx.restarts, "pid": os.getpid()}

    @handler
    async def crash(self, msg: Message) -> None:
        os._exit(1)  # the process dies mid-task: the caller gets an error, the supervisor restarts it
