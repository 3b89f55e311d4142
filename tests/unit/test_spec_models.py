"""The pydantic manifest models: defaults, aliases, rules, round trips."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from corral.spec.models import (
    KINDS,
    AgentManifest,
    AgentSpec,
    Backoff,
    FieldProblem,
    Health,
    Metadata,
    Resources,
    Restart,
    ScheduleSpec,
    ToolSpec,
)


def manifest(**spec: Any) -> dict[str, Any]:
    """A valid Agent manifest dict, with spec fields replaced by ``spec``."""
    body: dict[str, Any] = {"entrypoint": "examples.hello:Hello"}
    body.update(spec)
    body = {k: v for k, v in body.items() if v is not None}
    return {"apiVersion": "corral/v1", "kind": "Agent", "metadata": {"name": "hello"},
            "spec": body}


def errors(exc: pytest.ExceptionInfo[ValidationError]) -> list[tuple[tuple[Any, ...], str]]:
    return [(e["loc"], e["type"]) for e in exc.value.errors()]


def test_defaults() -> None:
    m = AgentManifest.from_dict(manifest())
    assert (m.name, m.namespace, m.key) == ("hello", "default", "default/hello")
    spec = m.spec
    assert spec.mode == "persistent" and spec.isolation == "process"
    assert spec.priority == "normal" and spec.replicas == 1
    assert spec.concurrency == 16 and spec.mailbox == 10_000
    assert spec.resources.task_timeout == 300 and spec.resources.memory is None
    assert spec.restart == Restart()
    assert spec.restart.backoff == Backoff(initial=0.1, max=30, multiplier=2.0, jitter=0.2,
                                           reset_after=30)
    assert spec.health == Health()
    assert spec.tools == [] and spec.config == {} and spec.python_path == []


def test_quantities_and_camel_case() -> None:
    m = AgentManifest.from_dict(manifest(
        resources={"memory": "256Mi", "cpu": "500m", "cpuTime": "1m", "maxOpenFiles": 256,
                   "maxProcesses": 32, "taskTimeout": "300s", "idleTimeout": "10m",
                   "maxToolCallsPerTask": 50},
        restart={"maxRestarts": 3, "window": "2m",
                 "backoff": {"initial": "100ms", "max": "30s", "resetAfter": "1h"}},
        health={"heartbeatInterval": "500ms", "heartbeatTimeout": "2s"},
        pythonPath=["src"]))
    r = m.spec.resources
    assert r == Resources(memory=256 * 1024**2, cpu=0.5, cpu_time=60, max_open_files=256,
                          max_processes=32, task_timeout=300, idle_timeout=600,
                          max_tool_calls_per_task=50)
    assert m.spec.restart.window == 120 and m.spec.restart.backoff.reset_after == 3600
    assert m.spec.health.heartbeat_interval == 0.5
    assert m.spec.python_path == ["src"]


def test_snake_case_names_also_accepted() -> None:
    spec = AgentSpec.model_validate({"entrypoint": "a:B", "python_path": ["x"]})
    assert spec.python_path == ["x"]


def test_frozen() -> None:
    m = AgentManifest.from_dict(manifest())
    with pytest.raises(ValidationError):
        m.spec.replicas = 3  # type: ignore[misc]


def test_round_trip_and_origin() -> None:
    m = AgentManifest.from_dict(manifest(
        entrypoint=None, command=["node", "agent.js"], mode="scheduled",
        schedule={"cron": "*/5 * * * *", "payload": {"x": [1, 2]}},
        tools=[{"name": "time", "command": ["python", "-m", "t"]},
               {"name": "web", "url": "http://localhost:1234/mcp"}],
        config={"model": "small", "n": 3}, resources={"memory": "1Gi"}))
    m = m.with_origin("dir/agent.yaml#2", "/abs/dir")
    assert (m.source, m.base_dir) == ("dir/agent.yaml#2", "/abs/dir")
    d = m.to_dict()
    assert set(d) == {"apiVersion", "kind", "metadata", "spec"}
    assert "/abs/dir" not in str(d) and "agent.yaml" not in str(d)
    assert d["spec"]["resources"]["memory"] == 1024**3
    assert d["apiVersion"] == "corral/v1" and "maxRestarts" in d["spec"]["restart"]
    back = AgentManifest.from_dict(d)
    assert back.to_dict() == d
    assert back.source == "" and back.with_origin(m.source, m.base_dir) == m


def test_with_origin_leaves_the_original_alone() -> None:
    m = AgentManifest.from_dict(manifest())
    m2 = m.with_origin("a.yaml", "/x")
    assert (m.source, m.base_dir) == ("", ".")
    assert (m2.source, m2.base_dir) == ("a.yaml", "/x")
    assert m2.to_dict() == m.to_dict()


def test_kinds() -> None:
    import corral.spec.loader  # noqa: F401  (registers kind: Policy)
    from corral.spec.policy import PolicyManifest

    assert list(KINDS) == ["Agent", "Policy"] and KINDS["Agent"] is AgentManifest
    assert KINDS["Policy"] is PolicyManifest


@pytest.mark.parametrize("name", ["a", "my-agent", "a1", "1a", "x" * 63])
def test_dns_names_accepted(name: str) -> None:
    assert Metadata(name=name, namespace=name).name == name


@pytest.mark.parametrize("name", ["", "-a", "a-", "A", "my_agent", "a.b", "x" * 64, "é"])
def test_dns_names_rejected(name: str) -> None:
    with pytest.raises(ValidationError, match="DNS-1123"):
        Metadata(name=name)


@pytest.mark.parametrize(
    ("spec", "loc", "kind"),
    [
        ({"replicas": -1}, ("spec", "replicas"), "greater_than_equal"),
        ({"replicas": 10_001}, ("spec", "replicas"), "less_than_equal"),
        ({"replicas": True}, ("spec", "replicas"), "int_type"),
        ({"replicas": "3"}, ("spec", "replicas"), "int_type"),
        ({"concurrency": 0}, ("spec", "concurrency"), "greater_than_equal"),
        ({"mailbox": 1_000_001}, ("spec", "mailbox"), "less_than_equal"),
        ({"mode": "forever"}, ("spec", "mode"), "literal_error"),
        ({"isolation": "vm"}, ("spec", "isolation"), "literal_error"),
        ({"priority": "urgent"}, ("spec", "priority"), "literal_error"),
        ({"entrypoint": "not an entrypoint"}, ("spec", "entrypoint"), "value_error"),
        ({"entrypoint": "pkg.mod"}, ("spec", "entrypoint"), "value_error"),
        ({"replcas": 2}, ("spec", "replcas"), "extra_forbidden"),
        ({"resources": {"memory": "lots"}}, ("spec", "resources", "memory"), "value_error"),
        ({"resources": {"memory": 0}}, ("spec", "resources", "memory"), "greater_than"),
        ({"resources": {"cpu": 0}}, ("spec", "resources", "cpu"), "value_error"),
        ({"resources": {"maxOpenFiles": 8}}, ("spec", "resources", "maxOpenFiles"),
         "greater_than_equal"),
        ({"resources": {"maxProcesses": 0}}, ("spec", "resources", "maxProcesses"),
         "greater_than_equal"),
        ({"resources": {"taskTimeout": "0s"}}, ("spec", "resources", "taskTimeout"),
         "greater_than"),
        ({"restart": {"policy": "sometimes"}}, ("spec", "restart", "policy"), "literal_error"),
        ({"restart": {"strategy": "all"}}, ("spec", "restart", "strategy"), "literal_error"),
        ({"restart": {"maxRestarts": -1}}, ("spec", "restart", "maxRestarts"),
         "greater_than_equal"),
        ({"restart": {"backoff": {"multiplier": 0.5}}},
         ("spec", "restart", "backoff", "multiplier"), "greater_than_equal"),
        ({"restart": {"backoff": {"jitter": 1.5}}}, ("spec", "restart", "backoff", "jitter"),
         "less_than_equal"),
        ({"health": {"heartbeatInterval": 0}}, ("spec", "health", "heartbeatInterval"),
         "greater_than"),
        ({"tools": [{"name": "t"}]}, ("spec", "tools", 0), "value_error"),
        ({"tools": [{"name": "t", "command": []}]}, ("spec", "tools", 0, "command"),
         "too_short"),
        ({"env": {"PORT": 8080}}, ("spec", "env", "PORT"), "string_type"),
        ({"subscriptions": [""]}, ("spec", "subscriptions", 0, "subject"), "value_error"),
    ],
)
def test_field_rules(spec: dict[str, Any], loc: tuple[Any, ...], kind: str) -> None:
    with pytest.raises(ValidationError) as exc:
        AgentManifest.from_dict(manifest(**spec))
    assert (loc, kind) in errors(exc)


def _field_problem(exc: pytest.ExceptionInfo[ValidationError]) -> FieldProblem:
    error = exc.value.errors()[0]["ctx"]["error"]
    assert isinstance(error, FieldProblem)
    return error


@pytest.mark.parametrize(
    ("spec", "field", "text"),
    [
        ({"entrypoint": None}, None, "set exactly one of spec.entrypoint or spec.command"),
        ({"command": ["node", "a.js"]}, None, "set exactly one of spec.entrypoint or spec.command"),
        ({"mode": "scheduled"}, "schedule", "needs spec.schedule"),
        ({"schedule": {"cron": "* * * * *"}}, "mode", "mode is 'persistent'"),
        ({"entrypoint": None, "command": ["x"], "isolation": "inproc"}, "isolation",
         "needs spec.entrypoint"),
        ({"tools": [{"name": "t", "url": "http://x"}, {"name": "t", "url": "http://y"}]},
         "tools[1].name", "duplicate tool name"),
    ],
)
def test_cross_field_rules(spec: dict[str, Any], field: str | None, text: str) -> None:
    with pytest.raises(ValidationError) as exc:
        AgentManifest.from_dict(manifest(**spec))
    problem = _field_problem(exc)
    assert problem.field == field and text in str(problem)


def test_health_timeout_must_exceed_interval() -> None:
    with pytest.raises(ValidationError) as exc:
        Health.model_validate({"heartbeatInterval": "5s", "heartbeatTimeout": "5s"})
    problem = _field_problem(exc)
    assert problem.field == "heartbeatTimeout" and problem.expected is not None
    assert "5s" in problem.expected


def test_backoff_max_not_below_initial() -> None:
    with pytest.raises(ValidationError) as exc:
        Backoff.model_validate({"initial": "10s", "max": "1s"})
    assert _field_problem(exc).field == "max"


def test_tool_needs_exactly_one_transport() -> None:
    assert ToolSpec.model_validate({"name": "t", "url": "http://x"}).url == "http://x"
    with pytest.raises(ValidationError):
        ToolSpec.model_validate({"name": "t", "url": "http://x", "command": ["a"]})


@pytest.mark.parametrize("cron", ["*/5 * * * *", "0 3 * * 1-5", "15 2 1 * *", "* * * * * */10"])
def test_cron_accepted(cron: str) -> None:
    assert ScheduleSpec(cron=cron).handler == "run"


@pytest.mark.parametrize("cron", ["", "every minute", "* * * *", "* * * * * * *", "61 * * * *"])
def test_cron_rejected(cron: str) -> None:
    with pytest.raises(ValidationError, match="cron expression like"):
        ScheduleSpec(cron=cron)


def test_kind_and_api_version_are_checked() -> None:
    d = manifest()
    d["apiVersion"] = "v1"
    with pytest.raises(ValidationError):
        AgentManifest.from_dict(d)
    d = manifest()
    d["kind"] = "Policy"
    with pytest.raises(ValidationError):
        AgentManifest.from_dict(d)
