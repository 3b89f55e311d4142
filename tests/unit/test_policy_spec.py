"""``kind: Policy`` manifests: the model, and turning manifests into policy sources."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from corral.errors import PolicyInvalid, SpecError
from corral.policy import PolicyEngine, agent, from_manifests, tool
from corral.spec import loader
from corral.spec.models import KINDS
from corral.spec.policy import PolicyManifest, PolicySpec

TEXT = '@id("no-tools") forbid (principal, action == Action::"tool.call", resource);'


def manifest(**spec: Any) -> dict[str, Any]:
    return {"apiVersion": "corral/v1", "kind": "Policy",
            "metadata": {"name": "no-tools", "namespace": "research"}, "spec": spec}


def test_inline_policy() -> None:
    m = PolicyManifest.from_dict(manifest(policy=TEXT))
    assert m.spec == PolicySpec(policy=TEXT) and m.spec.file is None
    assert (m.key, m.source_name, m.file_path) == ("research/no-tools",
                                                   "Policy/research/no-tools", None)
    assert PolicyManifest.from_dict(m.to_dict()) == m


def test_policy_file_is_relative_to_the_manifest(tmp_path: Path) -> None:
    m = PolicyManifest.from_dict(manifest(file="rules/tools.cedar")).with_origin(
        "deploy/policy.yaml#2", str(tmp_path))
    assert m.file_path == os.path.join(str(tmp_path), "rules/tools.cedar")
    assert m.source_name == os.path.join("deploy", "rules/tools.cedar")
    bare = PolicyManifest.from_dict(manifest(file="/etc/corral/tools.cedar"))
    assert bare.source_name == "/etc/corral/tools.cedar"


@pytest.mark.parametrize(("spec", "words"), [
    ({"policy": TEXT, "file": "x.cedar"}, ["exactly one of spec.policy or spec.file",
                                           "not both"]),
    ({}, ["exactly one of spec.policy or spec.file"]),
    ({"policy": "  \n"}, ["spec.policy is blank"]),
    ({"policy": ""}, ["at least 1 character"]),
    ({"text": TEXT}, ["Extra inputs are not permitted"]),
    ({"file": 3}, ["valid string"]),
])
def test_invalid_specs(spec: dict[str, Any], words: list[str]) -> None:
    with pytest.raises(ValidationError) as exc:
        PolicyManifest.from_dict(manifest(**spec))
    text = str(exc.value)
    for word in words:
        assert word in text


def test_kind_and_metadata_are_checked() -> None:
    with pytest.raises(ValidationError):
        PolicyManifest.from_dict({**manifest(policy=TEXT), "kind": "Agent"})
    with pytest.raises(ValidationError):
        PolicyManifest.from_dict({**manifest(policy=TEXT), "metadata": {"name": "No Tools"}})


def test_errors_through_the_loader(monkeypatch: pytest.MonkeyPatch) -> None:
    # What `corral apply` shows once the loader knows the kind (the lead wires it in).
    monkeypatch.setitem(KINDS, "Policy", PolicyManifest)
    doc = ("apiVersion: corral/v1\nkind: Policy\nmetadata: {name: p}\n"
           "spec: {policy: 'permit (principal, action, resource);', file: p.cedar}\n")
    with pytest.raises(SpecError) as exc:
        loader.load_text(doc, "policy.yaml")
    [problem] = exc.value.problems
    assert problem.file == "policy.yaml" and problem.path == "spec.file"
    assert "set exactly one of spec.policy or spec.file" in str(problem)
    [ok] = loader.load_text(doc.replace(", file: p.cedar", ""), "policy.yaml")
    assert isinstance(ok, PolicyManifest)


def test_manifests_become_sources_and_load(tmp_path: Path) -> None:
    (tmp_path / "rules").mkdir()
    (tmp_path / "rules" / "tools.cedar").write_text(
        "\n// trusted only\nforbid (principal, action == Action::\"tool.call\", resource)\n"
        "unless { principal.hasTag(\"tier\") && principal.getTag(\"tier\") == \"trusted\" };\n")
    inline = PolicyManifest.from_dict(manifest(policy="\n" + TEXT.replace("no-tools", "x") +
                                               "\npermit (principal, action, resource);"))
    from_file = PolicyManifest.from_dict(manifest(file="rules/tools.cedar")).with_origin(
        str(tmp_path / "policy.yaml"), str(tmp_path))
    sources = from_manifests([inline, from_file])
    assert [s.name for s in sources] == ["Policy/research/no-tools",
                                         str(tmp_path / "rules" / "tools.cedar")]
    engine = PolicyEngine(strict=True)
    engine.load(sources)
    assert [p.id for p in engine.policies()] == [
        "x", "Policy/research/no-tools:3", f"{tmp_path / 'rules' / 'tools.cedar'}:3"]
    d = engine.check(agent("a"), "tool.call", tool("clock", "now"))
    assert d.policies == ("x", f"{tmp_path / 'rules' / 'tools.cedar'}:3")


def test_unreadable_file_and_invalid_inline_policy(tmp_path: Path) -> None:
    missing = PolicyManifest.from_dict(manifest(file="nope.cedar")).with_origin(
        "policy.yaml", str(tmp_path))
    with pytest.raises(PolicyInvalid) as exc:
        from_manifests([missing])
    assert "relative to the manifest's folder" in exc.value.problems[0]["message"]
    bad = PolicyManifest.from_dict(manifest(policy="permit (principal, action, resource)\n"
                                                   "  when { principal.nam == \"x\" };"))
    with pytest.raises(PolicyInvalid) as exc:
        PolicyEngine().load(from_manifests([bad]))
    [problem] = exc.value.problems
    assert (problem["file"], problem["line"], problem["column"]) == (
        "Policy/research/no-tools", 2, 20)
