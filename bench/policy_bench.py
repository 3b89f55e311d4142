"""Policy-engine benchmark: decision latency (cached and cold) and reloading 1,000 policies.

``.venv/bin/python -m bench.policy_bench [--quick]``

- **cached**: ``PolicyEngine.check`` for requests already decided once (the decision cache).
- **cold, known entities**: the decision cache off (``cache_size=0``), principal and
  resource seen before, so their parsed entity set is reused: what a new context (another
  payload size) for a known agent costs.
- **cold, new entities**: every request names a principal never seen, so Cedar also
  parses the entities: the worst case.
- Cold figures are taken with the example policies (examples/policies, 12 of them) and,
  for known entities, with 1,000 policies too (Cedar evaluates every policy per decision,
  so the set's size shows in cold latency).
- **load 1,000 new policies**: a fresh engine validates every policy and builds the set.
- **reload 1,000 policies, one changed**: the usual hot reload; only the changed policy is
  validated again, the set is parsed whole.

Every figure is the median over repeated runs; latencies are per-call percentiles.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import statistics
from collections.abc import Callable
from typing import Any

from bench.common import ROOT, fmt, latency_us, median_runs, now_ns, print_table
from corral.policy import Entity, PolicyEngine, PolicySource, agent, namespace, tool, topic

__all__ = ["TARGETS", "main", "run"]

#: metric -> (target, unit); every target is an upper bound.
TARGETS: dict[str, tuple[float, str]] = {
    "cached_p50_us": (10.0, "µs"),
    "cold_p50_us": (100.0, "µs"),
    "cold_new_entities_p50_us": (100.0, "µs"),
    "cold_1000_p50_us": (100.0, "µs"),
    "reload_1000_ms": (50.0, "ms"),
    "load_1000_ms": (50.0, "ms"),
}
_NAMESPACES = ("research", "ops", "default", "web")
_LABELS: tuple[dict[str, str], ...] = ({"tier": "trusted"}, {}, {"tier": "guest"},
                                       {"quarantined": "true"})

Request = tuple[Entity, str, Entity, dict[str, Any]]


def example_sources() -> list[PolicySource]:
    """The policies of examples/policies."""
    folder = ROOT / "examples" / "policies"
    return [PolicySource(str(p), p.read_text()) for p in sorted(folder.glob("*.cedar"))]


def generated_sources(n: int, changed: int = -1) -> list[PolicySource]:
    """n policies of the shapes in examples/policies, ``changed`` one with another constant."""
    shapes = (
        '@id("ns-{i}") permit (principal in Namespace::"ns{i}", action == '
        'Action::"topic.publish", resource is Topic) when '
        '{{ resource.namespace == principal.namespace && context.payloadSize < {k} }};',
        '@id("tier-{i}") forbid (principal, action == Action::"tool.call", resource) when '
        '{{ principal.hasTag("team") && principal.getTag("team") == "t{i}-{k}" }};',
        '@id("mem-{i}") forbid (principal, action == Action::"resource.allocate", '
        'resource is Agent) when {{ resource.priority == "low" && '
        'context.memoryBytes > {k} }};',
        '@id("agent-{i}") permit (principal == Agent::"a{i}", action in '
        '[Action::"memory.read", Action::"memory.write"], resource) when '
        '{{ principal == resource || resource.name == "shared-{k}" }};',
    )
    text = "\n".join(shapes[i % len(shapes)].format(i=i, k=(i + 7 if i == changed else i) * 1000)
                     for i in range(n))
    return [PolicySource("generated.cedar", text)]


def requests(n: int, *, unique: bool = False) -> list[Request]:
    """n requests over every action; ``unique`` gives each one a principal never seen."""
    out: list[Request] = []
    for i in range(n):
        ns = _NAMESPACES[i % len(_NAMESPACES)]
        who = agent(f"agent-{i if unique else i % 50}", namespace=ns,
                    labels=_LABELS[i % len(_LABELS)], priority=("low", "normal")[i % 2])
        target = agent(f"agent-{(i + 1) % 50}", namespace=ns, priority="low")
        kind = i % 6
        if kind == 0:
            out.append((who, "topic.publish", topic(f"{ns}.news", namespace=ns),
                        {"payloadSize": 100 + i % 5000}))
        elif kind == 1:
            out.append((who, "tool.call", tool("clock", "now", namespace=ns), {}))
        elif kind == 2:
            out.append((namespace(ns), "resource.allocate", target,
                        {"memoryBytes": (i % 8) << 28}))
        elif kind == 3:
            out.append((who, "agent.request", target, {"payloadSize": i % 3000}))
        elif kind == 4:
            out.append((who, "memory.read", who, {}))
        else:
            out.append((who, "topic.subscribe", topic(f"{ns}.jobs", namespace=ns), {}))
    return out


def _time_checks(engine: PolicyEngine, reqs: list[Request], passes: int) -> list[int]:
    samples: list[int] = []
    check = engine.check
    for _ in range(passes):
        for p, action, r, ctx in reqs:
            t0 = now_ns()
            check(p, action, r, ctx)
            samples.append(now_ns() - t0)
    return samples


def _engine(sources: list[PolicySource], cache_size: int) -> PolicyEngine:
    engine = PolicyEngine(strict=True, cache_size=cache_size)
    engine.load(sources)
    return engine


def _decisions(quick: bool) -> dict[str, Any]:
    n, passes = (300, 3) if quick else (2_000, 5)
    reqs = requests(n)
    gc.collect()
    out: dict[str, Any] = {}

    cached = _engine(example_sources(), 100_000)
    _time_checks(cached, reqs, 1)  # fill the cache
    out.update({f"cached_{k}": v for k, v in latency_us(_time_checks(cached, reqs, passes)).items()})

    for label, sources in (("", example_sources()), ("1000_", generated_sources(1_000))):
        cold = _engine(sources, 0)
        _time_checks(cold, reqs, 1)  # warm the parsed entity sets, as a running engine has
        samples = _time_checks(cold, reqs, passes if not label else 1)
        out.update({f"cold_{label}{k}": v for k, v in latency_us(samples).items()})

    fresh = _engine(example_sources(), 0)
    samples = _time_checks(fresh, requests(n, unique=True), 1)
    out.update({f"cold_new_entities_{k}": v for k, v in latency_us(samples).items()})
    return out


def _ms(fn: Callable[[], Any]) -> float:
    gc.collect()
    t0 = now_ns()
    fn()
    return (now_ns() - t0) / 1e6


def _reloads(quick: bool) -> dict[str, Any]:
    reps = 3 if quick else 7
    base = generated_sources(1_000)
    loads = [_ms(lambda: _engine(base, 100_000)) for _ in range(reps)]
    engine = _engine(base, 100_000)
    reloads = []
    for i in range(reps):
        changed = generated_sources(1_000, changed=i * 97 % 1_000)
        reloads.append(_ms(functools.partial(engine.load, changed)))
    return {"load_1000_ms": statistics.median(loads), "reload_1000_ms": statistics.median(reloads),
            "load_1000_runs_ms": loads, "reload_1000_runs_ms": reloads}


def run(quick: bool) -> dict[str, Any]:
    """Measure everything; figures are medians over repeated runs."""
    reps = 2 if quick else 3
    decisions = median_runs([_decisions(quick) for _ in range(reps)])
    result = {k: v for k, v in decisions.items() if k != "runs"}
    result.update(_reloads(quick))
    result["targets"] = {k: {"target": t, "unit": u, "met": result[k] <= t}
                         for k, (t, u) in TARGETS.items()}
    return result


def _report(result: dict[str, Any]) -> None:
    rows = []
    labels = {
        "cached_p50_us": "decision from the cache, p50", "cached_p99_us": "  p99",
        "cold_p50_us": "cold, known entities (example policies), p50", "cold_p99_us": "  p99",
        "cold_new_entities_p50_us": "cold, new entities (example policies), p50",
        "cold_new_entities_p99_us": "  p99",
        "cold_1000_p50_us": "cold, known entities (1,000 policies), p50",
        "cold_1000_p99_us": "  p99",
        "load_1000_ms": "load 1,000 new policies (all validated), median",
        "reload_1000_ms": "reload 1,000 policies, one changed, median",
    }
    for key, label in labels.items():
        target = result["targets"].get(key)
        unit = "ms" if key.endswith("_ms") else "µs"
        verdict = "" if target is None else ("MET" if target["met"] else "MISSED")
        rows.append([label, f"{fmt(result[key])} {unit}",
                     f"≤ {fmt(target['target'])} {unit}" if target else "", verdict])
    print_table("Policy engine (cedarpy, strict mode)", ["metric", "value", "target", ""], rows)


def main() -> None:
    """Run the benchmark and print the table (and the JSON with --json)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small counts, a few seconds")
    parser.add_argument("--json", action="store_true", help="also print the result as JSON")
    args = parser.parse_args()
    result = run(args.quick)
    _report(result)
    if args.json:
        print(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()
