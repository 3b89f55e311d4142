"""Runtime: the facade. apply, get, list, describe, request, send, scale, stop, delete, stats.

``async with Runtime() as rt:`` opens the store, rebuilds state from its events, restarts
persistent agents, re-queues durable work, and runs the background loops in one
TaskGroup it owns. Leaving the block drains work, stops every agent and closes all.
"""

from __future__ import annotations

import asyncio
import builtins
import dataclasses
import gc
import importlib.machinery
import itertools
import logging
import os
import shutil
import sys
import time
import uuid
from collections.abc import AsyncIterator, Coroutine, Sequence
from pathlib import Path
from typing import Any

import msgspec

from corral.bus.backends import open_backend
from corral.bus.bus import Bus
from corral.bus.envelope import Guarantee
from corral.core.lifecycle import Crashed, InitFailed, State
from corral.core.queue import Priority
from corral.core.ratelimit import RateLimiter
from corral.core.selector import parse_selector
from corral.errors import (
    AgentNotFound,
    AgentUnavailable,
    Backpressure,
    CorralError,
    MessageRejected,
    PolicyDenied,
    SandboxUnavailable,
    SpecError,
    StoreError,
)
from corral.runtime.agent import AgentController
from corral.runtime.config import RuntimeConfig
from corral.runtime.dlq import DeadLetters
from corral.runtime.guard import Guard, payload_facts
from corral.runtime.instance import IDLE_LINGER, Instance
from corral.runtime.projection import Projection
from corral.runtime.scheduler import Scheduler
from corral.runtime.sealing import Part, PayloadSealer
from corral.runtime.supervision import SupervisionGroup
from corral.runtime.work import Work
from corral.sandbox.base import Channel
from corral.sandbox.cgroups import CgroupManager, CgroupSupport, detect
from corral.sandbox.inproc import InprocLauncher
from corral.sandbox.process import ProcessLauncher
from corral.sandbox.zygote_client import Zygote
from corral.spec.loader import load_paths, validate_set
from corral.spec.models import AgentManifest, Manifest, SubscriptionSpec
from corral.spec.policy import PolicyManifest
from corral.store.records import LogRecord, TaskRecord
from corral.store.sqlite import SQLiteStore
from corral.wire.messages import Schedule, Send

__all__ = ["Counters", "Runtime"]

log = logging.getLogger("corral")

_TIERS_LATER = {
    "namespace": "isolation 'namespace' (bubblewrap) is not available in this version; "
                 "use isolation: process",
    "gvisor": "isolation 'gvisor' (runsc) is not available in this version; use isolation: process",
}


class Counters:
    """Runtime-wide counters (seed 004's statistics)."""

    def __init__(self) -> None:
        self.spawned = 0
        self.started_at = time.time()


class Runtime:
    """The control plane of one Corral node."""

    def __init__(self, config: RuntimeConfig | None = None, *, home: str | Path | None = None,
                 **overrides: Any) -> None:
        cfg = config or RuntimeConfig()
        if home is not None:
            cfg.home = Path(home)
        for k, v in overrides.items():
            if not hasattr(cfg, k):
                raise TypeError(f"Runtime() got an unknown setting {k!r}; see RuntimeConfig")
            setattr(cfg, k, v)
        self.config = cfg
        self.store = SQLiteStore(cfg.store_path, synchronous=cfg.synchronous)
        self.agents: dict[str, AgentController] = {}
        self.groups: dict[str, SupervisionGroup] = {}
        self.counters = Counters()
        self.scheduler = Scheduler(self)
        self.zygote = Zygote()
        self.cgroup_support = CgroupSupport.none("not detected yet")
        self._ids = itertools.count(1)
        self._tg: asyncio.TaskGroup | None = None
        self._loops: list[asyncio.Task[None]] = []
        self._followers: dict[str, set[asyncio.Queue[LogRecord | None]]] = {}
        self._process: ProcessLauncher | None = None
        self._inproc: InprocLauncher | None = None
        self._closing = False
        self._log_seq = itertools.count(1)
        self._gc_before: tuple[int, int, int] | None = None
        self.bus: Bus | None = None
        rate = cfg.bus_config
        self._agent_limits = RateLimiter(rate.rate, rate.burst, 100_000) if rate.rate > 0 else None
        self.dlq: DeadLetters | None = None
        self.sealer: PayloadSealer | None = None
        #: agent -> subject -> its competing fetchers
        self._consumers: dict[str, dict[str, list[asyncio.Task[None]]]] = {}
        from corral.policy.engine import PolicyEngine

        self.guard = Guard(PolicyEngine(strict=cfg.policy_strict), None,
                           audit_allows=cfg.audit_allows, spawn=self._spawn_quiet)
        #: `kind: Policy` manifests applied, by "namespace/name".
        self.policy_manifests: dict[str, PolicyManifest] = {}

    # ================================================================ lifecycle of the runtime

    async def __aenter__(self) -> Runtime:
        if self.config.gc_threshold is not None:
            self._gc_before = gc.get_threshold()
            gc.set_threshold(*self.config.gc_threshold)
        self.config.home.mkdir(parents=True, exist_ok=True, mode=0o700)
        await self.store.open()
        self._tg = asyncio.TaskGroup()
        await self._tg.__aenter__()
        try:
            await self._open_guard()
            await self._open_bus()
            if self.config.use_cgroups:
                self.cgroup_support = await asyncio.to_thread(detect)
            manager = None
            if self.cgroup_support.version != "none":
                prefix = "corral-" + uuid.uuid5(uuid.NAMESPACE_URL, str(self.config.home.resolve())).hex[:10]
                manager = CgroupManager(self.cgroup_support, prefix=prefix)
                await asyncio.to_thread(manager.cleanup_stale)
            self._process = ProcessLauncher(self.zygote, manager, self.cgroup_support, self.spawn)
            self._inproc = InprocLauncher(self.spawn)
            self._loops.append(self._tg.create_task(self._health_loop()))
            self._loops.append(self._tg.create_task(self._sample_loop()))
            await self._restore()
        except BaseException as exc:
            await self.__aexit__(type(exc), exc, exc.__traceback__)
            raise
        return self

    async def __aexit__(self, et: Any, exc: Any, tb: Any) -> None:
        try:
            await self.shutdown()
        finally:
            for task in self._loops:
                task.cancel()
            try:
                if self._tg is not None:
                    # The body's own exception is the caller's: don't fold it into the
                    # group's ExceptionGroup. Only our tasks' failures surface here.
                    await self._tg.__aexit__(None, None, None)
            finally:
                try:
                    await self.zygote.close()
                    if self.bus is not None:
                        await self.bus.backend.aclose()
                    if self.guard.audit is not None:
                        await self.guard.audit.close()
                    await self.store.close()
                finally:
                    if self._gc_before is not None:
                        gc.set_threshold(*self._gc_before)

    async def shutdown(self) -> None:
        """Drain and stop every agent (bounded by shutdown_grace), then persist."""
        if self._closing:
            return
        self._closing = True
        self.scheduler.close()
        for name in list(self._consumers):
            self.pause_subscriptions(name)
        await asyncio.gather(*(a.stop_all("runtime shutdown") for a in self.agents.values()))
        for q in (q for qs in self._followers.values() for q in qs):
            _offer(q, None)
        await self.store.commit()

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run ``coro`` as a task owned by the runtime's TaskGroup."""
        if self._tg is None:
            coro.close()
            raise CorralError("the runtime is not running", hint="use `async with Runtime() as rt:`")
        self._tg.create_task(coro)

    async def _open_guard(self) -> None:
        cfg = self.config
        if cfg.audit:
            from corral.audit.log import AuditLog

            audit = AuditLog(cfg.audit_path, cfg.keys_dir / "audit",
                             seal_every=cfg.audit_seal_every, seal_interval=cfg.audit_seal_interval,
                             synchronous=cfg.synchronous)
            await audit.open()
            self.guard.audit = audit
        for ev in await self.store.events(kinds=["policy.applied", "policy.deleted"]):
            if ev.kind == "policy.applied":
                m = PolicyManifest.from_dict(ev.data["manifest"]).with_origin(
                    ev.data.get("source", ""), ev.data.get("base_dir", "."))
                self.policy_manifests[m.key] = m
            elif ev.kind == "policy.deleted":
                self.policy_manifests.pop(ev.data["key"], None)
        await asyncio.to_thread(self.guard.load, self._policy_sources())
        await self.guard.record("runtime.started", actor="runtime",
                                data={"home": str(cfg.home), "policies": len(self.guard.sources),
                                      "strict": cfg.policy_strict, "bus": cfg.bus})

    def _policy_sources(self, manifests: Sequence[PolicyManifest] | None = None) -> list[Any]:
        from corral.policy.sources import from_manifests, read_paths

        sources: list[Any] = list(read_paths(self.config.policy_paths)) if self.config.policy_paths else []
        sources += from_manifests(self.policy_manifests.values() if manifests is None else manifests)
        return sources

    def _spawn_quiet(self, coro: Coroutine[Any, Any, None]) -> None:
        if self._tg is None:
            coro.close()
            return
        self._tg.create_task(coro)

    def entity(self, name: str) -> Any:
        """The Cedar entity acting as ``name``: an applied agent, or a user (client, scheduler)."""
        ctl = self.agents.get(name)
        if ctl is not None:
            return ctl.entity
        from corral.policy.entities import user

        return user(name)

    async def _open_bus(self) -> None:
        cfg = self.config
        backend = open_backend(cfg.bus, home=cfg.home, url=cfg.bus_url, prefix=cfg.bus_prefix)
        await backend.start()
        cfg.keys_dir.mkdir(mode=0o700, exist_ok=True)
        from corral.bus.crypto import AgentKeys, Keyring

        keyring = Keyring(cfg.keys_dir / "bus-keyring.json")

        self.sealer = PayloadSealer(keyring)
        self.dlq = DeadLetters(self.store)
        self.bus = Bus(backend, cfg.bus_config, dead_letters=self.dlq, keyring=keyring,
                       signer=AgentKeys(cfg.keys_dir / "agents"))

    async def _restore(self) -> None:
        proj = Projection().fold(await self.store.events())
        for rec in proj.agents.values():
            try:
                manifest = AgentManifest.from_dict(rec.manifest).with_origin(rec.source, rec.base_dir)
            except ValueError as exc:
                log.error("stored manifest of %s no longer validates: %s", rec.name, exc)
                continue
            for inst, state in rec.instances.items():
                # Those instances died with the previous runtime; say so in their history.
                event = InitFailed if state is State.INITIALIZING else Crashed
                if state not in (State.TERMINATED, State.FAILED):
                    self.store.append_event(rec.name, "instance.transition", {
                        "instance": inst, "event": event.__name__, "from": state.value,
                        "to": State.FAILED.value, "reason": "the runtime stopped unexpectedly"})
            ctl = self._new_controller(manifest, rec.generation)
            ctl.replicas, ctl.stopped, ctl.gave_up = rec.replicas, rec.stopped, rec.gave_up
            ctl.restarts = rec.restarts
            ctl.dynamic = {k: SubscriptionSpec.model_validate(v) for k, v in rec.dynamic.items()}
            await self._load_memory(ctl)
            await self._start_controller(ctl)
        pending = await self.store.pending_tasks()
        for t in pending:
            ctl = self.agents.get(t.agent)
            if ctl is None:
                self.store.finish_task(t.id, "failed", error="agent no longer exists")
                continue
            try:
                payload = self.at_rest_open(ctl, t.id, "payload", t.payload)
            except CorralError as exc:
                self.log(t.agent, "", "error", f"queued task {t.id} dropped: {exc}")
                self.store.finish_task(t.id, "failed", error=str(exc))
                continue
            work = Work(next(self._ids), t.handler, payload, t.sender, t.kind,
                        Priority(t.priority), ctl.spec.resources.task_timeout, task_id=t.id,
                        attempts=t.attempts + (1 if t.status == "running" else 0))
            try:
                ctl.submit(work)
            except CorralError as exc:
                self.store.finish_task(t.id, "failed", error=str(exc))
        if proj.agents or pending:
            log.info("restored %d agent(s) and %d queued task(s)", len(proj.agents), len(pending))
        await self.store.commit()

    # ================================================================ apply

    async def apply(self, manifests: Sequence[Manifest] | Sequence[str | Path],
                    *, wait: bool = False, timeout: float | None = None,
                    caller: str = "client") -> list[dict[str, str]]:
        """Create or update agents and policies; an invalid or denied set applies nothing."""
        self._check_open()
        loaded: list[Manifest] = (
            load_paths(manifests) if manifests and not isinstance(manifests[0], Manifest)  # type: ignore[arg-type]
            else list(manifests))  # type: ignore[arg-type]
        policies = [m for m in loaded if isinstance(m, PolicyManifest)]
        items = [m for m in loaded if isinstance(m, AgentManifest)]
        problems = validate_set(loaded) + [p for m in items for p in self._check(m)]
        seen: dict[str, AgentManifest] = {}
        for m in items:
            first = seen.setdefault(m.name, m)
            if first is not m and first.namespace != m.namespace:
                problems.append(SpecError(
                    f"agent name {m.name!r} is used in namespaces {first.namespace!r} and "
                    f"{m.namespace!r}", file=m.source or m.name, path="metadata.name", got=m.name,
                    expected="a name unique across namespaces (agents are addressed by name)"))
        if problems:
            raise SpecError("invalid manifests", problems=problems)
        # Policies first: the agents of the same set are judged by them.
        outcomes: list[dict[str, str]] = await self._apply_policies(policies, caller)
        changed: list[AgentManifest] = []
        for m in items:
            old = self.agents.get(m.name)
            if old is not None and old.manifest.to_dict() == m.to_dict() \
                    and old.manifest.base_dir == m.base_dir:
                outcomes.append({"agent": m.name, "action": "unchanged"})
                continue
            changed.append(m)
            outcomes.append({"agent": m.name, "action": "configured" if old else "created"})
        for m in changed:  # every check before any change: a denial applies nothing
            await self._authorize_agent(m, caller)
        for m in changed:
            old = self.agents.get(m.name)
            gen = old.generation + 1 if old else 1
            await self.guard.record("agent.apply", actor=str(self.entity(caller)), agent=m.name,
                                    outcome="configured" if old else "created",
                                    data={"generation": gen, "source": m.source})
            self.store.append_event(m.name, "agent.applied", {
                "manifest": m.to_dict(), "base_dir": m.base_dir, "source": m.source,
                "generation": gen})
        await self.store.commit()
        for m in changed:
            old = self.agents.get(m.name)
            carried: list[Work] = []
            if old is not None:
                carried = old.mailbox.drain()
                await self._remove_controller(old, "reconfigured")
            ctl = self._new_controller(m, old.generation + 1 if old else 1)
            if old is not None:
                ctl.memory, ctl.restarts, ctl.dynamic = old.memory, old.restarts, old.dynamic
            else:
                await self._load_memory(ctl)
            await self._start_controller(ctl)
            for work in carried:
                ctl.submit(work)
        if wait:
            await self.wait_ready([m.name for m in changed], timeout=timeout)
        return outcomes

    async def _authorize_agent(self, m: AgentManifest, caller: str) -> None:
        from corral.policy.entities import agent, namespace, topic

        spec, who = m.spec, self.entity(caller)
        me = agent(m.name, namespace=m.namespace, labels=dict(m.metadata.labels),
                   isolation=spec.isolation, priority=spec.priority)
        await self.guard.authorize(who, "agent.create", me, agent=m.name)
        await self.guard.authorize(me, "resource.allocate", namespace(m.namespace),
                                   _allocation(m), agent=m.name)
        for s in spec.subscriptions:
            await self.guard.authorize(me, "topic.subscribe",
                                       topic(s.subject, namespace=m.namespace), agent=m.name)

    async def _apply_policies(self, policies: list[PolicyManifest],
                              caller: str) -> list[dict[str, str]]:
        if not policies:
            return []
        merged = dict(self.policy_manifests)
        outcomes = []
        for m in policies:
            old = merged.get(m.key)
            same = old is not None and old.to_dict() == m.to_dict()
            outcomes.append({"policy": m.key,
                             "action": "unchanged" if same else "configured" if old else "created"})
            merged[m.key] = m
        if all(o["action"] == "unchanged" for o in outcomes):
            return outcomes
        # Validated and swapped in whole: PolicyInvalid leaves the policies in force as they were.
        await asyncio.to_thread(self.guard.load, self._policy_sources(list(merged.values())))
        for m in policies:
            self.store.append_event("", "policy.applied", {
                "manifest": m.to_dict(), "base_dir": m.base_dir, "source": m.source})
        await self.store.commit()
        self.policy_manifests = merged
        await self.guard.record("policy.apply", actor=str(self.entity(caller)),
                                data={"policies": [m.key for m in policies],
                                      "generation": self.guard.policy.generation})
        self._recheck_suspended()
        return outcomes

    async def reload_policies(self, *, caller: str = "client") -> dict[str, Any]:
        """Re-read the policy files and applied Policy manifests; all or nothing."""
        sources = await asyncio.to_thread(self._policy_sources)
        await asyncio.to_thread(self.guard.load, sources)
        await self.guard.record("policy.reload", actor=str(self.entity(caller)),
                                data={"sources": [s.name for s in sources],
                                      "generation": self.guard.policy.generation})
        self._recheck_suspended()
        return {"sources": len(sources), "policies": len(self.guard.policy.policies()),
                "generation": self.guard.policy.generation}

    async def delete_policy(self, key: str, *, caller: str = "client") -> None:
        """Remove an applied Policy manifest ("namespace/name" or "name" in default)."""
        key = key if "/" in key else f"default/{key}"
        if key not in self.policy_manifests:
            raise SpecError(f"no Policy {key!r} is applied", path="name", got=key,
                            expected=f"one of {sorted(self.policy_manifests)}")
        rest = {k: m for k, m in self.policy_manifests.items() if k != key}
        await asyncio.to_thread(self.guard.load, self._policy_sources(list(rest.values())))
        self.store.append_event("", "policy.deleted", {"key": key})
        await self.store.commit()
        self.policy_manifests = rest
        await self.guard.record("policy.delete", actor=str(self.entity(caller)), resource=key)
        self._recheck_suspended()

    def policies(self) -> builtins.list[dict[str, Any]]:
        """The policies in force: id, effect, source and line."""
        return [dataclasses.asdict(p) for p in self.guard.policy.policies()]

    def eval_policy(self, principal: str, action: str, resource: str,
                    context: dict[str, Any] | None = None) -> dict[str, Any]:
        """Decide one request as the hooks would; principal/resource like agent:x, topic:news.eu."""
        p, r = self._parse_entity(principal, "principal"), self._parse_entity(resource, "resource")
        d = self.guard.policy.check(p, action, r, context or {})
        return {"principal": str(p), "action": action, "resource": str(r),
                "decision": "allow" if d.allowed else "deny", "policies": list(d.policies),
                "errors": list(d.errors), "strict": self.guard.policy.strict}

    def _parse_entity(self, text: str, what: str) -> Any:
        from corral.policy import entities as E

        kind, sep, ident = text.partition(":")
        kind = kind.strip().lower()
        ident = ident.lstrip(":").strip().strip('"')  # agent:x and Cedar's Agent::"x" alike
        if not sep or not ident:
            raise SpecError(f"can't read the {what} {text!r}", path=what, got=text,
                            expected="type:id, e.g. agent:summarizer, user:client, "
                                     "topic:news.eu, tool:time/now, namespace:research")
        if kind == "agent":
            return self.entity(ident) if ident in self.agents else E.agent(ident)
        if kind == "user":
            return E.user(ident)
        if kind == "topic":
            return E.topic(ident)
        if kind == "tool":
            server, _, name = ident.partition("/")
            return E.tool(server, name or server)
        if kind == "namespace":
            return E.namespace(ident)
        raise SpecError(f"unknown entity type {kind!r} in the {what}", path=what, got=text,
                        expected="agent, user, topic, tool or namespace")

    @staticmethod
    def check_policy_files(paths: Sequence[str | Path], *, strict: bool = False) -> builtins.list[dict[str, Any]]:
        """Parse and validate .cedar files (or Policy manifests) against the schema, offline."""
        from corral.policy.engine import PolicyEngine
        from corral.policy.sources import PolicySource, from_manifests, read_paths

        sources: list[PolicySource] = []
        cedar = [p for p in paths if str(p).endswith(".cedar") or (Path(p).is_dir()
                 and not any(Path(p).glob("*.y*ml")))]
        yaml_files = [p for p in paths if p not in cedar]
        if cedar:
            sources += read_paths(cedar)
        if yaml_files:
            sources += from_manifests(m for m in load_paths(yaml_files)
                                      if isinstance(m, PolicyManifest))
        engine = PolicyEngine(strict=strict)
        engine.load(sources)
        return [dataclasses.asdict(p) for p in engine.policies()]  # type: ignore[call-overload]

    # ================================================================ audit

    def _audit(self) -> Any:
        if self.guard.audit is None:
            from corral.errors import AuditUnavailable

            raise AuditUnavailable("this runtime runs without an audit trail (audit=False)",
                                   hint="start it with the audit trail on (the default)")
        return self.guard.audit

    async def verify_audit(self, anchor: str | None = None) -> dict[str, Any]:
        """Verify the whole trail (and truncation against ``anchor``, "SEQ:HASH")."""
        audit = self._audit()
        pin: tuple[int, str] | None = None
        if anchor:
            seq, _, digest = anchor.partition(":")
            if not seq.isdigit() or len(digest) != 64:
                raise SpecError("can't read the anchor", path="anchor", got=anchor,
                                expected="SEQ:HASH as printed by `corral audit verify`")
            pin = (int(seq), digest)
        await audit.flush()
        report = await audit.verify(pin)
        return dict(report.to_dict())

    async def query_audit(self, **filters: Any) -> builtins.list[dict[str, Any]]:
        """Audit records filtered by agent, action, time and outcome, oldest first."""
        audit = self._audit()
        await audit.flush()
        rows: builtins.list[dict[str, Any]] = await audit.query(**filters)
        return rows

    async def export_audit(self, path: str, *, caller: str = "client") -> dict[str, Any]:
        """Write the trail as JSON Lines with the public keys (see docs/audit-format.md)."""
        audit = self._audit()
        await self.guard.record("trail.export", actor=str(self.entity(caller)), resource=path)
        await audit.flush()
        res: dict[str, Any] = await audit.export(path)
        return res

    # ================================================================ suspension

    def suspend(self, inst: Instance, exc: PolicyDenied) -> None:
        """A run-time violation: the instance takes no new work until the policy allows again."""
        from corral.core.lifecycle import Violation

        if inst.state not in (State.READY, State.RUNNING, State.WAITING):
            return
        inst.violation = getattr(exc, "request", None)
        inst.transition(Violation(exc.message))
        self.log(inst.agent.name, inst.name, "error", f"suspended: {exc.message}")

    def _recheck_suspended(self) -> None:
        from corral.core.lifecycle import Allowed

        for ctl in self.agents.values():
            for inst in ctl.instances.values():
                if inst.state is not State.SUSPENDED:
                    continue
                req = getattr(inst, "violation", None)
                decision = self.guard.decide(*req) if req else None
                if decision is None or decision.allowed:
                    inst.violation = None
                    inst.transition(Allowed("the policy allows it now"))
                    inst.idle_since = asyncio.get_running_loop().time()
                    ctl.on_task_done(inst)  # dispatch what waited

    async def resume(self, name: str, *, caller: str = "client") -> int:
        """Re-check suspended instances of ``name`` now; returns how many still are."""
        self._agent(name)
        self._recheck_suspended()
        left = sum(1 for i in self.agents[name].instances.values() if i.state is State.SUSPENDED)
        await self.guard.record("agent.resume", actor=str(self.entity(caller)), agent=name,
                                data={"still_suspended": left})
        return left

    async def override(self, name: str, *, caller: str = "client") -> None:
        """An operator's override of a suspension: the agent's suspended instances end."""
        from corral.core.lifecycle import Override

        ctl = self._agent(name)
        await self.guard.authorize(self.entity(caller), "agent.terminate", ctl.entity, agent=name)
        for inst in ctl.instances.values():
            if inst.state is State.SUSPENDED:
                inst.transition(Override(f"override by {caller}"))
        await self.guard.record("agent.override", actor=str(self.entity(caller)), agent=name)
        await self.stop(name, caller=caller)

    def _check(self, m: AgentManifest) -> list[SpecError]:
        """Runtime-level checks: can this machine run the manifest as written?"""
        spec, src = m.spec, m.source or m.name
        out: list[SpecError] = []
        if spec.isolation in _TIERS_LATER:
            out.append(SpecError(_TIERS_LATER[spec.isolation], file=src, path="spec.isolation",
                                 got=spec.isolation, expected="inproc or process"))
        base = m.base_dir
        if spec.entrypoint:
            paths = [os.path.normpath(os.path.join(base, p)) for p in spec.python_path] or [base]
            top = spec.entrypoint.split(":")[0].split(".")[0]
            if importlib.machinery.PathFinder.find_spec(top, paths + sys.path) is None:
                out.append(SpecError(f"module {top!r} not found", file=src, path="spec.entrypoint",
                                     got=spec.entrypoint,
                                     expected=f"a module importable from {paths} or sys.path "
                                              "(set spec.pythonPath)"))
        if spec.command:
            cwd = os.path.normpath(os.path.join(base, spec.workdir or "."))
            exe = spec.command[0]
            found = shutil.which(exe) if os.sep not in exe else (
                exe if os.path.isabs(exe) else os.path.join(cwd, exe))
            if not found or not os.access(found, os.X_OK):
                out.append(SpecError(f"command {exe!r} not found or not executable",
                                     file=src, path="spec.command[0]", got=exe,
                                     expected="a program on PATH or a path relative to spec.workdir"))
            if not os.path.isdir(cwd):
                out.append(SpecError("workdir does not exist", file=src, path="spec.workdir",
                                     got=cwd, expected="an existing folder"))
        old = self.agents.get(m.name)
        if old is not None and old.manifest.namespace != m.namespace:
            out.append(SpecError(f"an agent named {m.name!r} already runs in namespace "
                                 f"{old.manifest.namespace!r}", file=src, path="metadata.name",
                                 got=m.name, expected="a name unique across namespaces "
                                 "(agents are addressed by name)"))
        group_key = self._group_key(m)
        g = self.groups.get(group_key)
        if g is not None and g.strategy.value != spec.restart.strategy and \
                not (len(g.members) and all(i.agent.name == m.name for i in g.members.values())):
            out.append(SpecError(f"restart group {group_key!r} already uses strategy "
                                 f"{g.strategy.value}", file=src, path="spec.restart.strategy",
                                 got=spec.restart.strategy, expected=g.strategy.value))
        return out

    def _group_key(self, m: AgentManifest) -> str:
        g = m.spec.restart.group
        return f"{m.namespace}/{g}" if g else f"agent:{m.name}"

    def _new_controller(self, m: AgentManifest, generation: int) -> AgentController:
        ctl = AgentController(self, m, generation=generation)
        if not ctl.one_shot:
            key = self._group_key(m)
            group = self.groups.get(key)
            if group is None or not group.members:
                group = self.groups[key] = SupervisionGroup(key, m.spec.restart)
            ctl.group = group
        self.agents[m.name] = ctl
        return ctl

    async def _start_controller(self, ctl: AgentController) -> None:
        if ctl.spec.encrypt and self.bus is not None:
            self.bus.encrypt_sender(ctl.name)
        ctl.reconcile()
        await self._open_subscriptions(ctl)
        self._subscribe(ctl)
        sched = ctl.spec.schedule
        if ctl.spec.mode == "scheduled" and sched is not None and not ctl.stopped:
            self.scheduler.ensure(ctl, [Schedule(sched.handler, cron=sched.cron)], sched.payload)

    async def _load_memory(self, ctl: AgentController) -> None:
        ctl.memory = dict(await self.store.memory(ctl.name))

    async def _remove_controller(self, ctl: AgentController, reason: str) -> None:
        self.scheduler.remove_agent(ctl.name)
        self.pause_subscriptions(ctl.name)
        await ctl.stop_all(reason)
        if self.agents.get(ctl.name) is ctl:
            del self.agents[ctl.name]

    async def wait_ready(self, names: Sequence[str], *, timeout: float | None = None) -> None:
        """Wait until each named persistent agent has all replicas Ready; raise the first failure."""
        async def one(name: str) -> None:
            ctl = self._agent(name)
            if ctl.one_shot or ctl.event_driven:
                return  # their instances come with work
            for inst in [i for i in ctl.instances.values() if not i.removed]:
                while True:
                    try:
                        await asyncio.shield(inst.ready)
                        break
                    except CorralError:
                        # A restart may still bring it up; give up only when none is coming.
                        if ctl.gave_up or inst.removed or inst.state is State.TERMINATED or \
                                (inst.state is State.FAILED and not inst.restart_pending):
                            raise
                        await asyncio.sleep(0.05)
        try:
            async with asyncio.timeout(timeout):
                await asyncio.gather(*(one(n) for n in names))
        except TimeoutError:
            late = [n for n in names if n in self.agents and
                    self.agents[n].ready_count() < self.agents[n].replicas]
            raise AgentUnavailable(f"not Ready within {timeout:g}s: {', '.join(late) or names}",
                                   hint="see `corral describe agent NAME` and `corral logs NAME`"
                                   ) from None

    # ================================================================ work

    async def request(self, name: str, payload: Any = None, *, handler: str = "",
                      timeout: float | None = None, priority: str | None = None,
                      sender: str = "client", subject: str = "", kind: str = "request") -> Any:
        """Send a task and wait for its result; raises TaskFailed, TaskTimeout, ..."""
        prio = self._priority(priority, Priority.NORMAL) if priority else None
        ctl = self._agent(name)
        if kind != "publish":  # a topic delivery was checked when it was published
            await self._guard_message(sender, "agent.request", ctl.entity, name, payload)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        work = Work(next(self._ids), handler, payload, sender, kind,
                    prio if prio is not None else ctl.priority,
                    timeout or ctl.spec.resources.task_timeout, future=fut, subject=subject)
        ctl.submit(work)
        try:
            return await fut
        except asyncio.CancelledError:
            ctl.abandon(work)
            raise

    async def send(self, name: str, payload: Any = None, *, handler: str = "",
                   priority: str | None = None, sender: str = "client") -> str:
        """Queue a one-way task durably (it survives a crash of the runtime); returns its id."""
        chosen = self._priority(priority, Priority.NORMAL) if priority else None
        ctl = self._agent(name)
        await self._guard_message(sender, "message.send", ctl.entity, name, payload)
        if len(ctl.mailbox) >= ctl.mailbox.maxsize:
            raise Backpressure(f"mailbox of {name!r} is full ({ctl.mailbox.maxsize} tasks)")
        prio = chosen if chosen is not None else ctl.priority
        task_id = uuid.uuid4().hex
        self.store.put_task(TaskRecord(task_id, name, handler,
                                       self.at_rest(ctl, task_id, "payload", payload),
                                       int(prio), "send", sender, "queued", time.time()))
        await self.store.commit()
        work = Work(next(self._ids), handler, payload, sender, "send", prio,
                    ctl.spec.resources.task_timeout, task_id=task_id)
        try:
            ctl.submit(work)
        except CorralError as exc:
            self.store.finish_task(task_id, "failed", error=str(exc))
            raise
        return task_id

    # ================================================================ bus

    async def publish(self, subject: str, payload: Any = None, *, sender: str = "client",
                      guarantee: Guarantee = "at-most-once", ttl: float | None = None,
                      idempotency_key: str | None = None,
                      headers: dict[str, str] | None = None) -> str:
        """Publish to a topic as ``sender``; returns the message id."""
        self._check_open()
        assert self.bus is not None
        from corral.policy.entities import topic

        ctl = self.agents.get(sender)
        await self._guard_message(sender, "topic.publish", topic(
            subject, namespace=ctl.manifest.namespace if ctl else "default"), subject, payload)
        env = await self.bus.publish(sender, subject, payload, guarantee=guarantee, ttl=ttl,
                                     idempotency_key=idempotency_key, headers=headers,
                                     sign=self.signing)
        return env.id

    async def _guard_message(self, sender: str, action: str, resource: Any, target: str,
                             payload: Any) -> None:
        """The policy check and audit record of one message, before it moves (fail closed)."""
        guard = self.guard
        if guard.idle:
            return
        size, digest = payload_facts(payload)
        who = self.entity(sender)
        await guard.authorize(who, action, resource, {"payloadSize": size}, agent=sender
                              if sender in self.agents else target)
        await guard.record(action, actor=str(who), agent=sender if sender in self.agents else "",
                           resource=str(resource),
                           data={"payload_sha256": digest, "payload_size": size})

    @property
    def signing(self) -> bool:
        """Whether bus messages are signed by their senders and verified on receipt."""
        sign = self.config.bus_sign
        return self.config.bus != "local" if sign is None else sign

    def export_keys(self) -> dict[str, dict[str, str]]:
        """Public signing keys of the agents applied here, for other nodes to trust.

        Only applied agents: "client" (this node's CLI and API callers) is a sender on every
        node, and one node's clients are not another's.
        """
        assert self.bus is not None and self.bus.signer is not None
        keys: dict[str, dict[str, str]] = self.bus.signer.export_public()
        return {agent: pubs for agent, pubs in keys.items() if agent in self.agents}

    def trust_keys(self, keys: dict[str, dict[str, str]]) -> int:
        """Accept another node's agents' public keys (``export_keys`` output); returns how many."""
        assert self.bus is not None and self.bus.signer is not None
        if not isinstance(keys, dict):
            raise SpecError("keys must be a mapping agent -> {key_id: public_key_hex}",
                            path="keys", got=type(keys).__name__, expected="`corral keys export` output")
        signer = self.bus.signer
        local = signer.export_public()
        problems: list[SpecError] = []
        checked: list[tuple[str, str, str]] = []
        for agent, pubs in keys.items():
            for kid, pub in (pubs.items() if isinstance(pubs, dict) else [("?", pubs)]):
                why = ""
                try:
                    signer.trustable(agent, kid, pub)
                except (TypeError, ValueError) as exc:
                    why = str(exc)
                else:
                    if agent in local:
                        why = "that agent runs on this node; a remote key could forge it"
                if why:
                    problems.append(SpecError(f"key {kid} of {agent!r}: {why}",
                                              path=f"{agent}.{kid}", got=pub,
                                              expected="a 64-hex-digit Ed25519 public key "
                                                       "under its key id"))
                else:
                    checked.append((agent, kid, pub))
        if problems:  # all or nothing: a bad entry trusts none of the file
            raise SpecError("invalid keys; none were trusted", problems=problems,
                            hint="use the JSON `corral keys export` printed on the other node; "
                                 "no key was trusted")
        for agent, kid, pub in checked:
            self.bus.signer.trust(agent, kid, pub)
        self.store.append_event("", "bus.keys_trusted", {"agents": sorted(keys)})
        return len(checked)

    async def route_publish(self, inst: Instance, msg: Any) -> None:
        """An agent's publish: the sender is the agent the channel belongs to."""
        try:
            await self.publish(msg.subject, msg.payload, sender=inst.agent.name,
                               guarantee=msg.guarantee, ttl=msg.ttl,
                               idempotency_key=msg.idempotency_key, headers=dict(msg.headers))
        except PolicyDenied as exc:
            self.suspend(inst, exc)
        except CorralError as exc:
            self.log(inst.agent.name, inst.name, "error", f"publish to {msg.subject!r} failed: {exc}")

    async def broadcast(self, payload: Any = None, *, handler: str = "",
                        namespace: str | None = None, selector: str = "",
                        sender: str = "client") -> dict[str, str]:
        """Send ``payload`` durably to every agent (but the sender) in scope; agent -> task id."""
        try:
            sel = parse_selector(selector)
        except ValueError as exc:
            raise SpecError(str(exc), path="selector", got=selector,
                            expected="requirements like team=nlp,tier!=gpu") from None
        targets = [a.name for a in self.agents.values()
                   if a.name != sender and (namespace is None or a.manifest.namespace == namespace)
                   and sel.matches(a.manifest.metadata.labels)]
        sent: dict[str, str] = {}
        for name in targets:
            try:
                sent[name] = await self.send(name, payload, handler=handler, sender=sender)
            except CorralError as exc:  # one full or stopped agent does not stop the rest
                self.log(name, "", "warning", f"broadcast from {sender!r} not delivered: {exc}")
        return sent

    async def route_broadcast(self, inst: Instance, msg: Any) -> None:
        """An agent's broadcast; the sender is the agent the channel belongs to."""
        try:
            self.check_outbound(inst.agent.name, msg.payload)
            await self.broadcast(msg.payload, handler=msg.handler, namespace=msg.namespace,
                                 selector=msg.selector, sender=inst.agent.name)
        except CorralError as exc:
            self.log(inst.agent.name, inst.name, "error", f"broadcast failed: {exc}")

    def rotate_bus_key(self) -> str:
        """Start encrypting with a new key; older keys still decrypt what is in flight."""
        assert self.bus is not None and self.bus.keyring is not None
        key_id: str = self.bus.keyring.rotate()
        self.store.append_event("", "bus.key_rotated", {"key_id": key_id})
        return key_id

    async def republish(self, subject: str, data: bytes) -> None:
        """Put a dead letter's original bytes back on its subject."""
        assert self.bus is not None
        await self.bus.backend.publish(subject, data)

    def pause_subscriptions(self, name: str) -> None:
        """Stop fetching for an agent that cannot take work; messages wait, durably."""
        for tasks in self._consumers.pop(name, {}).values():
            for task in tasks:
                task.cancel()

    async def _open_subscriptions(self, ctl: AgentController) -> None:
        # Create the durable subscriptions now, before apply returns: a message published
        # right after must reach the agent even if no fetcher runs yet.
        if self.bus is None:
            return
        for s in ctl.subscriptions():
            await self._open_subscription(ctl, s)

    async def _open_subscription(self, ctl: AgentController, s: SubscriptionSpec) -> None:
        assert self.bus is not None
        if s.encrypt or ctl.spec.encrypt:
            self.bus.encrypt(s.subject)
        if s.guarantee not in (None, "at-most-once"):
            self.bus.require_durable(s.subject)
        sub = await self.bus.backend.subscribe(_subscription_name(ctl.name, s.subject),
                                               s.subject, ack_wait=s.ack_wait)
        await sub.close()

    def _subscribe(self, ctl: AgentController) -> None:
        if self.bus is None or not ctl.subscriptions() or ctl.stopped or ctl.gave_up \
                or ctl.name in self._consumers:
            return
        for s in ctl.subscriptions():
            self._start_fetchers(ctl, s)

    def _start_fetchers(self, ctl: AgentController, s: SubscriptionSpec) -> None:
        # One fetcher per replica (at most 16): they compete, so each message reaches the
        # agent once, and up to `replicas` are handled at a time.
        assert self._tg is not None
        tasks = self._consumers.setdefault(ctl.name, {}).setdefault(s.subject, [])
        for _ in range(min(16, max(1, ctl.replicas))):
            tasks.append(self._tg.create_task(self._consume(ctl.name, s)))

    async def add_subscription(self, name: str, s: SubscriptionSpec) -> None:
        """Subscribe an agent at run time; durable, recorded, and kept across restarts."""
        ctl = self._agent(name)
        if s.subject in {x.subject for x in ctl.subscriptions()}:
            return
        from corral.policy.entities import topic

        await self.guard.authorize(ctl.entity, "topic.subscribe",
                                   topic(s.subject, namespace=ctl.manifest.namespace), agent=name)
        await self.guard.record("topic.subscribe", actor=str(ctl.entity), agent=name,
                                resource=s.subject)
        # Open it first: once it shows as subscribed, every later publish reaches it.
        if self.bus is not None:
            await self._open_subscription(ctl, s)
        self.store.append_event(name, "agent.subscribed", s.model_dump(by_alias=True))
        await self.store.commit()
        ctl.dynamic[s.subject] = s
        if self.bus is not None and not (ctl.stopped or ctl.gave_up):
            self._start_fetchers(ctl, s)

    async def remove_subscription(self, name: str, subject: str) -> None:
        """Drop a subscription made at run time (manifest ones change by applying)."""
        ctl = self._agent(name)
        if subject not in ctl.dynamic:
            raise SpecError(f"{name!r} has no run-time subscription to {subject!r}",
                            path="subject", got=subject,
                            expected=f"one of {sorted(ctl.dynamic)}")
        # Close it first: once it no longer shows, nothing more is delivered from it.
        tasks = self._consumers.get(name, {}).pop(subject, [])
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self.bus is not None:
            await self.bus.backend.unsubscribe(_subscription_name(name, subject))
        self.store.append_event(name, "agent.unsubscribed", {"subject": subject})
        await self.store.commit()
        ctl.dynamic.pop(subject, None)

    async def route_subscribe(self, inst: Instance, msg: Any) -> None:
        """An agent subscribes itself at run time."""
        try:
            spec = SubscriptionSpec(subject=msg.subject, handler=msg.handler,
                                    ack_wait=msg.ack_wait, guarantee=msg.guarantee or None)
            await self.add_subscription(inst.agent.name, spec)
        except PolicyDenied as exc:
            self.suspend(inst, exc)
        except (ValueError, CorralError) as exc:
            self.log(inst.agent.name, inst.name, "error", f"subscribe to {msg.subject!r} failed: {exc}")

    async def route_unsubscribe(self, inst: Instance, msg: Any) -> None:
        """An agent drops one of its run-time subscriptions."""
        try:
            await self.remove_subscription(inst.agent.name, msg.subject)
        except CorralError as exc:
            self.log(inst.agent.name, inst.name, "error", f"unsubscribe failed: {exc}")

    async def _consume(self, agent: str, s: Any) -> None:
        assert self.bus is not None

        async def deliver(env: Any) -> None:
            # Acknowledged only after the agent's handler returned: a crash or an error
            # redelivers (at-least-once), per the message's guarantee.
            await self.request(agent, env.payload, handler=s.handler, sender=env.sender,
                               subject=env.subject, kind="publish")

        try:
            await self.bus.consume(_subscription_name(agent, s.subject), s.subject, deliver,
                                   ack_wait=s.ack_wait, guarantee=s.guarantee,
                                   require_signature=self.signing)
        except CorralError as exc:
            self.log(agent, "", "error", f"subscription {s.subject!r} stopped: {exc}")

    def submit_scheduled(self, ctl: AgentController, handler: str, payload: Any) -> None:
        """Queue one scheduled run."""
        ctl.submit(Work(next(self._ids), handler, payload, "scheduler", "scheduled", ctl.priority,
                        ctl.spec.resources.task_timeout))

    def check_outbound(self, sender: str, payload: Any) -> None:
        """An agent's direct message: within its rate limit and the size limit, or refused."""
        cfg = self.config.bus_config
        bus = self.bus
        size = len(_PAYLOAD_SIZE(payload))
        if size > cfg.max_message_size:
            if bus is not None:
                bus.rejected["too_large"] += 1
            raise MessageRejected(f"message of {size} bytes is over the "
                                  f"{cfg.max_message_size}-byte limit", reason="too_large",
                                  hint="send a reference to the data instead of the data")
        if self._agent_limits is not None and not self._agent_limits.take(sender, time.time()):
            if bus is not None:
                bus.rejected["rate_limited"] += 1
            raise MessageRejected(f"{sender!r} is over its rate limit of {cfg.rate:g}/s",
                                  reason="rate_limited", hint="slow down or raise the limit")

    async def route_send(self, inst: Instance, msg: Send) -> None:
        """An agent's one-way message to another agent."""
        try:
            self.check_outbound(inst.agent.name, msg.payload)
            await self.send(msg.to, msg.payload, handler=msg.handler, sender=inst.agent.name)
        except PolicyDenied as exc:
            self.suspend(inst, exc)
        except CorralError as exc:
            self.log(inst.agent.name, inst.name, "error", f"send to {msg.to!r} failed: {exc}")

    async def task(self, task_id: str) -> TaskRecord | None:
        """A durable task's record (status, result), opened if its agent encrypts at rest."""
        rec = await self.store.task(task_id)
        if rec is None or self.sealer is None:
            return rec
        return dataclasses.replace(
            rec, payload=self.sealer.open(rec.agent, rec.id, "payload", rec.payload),
            result=self.sealer.open(rec.agent, rec.id, "result", rec.result))

    def at_rest(self, ctl: AgentController, task_id: str, part: Part, value: Any) -> Any:
        """What the store keeps of a task's payload or result: sealed if the agent encrypts."""
        if not ctl.spec.encrypt or value is None:
            return value
        assert self.sealer is not None
        return self.sealer.seal(ctl.name, task_id, part, value)

    def at_rest_open(self, ctl: AgentController, task_id: str, part: Part, value: Any) -> Any:
        """The plaintext of a stored payload or result (as it is, if it was not sealed)."""
        assert self.sealer is not None
        return self.sealer.open(ctl.name, task_id, part, value)

    # ================================================================ control

    async def scale(self, name: str, replicas: int, *, caller: str = "client") -> None:
        """Set the number of replicas (0 stops the agent but keeps it applied)."""
        if not 0 <= replicas <= 10_000:
            raise SpecError("replicas out of range", path="replicas", got=replicas,
                            expected="0..10000")
        ctl = self._agent(name)
        await self.guard.record("agent.scale", actor=str(self.entity(caller)), agent=name,
                                data={"replicas": replicas})
        ctl.replicas, ctl.stopped, ctl.gave_up = replicas, False, None
        if ctl.group is not None:
            ctl.group.gave_up = None
            ctl.group.state = type(ctl.group.state).new(
                ctl.group.strategy, ctl.spec.restart.max_restarts, ctl.spec.restart.window,
                ctl.group.state.children)
            for inst in list(ctl.instances.values()):
                if inst.state is State.TERMINATED and not inst.removed:
                    inst.removed = True
        self.store.append_event(name, "agent.scaled", {"replicas": replicas})
        await self.store.commit()
        ctl.reconcile()
        if replicas == 0:
            self.pause_subscriptions(name)
        else:
            self._subscribe(ctl)

    async def stop(self, name: str, *, caller: str = "client") -> None:
        """Stop every instance; the agent stays applied (scale it to start again)."""
        ctl = self._agent(name)
        await self.guard.authorize(self.entity(caller), "agent.terminate", ctl.entity, agent=name)
        await self.guard.record("agent.stop", actor=str(self.entity(caller)), agent=name)
        ctl.stopped = True
        self.pause_subscriptions(name)
        self.store.append_event(name, "agent.stopped", {})
        await self.store.commit()
        await ctl.stop_all("stopped")

    async def delete(self, name: str, *, purge: bool = False, caller: str = "client") -> None:
        """Stop and remove an agent; ``purge`` also drops its persistent memory."""
        ctl = self._agent(name)
        await self.guard.authorize(self.entity(caller), "agent.terminate", ctl.entity, agent=name)
        await self.guard.record("agent.delete", actor=str(self.entity(caller)), agent=name,
                                data={"purge": purge})
        await self._remove_controller(ctl, "deleted")
        if self.bus is not None:
            for s in ctl.subscriptions():
                await self.bus.backend.unsubscribe(_subscription_name(name, s.subject))
        for work in ctl.mailbox.drain():
            ctl.fail(work, AgentNotFound(f"agent {name!r} was deleted"))
        self.store.append_event(name, "agent.deleted", {"purge": purge})
        if purge:
            self.store.clear_memory(name)
        await self.store.commit()

    # ================================================================ views

    def agent_or_none(self, name: str) -> AgentController | None:
        """The controller of ``name``, if applied."""
        return self.agents.get(name)

    @staticmethod
    def _priority(text: str | None, default: Priority) -> Priority:
        if not text:
            return default
        try:
            return Priority.parse(text)
        except ValueError:
            raise SpecError("unknown priority", path="priority", got=text,
                            expected="critical, high, normal, low or background") from None

    def _agent(self, name: str) -> AgentController:
        ctl = self.agents.get(name)
        if ctl is None:
            raise AgentNotFound(f"no agent named {name!r}")
        return ctl

    def _check_open(self) -> None:
        if self._tg is None or self._closing:
            raise CorralError("the runtime is not running", hint="use `async with Runtime() as rt:`")

    def get(self, name: str) -> dict[str, Any]:
        """One agent's summary row."""
        return self._row(self._agent(name))

    def list(self) -> builtins.list[dict[str, Any]]:
        """Every agent's summary row, by name."""
        return [self._row(a) for _, a in sorted(self.agents.items())]

    def _row(self, a: AgentController) -> dict[str, Any]:
        done = a.tasks_ok + a.tasks_failed
        return {
            "name": a.name, "namespace": a.manifest.namespace, "mode": a.spec.mode,
            "isolation": a.spec.isolation, "status": a.status(),
            "ready": f"{a.ready_count()}/{a.replicas if not a.one_shot else len(a.instances)}",
            "restarts": a.restarts, "age": round(time.time() - a.created, 1),
            "tasks": done, "failed": a.tasks_failed, "queued": len(a.mailbox),
            "gave_up": a.gave_up,
        }

    async def describe(self, name: str) -> dict[str, Any]:
        """Everything about one agent: spec, instances, limits and how they are enforced, events."""
        a = self._agent(name)
        insts = list(a.instances.values())
        samples = await asyncio.to_thread(_sample_all, insts)
        now = asyncio.get_running_loop().time()
        enforcement = self._enforcement(a)
        events = await self.store.events(agent=name)
        return {
            **self._row(a),
            "labels": dict(a.manifest.metadata.labels), "priority": a.spec.priority,
            "entrypoint": a.spec.entrypoint, "command": a.spec.command,
            "source": a.manifest.source, "generation": a.generation,
            "replicas": a.replicas, "concurrency": a.spec.concurrency,
            "mailbox": {"depth": len(a.mailbox), "peak": a.mailbox.peak, "max": a.mailbox.maxsize},
            "restart": a.spec.restart.model_dump(by_alias=True),
            "limits": [e.to_dict() for e in enforcement],
            "schedules": [{"handler": h, "next_run": t} for (n, h), t in
                          self.scheduler.next_runs.items() if n == name],
            "stats": self._agent_stats(a),
            "instances": [{
                "name": i.name, "state": i.state.value, "pid": i.channel.pid if i.channel else None,
                "tier": i.channel.tier if i.channel else a.spec.isolation,
                "restarts": i.restarts, "inflight": len(i.inflight),
                "handlers": i.handlers,
                "uptime": round(now - i.ready_at, 1) if i.ready_at and i.channel else None,
                "last_exit": i.last_exit.describe() if i.last_exit else None,
                "resources": s,
            } for i, s in zip(insts, samples, strict=True)],
            "events": [{"seq": e.seq, "ts": e.ts, "kind": e.kind, **e.data}
                       for e in events[-25:] if e.kind != "agent.applied"],
        }

    def _enforcement(self, a: AgentController) -> list[Any]:
        if a.spec.isolation == "inproc":
            assert self._inproc is not None
            return self._inproc.enforcement(a.limits)
        assert self._process is not None
        return self._process.enforcement(a.limits)

    def _agent_stats(self, a: AgentController) -> dict[str, Any]:
        done = a.tasks_ok + a.tasks_failed
        return {"tasks_executed": done, "tasks_succeeded": a.tasks_ok,
                "tasks_failed": a.tasks_failed,
                "success_rate": round(a.tasks_ok / done, 4) if done else None,
                "avg_task_ms": round(a.task_time / done * 1000, 3) if done else None}

    def stats(self) -> dict[str, Any]:
        """Seed 004's runtime statistics, plus per-agent ones."""
        ok = sum(a.tasks_ok for a in self.agents.values())
        failed = sum(a.tasks_failed for a in self.agents.values())
        t = sum(a.task_time for a in self.agents.values())
        done = ok + failed
        active = sum(1 for a in self.agents.values() for i in a.instances.values()
                     if i.channel is not None)
        return {
            "agents": len(self.agents), "agents_spawned": self.counters.spawned,
            "agents_active": active, "tasks_executed": done, "tasks_succeeded": ok,
            "tasks_failed": failed, "success_rate": round(ok / done, 4) if done else None,
            "avg_task_ms": round(t / done * 1000, 3) if done else None,
            "uptime_s": round(time.time() - self.counters.started_at, 1),
            "store": self.store.stats,
            "policy": {"policies": len(self.guard.sources), "strict": self.guard.policy.strict,
                       "denials": self.guard.denials,
                       "generation": self.guard.policy.generation},
            "audit": dict(self.guard.audit.stats) if self.guard.audit is not None else None,
            "bus": {"backend": self.config.bus,
                    "delivered": sum(self.bus.delivered.values()) if self.bus else 0,
                    "rejected": dict(self.bus.rejected) if self.bus else {},
                    "dead_letters": self.dlq.stats() if self.dlq else {}},
            "per_agent": {a.name: self._agent_stats(a) for a in self.agents.values()},
        }

    # ================================================================ logs

    def log(self, agent: str, instance: str, level: str, message: str) -> None:
        """Record one log line of an agent and hand it to live followers."""
        ts = time.time()
        try:
            self.store.append_log(agent, instance, level, message, ts)
        except StoreError as exc:
            log.error("cannot store log line of %s: %s", agent, exc)
        log.log(logging.ERROR if level == "error" else logging.INFO, "[%s] %s",
                instance or agent, message)
        followers = self._followers.get(agent)
        if followers:
            rec = LogRecord(next(self._log_seq), ts, agent, instance, level, message)
            for q in followers:
                _offer(q, rec)

    async def logs(self, name: str, *, after: int = 0, limit: int = 1000) -> builtins.list[LogRecord]:
        """Stored log lines of an agent (also after it was deleted)."""
        await self.store.commit()
        return await self.store.logs(name, after=after, limit=limit)

    async def follow(self, name: str) -> AsyncIterator[LogRecord]:
        """Live log lines of an agent until the runtime stops."""
        q: asyncio.Queue[LogRecord | None] = asyncio.Queue(maxsize=10_000)
        self._followers.setdefault(name, set()).add(q)
        try:
            while (rec := await q.get()) is not None:
                yield rec
        finally:
            self._followers[name].discard(q)

    # ================================================================ launching

    async def launch(self, ctl: AgentController, inst: Instance) -> Channel:
        """Start one incarnation of ``inst`` in its agent's tier, once the policy allows it."""
        spec = ctl.spec
        if not self.guard.idle:
            from corral.policy.entities import namespace

            ctx = _allocation(ctl.manifest)
            await self.guard.authorize(ctl.entity, "resource.allocate",
                                       namespace(ctl.manifest.namespace), ctx, agent=ctl.name)
            await self.guard.record("resource.allocate", actor=str(ctl.entity), agent=ctl.name,
                                    resource=inst.name, data={**ctx, "tier": spec.isolation})
        if spec.isolation == "inproc":
            assert self._inproc is not None
            return await self._inproc.launch(instance=inst.name, sink=inst, limits=ctl.limits)
        if spec.isolation != "process":
            raise SandboxUnavailable(_TIERS_LATER.get(spec.isolation, spec.isolation))
        assert self._process is not None
        env = dict(spec.env)
        env["CORRAL_AGENT"] = ctl.name
        return await self._process.launch(instance=inst.name, sink=inst, limits=ctl.limits,
                                          command=spec.command, env=env, cwd=ctl.cwd)

    # ================================================================ background loops

    async def _health_loop(self) -> None:
        """Kill instances whose heartbeats stopped (hung agents); the supervisor restarts them."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(0.1)
            now = loop.time()
            for a in list(self.agents.values()):
                if a.event_driven:
                    a.deactivate_idle(now)
                timeout = a.spec.health.heartbeat_timeout
                for i in list(a.instances.values()):
                    if i.idle_since is not None and now - i.idle_since >= IDLE_LINGER:
                        i.complete()
                    ch = i.channel
                    if ch is None or ch.tier == "inproc" or i.state in (State.INITIALIZING,
                                                                        State.TERMINATED):
                        continue
                    silent = now - i.last_heartbeat
                    if silent > timeout:
                        self.log(a.name, i.name, "error",
                                 f"hung: no heartbeat for {silent:.1f}s (heartbeatTimeout "
                                 f"{timeout:g}s); killing it")
                        ch.kill("hung", f"no heartbeat for {silent:.1f}s")
                        i.last_heartbeat = now

    async def _sample_loop(self) -> None:
        """Sample live instances' resources with psutil, off the event loop."""
        while True:
            await asyncio.sleep(self.config.sample_interval)
            insts = [i for a in self.agents.values() for i in a.instances.values()
                     if i.channel is not None and i.channel.tier != "inproc"]
            if not insts:
                continue
            samples = await asyncio.to_thread(_sample_all, insts)
            for i, s in zip(insts, samples, strict=True):
                i.sample = s


_PAYLOAD_SIZE = msgspec.msgpack.Encoder().encode



def _allocation(m: AgentManifest) -> dict[str, int]:
    """resource.allocate's context: the memory limit in bytes (0: none) and cpu in millicores."""
    res = m.spec.resources
    ctx = {"memoryBytes": int(res.memory or 0)}
    if res.cpu is not None:
        ctx["cpuMillis"] = round(float(res.cpu) * 1000)
    return ctx


def _subscription_name(agent: str, subject: str) -> str:
    # Stable across restarts, so a durable subscription resumes where it stopped.
    return f"{agent}:{subject}"


def _sample_all(insts: list[Instance]) -> list[dict[str, Any]]:
    # psutil reads /proc: run in a thread, never on the loop.
    return [i.channel.sample() if i.channel else {} for i in insts]


def _offer(q: asyncio.Queue[Any], item: Any) -> None:
    # A slow follower loses its oldest lines, never blocks the runtime.
    while True:
        try:
            q.put_nowait(item)
            return
        except asyncio.QueueFull:
            q.get_nowait()
