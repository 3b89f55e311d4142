"""Scheduler: fires ``@scheduled`` handlers and ``mode: scheduled`` agents on time.

Each schedule is one loop timer, re-armed after it fires; firing submits ordinary work,
so scheduled runs get the same queue, priorities, timeouts and stats as any task.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

from corral.core.schedule import next_fire
from corral.errors import CorralError
from corral.wire.messages import Schedule

if TYPE_CHECKING:
    from corral.runtime.agent import AgentController
    from corral.runtime.runtime import Runtime

__all__ = ["Scheduler"]


class Scheduler:
    """Timers keyed by (agent, handler)."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self._timers: dict[tuple[str, str], asyncio.TimerHandle] = {}
        self.next_runs: dict[tuple[str, str], float] = {}

    def ensure(self, agent: AgentController, schedules: list[Schedule],
               payload: Any = None) -> None:
        """Arm each schedule of ``agent`` that is not armed yet."""
        for s in schedules:
            key = (agent.name, s.handler)
            if key not in self._timers:
                self._arm(key, s, payload, last=None)

    def remove_agent(self, name: str) -> None:
        """Disarm every schedule of an agent."""
        for key in [k for k in self._timers if k[0] == name]:
            self._timers.pop(key).cancel()
            self.next_runs.pop(key, None)

    def close(self) -> None:
        """Disarm everything."""
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()

    def _arm(self, key: tuple[str, str], s: Schedule, payload: Any, last: float | None) -> None:
        now = time.time()
        at = next_fire(now=now, interval=s.interval, cron=s.cron, last=last)
        self.next_runs[key] = at
        loop = asyncio.get_running_loop()
        self._timers[key] = loop.call_later(max(0.0, at - now), self._fire, key, s, payload)

    def _fire(self, key: tuple[str, str], s: Schedule, payload: Any) -> None:
        agent = self.rt.agent_or_none(key[0])
        if agent is None:
            self._timers.pop(key, None)
            return
        try:
            self.rt.submit_scheduled(agent, s.handler, payload)
        except CorralError as exc:
            self.rt.log(agent.name, "", "warning", f"scheduled {s.handler} skipped: {exc}")
        self._arm(key, s, payload, last=time.time())
