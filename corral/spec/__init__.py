"""Kubernetes-shaped YAML manifests: models, quantities and the loader."""

from corral.spec.loader import load_paths, load_text, validate_set
from corral.spec.models import (
    KINDS,
    AgentManifest,
    AgentSpec,
    Backoff,
    Cpu,
    Duration,
    FieldProblem,
    Health,
    Manifest,
    Memory,
    Metadata,
    Resources,
    Restart,
    ScheduleSpec,
    ToolSpec,
)
from corral.spec.policy import PolicyManifest, PolicySpec
from corral.spec.quantity import (
    format_duration,
    format_memory,
    parse_cpu,
    parse_duration,
    parse_memory,
)

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
    "PolicyManifest",
    "PolicySpec",
    "Resources",
    "Restart",
    "ScheduleSpec",
    "ToolSpec",
    "format_duration",
    "format_memory",
    "load_paths",
    "load_text",
    "parse_cpu",
    "parse_duration",
    "parse_memory",
    "validate_set",
]
