"""One exception hierarchy for Corral. Every message says what to do next.

::

    CorralError
      SpecError                    file, field path, what it got, what it expects
      LifecycleError
        IllegalTransition          state and event named; nothing changed
      SupervisionError
        RestartLimitExceeded       too many restarts in the window; the supervisor gave up
      SandboxError
        SandboxUnavailable         the tier cannot run on this machine
        SpawnError                 a worker process could not be started
        LimitExceeded              an agent went over a resource limit (memory, cpu, ...)
      WireError
        LocalProtocolError         Corral broke the wire protocol (a bug in Corral)
        RemoteProtocolError        the agent broke the wire protocol
          FrameTooLarge            a frame's length prefix is over max_frame_size
      BusError                     the message bus failed
        BackendUnavailable         the configured backend cannot be reached or is not installed
        MessageRejected            spoofed, forged, tampered, oversize or rate-limited message
      AgentError
        AgentNotFound              no agent of that name is applied
        AgentUnavailable           the agent has no live instance to take the task
        HandlerNotFound            the agent has no handler of that name
        TaskFailed                 the handler raised; the agent stays up
        TaskTimeout                the task ran past its deadline and was cancelled
        Backpressure               a bounded queue is full; retry later
      StoreError                   the embedded store failed
      PolicyError                  a policy could not be loaded or evaluated
        PolicyInvalid              a policy or schema does not parse or validate (line, column)
        PolicyDenied               the policy denied the action; nothing was done
      AuditError                   the audit trail failed
        AuditUnavailable           a record could not be written; the action was refused
        AuditKeyError              the audit signing key is missing, unreadable or corrupt
        AuditTampered              verification found a bad record (named in the message)
      ControlError
        RuntimeNotRunning          no runtime answers on the control socket

`tests/unit/test_errors.py` walks ``CorralError.__subclasses__()`` to keep this tree true.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

__all__ = [
    "AgentError",
    "AgentNotFound",
    "AgentUnavailable",
    "AuditError",
    "AuditKeyError",
    "AuditTampered",
    "AuditUnavailable",
    "BackendUnavailable",
    "Backpressure",
    "BusError",
    "ControlError",
    "CorralError",
    "FrameTooLarge",
    "HandlerNotFound",
    "IllegalTransition",
    "LifecycleError",
    "LimitExceeded",
    "LocalProtocolError",
    "MessageRejected",
    "PolicyDenied",
    "PolicyError",
    "PolicyInvalid",
    "RemoteProtocolError",
    "RestartLimitExceeded",
    "RuntimeNotRunning",
    "SandboxError",
    "SandboxUnavailable",
    "SpawnError",
    "SpecError",
    "StoreError",
    "SupervisionError",
    "TaskFailed",
    "TaskTimeout",
    "WireError",
    "agent_context",
    "error_from_info",
]


class CorralError(Exception):
    """Base of every error Corral raises on purpose."""

    #: Default advice, used when the raiser gives none.
    hint: str = ""

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        self.message = message
        if hint is not None:
            self.hint = hint
        self.agent: str | None = None
        super().__init__(message)

    def __str__(self) -> str:
        where = f"agent {self.agent!r}: " if self.agent else ""
        advice = f" ({self.hint})" if self.hint else ""
        return f"{where}{self.message}{advice}"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able form, used by the control socket and the CLI's -o json."""
        return {"type": type(self).__name__, "message": self.message, "hint": self.hint,
                "agent": self.agent}


class SpecError(CorralError):
    """A manifest or config is invalid; nothing from the set was applied."""

    hint = "fix the manifest and apply it again; nothing was applied"

    def __init__(
        self,
        message: str,
        *,
        file: str | None = None,
        path: str | None = None,
        got: Any = None,
        expected: str | None = None,
        hint: str | None = None,
        problems: list[SpecError] | None = None,
    ) -> None:
        self.file = file
        self.path = path
        self.got = got
        self.expected = expected
        self.problems: list[SpecError] = problems or []
        super().__init__(message, hint=hint)

    def __str__(self) -> str:
        if self.problems:
            lines = [f"{len(self.problems)} problem(s); nothing was applied:"]
            lines += [f"  - {p.describe()}" for p in self.problems]
            return "\n".join(lines)
        return self.describe()

    def describe(self) -> str:
        """One line: file, field path, what it got and what it expects."""
        parts = []
        if self.file:
            parts.append(self.file)
        if self.path:
            parts.append(self.path)
        head = ": ".join(parts)
        body = self.message
        if self.expected is not None:
            body += f"; expected {self.expected}"
        if self.got is not None:
            body += f", got {self.got!r}"
        return f"{head}: {body}" if head else body

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        d["message"] = str(self)
        d.update(file=self.file, path=self.path, expected=self.expected,
                 got=None if self.got is None else repr(self.got),
                 problems=[p.to_dict() for p in self.problems])
        return d


class LifecycleError(CorralError):
    """A lifecycle rule was broken."""

    hint = "check the agent's state with `corral describe agent NAME`"


class IllegalTransition(LifecycleError):
    """An event that the current lifecycle state does not accept; nothing changed."""

    hint = "this is a bug in the caller: check the state before sending the event"

    def __init__(self, state: object, event: object) -> None:
        self.state = state
        self.event = event
        name = getattr(state, "value", state)
        super().__init__(f"can't handle event {type(event).__name__} in state {name}")


class SupervisionError(CorralError):
    """The supervisor could not keep an agent up."""

    hint = "read `corral logs NAME` and `corral describe agent NAME` for the cause"


class RestartLimitExceeded(SupervisionError):
    """More restarts in the window than the restart policy allows; the supervisor gave up."""

    hint = "read `corral logs` for the crash, fix the agent, then apply it again"


class SandboxError(CorralError):
    """A sandbox tier failed to start or contain an agent."""

    hint = "check spec.isolation and spec.resources against what this machine offers"


class SandboxUnavailable(SandboxError):
    """The requested isolation tier cannot run on this machine."""

    hint = "use isolation: process, or install what the tier needs"


class SpawnError(SandboxError):
    """A worker process could not be started."""

    hint = "check the entrypoint or command, and `corral logs` for the agent"


class LimitExceeded(SandboxError):
    """An agent went over a resource limit."""

    def __init__(self, limit: str, value: str, message: str | None = None,
                 *, hint: str | None = None) -> None:
        self.limit = limit
        self.value = value
        super().__init__(message or f"{limit} limit exceeded ({value})",
                         hint=hint or f"raise resources.{limit} in the manifest or use less")


class WireError(CorralError):
    """The runtime<->agent wire protocol failed."""

    hint = "see docs/wire-protocol.md"


class LocalProtocolError(WireError):
    """Corral itself broke the wire protocol: a bug in Corral."""

    hint = "this is a bug in Corral; please report it"


class RemoteProtocolError(WireError):
    """The agent broke the wire protocol; the supervisor stops it."""

    hint = "fix the agent's wire protocol implementation (see docs/wire-protocol.md)"


class FrameTooLarge(RemoteProtocolError):
    """A frame's length prefix is larger than max_frame_size."""


class BusError(CorralError):
    """The message bus failed."""

    hint = "see docs/messaging.md"


class BackendUnavailable(BusError):
    """The configured bus backend cannot be reached, or its client library is missing."""

    hint = "start the service or install the extra (pip install 'corral[nats]' or 'corral[redis]')"


class MessageRejected(BusError):
    """A message was refused: spoofed, forged, tampered with, too large, or over a rate limit."""

    hint = "the message was not delivered; see `corral stats` for rejection counts"

    def __init__(self, message: str, *, reason: str, hint: str | None = None) -> None:
        self.reason = reason
        super().__init__(message, hint=hint)


class AgentError(CorralError):
    """A task could not be carried out by its agent."""

    hint = "see `corral logs NAME` for what the agent said"


class AgentNotFound(AgentError):
    """No agent of that name is applied."""

    hint = "list agents with `corral get agents`, or apply the manifest first"


class AgentUnavailable(AgentError):
    """The agent exists but has no live instance that can take the task."""

    hint = "check `corral describe agent NAME`; it may be restarting, stopped or given up"


class HandlerNotFound(AgentError):
    """The agent has no handler of that name."""

    hint = "see the agent's handlers in `corral describe agent NAME`"


class TaskFailed(AgentError):
    """The handler raised; the error is reported and the agent stays up."""

    def __init__(self, message: str, *, error_type: str = "Exception", traceback: str = "",
                 hint: str | None = None) -> None:
        self.error_type = error_type
        self.traceback = traceback
        super().__init__(message, hint=hint)


class TaskTimeout(AgentError):
    """The task ran past its deadline and was cancelled."""

    hint = "raise resources.taskTimeout or the request's timeout, or make the handler faster"


class Backpressure(AgentError):
    """A bounded queue is full; the task was refused rather than dropped."""

    hint = "retry later, add replicas, or raise spec.mailbox"


class StoreError(CorralError):
    """The embedded store failed to read or write."""

    hint = "check the disk and permissions of CORRAL_HOME"


class PolicyError(CorralError):
    """A policy could not be loaded or evaluated; the action it guards is denied."""

    hint = "check the policies with `corral policy check FILE`; see docs/policy.md"


class PolicyInvalid(PolicyError):
    """A policy or schema does not parse or does not validate against the schema."""

    hint = "fix the policy at the line and column given; `corral policy check FILE` re-checks it"

    def __init__(self, message: str, *, problems: list[dict[str, Any]] | None = None,
                 hint: str | None = None) -> None:
        #: One dict per problem: file, line, column, message.
        self.problems = problems or []
        super().__init__(message, hint=hint)

    def to_dict(self) -> dict[str, Any]:
        """The base form plus each problem."""
        return {**super().to_dict(), "problems": self.problems}


class PolicyDenied(PolicyError):
    """The policy denied the action; nothing was done."""

    hint = "see which policies decided with `corral policy eval`, or change the policy"

    def __init__(self, message: str, *, action: str = "", principal: str = "",
                 resource: str = "", policies: list[str] | None = None,
                 hint: str | None = None) -> None:
        self.action, self.principal, self.resource = action, principal, resource
        #: Ids of the policies that decided (empty when no policy permitted it).
        self.policies = policies or []
        super().__init__(message, hint=hint)


class AuditError(CorralError):
    """The audit trail failed."""

    hint = "see docs/audit-format.md"


class AuditUnavailable(AuditError):
    """An audit record could not be written, so the action it records was refused."""

    hint = "free disk space or fix the permissions of CORRAL_HOME/audit.db, then retry"


class AuditKeyError(AuditError):
    """The audit signing key is missing, unreadable or corrupt."""

    hint = "restore CORRAL_HOME/keys/audit from backup; a new key can only start a new trail"


class AuditTampered(AuditError):
    """Verification found a record that was edited, deleted, inserted or reordered."""

    hint = "the trail is not trustworthy from the record named; keep the file for forensics"


class ControlError(CorralError):
    """The control socket failed."""

    hint = "check that the runtime is running and CORRAL_HOME points at it"


class RuntimeNotRunning(ControlError):
    """No runtime answers on the control socket."""

    hint = "start one with `corral up` (or `make run`), or set CORRAL_HOME to its home"


_BY_NAME: dict[str, type[CorralError]] = {}


def _index(cls: type[CorralError]) -> None:
    _BY_NAME[cls.__name__] = cls
    for sub in cls.__subclasses__():
        _index(sub)


def error_from_info(error_type: str, message: str, *, hint: str = "", traceback: str = "",
                    agent: str | None = None) -> CorralError:
    """Rebuild a Corral error from its wire form; unknown types become TaskFailed."""
    if not _BY_NAME:
        _index(CorralError)
    cls = _BY_NAME.get(error_type)
    err: CorralError
    if error_type == "InternalError":
        err = ControlError(message, hint=hint or None)
    elif cls is None or cls is TaskFailed:
        err = TaskFailed(message, error_type=error_type, traceback=traceback, hint=hint or None)
    elif cls is MessageRejected:
        err = MessageRejected(message, reason="remote", hint=hint or None)
    elif cls is LimitExceeded:
        err = LimitExceeded("resource", "", message, hint=hint or None)
    elif issubclass(cls, SpecError):
        err = SpecError(message, hint=hint or None)  # the message already lists every problem
    elif cls is IllegalTransition:
        err = LifecycleError(message, hint=hint or None)
    else:
        err = cls(message, hint=hint or None)
    err.agent = agent
    return err


@contextmanager
def agent_context(agent: str) -> Iterator[None]:
    """Attach ``.agent`` to any CorralError raised inside, like httpx's request_context."""
    try:
        yield
    except CorralError as exc:
        if exc.agent is None:
            exc.agent = agent
        raise
