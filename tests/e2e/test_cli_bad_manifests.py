"""Any manifest text, however broken, gives `corral apply` a clear error and never a traceback."""

from __future__ import annotations

from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from corral.cli.main import app

VALID = {"apiVersion": "corral/v1", "kind": "Agent", "metadata": {"name": "a"},
         "spec": {"entrypoint": "m:C", "resources": {"memory": "256Mi"}}}

scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False),
                    st.text(max_size=12))
trees = st.recursive(scalars, lambda c: st.lists(c, max_size=4) |
                     st.dictionaries(st.text(max_size=10), c, max_size=4), max_leaves=20)


def mutate(draw: st.DrawFn) -> dict:
    doc = yaml.safe_load(yaml.safe_dump(VALID))
    section = draw(st.sampled_from(["top", "metadata", "spec", "resources"]))
    target = {"top": doc, "metadata": doc["metadata"], "spec": doc["spec"],
              "resources": doc["spec"]["resources"]}[section]
    key = draw(st.sampled_from([*target.keys(), "unknownField"]))
    if draw(st.booleans()) and key in target:
        del target[key]
    else:
        target[key] = draw(trees)
    return doc


@st.composite
def bad_texts(draw: st.DrawFn) -> str:
    kind = draw(st.sampled_from(["mutated", "tree", "text"]))
    if kind == "mutated":
        return yaml.safe_dump(mutate(draw))
    if kind == "tree":
        return yaml.safe_dump(draw(trees))
    return draw(st.text(max_size=200))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=bad_texts())
def test_bad_manifest_never_tracebacks(tmp_path: Path, text: str) -> None:
    f = tmp_path / "agent.yaml"
    f.write_text(text)
    # No runtime runs under this home: a manifest that is somehow valid is told so instead.
    res = CliRunner().invoke(app, ["apply", "-f", str(f), "--home", str(tmp_path / "nohome")])
    # An uncaught exception would land here (CliRunner catches it instead of printing it).
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    assert res.exit_code == 1, res.output
    assert "Traceback" not in res.output
    assert "error:" in res.output
    assert "agent.yaml" in res.output or "no runtime" in res.output.lower() or \
        "not running" in res.output.lower() or "corral up" in res.output
