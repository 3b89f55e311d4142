"""AgentController: one applied agent: its spec, replicas, mailbox and counters."""

from __future__ import annotations

import asyncio
import functools
import itertools
import os
import time
from typing import TYPE_CHECKING, Any

from corral.core.lifecycle import State
from corral.core.queue import Priority, PriorityQueue
from corral.errors import AgentUnavailable, CorralError, error_from_info
from corral.runtime.instance import Instance
from corral.sandbox.base import Channel, ExitInfo
from corral.sandbox.limits import Limits
from corral.spec.models import AgentManifest, SubscriptionSpec
from corral.wire.messages import Result

if TYPE_CHECKING:
    from corral.runtime.runtime import Runtime
    from corral.runtime.supervision import SupervisionGroup
    from corral.runtime.work import Work

__all__ = ["DEFAULT_IDLE_TIMEOUT", "AgentController"]

#: How long an event-driven agent stays active without work when resources.idleTimeout is unset.
DEFAULT_IDLE_TIMEOUT = 300.0


def limits_of(manifest: AgentManifest) -> Limits:
    """The sandbox limits a manifest asks for."""
    r = manifest.spec.resources
    return Limits(memory=r.memory, cpu=r.cpu, cpu_time=r.cpu_time,
                  max_open_files=r.max_open_files, max_processes=r.max_processes)


class AgentController:
    """Keeps an agent's replicas running and feeds them work from its mailbox."""

    def __init__(self, rt: Runtime, manifest: AgentManifest, *, generation: int = 1) -> None:
        self.rt = rt
        self.manifest = manifest
        self.spec = manifest.spec
        self.name = manifest.name
        self.generation = generation
        self.priority = Priority.parse(self.spec.priority)
        self.mailbox: PriorityQueue[Work] = PriorityQueue(self.spec.mailbox)
        self.instances: dict[str, Instance] = {}
        self.replicas = self.spec.replicas
        self.one_shot = self.spec.mode in ("ephemeral", "scheduled")
        #: Virtual actor: no instance until a message arrives; deactivated after idleTimeout.
        self.event_driven = self.spec.mode == "event-driven"
        self.idle_timeout = self.spec.resources.idle_timeout or DEFAULT_IDLE_TIMEOUT
        self.stopped = False
        self.gave_up: str | None = None
        self.group: SupervisionGroup | None = None
        self.limits = limits_of(manifest)
        self.memory: dict[str, tuple[Any, float]] = {}
        self.created = time.time()
        self.restarts = 0
        self.tasks_ok = 0
        self.tasks_failed = 0
        self.task_time = 0.0
        self._available: dict[Instance, None] = {}
        self._seq = itertools.count()
        self._warned_schedules = False
        #: Subscriptions the agent made at run time (ctx.subscribe), by subject.
        self.dynamic: dict[str, SubscriptionSpec] = {}
        base = manifest.base_dir
        self.python_path = [os.path.normpath(os.path.join(base, p)) for p in self.spec.python_path]
        if not self.python_path and self.spec.entrypoint:
            self.python_path = [base]
        self.cwd = os.path.normpath(os.path.join(base, self.spec.workdir or "."))


    @functools.cached_property
    def entity(self) -> Any:
        """This agent as a Cedar entity (namespace, labels, tier, priority), built once."""
        from corral.policy.entities import agent

        m = self.manifest
        return agent(self.name, namespace=m.namespace, labels=dict(m.metadata.labels),
                     isolation=self.spec.isolation, priority=self.spec.priority)

    def subscriptions(self) -> list[SubscriptionSpec]:
        """Manifest subscriptions, then those made at run time."""
        declared = {s.subject for s in self.spec.subscriptions}
        return [*self.spec.subscriptions,
                *(s for k, s in self.dynamic.items() if k not in declared)]

    # ---------------------------------------------------------------- replicas

    def reconcile(self) -> None:
        """Start missing persistent replicas and stop surplus ones."""
        if self.one_shot:
            return
        if self.event_driven:
            # Instances come with messages (see pump); only surplus ones are stopped here.
            want = 0 if self.stopped or self.gave_up else self.replicas
            for name, inst in list(self.instances.items()):
                if int(name.rsplit("-", 1)[1]) >= want and not inst.removed:
                    self.rt.spawn(self._retire(inst, "scaled down"))
            return
        want = 0 if self.stopped or self.gave_up else self.replicas
        for i in range(want):
            name = f"{self.name}-{i}"
            inst = self.instances.get(name)
            if inst is None or inst.removed:
                self._add_instance(name)
        for name, inst in list(self.instances.items()):
            ordinal = int(name.rsplit("-", 1)[1])
            if ordinal >= want and not inst.removed:
                self.rt.spawn(self._retire(inst, "scaled down"))

    def _add_instance(self, name: str) -> Instance:
        inst = Instance(self, name, one_shot=self.one_shot)
        self.instances[name] = inst
        self.rt.store.append_event(self.name, "instance.created", {"instance": name})
        if self.one_shot or self.group is None:
            inst.schedule_start(0)
        else:
            self.group.add(inst, self.spec.restart)
        return inst

    async def _retire(self, inst: Instance, reason: str) -> None:
        if self.group is not None:
            self.group.remove(inst)
        await inst.stop(self.rt.config.shutdown_grace, reason)

    async def stop_all(self, reason: str, grace: float | None = None) -> None:
        """Stop every instance gracefully, in parallel."""
        g = self.rt.config.shutdown_grace if grace is None else grace
        insts = list(self.instances.values())
        for inst in insts:
            if self.group is not None:
                self.group.remove(inst)
        await asyncio.gather(*(i.stop(g, reason) for i in insts))

    async def launch(self, inst: Instance) -> Channel:
        """Start one incarnation in the agent's isolation tier."""
        return await self.rt.launch(self, inst)

    # ---------------------------------------------------------------- work

    def submit(self, work: Work) -> None:
        """Queue work (Backpressure when the mailbox is full) and dispatch what can go."""
        if self.gave_up:
            raise AgentUnavailable(f"agent {self.name!r} was given up: {self.gave_up}",
                                   hint="fix the agent and apply it again, or `corral scale` it")
        if self.stopped or (self.replicas == 0 and not self.one_shot):
            raise AgentUnavailable(f"agent {self.name!r} is stopped (0 replicas)",
                                   hint=f"run `corral scale {self.name} 1` to start it")
        self.mailbox.push(work, work.priority)
        self.pump()

    def pump(self) -> None:
        """Dispatch queued work to instances with free capacity."""
        mailbox, avail = self.mailbox, self._available
        while mailbox:
            if not avail:
                if self.one_shot:
                    self._spawn_one_shot()
                elif self.event_driven:
                    self._activate()
                return
            inst = next(iter(avail))
            inst.dispatch(mailbox.pop())
            self._refresh(inst)

    def _activate(self) -> None:
        # One more instance when work waits and none is starting, up to `replicas`.
        live = [i for i in self.instances.values() if not i.removed]
        if any(i.state is State.INITIALIZING for i in live) or len(live) >= max(1, self.replicas):
            return
        used = {int(i.name.rsplit("-", 1)[1]) for i in live}
        ordinal = next(n for n in itertools.count() if n not in used)
        self.rt.log(self.name, "", "info", f"activating {self.name}-{ordinal} for queued work")
        self._add_instance(f"{self.name}-{ordinal}")

    def deactivate_idle(self, now: float) -> None:
        """Event-driven: stop instances idle for idleTimeout (memory is saved on the way out)."""
        for inst in list(self.instances.values()):
            if not inst.removed and inst.accepting and not inst.inflight and \
                    now - inst.last_active >= self.idle_timeout:
                self.rt.spawn(self._retire(inst, f"idle for {self.idle_timeout:g}s (event-driven)"))

    def _spawn_one_shot(self) -> None:
        starting = sum(1 for i in self.instances.values()
                       if i.state is State.INITIALIZING and not i.removed)
        live = sum(1 for i in self.instances.values() if not i.removed)
        if starting < len(self.mailbox) and live < max(1, self.replicas):
            self._add_instance(f"{self.name}-{next(self._seq)}")

    def _refresh(self, inst: Instance) -> None:
        # Keep _available to the instances that can take work now, least recently used first.
        cap = 1 if self.one_shot else self.spec.concurrency
        ok = inst.accepting and len(inst.inflight) < cap and not (self.one_shot and inst.used)
        self._available.pop(inst, None)
        if ok:
            self._available[inst] = None

    def finish(self, work: Work, msg: Result, duration: float) -> None:
        """A task ended with a Result from the agent."""
        self.task_time += duration
        if msg.ok:
            self.tasks_ok += 1
            if work.future is not None and not work.future.done():
                work.future.set_result(msg.payload)
            if work.task_id is not None:
                self.rt.store.finish_task(work.task_id, "done", result=self.rt.at_rest(
                    self, work.task_id, "result", msg.payload))
            return
        self.tasks_failed += 1
        err = msg.error
        etype, emsg = (err.type, err.message) if err else ("TaskFailed", "failed")
        if work.future is not None and not work.future.done():
            work.future.set_exception(error_from_info(
                etype, emsg, hint=err.hint if err else "", traceback=err.traceback if err else "",
                agent=self.name))
        if work.task_id is not None:
            self.rt.store.finish_task(work.task_id, "failed", error=f"{etype}: {emsg}")

    def fail(self, work: Work, err: CorralError) -> None:
        """A task ended without a Result (timeout, no handler, instance gone)."""
        self.tasks_failed += 1
        err.agent = err.agent or self.name
        if work.future is not None and not work.future.done():
            work.future.set_exception(err)
        if work.task_id is not None:
            self.rt.store.finish_task(work.task_id, "failed", error=str(err))

    def retry_or_fail(self, work: Work, err: CorralError) -> None:
        """Durable sends go back to the mailbox until max attempts; the rest fail."""
        work.attempts += 1
        if work.task_id is not None and work.attempts < self.rt.config.max_send_attempts:
            self.rt.store.set_task_status(work.task_id, "queued", attempts=work.attempts)
            try:
                self.mailbox.push(work, work.priority)
                return
            except CorralError:
                pass
        self.fail(work, err)

    def abandon(self, work: Work) -> None:
        """The caller went away: drop queued work; in-flight work is cancelled by timeout."""
        self.mailbox.remove(work)

    # ---------------------------------------------------------------- memory

    def save_memory(self, values: dict[str, Any]) -> None:
        """Persist memory values the agent changed."""
        now = time.time()
        for key, value in values.items():
            self.memory[key] = (value, now)
            self.rt.store.put_memory(self.name, key, value, now)

    def memory_snapshot(self) -> tuple[dict[str, Any], dict[str, float]]:
        """Values and ages (seconds) for an Init."""
        now = time.time()
        return ({k: v for k, (v, _) in self.memory.items()},
                {k: now - ts for k, (_, ts) in self.memory.items()})

    # ---------------------------------------------------------------- callbacks from instances

    def on_transition(self, inst: Instance, old: State) -> None:
        """Keep the dispatch set in step with the lifecycle."""
        self._refresh(inst)

    def on_task_done(self, inst: Instance) -> None:
        """An instance has room again: dispatch more."""
        self._refresh(inst)
        if self.mailbox:
            self.pump()

    def on_ready(self, inst: Instance) -> None:
        """An instance said Ready."""
        if self.group is not None and not self.one_shot:
            self.group.started(inst)
        if inst.schedules and not self.one_shot:
            self.rt.scheduler.ensure(self, inst.schedules)
        elif inst.schedules and not self._warned_schedules:
            # Each tick would start a fresh one-shot instance: not what @scheduled means.
            self._warned_schedules = True
            self.rt.log(self.name, inst.name, "warning",
                        f"@scheduled methods {[s.handler for s in inst.schedules]} are ignored "
                        f"in mode {self.spec.mode!r}; they run in persistent agents")
        self._refresh(inst)
        self.pump()

    def on_instance_exit(self, inst: Instance, exit: ExitInfo) -> None:
        """A supervised instance ended; its supervisor decides."""
        if self.group is not None:
            self.group.exited(inst, exit.failed, exit.describe())

    def on_instance_gone(self, inst: Instance) -> None:
        """An incarnation closed; drop retired one-shot instances."""
        self._refresh(inst)
        if inst.removed and inst.state is State.TERMINATED and (self.one_shot or
                                                                  self.event_driven):
            self.instances.pop(inst.name, None)
            self._available.pop(inst, None)
        if self.mailbox:
            self.pump()

    def on_give_up(self, reason: str) -> None:
        """The supervisor gave up on this agent."""
        if self.gave_up is None:
            self.gave_up = reason
            self.rt.store.append_event(self.name, "agent.gave_up", {"reason": reason})
            self.rt.log(self.name, "", "error", f"supervisor gave up: {reason}")
            self.rt.pause_subscriptions(self.name)
            err = AgentUnavailable(f"agent {self.name!r} was given up: {reason}")
            for work in self.mailbox.drain():
                self.fail(work, err)

    # ---------------------------------------------------------------- views

    def status(self) -> str:
        """One word for `get agents`."""
        if self.gave_up:
            return "GaveUp"
        if self.stopped or (self.replicas == 0 and not self.one_shot):
            return "Stopped"
        if self.one_shot or (self.event_driven and not self.instances):
            return "Active" if self.instances else ("Scheduled" if self.spec.mode == "scheduled"
                                                    else "Idle")
        ready = self.ready_count()
        if ready == self.replicas:
            return "Running"
        if any(i.state is State.FAILED for i in self.instances.values()):
            return "Restarting"
        return "Starting" if ready == 0 else "Degraded"

    def ready_count(self) -> int:
        """Instances that can take work."""
        return sum(1 for i in self.instances.values() if i.accepting)
