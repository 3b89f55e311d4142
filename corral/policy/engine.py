"""The policy engine: Cedar decisions over a pre-parsed policy set, with a decision cache.

Everything a decision depends on lives in one immutable ``_State`` (policy set, id map,
cache, generation). :meth:`PolicyEngine.load` builds a new state off to the side and swaps
one reference, so a check sees either the old set or the new one, never a mix, and a
failed load changes nothing. The cache belongs to the state, so it is dropped with it.

Decisions fail closed: if cedarpy raises, cannot build the request (an unknown action, a
context that does not match the schema) or reports an error evaluating any policy, the
answer is DENY, with the errors in :attr:`Decision.errors`.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import cedarpy

from corral.errors import PolicyDenied
from corral.policy._cache import BoundedCache
from corral.policy._schema import schema
from corral.policy.compiler import CompiledPolicies, PolicyInfo, compile_policies
from corral.policy.entities import Entity
from corral.policy.sources import PolicySource, read_paths

__all__ = ["Decision", "PolicyEngine"]

_CEDAR_ID = re.compile(r"`(policy\d+)`")
_ALLOW = cedarpy.Decision.Allow
#: Parsed entity sets kept: a new context for a known principal and resource (the usual
#: cold decision) then skips parsing the entities, about half the cost of a decision.
_ENTITY_SETS = 4096


@dataclass(frozen=True, slots=True)
class Decision:
    """The answer to one request, and why.

    ``policies`` are the ids of the policies that decided: the permits that matched when
    allowed; the forbids that matched when denied by a forbid; the policies that failed to
    evaluate when denied by an error; empty when no policy permitted (strict mode).
    """

    allowed: bool
    policies: tuple[str, ...]
    errors: tuple[str, ...]
    cached: bool


def _context_key(context: Mapping[str, Any]) -> Any:
    """A hashable key for a context; JSON text unless every value is a str or an int."""
    items = []
    for key, value in context.items():
        kind = type(value)
        if kind is not str and kind is not int:  # bools, sets, records: True == 1 in Python
            return json.dumps(context, sort_keys=True, default=repr)
        items.append((key, value))
    items.sort()
    return tuple(items)


@dataclass(frozen=True, eq=False, slots=True)
class _State:
    """Everything a decision depends on besides the request; replaced whole by a load."""

    compiled: CompiledPolicies
    generation: int
    cache: BoundedCache[tuple[Any, ...], Decision]

    def evaluate(self, request: dict[str, Any], entities: cedarpy.Entities
                 ) -> tuple[Decision, bool]:
        """The decision, and whether it may be cached (not when cedarpy itself raised)."""
        ids = self.compiled.ids
        try:
            result = cedarpy.is_authorized(request, self.compiled.policy_set, entities,
                                           schema=schema())
            # Cedar lists them in no fixed order; "policy<n>" sorts by n as (length, text),
            # which is the order the policies were loaded in.
            reasons = tuple(ids.get(r, r) for r in sorted(result.diagnostics.reasons,
                                                          key=lambda r: (len(r), r)))
            raw_errors = result.diagnostics.errors
            allowed = result.decision == _ALLOW
        except Exception as exc:  # fail closed, whatever cedarpy does
            return _failed(f"cedarpy failed: {type(exc).__name__}: {exc}"), False
        if raw_errors:
            errors = tuple(_CEDAR_ID.sub(lambda m: f"`{ids.get(m[1], m[1])}`", e)
                           for e in raw_errors)
            failing = {m for e in raw_errors for m in _CEDAR_ID.findall(e)}
            failed = tuple(ids.get(m, m) for m in sorted(failing, key=lambda r: (len(r), r)))
            return Decision(False, failed, errors, False), True
        return Decision(allowed, reasons, (), False), True


def _failed(error: str) -> Decision:
    return Decision(False, (), (error,), False)


class PolicyEngine:
    """Cedar policies over Corral's schema: load, reload, check and authorize requests.

    ``strict=True`` is Cedar's own semantics: denied unless a policy permits, and a forbid
    always wins. ``strict=False`` adds a permit-all policy (id ``corral.default-allow``), so
    a request is allowed unless a forbid matches. Either way an evaluation error denies.
    """

    def __init__(self, *, strict: bool = False, cache_size: int = 100_000) -> None:
        if cache_size < 0:
            raise ValueError("cache_size must be 0 (no cache) or more")
        self.strict = strict
        self._cache_size = cache_size
        self._state = _State(compile_policies([], strict=strict), 0, BoundedCache(cache_size))
        # Entity sets depend only on the entities' JSON, never on the policies: kept on reload.
        self._entity_sets: BoundedCache[tuple[str, str], cedarpy.Entities] = (
            BoundedCache(_ENTITY_SETS))
        self._loading = threading.Lock()  # one load at a time; checks never wait for it

    @property
    def generation(self) -> int:
        """Bumped by each successful load; 0 before the first."""
        return self._state.generation

    def load(self, sources: Sequence[PolicySource]) -> None:
        """Validate every source, then swap the whole set in; PolicyInvalid lists all problems.

        On PolicyInvalid nothing changes: the policies in force and their cache stay. A first
        load of many policies takes a while (Cedar validates ~10k policies a second), and
        cedarpy releases the GIL meanwhile: call it through ``asyncio.to_thread``.
        """
        with self._loading:
            old = self._state
            compiled = compile_policies(sources, strict=self.strict,
                                        known_valid=old.compiled.texts)
            self._state = _State(compiled, old.generation + 1, BoundedCache(self._cache_size))

    def load_paths(self, paths: Sequence[str | Path]) -> list[PolicySource]:
        """Read .cedar files and folders, load them (see :meth:`load`) and return the sources."""
        sources = read_paths(paths)
        self.load(sources)
        return sources

    def policies(self) -> list[PolicyInfo]:
        """The policies in force, in evaluation-set order (non-strict adds the default last)."""
        return list(self._state.compiled.infos)

    def check(self, principal: Entity, action: str, resource: Entity,
              context: Mapping[str, Any] | None = None) -> Decision:
        """The decision for one request, from the cache when the same request was seen."""
        state = self._state  # one read: a concurrent load cannot mix two sets
        key = (principal.cedar_json, action, resource.cedar_json,
               _context_key(context) if context else ())
        hit = state.cache.get(key)
        if hit is not None:
            return hit
        decision, cacheable = self._decide(state, principal, action, resource, context)
        if cacheable:
            state.cache.put(key, replace(decision, cached=True))
        return decision

    def _decide(self, state: _State, principal: Entity, action: str, resource: Entity,
                context: Mapping[str, Any] | None) -> tuple[Decision, bool]:
        pair = (principal.cedar_json, resource.cedar_json)
        entities = self._entity_sets.get(pair)
        if entities is None:
            same = principal.uid == resource.uid and pair[0] == pair[1]
            text = f"[{pair[0]}]" if same else f"[{pair[0]},{pair[1]}]"
            try:
                entities = cedarpy.Entities.from_json_str(text, schema())
            except ValueError as exc:  # e.g. an attribute the schema does not declare
                return _failed(f"the principal or resource is not a valid entity: {exc}"), True
            except Exception as exc:  # fail closed, whatever cedarpy does
                return _failed(f"cedarpy failed: {type(exc).__name__}: {exc}"), False
            self._entity_sets.put(pair, entities)
        request = {"principal": principal.uid, "action": {"type": "Action", "id": action},
                   "resource": resource.uid, "context": dict(context or {})}
        return state.evaluate(request, entities)

    def authorize(self, principal: Entity, action: str, resource: Entity,
                  context: Mapping[str, Any] | None = None) -> Decision:
        """Like :meth:`check`, but raises PolicyDenied (naming the deciding policies) on deny."""
        decision = self.check(principal, action, resource, context)
        if decision.allowed:
            return decision
        raise self.denial(principal, action, resource, decision)

    @staticmethod
    def denial(principal: Entity, action: str, resource: Entity,
               decision: Decision) -> PolicyDenied:
        """The PolicyDenied for a denying ``decision``: why, and what to do about it."""
        ids = ", ".join(decision.policies)
        if decision.errors:
            why = f"policy evaluation failed, so it is denied to be safe: {decision.errors[0]}"
            hint = ("fix the request or the policy named; run `corral policy eval` to see "
                    "every error")
        elif decision.policies:
            why = f"forbidden by policy {ids}"
            hint = "change or remove that policy, or run `corral policy eval` to see why it matched"
        else:
            why = "no policy permits it, and strict mode denies by default"
            hint = f"add a permit policy for {action} (see docs/policy.md)"
        return PolicyDenied(f"{principal} may not {action} {resource}: {why}", action=action,
                            principal=str(principal), resource=str(resource),
                            policies=list(decision.policies), hint=hint)
