"""Shared fixtures: a runtime in a temporary home, and manifests built in code."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings

from corral.runtime.runtime import Runtime
from corral.spec.models import AgentManifest

# Timing deadlines make property tests flaky on a loaded 2-core machine; we test logic, not speed.
settings.register_profile("corral", deadline=None)
settings.load_profile("corral")

AGENTS = str(Path(__file__).parent / "agents")
REQUIRE_SERVICES = os.environ.get("CORRAL_REQUIRE_SERVICES") == "1"


def manifest(name: str, cls: str = "Echo", **spec: Any) -> AgentManifest:
    """An Agent manifest for a class in tests/agents/testagents.py."""
    body: dict[str, Any] = {"entrypoint": f"testagents:{cls}", "isolation": "process"}
    body.update(spec)
    return AgentManifest.model_validate({
        "apiVersion": "corral/v1", "kind": "Agent", "metadata": {"name": name}, "spec": body,
    }).with_origin(f"test:{name}", AGENTS)


@pytest.fixture
async def rt(tmp_path: Path) -> AsyncIterator[Runtime]:
    """A running runtime with its home in tmp_path."""
    async with Runtime(home=tmp_path / "home", shutdown_grace=2.0) as runtime:
        yield runtime
