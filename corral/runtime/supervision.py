"""SupervisionGroup: carries out ``core.supervisor`` decisions on live instances.

The decisions are pure; this adapter feeds them events (with ``now`` and a seeded rng)
and turns their actions into starts, kills and give-ups.
"""

from __future__ import annotations

import asyncio
import functools
import random
from typing import TYPE_CHECKING

from corral.core.backoff import BackoffPolicy
from corral.core.supervisor import (
    Action,
    ChildAdded,
    ChildExited,
    ChildRemoved,
    ChildSpec,
    ChildStarted,
    GiveUp,
    RestartPolicy,
    StartChild,
    StopChild,
    Strategy,
    SupervisorEvent,
    SupervisorState,
    decide,
)

if TYPE_CHECKING:
    from corral.runtime.instance import Instance
    from corral.spec.models import Restart

__all__ = ["SupervisionGroup"]


class SupervisionGroup:
    """One supervisor: its children are instances, of one agent or of a named group."""

    def __init__(self, key: str, restart: Restart, *, rng: random.Random | None = None) -> None:
        self.key = key
        self.strategy = Strategy(restart.strategy)
        self.state = SupervisorState.new(self.strategy, restart.max_restarts, restart.window)
        self.members: dict[str, Instance] = {}
        self.rng = rng or random.Random()
        self.gave_up: str | None = None

    def add(self, inst: Instance, restart: Restart) -> None:
        """Supervise ``inst``; the supervisor starts it."""
        self.members[inst.name] = inst
        self._feed(ChildAdded(ChildSpec(inst.name, RestartPolicy(restart.policy),
                                        _backoff(restart))))

    def remove(self, inst: Instance) -> None:
        """Stop supervising ``inst`` (its owner stops it gracefully)."""
        if self.members.pop(inst.name, None) is not None:
            self.state, _ = decide(self.state, ChildRemoved(inst.name), self._now(), self.rng)

    def started(self, inst: Instance) -> None:
        """``inst`` reached Ready."""
        if inst.name in self.members:
            self._feed(ChildStarted(inst.name))

    def exited(self, inst: Instance, failed: bool, reason: str) -> None:
        """``inst`` ended; the supervisor decides what happens next."""
        if inst.name in self.members:
            self._feed(ChildExited(inst.name, failed, reason))

    def _feed(self, event: SupervisorEvent) -> None:
        self.state, actions = decide(self.state, event, self._now(), self.rng)
        self._carry_out(actions)

    def _carry_out(self, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, StartChild):
                inst = self.members.get(action.name)
                if inst is not None:
                    inst.schedule_start(action.delay)
            elif isinstance(action, StopChild):
                inst = self.members.get(action.name)
                if inst is not None:
                    inst.kill("killed", f"stopped by supervisor ({self.strategy.value})")
            elif isinstance(action, GiveUp):
                self.gave_up = action.reason
                for name in action.children:
                    inst = self.members.get(name)
                    if inst is not None:
                        inst.agent.on_give_up(action.reason)
                        inst.give_up(action.reason)

    @staticmethod
    def _now() -> float:
        return asyncio.get_running_loop().time()


@functools.lru_cache(maxsize=256)
def _backoff(restart: Restart) -> BackoffPolicy:
    # One policy per restart spec (they are frozen, hence hashable), not one per instance.
    b = restart.backoff
    return BackoffPolicy(initial=max(b.initial, 1e-6), max=max(b.max, b.initial, 1e-6),
                         multiplier=b.multiplier, jitter=b.jitter, reset_after=b.reset_after)
