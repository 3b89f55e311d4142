"""The projection folds stored events through the same lifecycle table the live path uses."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from corral.core.lifecycle import EVENTS, TRANSITIONS, State, apply, event_from_name
from corral.runtime.projection import Projection
from corral.store.records import StoredEvent

MANIFEST = {"apiVersion": "corral/v1", "kind": "Agent", "metadata": {"name": "a"},
            "spec": {"entrypoint": "m:C", "replicas": 2}}


def ev(seq: int, kind: str, **data: object) -> StoredEvent:
    return StoredEvent(seq, float(seq), "a", kind, dict(data))


def legal_path(names: list[str]) -> list[str]:
    """Keep only the events that are legal in sequence, as the live runtime would."""
    state, out = State.INITIALIZING, []
    for n in names:
        e = event_from_name(n)
        if type(e) in TRANSITIONS[state]:
            state = apply(state, e)
            out.append(n)
    return out


@given(st.lists(st.sampled_from(sorted(EVENTS)), max_size=40))
def test_fold_matches_live_transitions(names: list[str]) -> None:
    path = legal_path(names)
    events = [ev(1, "agent.applied", manifest=MANIFEST), ev(2, "instance.created", instance="a-0")]
    state = State.INITIALIZING
    for i, n in enumerate(path):
        state = apply(state, event_from_name(n))
        events.append(ev(3 + i, "instance.transition", instance="a-0", event=n))
    proj = Projection().fold(events)
    assert proj.agents["a"].instances["a-0"] is state
    assert proj.agents["a"].restarts == path.count("Restart")
    assert proj.last_seq == events[-1].seq


def test_admin_events() -> None:
    events = [ev(1, "agent.applied", manifest=MANIFEST, base_dir="/x", source="f.yaml"),
              ev(2, "agent.scaled", replicas=5), ev(3, "agent.stopped"),
              ev(4, "agent.gave_up", reason="6 restarts in 60s")]
    rec = Projection().fold(events).agents["a"]
    assert (rec.replicas, rec.stopped, rec.gave_up, rec.base_dir) == (5, True, "6 restarts in 60s", "/x")
    rec2 = Projection().fold([*events, ev(5, "agent.scaled", replicas=1)]).agents["a"]
    assert (rec2.replicas, rec2.stopped, rec2.gave_up) == (1, False, None)
    assert "a" not in Projection().fold([*events, ev(5, "agent.deleted")]).agents


def test_reapply_keeps_history_and_new_incarnation_resets_state() -> None:
    events = [ev(1, "agent.applied", manifest=MANIFEST), ev(2, "instance.created", instance="a-0"),
              ev(3, "instance.transition", instance="a-0", event="InitFailed"),
              ev(4, "instance.transition", instance="a-0", event="Restart"),
              ev(5, "agent.applied", manifest=MANIFEST, generation=2),
              ev(6, "instance.created", instance="a-0")]
    rec = Projection().fold(events).agents["a"]
    assert rec.restarts == 1 and rec.generation == 2
    assert rec.instances["a-0"] is State.INITIALIZING
