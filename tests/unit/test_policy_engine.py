"""The Cedar policy engine: validation with positions, every action, reload, cache, denial."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cedarpy
import pytest

from corral.errors import PolicyDenied, PolicyInvalid
from corral.policy import (
    ACTIONS,
    APPLIES_TO,
    DEFAULT_ALLOW_ID,
    Entity,
    PolicyEngine,
    PolicySource,
    agent,
    compile_policies,
    namespace,
    read_paths,
    tool,
    topic,
    user,
)

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "policies"


def engine(text: str, *, strict: bool = True, name: str = "p.cedar") -> PolicyEngine:
    e = PolicyEngine(strict=strict)
    e.load([PolicySource(name, text)])
    return e


def problems(text: str, name: str = "p.cedar") -> list[dict[str, Any]]:
    with pytest.raises(PolicyInvalid) as exc:
        engine(text, name=name)
    return exc.value.problems


def request_for(action: str, ns: str = "research") -> tuple[Entity, Entity, dict[str, int]]:
    """A principal, resource and context that fit the schema for ``action``."""
    principal = agent("alice", namespace=ns)
    kind = APPLIES_TO[action][1][0]
    resource = {"Agent": agent("bob", namespace=ns), "Topic": topic("news", namespace=ns),
                "Tool": tool("clock", "now", namespace=ns), "Namespace": namespace(ns)}[kind]
    context = {"resource.allocate": {"memoryBytes": 1 << 20}}.get(action, {})
    if action in ("message.send", "agent.request", "topic.publish"):
        context = {"payloadSize": 100}
    return principal, resource, context


# -- validation errors carry file, line and column -----------------------------------------


@pytest.mark.parametrize(("text", "line", "column", "words"), [
    # a typo in an attribute name: the column of the attribute, and a suggestion
    ('// header\npermit (principal, action, resource)\n  when { principal.namespac == "x" };\n',
     3, 20, ["namespac", "did you mean 'namespace'"]),
    # an unknown action
    ('@id("a")\npermit (principal, action == Action::"topic.pub", resource);\n',
     2, 30, ['Action::"topic.pub"', "did you mean 'topic.publish'"]),
    # a syntax error: the column of the bad token
    ('permit (principal, action, resource);\n\npermit (principal, action, resource)\n'
     '  when { principal.name == };\n', 4, 28, ["syntax error", "unexpected token `}`"]),
    # an error Cedar only finds once the policy is read: the token it names
    ('permit (principal, acton, resource);', 1, 20, ["acton"]),
    # a missing ";": just past the last token
    ('permit (principal, action, resource)\n', 1, 37, ["unexpected end of input", "`;`"]),
    # an unguarded tag: the tag's literal
    ('permit (principal, action, resource) when { principal.getTag("tier") == "x" };',
     1, 62, ['"tier"', "hasTag"]),
    # an optional context field read without `has`
    ('permit (principal, action == Action::"resource.allocate", resource)\n'
     '  when { context.cpuMillis > 500 };', 2, 18, ["cpuMillis", "context has"]),
    # a broken annotation is a syntax error, not an empty @id
    ('@id("a" permit (principal, action, resource);', 1, 9, ["unexpected token `permit`"]),
    # an unterminated string
    ('permit (principal, action, resource) when { principal.name == "abc };', 1, 63,
     ["invalid token"]),
])
def test_problem_has_file_line_column(text: str, line: int, column: int,
                                      words: list[str]) -> None:
    [p] = problems(text, "rules/p.cedar")
    assert (p["file"], p["line"], p["column"]) == ("rules/p.cedar", line, column)
    for word in words:
        assert word in p["message"]


def test_every_problem_of_every_file_is_reported_at_once() -> None:
    e = PolicyEngine(strict=True)
    with pytest.raises(PolicyInvalid) as exc:
        e.load([
            PolicySource("a.cedar", 'permit (principal, action, resource) when { resource.x };'),
            PolicySource("b.cedar", 'permit (principal, action, resource);\nforbid (principal);'),
            PolicySource("c.cedar", 'permit (principal is Agnt, action, resource);'),
        ])
    found = {(p["file"], p["line"]) for p in exc.value.problems}
    assert found == {("a.cedar", 1), ("b.cedar", 2), ("c.cedar", 1)}
    text = str(exc.value)
    assert "3 problem(s) in a.cedar, b.cedar, c.cedar" in text
    assert "b.cedar:2:" in text and "policies in force are unchanged" in text
    assert "did you mean 'Agent'" in text
    assert exc.value.to_dict()["problems"] == exc.value.problems


def test_duplicate_ids_empty_ids_and_templates_are_refused() -> None:
    found = problems('@id("x") permit (principal, action, resource);\n'
                     '@id("x") forbid (principal, action, resource);\n'
                     '@id("") permit (principal, action, resource);\n'
                     'permit (principal == ?principal, action, resource);\n')
    messages = [(p["line"], p["message"]) for p in found]
    assert messages[0][0] == 2 and "duplicate policy id 'x'" in messages[0][1]
    assert "p.cedar:1" in messages[0][1]
    assert messages[1][0] == 3 and "@id is empty" in messages[1][1]
    assert messages[2][0] == 4 and "templates" in messages[2][1]


def test_policy_ids_lines_and_text() -> None:
    e = engine('// leading comment\n\n@id("first")\n@note("x")\npermit (principal, action, '
               'resource);\n  forbid (principal, action == Action::"tool.call", resource);\n'
               '@id("quote\\"d") permit (principal, action, resource);',
               name="dir/p.cedar", strict=False)
    infos = e.policies()
    assert [(i.id, i.line, i.column, i.effect) for i in infos] == [
        ("first", 3, 1, "permit"), ("dir/p.cedar:6", 6, 3, "forbid"),
        ('quote"d', 7, 1, "permit"), (DEFAULT_ALLOW_ID, 0, 0, "permit")]
    assert infos[1].text == 'forbid (principal, action == Action::"tool.call", resource);'
    assert infos[0].source == "dir/p.cedar" and infos[0].text.startswith('@id("first")')
    p, r, c = request_for("memory.read")
    d = e.check(p, "memory.read", r, c)
    assert set(d.policies) == {"first", 'quote"d', DEFAULT_ALLOW_ID}


def test_semicolons_in_strings_and_comments_do_not_split_policies() -> None:
    e = engine('// a comment; with a semicolon\n'
               '@id("a;b") permit (principal, action, resource)\n'
               '  when { principal.name != "x;y" }; // a trailing; comment\n'
               '@id("c") forbid (principal, action, resource) when { principal.name == "m\\";" };')
    assert [(p.id, p.line) for p in e.policies()] == [("a;b", 2), ("c", 4)]
    odd = agent('m";')
    assert e.check(odd, "memory.read", odd).policies == ("c",)
    assert e.check(agent("x"), "memory.read", odd).policies == ("a;b",)


def test_ids_agree_with_cedars_own_reading() -> None:
    text = ('@id("caf\\u{e9}\\n") @note("x;y") permit (principal, action, resource);\n'
            '// @id("not-me"); forbid (principal, action, resource);\n'
            'permit (principal, action, resource) when { "@id(\\"z\\");" != "" };\n')
    compiled = compile_policies([PolicySource("p.cedar", text)], strict=True)
    assert dict(compiled.ids) == {"policy0": "café\n", "policy1": "p.cedar:3"}
    pst = compiled.policy_set.to_pst()
    assert pst.static_policies["policy0"].annotations["id"] == "café\n"
    assert "id" not in pst.static_policies["policy1"].annotations


# -- a matrix over every action ------------------------------------------------------------


def test_schema_lists_the_domain() -> None:
    assert set(ACTIONS) == {"agent.create", "agent.terminate", "message.send", "topic.publish",
                            "topic.subscribe", "agent.request", "tool.call",
                            "resource.allocate", "memory.read", "memory.write"}
    assert {t for p, _ in APPLIES_TO.values() for t in p} == {"Agent", "User", "Namespace"}
    assert {t for _, r in APPLIES_TO.values() for t in r} == {"Agent", "Topic", "Tool",
                                                              "Namespace"}


@pytest.mark.parametrize("action", ACTIONS)
def test_action_matrix(action: str) -> None:
    principal, resource, context = request_for(action)
    permit = f'@id("permit") permit (principal, action == Action::"{action}", resource);'
    forbid = f'@id("forbid") forbid (principal, action == Action::"{action}", resource);'
    everything = '@id("all") permit (principal, action, resource);'

    # Defaults: strict denies with no deciding policy; non-strict allows by the default.
    assert engine("", strict=True).check(principal, action, resource, context).allowed is False
    assert engine("", strict=True).check(principal, action, resource, context).policies == ()
    d = engine("", strict=False).check(principal, action, resource, context)
    assert (d.allowed, d.policies, d.errors) == (True, (DEFAULT_ALLOW_ID,), ())

    # A permit for this action allows it in strict mode, and only this action.
    e = engine(permit)
    d = e.check(principal, action, resource, context)
    assert (d.allowed, d.policies, d.errors) == (True, ("permit",), ())
    for other in ACTIONS:
        if other != action:
            p, r, c = request_for(other)
            assert e.check(p, other, r, c).allowed is False

    # A forbid wins over any permit, in both modes, and names itself.
    for strict, text in ((True, f"{everything}\n{forbid}"), (False, forbid)):
        d = engine(text, strict=strict).check(principal, action, resource, context)
        assert (d.allowed, d.policies) == (False, ("forbid",))
    # ...and leaves other actions alone in non-strict mode.
    other = next(a for a in ACTIONS if a != action)
    p, r, c = request_for(other)
    assert engine(forbid, strict=False).check(p, other, r, c).allowed is True


def test_namespace_hierarchy_and_principal_types() -> None:
    e = engine('@id("research") permit (principal in Namespace::"research", action, resource);')
    t = topic("news", namespace="research")
    assert e.check(agent("a", namespace="research"), "topic.subscribe", t).allowed
    assert e.check(user("ada", namespace="research"), "topic.subscribe", t).allowed
    assert e.check(namespace("research"), "topic.subscribe", t).allowed  # `in` is reflexive
    assert not e.check(agent("a", namespace="ops"), "topic.subscribe", t).allowed
    assert not e.check(user("ada"), "topic.subscribe", t).allowed  # no namespace, no parent


def test_example_policies() -> None:
    sources = read_paths([EXAMPLES])
    assert [Path(s.name).name for s in sources] == ["namespaces.cedar", "resources.cedar",
                                                    "tools.cedar"]
    e = PolicyEngine(strict=True)
    e.load(sources)
    trusted = agent("a", namespace="research", labels={"tier": "trusted"})
    plain = agent("b", namespace="research")
    clock = tool("clock", "now", namespace="research")
    assert e.check(trusted, "tool.call", clock).allowed
    assert e.check(plain, "tool.call", clock).policies == ("tools-need-trust",)
    quarantined = agent("q", namespace="research",
                        labels={"tier": "trusted", "quarantined": "true"})
    assert e.check(quarantined, "tool.call", clock).policies == ("quarantine",)
    news = {"payloadSize": 10}
    assert e.check(plain, "topic.publish", topic("r.news", namespace="research"), news).allowed
    assert not e.check(plain, "topic.publish", topic("o.news", namespace="ops"), news).allowed
    big = {"payloadSize": 2 << 20}
    assert e.check(plain, "topic.publish", topic("r.news", namespace="research"),
                   big).policies == ("payload-cap",)
    ns = namespace("research")
    low = agent("low", namespace="research", priority="low")
    assert e.check(low, "resource.allocate", ns, {"memoryBytes": 512 << 20}).allowed
    for no_or_high_limit in (0, 2 << 30):
        assert e.check(low, "resource.allocate", ns, {"memoryBytes": no_or_high_limit}
                       ).policies == ("low-priority-memory-cap",)
    assert e.check(plain, "resource.allocate", ns, {"memoryBytes": 0}).allowed
    assert not e.check(plain, "resource.allocate", namespace("ops"), {"memoryBytes": 1}).allowed
    assert e.check(ns, "resource.allocate", low, {"memoryBytes": 1}).allowed
    assert e.check(user("ada"), "agent.create", low).allowed
    inproc = agent("fast", namespace="research", isolation="inproc")
    assert e.check(ns, "agent.create", inproc).policies == ("inproc-needs-trust",)
    assert e.check(ns, "agent.create", agent("slow", namespace="research")).allowed
    assert e.check(plain, "memory.write", plain).allowed
    assert not e.check(plain, "memory.write", trusted).allowed


# -- fail closed ---------------------------------------------------------------------------


def test_errors_deny_and_say_why() -> None:
    e = engine("permit (principal, action, resource);")
    a, t = agent("a"), topic("news")
    missing = e.check(a, "topic.publish", t, {})
    assert not missing.allowed and "payloadSize" in missing.errors[0]
    assert not e.check(a, "no.such.action", t).allowed
    assert "does not exist" in e.check(a, "no.such.action", t).errors[0]
    wrong_type = e.check(a, "tool.call", t)  # tool.call takes a Tool
    assert not wrong_type.allowed and wrong_type.errors
    odd = Entity("Agent", "odd", {"name": "odd"})  # attributes the schema requires are missing
    d = e.check(odd, "memory.read", odd)
    assert not d.allowed and "not a valid entity" in d.errors[0]
    float_context = e.check(a, "topic.publish", t, {"payloadSize": 1.5})
    assert not float_context.allowed and float_context.errors


def test_a_forbid_that_fails_to_evaluate_does_not_fail_open() -> None:
    # Cedar skips a policy whose evaluation errors (here: Long overflow), which in
    # non-strict mode would leave only the default permit. Corral denies instead.
    e = engine('@id("huge") forbid (principal, action == Action::"topic.publish", resource)\n'
               '  when { context.payloadSize * 9223372036854775807 > 0 };', strict=False)
    d = e.check(agent("a"), "topic.publish", topic("news"), {"payloadSize": 2})
    assert (d.allowed, d.policies) == (False, ("huge",))
    assert "`huge`" in d.errors[0] and "policy0" not in d.errors[0]


def test_entities_refuse_values_cedar_cannot_hold() -> None:
    with pytest.raises(TypeError, match="integer"):
        Entity("Agent", "x", {"weight": 0.5})
    with pytest.raises(TypeError, match="labels must map strings to strings"):
        agent("x", labels={"replicas": 3})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="64-bit"):
        Entity("Agent", "x", {"n": 1 << 70})
    a = agent("x", labels={"tier": "trusted"})
    assert a == agent("x", labels={"tier": "trusted"}) and a != agent("x")
    assert len({a, agent("x", labels={"tier": "trusted"})}) == 1
    assert str(a) == 'Agent::"x"' and a.parents == (("Namespace", "default"),)
    assert user("ada").attrs["namespace"] == "" and user("ada").parents == ()
    assert tool("srv", "now").id == "srv/now"


# -- reload --------------------------------------------------------------------------------


def test_bad_reload_keeps_the_old_set_and_its_cache() -> None:
    e = engine('@id("allow-all") permit (principal, action, resource);')
    a, t = agent("a"), tool("clock", "now")
    assert e.check(a, "tool.call", t).allowed and e.generation == 1
    before = e.policies()
    with pytest.raises(PolicyInvalid):
        e.load([PolicySource("good.cedar", "forbid (principal, action, resource);"),
                PolicySource("bad.cedar", "permit (principal, action, resource) when { x };")])
    assert e.generation == 1 and e.policies() == before
    d = e.check(a, "tool.call", t)
    assert d.allowed and d.cached and d.policies == ("allow-all",)


def test_good_reload_drops_the_cache() -> None:
    e = engine('@id("allow-all") permit (principal, action, resource);')
    a, t = agent("a"), tool("clock", "now")
    assert not e.check(a, "tool.call", t).cached
    assert e.check(a, "tool.call", t).cached
    e.load([PolicySource("p.cedar", '@id("no-tools") forbid (principal, action == '
                                    'Action::"tool.call", resource);\n'
                                    '@id("allow-all") permit (principal, action, resource);')])
    assert e.generation == 2
    d = e.check(a, "tool.call", t)
    assert (d.allowed, d.policies, d.cached) == (False, ("no-tools",), False)


def test_load_paths(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.cedar").write_text('@id("a") permit (principal, action, resource);')
    (tmp_path / "sub" / "b.cedar").write_text('@id("b") forbid (principal, action, resource)'
                                              ' when { principal.name == "mallory" };')
    (tmp_path / "notes.txt").write_text("not a policy")
    e = PolicyEngine(strict=True)
    sources = e.load_paths([tmp_path])
    assert [Path(s.name).name for s in sources] == ["a.cedar", "b.cedar"]
    assert [p.id for p in e.policies()] == ["a", "b"]
    assert e.check(agent("mallory"), "memory.read", agent("x")).policies == ("b",)
    with pytest.raises(PolicyInvalid) as exc:
        e.load_paths([tmp_path / "missing.cedar"])
    assert exc.value.problems[0]["file"].endswith("missing.cedar")
    assert exc.value.problems[0]["line"] is None
    (tmp_path / "bad.cedar").write_bytes(b"\xff\xfe")
    with pytest.raises(PolicyInvalid, match="UTF-8"):
        e.load_paths([tmp_path / "bad.cedar"])
    assert e.generation == 1


def test_unchanged_policies_are_not_validated_again(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[str] = []
    real = cedarpy.validate_policies

    def spy(text: str, schema: Any, **kw: Any) -> Any:
        seen.append(text)
        return real(text, schema, **kw)

    monkeypatch.setattr(cedarpy, "validate_policies", spy)
    old = '@id("a") permit (principal, action, resource);'
    e = engine(old)
    e.load([PolicySource("p.cedar", old + '\n@id("b") forbid (principal, action, resource);')])
    assert seen == [old, '@id("b") forbid (principal, action, resource);']


def test_many_new_policies_validate_on_threads() -> None:
    # Enough new policies to be split into batches; problems still map to their lines.
    bad = {10, 250, 399}
    text = "\n".join(f'@id("p{i}") permit (principal, action == Action::"tool.call", resource)'
                     f' when {{ principal.{"nam" if i in bad else "name"} == "a{i}" }};'
                     for i in range(400))
    found = problems(text)
    lines = text.splitlines()
    assert [(p["line"], p["column"]) for p in found] == [
        (i + 1, lines[i].index(".nam ") + 2) for i in sorted(bad)]
    assert all("did you mean 'name'" in p["message"] for p in found)


# -- the cache -----------------------------------------------------------------------------


def test_cache_keys_include_attributes_labels_and_context() -> None:
    e = engine('@id("trusted") permit (principal, action, resource) when '
               '{ principal.hasTag("tier") && principal.getTag("tier") == "trusted" };\n'
               '@id("small") forbid (principal, action == Action::"topic.publish", resource) '
               'when { context.payloadSize > 10 };')
    t = topic("news")
    trusted = agent("a", labels={"tier": "trusted"})
    assert e.check(trusted, "topic.publish", t, {"payloadSize": 1}).allowed
    assert e.check(trusted, "topic.publish", t, {"payloadSize": 1}).cached
    relabelled = agent("a", labels={"tier": "guest"})  # same name, changed label
    d = e.check(relabelled, "topic.publish", t, {"payloadSize": 1})
    assert (d.allowed, d.cached) == (False, False)
    assert not e.check(trusted, "topic.publish", t, {"payloadSize": 11}).allowed
    # True == 1 in Python, but not in Cedar: a bool payloadSize must not hit the int's entry.
    assert not e.check(trusted, "topic.publish", t, {"payloadSize": True}).allowed
    moved = agent("a", namespace="ops", labels={"tier": "trusted"})
    assert not e.check(moved, "topic.publish", t, {"payloadSize": 1}).cached


def test_cache_can_be_disabled_and_is_bounded() -> None:
    off = PolicyEngine(strict=False, cache_size=0)
    a = agent("a")
    assert not off.check(a, "memory.read", a).cached
    assert not off.check(a, "memory.read", a).cached
    small = PolicyEngine(strict=False, cache_size=2)
    agents = [agent(f"a{i}") for i in range(3)]
    for x in agents:
        small.check(x, "memory.read", x)
    assert small.check(agents[2], "memory.read", agents[2]).cached
    assert not small.check(agents[0], "memory.read", agents[0]).cached  # evicted first
    with pytest.raises(ValueError):
        PolicyEngine(cache_size=-1)


# -- PolicyDenied --------------------------------------------------------------------------


def test_authorize_raises_with_the_deciding_policies() -> None:
    e = engine('@id("all") permit (principal, action, resource);\n'
               '@id("no-tools") forbid (principal, action == Action::"tool.call", resource);\n'
               '@id("no-tools-2") forbid (principal is Agent, action == Action::"tool.call", '
               'resource);')
    a, t = agent("alice", namespace="research"), tool("clock", "now")
    with pytest.raises(PolicyDenied) as exc:
        e.authorize(a, "tool.call", t)
    err = exc.value
    assert err.policies == ["no-tools", "no-tools-2"]  # in the order they were loaded
    assert (err.principal, err.action, err.resource) == ('Agent::"alice"', "tool.call",
                                                         'Tool::"clock/now"')
    assert 'Agent::"alice" may not tool.call Tool::"clock/now"' in str(err)
    assert "forbidden by policy" in str(err) and "no-tools" in str(err)
    assert e.authorize(a, "memory.read", a).policies == ("all",)


def test_authorize_explains_strict_default_and_errors() -> None:
    e = engine("")
    with pytest.raises(PolicyDenied) as exc:
        e.authorize(agent("a"), "memory.read", agent("b"))
    assert exc.value.policies == [] and "strict mode denies by default" in str(exc.value)
    assert "add a permit policy for memory.read" in str(exc.value)
    with pytest.raises(PolicyDenied, match="evaluation failed") as exc:
        e.authorize(agent("a"), "topic.publish", topic("news"))
    assert exc.value.policies == []
