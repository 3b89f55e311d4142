"""The runtime's state as a fold of its stored events.

Live code and replay share ``core.lifecycle.apply``: after a restart the runtime folds
the event log through the same table to learn what each agent and instance was.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from corral.core.lifecycle import State, apply, event_from_name
from corral.store.records import StoredEvent

__all__ = ["AgentRecord", "Projection"]


@dataclass
class AgentRecord:
    """What the event log says about one agent."""

    name: str
    manifest: dict[str, Any]
    base_dir: str
    source: str
    generation: int = 1
    replicas: int = 1
    stopped: bool = False
    gave_up: str | None = None
    restarts: int = 0
    instances: dict[str, State] = field(default_factory=dict)
    #: Subscriptions made at run time: subject -> their stored spec.
    dynamic: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass
class Projection:
    """Agents (not deleted) and their instances' last states."""

    agents: dict[str, AgentRecord] = field(default_factory=dict)
    last_seq: int = 0

    def fold(self, events: Iterable[StoredEvent]) -> Projection:
        """Apply events in order; returns self."""
        for ev in events:
            self.last_seq = ev.seq
            self._apply(ev)
        return self

    def _apply(self, ev: StoredEvent) -> None:
        d = ev.data
        if ev.kind == "agent.applied":
            old = self.agents.get(ev.agent)
            rec = AgentRecord(ev.agent, d["manifest"], d.get("base_dir", "."), d.get("source", ""),
                              generation=d.get("generation", 1),
                              replicas=d["manifest"]["spec"].get("replicas", 1))
            if old is not None:
                rec.restarts, rec.instances, rec.dynamic = old.restarts, old.instances, old.dynamic
            self.agents[ev.agent] = rec
            return
        rec_or_none = self.agents.get(ev.agent)
        if rec_or_none is None:
            return
        rec = rec_or_none
        if ev.kind == "agent.deleted":
            del self.agents[ev.agent]
        elif ev.kind == "agent.scaled":
            rec.replicas, rec.stopped, rec.gave_up = d["replicas"], False, None
        elif ev.kind == "agent.stopped":
            rec.stopped = True
        elif ev.kind == "agent.subscribed":
            rec.dynamic[d["subject"]] = d
        elif ev.kind == "agent.unsubscribed":
            rec.dynamic.pop(d["subject"], None)
        elif ev.kind == "agent.gave_up":
            rec.gave_up = d.get("reason", "")
        elif ev.kind == "instance.created":
            rec.instances[d["instance"]] = State.INITIALIZING
        elif ev.kind == "instance.transition":
            inst = d["instance"]
            state = rec.instances.get(inst, State.INITIALIZING)
            rec.instances[inst] = apply(state, event_from_name(d["event"], d.get("reason", "")))
            if d["event"] == "Restart":
                rec.restarts += 1
