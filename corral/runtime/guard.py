"""Guard: every hook point asks the policy, and what happened goes into the audit trail.

The runtime calls ``authorize`` before it acts (create an agent, send, publish, subscribe,
request, allocate resources, terminate) and ``record`` for what it did. Both fail closed:
a policy that cannot be evaluated denies, and a record that cannot be written raises
AuditUnavailable, so the action it was to record is refused. Lifecycle transitions
already happened when they are recorded (a crash cannot be refused), so ``note`` writes
them without blocking the caller and logs a failure loudly instead.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Callable, Coroutine, Mapping
from typing import TYPE_CHECKING, Any

import msgspec

from corral.errors import AuditError

if TYPE_CHECKING:
    from corral.audit.log import AuditLog
    from corral.policy.engine import Decision, PolicyEngine
    from corral.policy.entities import Entity
    from corral.policy.sources import PolicySource

__all__ = ["Guard", "payload_facts"]

log = logging.getLogger("corral")
_ENC = msgspec.msgpack.Encoder()


def payload_facts(payload: Any) -> tuple[int, str]:
    """Size and SHA-256 of a payload's msgpack bytes: what policy and audit see of the data."""
    try:
        data = _ENC.encode(payload)
    except (TypeError, msgspec.EncodeError):
        data = repr(payload).encode()
    return len(data), hashlib.sha256(data).hexdigest()


class Guard:
    """Policy decisions and audit records for one runtime."""

    def __init__(self, policy: PolicyEngine, audit: AuditLog | None, *,
                 audit_allows: bool = False,
                 spawn: Callable[[Coroutine[Any, Any, None]], None] | None = None) -> None:
        self.policy = policy
        self.audit = audit
        self.audit_allows = audit_allows
        self._spawn = spawn
        self.sources: list[PolicySource] = []
        self.denials = 0
        #: Non-strict with no policies allows everything: skip evaluating then.
        self._idle = not policy.strict

    def load(self, sources: list[PolicySource]) -> None:
        """Put ``sources`` in force (all or nothing; PolicyInvalid keeps the old set)."""
        self.policy.load(sources)
        self.sources = list(sources)
        self._idle = not self.policy.strict and not sources

    @property
    def idle(self) -> bool:
        """Nothing to check and nothing to record: no policy in force and no audit trail."""
        return self._idle and self.audit is None

    def decide(self, principal: Entity, action: str, resource: Entity,
               context: Mapping[str, Any] | None = None) -> Decision | None:
        """The decision, or None when no policy is in force and nothing can be denied."""
        if self._idle:
            return None
        return self.policy.check(principal, action, resource, context)

    async def authorize(self, principal: Entity, action: str, resource: Entity,
                        context: Mapping[str, Any] | None = None, *, agent: str = "") -> None:
        """Raise PolicyDenied (recorded) unless the policy allows; AuditUnavailable refuses too."""
        decision = self.decide(principal, action, resource, context)
        if decision is None:
            return
        if decision.allowed and not self.audit_allows:
            return
        if not decision.allowed:
            self.denials += 1
        await self.record("policy.decision", actor=str(principal), agent=agent,
                          resource=str(resource), outcome="allow" if decision.allowed else "deny",
                          data={"action": action, "policies": list(decision.policies),
                                "errors": list(decision.errors)})
        if not decision.allowed:
            exc = self.policy.denial(principal, action, resource, decision)
            exc.request = (principal, action, resource, context)  # type: ignore[attr-defined]
            raise exc

    async def record(self, kind: str, *, actor: str, agent: str = "", resource: str = "",
                     outcome: str = "ok", data: dict[str, Any] | None = None) -> None:
        """Write one audit record before going on; AuditUnavailable means: refuse the action."""
        if self.audit is not None:
            await self.audit.append(kind, actor=actor, agent=agent, resource=resource,
                                    outcome=outcome, data=data)

    def note(self, kind: str, *, actor: str, agent: str = "", resource: str = "",
             outcome: str = "ok", data: dict[str, Any] | None = None) -> None:
        """Record something that already happened, without waiting (lifecycle transitions)."""
        if self.audit is None or self._spawn is None:
            return
        self._spawn(self._quiet(kind, actor, agent, resource, outcome, data))

    async def _quiet(self, kind: str, actor: str, agent: str, resource: str, outcome: str,
                     data: dict[str, Any] | None) -> None:
        assert self.audit is not None
        try:
            await self.audit.append(kind, actor=actor, agent=agent, resource=resource,
                                    outcome=outcome, data=data)
        except AuditError as exc:
            log.error("audit record %s of %s was not written: %s", kind, agent or actor, exc)
        except asyncio.CancelledError:
            raise
