"""The manifest loader: files, folders, multi-document YAML and every error shape."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from corral.errors import SpecError
from corral.spec import AgentManifest, load_paths, load_text, validate_set

HELLO = """\
apiVersion: corral/v1
kind: Agent
metadata: {name: hello}
spec:
  entrypoint: examples.hello:Hello
"""

FULL = """\
apiVersion: corral/v1
kind: Agent
metadata: {name: summarizer, namespace: research, labels: {team: nlp}}
spec:
  entrypoint: examples.summarizer:Summarizer
  mode: persistent
  isolation: process
  priority: normal
  replicas: 1
  resources: {memory: 256Mi, cpu: 0.5, maxOpenFiles: 256, maxProcesses: 32,
              taskTimeout: 300s, idleTimeout: 10m, maxToolCallsPerTask: 50}
  restart: {policy: on-failure, maxRestarts: 5, window: 60s,
            backoff: {initial: 100ms, max: 30s, jitter: 0.2}}
  subscriptions: [news.*]
  tools: [{name: time, command: [python, -m, mcp_server_time]}]
"""


def agent(name: str, namespace: str = "default", **extra: str) -> str:
    lines = [f"apiVersion: corral/v1\nkind: Agent\nmetadata: {{name: {name}, "
             f"namespace: {namespace}}}\nspec:\n  entrypoint: examples.hello:Hello"]
    lines += [f"  {key}: {value}" for key, value in extra.items()]
    return "\n".join(lines) + "\n"


def problems_of(text: str | bytes, source: str = "m.yaml") -> list[SpecError]:
    with pytest.raises(SpecError) as exc:
        load_text(text, source)
    assert exc.value.problems, "the loader always lists its problems"
    assert source in str(exc.value)
    return exc.value.problems


def only_problem(text: str | bytes, source: str = "m.yaml") -> SpecError:
    problems = problems_of(text, source)
    assert len(problems) == 1, [p.describe() for p in problems]
    return problems[0]


# -- loading ---------------------------------------------------------------------------------


def test_design_example_loads() -> None:
    [m] = load_text(FULL, "design.yaml", base_dir="examples")
    assert isinstance(m, AgentManifest)
    assert m.key == "research/summarizer" and m.source == "design.yaml"
    assert m.base_dir == os.path.abspath("examples")
    assert m.spec.resources.memory == 256 * 1024**2
    assert m.spec.resources.idle_timeout == 600 and m.spec.restart.backoff.initial == 0.1
    assert m.spec.tools[0].command == ["python", "-m", "mcp_server_time"]


def test_multi_document_numbering_skips_empty_documents() -> None:
    text = "---\n" + agent("a") + "---\n---\n" + agent("b") + "---\n"
    ms = load_text(text, "many.yaml")
    assert [(m.name, m.source) for m in ms] == [("a", "many.yaml#1"), ("b", "many.yaml#3")]


def test_single_document_source_has_no_number() -> None:
    [m] = load_text("---\n" + HELLO + "---\n", "one.yaml")
    assert m.source == "one.yaml"


def test_empty_text_gives_nothing() -> None:
    assert load_text("") == [] and load_text("# just a comment\n---\n") == []


def test_bytes_are_decoded() -> None:
    [m] = load_text(("\ufeff" + HELLO).encode())
    assert m.name == "hello" and m.source == "<stdin>"


def test_load_paths_files_and_folders(tmp_path: Path) -> None:
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "deep").mkdir()
    (tmp_path / ".hidden").mkdir()
    (tmp_path / "a.yaml").write_text(agent("a"))
    (tmp_path / "b" / "c.yml").write_text(agent("c") + "---\n" + agent("d"))
    (tmp_path / "b" / "deep" / "e.yaml").write_text(agent("e"))
    (tmp_path / "b" / "notes.txt").write_text("not yaml: [")
    (tmp_path / ".hidden" / "x.yaml").write_text("not: [valid")
    single = tmp_path / "single.yaml"
    single.write_text(agent("f"))
    ms = load_paths([tmp_path / "b", str(single)])
    assert [m.name for m in ms] == ["c", "d", "e", "f"]
    assert ms[0].source == str(tmp_path / "b" / "c.yml") + "#1"
    assert ms[2].source == str(tmp_path / "b" / "deep" / "e.yaml")
    assert ms[2].base_dir == str(tmp_path / "b" / "deep")
    assert [m.name for m in load_paths([tmp_path / "a.yaml"])] == ["a"]


def test_load_paths_counts_a_file_once(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(agent("a"))
    assert len(load_paths([tmp_path, tmp_path / "a.yaml", str(tmp_path / "a.yaml")])) == 1


def test_load_paths_relative_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "agent.yaml").write_text(HELLO)
    monkeypatch.chdir(tmp_path)
    [m] = load_paths(["x/agent.yaml"])
    assert m.source == "x/agent.yaml" and m.base_dir == str(tmp_path / "x")


# -- error shapes ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "path", "got", "expected"),
    [
        (agent("a", replicas="-1"), "spec.replicas", -1, "at least 0"),
        (agent("a", replicas="lots"), "spec.replicas", "lots", "an integer"),
        (agent("a", mode="forever"), "spec.mode", "forever", "one of 'persistent'"),
        (agent("a", resources="{memory: 12Qi}"), "spec.resources.memory", "12Qi",
         "a memory quantity like 256Mi or 1Gi"),
        (agent("a", resources="{cpu: 0}"), "spec.resources.cpu", 0, "a CPU quantity greater than 0"),
        (agent("a", resources="{taskTimeout: soon}"), "spec.resources.taskTimeout", "soon",
         "a duration like 300s"),
        (agent("a", tools="[{name: t, command: []}]"), "spec.tools[0].command", [],
         "at least 1 item"),
        (agent("a", env="{PORT: 8080}"), "spec.env.PORT", 8080, "a string"),
        (agent("a", env="{a.b: 1}"), "spec.env['a.b']", 1, "a string"),
        (agent("a", restart="{backoff: {jitter: 2}}"), "spec.restart.backoff.jitter", 2,
         "at most 1"),
        (agent("a", health="{heartbeatInterval: 5s, heartbeatTimeout: 1s}"),
         "spec.health.heartbeatTimeout", 1.0, "a duration longer than 5s"),
        (agent("a", schedule="{cron: '* * *'}", mode="scheduled"), "spec.schedule.cron",
         "* * *", "a cron expression like '*/5 * * * *'"),
        (agent("a", mode="scheduled"), "spec.schedule", None, "a schedule like"),
        (agent("a", command="[node, a.js]"), "spec", None, "an entrypoint like"),
        (agent("Bad_Name"), "metadata.name", "Bad_Name", "a DNS-1123 label"),
        (agent("a", replcas="3"), "spec.replcas", 3, "one of: entrypoint, command"),
        (agent("a", tools="[{name: t, url: 'http://x', command: [a]}]"), "spec.tools[0].url",
         None, "a command like"),
        (HELLO.replace("corral/v1", "corral/v2"), "apiVersion", "corral/v2", "'corral/v1'"),
        (HELLO.replace("kind: Agent\n", "kind: Agent\nkind2: x\n"), "kind2", "x",
         "one of: apiVersion, kind, metadata, spec"),
        (HELLO.replace("metadata: {name: hello}\n", ""), "metadata", None,
         "a mapping with name"),
        (HELLO.replace("metadata: {name: hello}", "metadata: {namespace: x}"),
         "metadata.name", None, "a string"),
        (HELLO.replace("metadata: {name: hello}", "metadata: [hello]"), "metadata",
         ["hello"], "a mapping"),
        (HELLO.replace("kind: Agent", "kind: Foo"), "kind", "Foo", "one of: Agent, Policy"),
        (HELLO.replace("kind: Agent\n", ""), "kind", None, "one of: Agent, Policy"),
    ],
)
def test_error_shapes(text: str, path: str, got: Any, expected: str) -> None:
    problem = only_problem(text)
    assert problem.file == "m.yaml"
    assert problem.path == path
    assert problem.got == got
    assert problem.expected is not None and problem.expected.startswith(expected), problem
    line = problem.describe()
    assert line.startswith(f"m.yaml: {path}: ") and problem.expected in line


def test_unknown_field_suggests_the_closest_name() -> None:
    problem = only_problem(agent("a", replcas="3"))
    assert "unknown field 'replcas'" in problem.message
    assert "did you mean 'replicas'?" in problem.message
    problem = only_problem(agent("a", resources="{memroy: 1Gi}"))
    assert problem.path == "spec.resources.memroy" and "did you mean 'memory'?" in problem.message


def test_unknown_kind_message() -> None:
    problem = only_problem(HELLO.replace("kind: Agent", "kind: Foo"))
    assert "kind 'Foo' is not supported; expected one of: Agent, Policy" in problem.describe()


def test_missing_api_version_and_kind() -> None:
    problems = problems_of("metadata: {name: a}\nspec: {}\n")
    assert [(p.path, p.expected) for p in problems] == [("apiVersion", "'corral/v1'"),
                                                         ("kind", "one of: Agent, Policy")]


@pytest.mark.parametrize("doc", ["- a\n- b\n", "just a string\n", "42\n"])
def test_document_not_a_mapping(doc: str) -> None:
    problem = only_problem(doc)
    assert problem.message == "a manifest must be a mapping"
    assert problem.expected == "a mapping with apiVersion, kind, metadata and spec"
    assert problem.got == yaml.safe_load(doc)


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("apiVersion: corral/v1\nkind: Agent\nmetadata: {name: a\n", "line 4, column 1"),
        ("a: 1\n  b: 2\n", "line 2, column 4"),
        ("a: [1, 2\n", "line 2, column 1"),
        ("a: 1\nb: @x\n", "line 2, column 4"),
        ("a: 1\na: 2\n", "line 2, column 1"),
        ("a: b\x00\n", "line 1, column 5"),
        ("a: !!python/object:os.system {}\n", "line 1, column 4"),
    ],
)
def test_yaml_errors_name_line_and_column(text: str, where: str) -> None:
    problem = only_problem(text)
    assert problem.file == "m.yaml" and problem.expected == "valid YAML"
    assert problem.message.startswith(where + ": "), problem.message


def test_duplicate_key_is_named() -> None:
    problem = only_problem(HELLO + "  replicas: 1\n  replicas: 2\n")
    assert "duplicate key 'replicas'" in problem.message


def test_invalid_utf8() -> None:
    problem = only_problem(b"apiVersion: corral/v1\n\xff\xfe")
    assert problem.message == "not valid UTF-8 at byte 22" and problem.expected == "UTF-8 text"


@pytest.mark.parametrize(
    ("snippet", "path", "message"),
    [
        ("config: {when: 2024-01-01}", "spec.config.when", "unsupported YAML value of type date"),
        ("config: {blob: !!binary aGk=}", "spec.config.blob", "unsupported YAML value"),
        ("config: {s: !!set {a, b}}", "spec.config.s", "unsupported YAML value"),
        ("config: {x: .nan}", "spec.config.x", "not a finite number"),
        ("config: {1: a}", "spec.config", "mapping key is not a string"),
        ("config: {on: a}", "spec.config", "mapping key is not a string"),
    ],
)
def test_values_json_cannot_hold(snippet: str, path: str, message: str) -> None:
    problem = only_problem(HELLO + "  " + snippet + "\n")
    assert (problem.path, problem.file) == (path, "m.yaml")
    assert problem.message.startswith(message) and problem.expected


def test_alias_bomb_is_refused() -> None:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]
    text = HELLO + "  config:\n" + "\n".join("    " + line for line in lines) + "\n"
    problem = only_problem(text)
    assert problem.message == "document is too large"


def test_recursive_yaml_is_refused() -> None:
    assert only_problem(HELLO + "  config: &c {self: *c}\n").message == "nested too deeply"


def test_deep_nesting_is_refused() -> None:
    assert "nested too deeply" in only_problem("[" * 5000 + "]" * 5000).message
    assert "nested too deeply" in only_problem(HELLO + "  config: " + "[" * 300 + "]" * 300).message


def test_huge_numbers() -> None:
    problem = only_problem(agent("a", replicas="0x" + "f" * 3000))
    assert problem.path == "spec.replicas" and "bit integer" in repr(problem.got)
    assert str(problem)
    problem = only_problem(agent("a", replicas="9" * 5000))
    assert "could not be read" in problem.message


def test_long_values_are_shortened_in_messages() -> None:
    problem = only_problem(agent("a", mode="x" * 10_000))
    assert len(problem.describe()) < 500


def test_not_text() -> None:
    problem = only_problem(12, "<stdin>")  # type: ignore[arg-type]
    assert problem.expected == "a str or bytes of YAML"


# -- nothing partial, everything collected -----------------------------------------------------


def test_one_bad_document_of_three_returns_nothing() -> None:
    text = agent("a") + "---\n" + agent("b", replicas="many") + "---\n" + agent("c")
    problems = problems_of(text, "three.yaml")
    assert [(p.file, p.path) for p in problems] == [("three.yaml#2", "spec.replicas")]


def test_problems_across_files_are_collected(tmp_path: Path) -> None:
    (tmp_path / "1.yaml").write_text(agent("a", replicas="-1"))
    (tmp_path / "2.yaml").write_text("a: [")
    (tmp_path / "3.yaml").write_text(agent("c"))
    missing = tmp_path / "missing.yaml"
    with pytest.raises(SpecError) as exc:
        load_paths([tmp_path, missing])
    files = [p.file for p in exc.value.problems]
    assert files == [str(tmp_path / "1.yaml"), str(tmp_path / "2.yaml"), str(missing)]
    assert exc.value.problems[2].message == "no such file or directory"
    text = str(exc.value)
    assert text.startswith("3 problem(s); nothing was applied:")
    assert all(f in text for f in files)


def test_bad_bytes_in_a_file(tmp_path: Path) -> None:
    path = tmp_path / "bin.yaml"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    with pytest.raises(SpecError) as exc:
        load_paths([path])
    assert exc.value.problems[0].file == str(path)


def test_duplicate_names_name_both_sources(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(agent("x"))
    (tmp_path / "b.yaml").write_text(agent("y") + "---\n" + agent("x"))
    with pytest.raises(SpecError) as exc:
        load_paths([tmp_path])
    [problem] = exc.value.problems
    assert problem.file == str(tmp_path / "b.yaml") + "#2"
    assert str(tmp_path / "a.yaml") in problem.message and "'default/x'" in problem.message
    assert problem.path == "metadata.name" and problem.got == "x"


def test_same_name_in_other_namespaces_is_fine() -> None:
    assert len(load_text(agent("x") + "---\n" + agent("x", namespace="other"))) == 2


def test_restart_group_needs_one_strategy() -> None:
    text = (agent("a", restart="{group: g, strategy: one_for_all}") + "---\n"
            + agent("b", restart="{group: g, strategy: one_for_all}") + "---\n"
            + agent("c", restart="{group: g}") + "---\n"
            + agent("d", namespace="other", restart="{group: g}"))
    [problem] = problems_of(text, "g.yaml")
    assert (problem.file, problem.path) == ("g.yaml#3", "spec.restart.strategy")
    assert problem.got == "one_for_one" and problem.expected is not None
    assert "'one_for_all'" in problem.expected and "g.yaml#1" in problem.message


def test_validate_set_on_loaded_manifests() -> None:
    ms = load_text(agent("a") + "---\n" + agent("b"), "s.yaml")
    assert validate_set(ms) == []
    [problem] = validate_set([*ms, ms[0].with_origin("t.yaml", "/")])
    assert problem.file == "t.yaml" and "s.yaml#1" in problem.message


# -- never anything but SpecError -------------------------------------------------------------

VALID: dict[str, Any] = yaml.safe_load(FULL)

scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False),
                    st.text(max_size=12), st.sampled_from(["256Mi", "10m", "corral/v1", "Agent",
                                                           "inproc", "a:B", "* * * * *"]))
trees = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=20,
)


def _expect_manifests_or_spec_error(text: str | bytes, source: str = "fuzz.yaml") -> None:
    try:
        result = load_text(text, source)
    except SpecError as exc:
        message = str(exc)
        assert message and source in message
        assert exc.problems and all(p.describe() for p in exc.problems)
        exc.to_dict()
    else:
        assert all(isinstance(m, AgentManifest) for m in result)
        for m in result:
            assert AgentManifest.from_dict(m.to_dict()).to_dict() == m.to_dict()


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(trees)
def test_random_trees(tree: Any) -> None:
    _expect_manifests_or_spec_error(yaml.safe_dump(tree))


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.text(max_size=200), st.binary(max_size=200)))
def test_random_text(text: str | bytes) -> None:
    _expect_manifests_or_spec_error(text)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(["apiVersion: corral/v1\n", "kind: Agent\n", "metadata:\n",
                                 "  name: a\n", "spec:\n", "  entrypoint: a:B\n", "---\n",
                                 "  - x\n", "&a ", "*a\n", "!!set ", "? ", "{", "}", "[", "]",
                                 ": ", "'", '"', "\t", "<<: *a\n", "!!binary x\n"]),
                max_size=30))
def test_random_yaml_fragments(parts: list[str]) -> None:
    _expect_manifests_or_spec_error("".join(parts))


def _paths(tree: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [prefix]
    if isinstance(tree, dict):
        for key, value in tree.items():
            found += _paths(value, (*prefix, key))
    elif isinstance(tree, list):
        for i, value in enumerate(tree):
            found += _paths(value, (*prefix, i))
    return found


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_random_mutations_of_a_valid_manifest(data: st.DataObject) -> None:
    doc = copy.deepcopy(VALID)
    for _ in range(data.draw(st.integers(min_value=1, max_value=3))):
        path = data.draw(st.sampled_from(_paths(doc)))
        parent: Any = doc
        for key in path[:-1]:
            parent = parent[key]
        op = data.draw(st.sampled_from(["drop", "retype", "unknown"]))
        if not path:
            doc = data.draw(trees)
            break
        if op == "drop":
            del parent[path[-1]]
        elif op == "retype":
            parent[path[-1]] = data.draw(trees)
        else:
            target = parent[path[-1]]
            if isinstance(target, dict):
                target[data.draw(st.text(min_size=1, max_size=8))] = data.draw(scalars)
        if not isinstance(doc, dict):
            break
    _expect_manifests_or_spec_error(yaml.safe_dump(doc))


def test_yaml_error_in_a_later_document_keeps_earlier_problems() -> None:
    text = agent("a", replicas="-1") + "---\n" + agent("b") + "---\nmetadata: {name: c\n"
    problems = problems_of(text, "late.yaml")
    assert [(p.file, p.path) for p in problems] == [("late.yaml#1", "spec.replicas"),
                                                    ("late.yaml", None)]
    assert problems[1].message.startswith("line 15, column 1: ")
