"""Pydantic models of Corral manifests (``apiVersion: corral/v1``).

Fields are snake_case in Python and camelCase in YAML (``max_restarts`` / ``maxRestarts``);
both spellings are accepted, unknown fields are errors, and every model is frozen.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, Self

from croniter import croniter
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    model_validator,
)
from pydantic.alias_generators import to_camel

from corral.spec.quantity import format_duration, parse_cpu, parse_duration, parse_memory

__all__ = [
    "KINDS",
    "AgentManifest",
    "AgentSpec",
    "Backoff",
    "Cpu",
    "Duration",
    "FieldProblem",
    "Health",
    "Manifest",
    "Memory",
    "Metadata",
    "Resources",
    "Restart",
    "ScheduleSpec",
    "ToolSpec",
]


class FieldProblem(ValueError):
    """A rule across fields, broken at ``field`` (camelCase, relative to the model)."""

    def __init__(self, message: str, *, field: str | None = None, expected: str | None = None,
                 got: Any = None) -> None:
        super().__init__(message)
        self.field = field
        self.expected = expected
        self.got = got


# -- field types ---------------------------------------------------------------------------

Memory = Annotated[int, BeforeValidator(parse_memory)]
"""Bytes; YAML may say 256Mi, 1Gi, 100M or a plain number of bytes."""
Cpu = Annotated[float, BeforeValidator(parse_cpu)]
"""Cores; YAML may say 0.5, "500m" or 2."""
Duration = Annotated[float, BeforeValidator(parse_duration)]
"""Seconds; YAML may say 300s, 10m, 1h30m, 100ms or a plain number of seconds."""

Int = Annotated[int, Field(strict=True)]  # no bools, floats or strings
Float = Annotated[float, Field(strict=True)]  # ints are fine, bools are not
NonEmptyStr = Annotated[str, Field(min_length=1)]

_DNS_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
_ENTRYPOINT = re.compile(rf"{_IDENT}(?:\.{_IDENT})*:{_IDENT}(?:\.{_IDENT})*")
_TOOL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")


def _dns_label(v: str) -> str:
    if not _DNS_LABEL.fullmatch(v):
        raise ValueError("expected a DNS-1123 label: 1-63 lowercase letters, digits or '-', "
                         "starting and ending with a letter or digit, like 'my-agent'")
    return v


def _entrypoint(v: str) -> str:
    if not _ENTRYPOINT.fullmatch(v):
        raise ValueError("expected an entrypoint like 'package.module:ClassName'")
    return v


def _subject_filter(v: str) -> str:
    from corral.core.subjects import validate_filter

    try:
        validate_filter(v)
    except ValueError as exc:
        raise ValueError(f"expected a subject filter like 'news.*' or 'news.>': {exc}") from None
    return v


def _subscription(v: Any) -> Any:
    # `subscriptions: [news.*]` is shorthand for `[{subject: news.*}]`.
    return {"subject": v} if isinstance(v, str) else v


def _tool_name(v: str) -> str:
    if not _TOOL_NAME.fullmatch(v):
        raise ValueError("expected a tool name of 1-63 letters, digits, '_', '.' or '-', "
                         "like 'time'")
    return v


def _cron(v: str) -> str:
    try:
        ok = len(v.split()) in (5, 6) and bool(croniter.is_valid(v))
    except Exception:
        ok = False
    if not ok:
        raise ValueError("expected a cron expression like '*/5 * * * *' (5 fields, or 6 with "
                         "seconds last)")
    return v


DnsLabel = Annotated[str, AfterValidator(_dns_label)]


class _Model(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid",
                              frozen=True)


# -- parts of a spec -----------------------------------------------------------------------


class Metadata(_Model):
    """Who the manifest is: a name unique in its namespace, plus labels and annotations."""

    name: DnsLabel
    namespace: DnsLabel = "default"
    labels: dict[str, str] = {}
    annotations: dict[str, str] = {}


class Backoff(_Model):
    """Delay between restarts: initial * multiplier**n, capped at max, with +-jitter."""

    initial: Annotated[Duration, Field(ge=0)] = 0.1
    max: Annotated[Duration, Field(gt=0)] = 30.0
    multiplier: Annotated[Float, Field(ge=1)] = 2.0
    jitter: Annotated[Float, Field(ge=0, le=1)] = 0.2
    reset_after: Annotated[Duration, Field(ge=0)] = 30.0

    @model_validator(mode="after")
    def _max_not_below_initial(self) -> Self:
        if self.max < self.initial:
            raise FieldProblem("backoff max is shorter than backoff initial", field="max",
                               expected=f"at least initial ({format_duration(self.initial)})",
                               got=self.max)
        return self


class Restart(_Model):
    """How the supervisor restarts the agent (Erlang/OTP style).

    Agents of one namespace that share ``group`` are supervised together and must use
    the same ``strategy``; with no group, the agent's own replicas form the group.
    """

    policy: Literal["always", "on-failure", "never"] = "on-failure"
    strategy: Literal["one_for_one", "one_for_all", "rest_for_one"] = "one_for_one"
    group: NonEmptyStr | None = None
    max_restarts: Annotated[Int, Field(ge=0)] = 5
    window: Annotated[Duration, Field(gt=0)] = 60.0
    backoff: Backoff = Field(default_factory=Backoff)


class Resources(_Model):
    """Limits for one instance; None means no limit."""

    memory: Annotated[Memory, Field(gt=0)] | None = None
    cpu: Cpu | None = None
    cpu_time: Annotated[Duration, Field(gt=0)] | None = None
    max_open_files: Annotated[Int, Field(ge=16)] | None = None
    max_processes: Annotated[Int, Field(ge=1)] | None = None
    task_timeout: Annotated[Duration, Field(gt=0)] = 300.0
    idle_timeout: Annotated[Duration, Field(gt=0)] | None = None
    max_tool_calls_per_task: Annotated[Int, Field(ge=0)] | None = None


class Health(_Model):
    """Heartbeats: the runtime expects one every interval and gives up after timeout."""

    heartbeat_interval: Annotated[Duration, Field(gt=0)] = 1.0
    heartbeat_timeout: Duration = 5.0
    start_timeout: Annotated[Duration, Field(gt=0)] = 30.0

    @model_validator(mode="after")
    def _timeout_after_interval(self) -> Self:
        if self.heartbeat_timeout <= self.heartbeat_interval:
            interval = format_duration(self.heartbeat_interval)
            raise FieldProblem("heartbeatTimeout must be longer than heartbeatInterval",
                               field="heartbeatTimeout",
                               expected=f"a duration longer than {interval}",
                               got=self.heartbeat_timeout)
        return self


class ScheduleSpec(_Model):
    """When a scheduled agent runs: a cron expression, the handler and its payload."""

    cron: Annotated[str, AfterValidator(_cron)]
    handler: NonEmptyStr = "run"
    payload: Any = None


class SubscriptionSpec(_Model):
    """A topic the agent listens to, and the handler that gets its messages."""

    subject: Annotated[str, AfterValidator(_subject_filter)]
    #: The handler for these messages ("" = the agent's default handler).
    handler: str = ""
    #: How long a delivery may stay unacknowledged before it is redelivered.
    ack_wait: Annotated[Duration, Field(gt=0)] = 30.0
    #: Encrypt every message published on matching subjects (AES-256-GCM, on the wire and
    #: at rest in the backend), whoever publishes it.
    encrypt: bool = False
    #: The delivery guarantee for this subscription, overriding each message's own
    #: (unset: the message's). At-least-once and effectively-once make every publish on
    #: matching subjects durable, so nothing is lost before this subscriber acks it.
    guarantee: Literal["at-most-once", "at-least-once", "effectively-once"] | None = None


class ToolSpec(_Model):
    """An MCP tool server: a local command (stdio) or a URL, exactly one of them."""

    name: Annotated[str, AfterValidator(_tool_name)]
    command: Annotated[list[str], Field(min_length=1)] | None = None
    args: list[str] = []
    env: dict[str, str] = {}
    cwd: str | None = None
    url: NonEmptyStr | None = None

    @model_validator(mode="after")
    def _one_transport(self) -> Self:
        if (self.command is None) == (self.url is None):
            raise FieldProblem("set exactly one of command or url",
                               field="url" if self.url is not None else "command",
                               expected="a command like [python, -m, server] or a url, not both")
        return self


class AgentSpec(_Model):
    """What runs, how it is isolated, scheduled, limited, supervised and wired."""

    entrypoint: Annotated[str, AfterValidator(_entrypoint)] | None = None
    command: Annotated[list[str], Field(min_length=1)] | None = None
    python_path: list[str] = []
    workdir: str | None = None
    env: dict[str, str] = {}
    mode: Literal["persistent", "ephemeral", "scheduled", "event-driven"] = "persistent"
    schedule: ScheduleSpec | None = None
    isolation: Literal["inproc", "process", "namespace", "gvisor"] = "process"
    priority: Literal["critical", "high", "normal", "low", "background"] = "normal"
    replicas: Annotated[Int, Field(ge=0, le=10_000)] = 1
    concurrency: Annotated[Int, Field(ge=1, le=10_000)] = 16
    mailbox: Annotated[Int, Field(ge=1, le=1_000_000)] = 10_000
    resources: Resources = Field(default_factory=Resources)
    restart: Restart = Field(default_factory=Restart)
    health: Health = Field(default_factory=Health)
    subscriptions: list[Annotated[SubscriptionSpec, BeforeValidator(_subscription)]] = []
    #: AES-256-GCM for everything to and from this agent: its durable direct messages and
    #: their results at rest, its subscriptions' topics, and whatever it publishes.
    encrypt: bool = False
    tools: list[ToolSpec] = []
    config: dict[str, Any] = {}

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if (self.entrypoint is None) == (self.command is None):
            raise FieldProblem("set exactly one of spec.entrypoint or spec.command",
                               expected="an entrypoint like 'pkg.module:Class' or a command "
                                        "like [node, agent.js], not both")
        if self.mode == "scheduled" and self.schedule is None:
            raise FieldProblem("mode 'scheduled' needs spec.schedule", field="schedule",
                               expected="a schedule like {cron: '*/5 * * * *'}")
        if self.mode != "scheduled" and self.schedule is not None:
            raise FieldProblem(f"spec.schedule is set but mode is {self.mode!r}", field="mode",
                               expected="'scheduled', or remove spec.schedule", got=self.mode)
        if self.isolation == "inproc" and self.command is not None:
            raise FieldProblem("isolation 'inproc' loads Python into the runtime and needs "
                               "spec.entrypoint, not spec.command", field="isolation",
                               expected="'process', 'namespace' or 'gvisor' for a command",
                               got=self.isolation)
        seen: set[str] = set()
        for i, tool in enumerate(self.tools):
            if tool.name in seen:
                raise FieldProblem(f"duplicate tool name {tool.name!r}", field=f"tools[{i}].name",
                                   expected="tool names unique within the agent", got=tool.name)
            seen.add(tool.name)
        return self


# -- manifests -----------------------------------------------------------------------------


class Manifest(_Model):
    """Common shape of every kind: apiVersion, kind, metadata (and a kind-specific spec).

    ``source`` (e.g. "examples/hello/agent.yaml#1") and ``base_dir`` (the file's folder,
    absolute) are set by the loader via :meth:`with_origin` and are never serialized.
    """

    api_version: Literal["corral/v1"]
    kind: str
    metadata: Metadata

    _source: str = PrivateAttr(default="")
    _base_dir: str = PrivateAttr(default=".")

    @property
    def source(self) -> str:
        """Where the manifest came from, like "dir/agent.yaml#2"; "" if unknown."""
        return self._source

    @property
    def base_dir(self) -> str:
        """Absolute folder of the manifest's file; relative paths in the spec start here."""
        return self._base_dir

    @property
    def name(self) -> str:
        """metadata.name."""
        return self.metadata.name

    @property
    def namespace(self) -> str:
        """metadata.namespace."""
        return self.metadata.namespace

    @property
    def key(self) -> str:
        """"namespace/name", unique per kind."""
        return f"{self.metadata.namespace}/{self.metadata.name}"

    def with_origin(self, source: str, base_dir: str) -> Self:
        """A copy that remembers where it was loaded from."""
        copy = self.model_copy()
        copy._source = source
        copy._base_dir = base_dir
        return copy

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict with camelCase keys; from_dict() reads it back."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=False)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Self:
        """Validate a dict (e.g. from to_dict()); raises pydantic.ValidationError."""
        return cls.model_validate(d)


class AgentManifest(Manifest):
    """``kind: Agent``: one supervised agent and its replicas."""

    kind: Literal["Agent"]
    spec: AgentSpec


#: Manifest classes by ``kind``; later kinds (Policy, Twin) are added here.
KINDS: dict[str, type[Manifest]] = {"Agent": AgentManifest}
