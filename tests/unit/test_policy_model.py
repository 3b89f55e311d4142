"""The engine agrees with a plain-Python model of two policy sets, cold, cached and reloaded."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from corral.policy import (
    ACTIONS,
    APPLIES_TO,
    DEFAULT_ALLOW_ID,
    Entity,
    PolicyEngine,
    PolicySource,
    agent,
    namespace,
    tool,
    topic,
    user,
)

FIRST = """
@id("same-namespace")
permit (principal, action, resource) when { principal.namespace == resource.namespace };

@id("tools-need-trust")
forbid (principal, action == Action::"tool.call", resource)
unless { principal.hasTag("tier") && principal.getTag("tier") == "trusted" };

@id("quarantine")
forbid (principal, action, resource)
when { principal.hasTag("quarantined") && principal.getTag("quarantined") == "true" };
"""

SECOND = """
@id("same-namespace")
permit (principal, action, resource) when { principal.namespace == resource.namespace };

@id("ops-reads")
permit (principal in Namespace::"ops",
        action in [Action::"memory.read", Action::"topic.subscribe"], resource);

@id("big-payloads")
forbid (principal,
        action in [Action::"topic.publish", Action::"message.send", Action::"agent.request"],
        resource)
when { context.payloadSize > 65536 };

@id("low-priority-memory")
forbid (principal, action == Action::"resource.allocate", resource is Agent)
when { resource.priority == "low" && context.memoryBytes > 1073741824 };
"""

NAMESPACES = ["research", "ops", "default"]
PAYLOAD_ACTIONS = ("message.send", "agent.request", "topic.publish")


@dataclass(frozen=True)
class Request:
    principal: Entity
    action: str
    resource: Entity
    context: dict[str, Any]

    @property
    def key(self) -> tuple[str, str, str, str]:
        return (self.principal.cedar_json, self.action, self.resource.cedar_json,
                repr(sorted(self.context.items())))


def _label(e: Entity, key: str) -> str | None:
    return e.tags.get(key)


def first_forbids(r: Request) -> set[str]:
    """The forbids of FIRST that match."""
    matched = set()
    if r.action == "tool.call" and _label(r.principal, "tier") != "trusted":
        matched.add("tools-need-trust")
    if _label(r.principal, "quarantined") == "true":
        matched.add("quarantine")
    return matched


def first_permits(r: Request) -> set[str]:
    """The permits of FIRST that match."""
    same = r.principal.attrs["namespace"] == r.resource.attrs["namespace"]
    return {"same-namespace"} if same else set()


def second_forbids(r: Request) -> set[str]:
    """The forbids of SECOND that match."""
    matched = set()
    if r.action in PAYLOAD_ACTIONS and r.context["payloadSize"] > 65536:
        matched.add("big-payloads")
    if (r.action == "resource.allocate" and r.resource.type == "Agent"
            and r.resource.attrs["priority"] == "low" and r.context["memoryBytes"] > 1 << 30):
        matched.add("low-priority-memory")
    return matched


def second_permits(r: Request) -> set[str]:
    """The permits of SECOND that match."""
    matched = first_permits(r)
    in_ops = r.principal.uid == {"type": "Namespace", "id": "ops"} or (
        ("Namespace", "ops") in r.principal.parents)
    if in_ops and r.action in ("memory.read", "topic.subscribe"):
        matched.add("ops-reads")
    return matched


Model = tuple[Callable[[Request], set[str]], Callable[[Request], set[str]]]


def expected(model: Model, r: Request, strict: bool) -> tuple[bool, set[str]]:
    """Cedar's rule in plain Python: any forbid denies; else any permit allows; else default."""
    permits, forbids = model[0](r), model[1](r)
    if not strict:
        permits |= {DEFAULT_ALLOW_ID}
    if forbids:
        return False, forbids
    return (True, permits) if permits else (False, set())


# -- strategies ----------------------------------------------------------------------------

names = st.sampled_from(["alice", "bob", "carol", "dave"])
namespaces = st.sampled_from(NAMESPACES)
labels = st.fixed_dictionaries(
    {}, optional={"tier": st.sampled_from(["trusted", "untrusted", ""]),
                  "quarantined": st.sampled_from(["true", "false", "TRUE"]),
                  "team": st.text(max_size=5)})


@st.composite
def principals(draw: st.DrawFn) -> Entity:
    kind = draw(st.sampled_from(["Agent", "User", "Namespace"]))
    if kind == "Agent":
        return agent(draw(names), namespace=draw(namespaces), labels=draw(labels),
                     priority=draw(st.sampled_from(["low", "normal", "high"])))
    if kind == "User":
        return user(draw(names), namespace=draw(st.none() | namespaces), labels=draw(labels))
    return namespace(draw(namespaces), labels=draw(labels))


@st.composite
def requests(draw: st.DrawFn) -> Request:
    action = draw(st.sampled_from(ACTIONS))
    kind = draw(st.sampled_from(APPLIES_TO[action][1]))
    ns = draw(namespaces)
    resource = {
        "Agent": lambda: agent(draw(names), namespace=ns,
                               priority=draw(st.sampled_from(["low", "normal"]))),
        "Topic": lambda: topic(draw(st.sampled_from(["news", "jobs.done"])), namespace=ns),
        "Tool": lambda: tool("clock", draw(st.sampled_from(["now", "sleep"])), namespace=ns),
        "Namespace": lambda: namespace(ns),
    }[kind]()
    context: dict[str, Any] = {}
    if action in PAYLOAD_ACTIONS:
        context = {"payloadSize": draw(st.integers(0, 1 << 20))}
    elif action == "resource.allocate":
        context = {"memoryBytes": draw(st.integers(0, 1 << 32))}
        if draw(st.booleans()):
            context["cpuMillis"] = draw(st.integers(0, 8000))
    return Request(draw(principals()), action, resource, context)


# -- the property --------------------------------------------------------------------------


def agree(engine: PolicyEngine, model: Model, batch: list[Request], strict: bool) -> None:
    """Two passes: the first cold (cached only for repeats), the second all from the cache."""
    seen: set[tuple[str, str, str, str]] = set()
    for cold in (True, False):
        for r in batch:
            d = engine.check(r.principal, r.action, r.resource, r.context)
            assert d.cached == (r.key in seen or not cold)
            seen.add(r.key)
            if conflict(r):  # two different entities with one uid: fail closed
                assert not d.allowed and "duplicate entity" in d.errors[0]
                continue
            assert (d.allowed, set(d.policies)) == expected(model, r, strict), r
            assert d.errors == ()


def conflict(r: Request) -> bool:
    """Principal and resource share a uid but not their attributes or labels."""
    return r.principal.uid == r.resource.uid and r.principal != r.resource


@settings(max_examples=150)
@given(batch=st.lists(requests(), min_size=1, max_size=12), strict=st.booleans())
def test_engine_agrees_with_the_model_before_and_after_reload(batch: list[Request],
                                                              strict: bool) -> None:
    engine = PolicyEngine(strict=strict)
    engine.load([PolicySource("first.cedar", FIRST)])
    agree(engine, (first_permits, first_forbids), batch, strict)
    engine.load([PolicySource("second.cedar", SECOND)])
    agree(engine, (second_permits, second_forbids), batch, strict)


@settings(max_examples=50)
@given(batch=st.lists(requests(), min_size=1, max_size=6))
def test_a_bad_reload_changes_no_decision(batch: list[Request]) -> None:
    engine = PolicyEngine(strict=True)
    engine.load([PolicySource("first.cedar", FIRST)])
    before = [engine.check(r.principal, r.action, r.resource, r.context) for r in batch]
    try:
        engine.load([PolicySource("second.cedar", SECOND + "\nforbid (principal) when { };")])
    except Exception as exc:
        assert type(exc).__name__ == "PolicyInvalid"
    after = [engine.check(r.principal, r.action, r.resource, r.context) for r in batch]
    assert [(d.allowed, d.policies) for d in after] == [(d.allowed, d.policies) for d in before]
    assert all(d.cached for d in after) and engine.generation == 1
