"""Subjects and filters: validation messages, matching rules, and SubjectTrie against brute force."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from corral.core.subjects import SubjectTrie, matches, validate_filter, validate_subject


@pytest.mark.parametrize("subject", ["a", "agents.billing.inbox", "A-b_9.x", "_", "-.-"])
def test_valid_subjects(subject: str) -> None:
    validate_subject(subject)
    validate_filter(subject)  # every subject is also a filter that matches only itself
    assert matches(subject, subject)


@pytest.mark.parametrize("f", ["*", ">", "a.*", "*.b", "a.>", "*.*.>", "a.*.c.>"])
def test_valid_filters(f: str) -> None:
    validate_filter(f)


@pytest.mark.parametrize(
    ("subject", "message"),
    [
        ("", r"invalid subject '': it is empty"),
        ("a..b", r"invalid subject 'a\.\.b': token 2 of 3 is empty"),
        (".a", r"token 1 of 2 is empty"),
        ("a.", r"token 2 of 2 is empty"),
        ("a.*", r"wildcard '\*' \(token 2 of 2\) is allowed in subscription filters, not in a "
                r"publish subject"),
        (">", r"wildcard '>' \(token 1 of 1\)"),
        ("a.b c", r"invalid subject 'a\.b c': token 2 of 2 'b c' has ' '"),
        ("a.é", r"token 2 of 2 'é' has 'é'; tokens are letters, digits"),
        ("a.b*", r"'b\*' has '\*'"),
        ("a\n", r"has '\\n'"),
    ],
)
def test_invalid_subjects(subject: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        validate_subject(subject)


@pytest.mark.parametrize(
    ("f", "message"),
    [
        ("", r"invalid filter '': it is empty"),
        ("a.>.b", r"invalid filter 'a\.>\.b': '>' \(token 2 of 3\) must be the last token"),
        ("a.b*", r"token 2 of 2 'b\*' mixes a wildcard with other characters"),
        ("a.>>", r"'>>' mixes a wildcard"),
        ("a..*", r"token 2 of 3 is empty"),
        ("a.b/c", r"'b/c' has '/'"),
    ],
)
def test_invalid_filters(f: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        validate_filter(f)


def test_non_strings_are_type_errors() -> None:
    with pytest.raises(TypeError, match="subject must be a str, got bytes"):
        validate_subject(b"a")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="filter must be a str, got int"):
        validate_filter(1)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("f", "subject", "expected"),
    [
        ("a.b", "a.b", True),
        ("a.b", "a.c", False),
        ("a.b", "a.b.c", False),
        ("a.b.c", "a.b", False),
        ("a.*", "a.b", True),
        ("a.*", "a", False),
        ("a.*", "a.b.c", False),
        ("*.b", "a.b", True),
        ("*", "a", True),
        ("*", "a.b", False),
        ("a.>", "a.b", True),
        ("a.>", "a.b.c.d", True),
        ("a.>", "a", False),
        ("a.>", "b.c", False),
        (">", "a", True),
        (">", "a.b.c", True),
        ("*.>", "a", False),
        ("*.>", "a.b", True),
        ("a.*.c.>", "a.x.c.d", True),
        ("a.*.c.>", "a.x.c", False),
    ],
)
def test_matches(f: str, subject: str, expected: bool) -> None:
    assert matches(f, subject) is expected
    trie: SubjectTrie[str] = SubjectTrie()
    trie.add(f, "v")
    assert trie.match(subject) == (["v"] if expected else [])


def test_matches_validates_both() -> None:
    with pytest.raises(ValueError, match="filter"):
        matches("a.>.b", "a.b")
    with pytest.raises(ValueError, match="subject"):
        matches("a.*", "a.*")


def test_trie_add_remove_len() -> None:
    trie: SubjectTrie[str] = SubjectTrie()
    assert trie.add("a.*", "x") is True
    assert trie.add("a.*", "x") is False  # a set of pairs
    assert trie.add("a.>", "x") is True
    assert trie.add("a.b", "y") is True
    assert len(trie) == 3
    assert trie.match("a.b") == ["x", "y"]  # "x" matched twice, returned once
    assert trie.remove("a.*", "x") is True
    assert trie.remove("a.*", "x") is False
    assert trie.remove("a.b", "x") is False
    assert trie.remove("q.r.s", "x") is False
    assert trie.match("a.b") == ["x", "y"]
    assert trie.remove("a.>", "x") is True
    assert trie.match("a.b") == ["y"]
    assert len(trie) == 1


def test_trie_order_is_insertion_order_across_filters() -> None:
    trie: SubjectTrie[str] = SubjectTrie()
    trie.add("a.>", "first")
    trie.add("*.b", "second")
    trie.add("a.b", "third")
    trie.add("a.*", "first")  # already present through an earlier pair
    assert trie.match("a.b") == ["first", "second", "third"]
    trie.remove("a.>", "first")  # "first" now survives only through its later pair
    assert trie.match("a.b") == ["second", "third", "first"]


def test_trie_validates() -> None:
    trie: SubjectTrie[int] = SubjectTrie()
    with pytest.raises(ValueError, match="must be the last token"):
        trie.add("a.>.b", 1)
    with pytest.raises(ValueError, match="is empty"):
        trie.remove("a..b", 1)
    with pytest.raises(ValueError, match="not in a publish subject"):
        trie.match("a.*")
    assert len(trie) == 0


def test_trie_prunes_empty_nodes() -> None:
    trie: SubjectTrie[int] = SubjectTrie()
    for i in range(50):
        trie.add(f"a.{i}.c.>", i)
        trie.add(f"a.*.{i}", i)
    trie.add("a.keep", -1)
    for i in range(50):
        assert trie.remove(f"a.{i}.c.>", i)
        assert trie.remove(f"a.*.{i}", i)
    root = trie._root
    assert list(root.children) == ["a"]
    assert list(root.children["a"].children) == ["keep"]
    assert trie.remove("a.keep", -1)
    assert root.empty() and len(trie) == 0


# --- property: the trie agrees with brute-force `matches` --------------------------------

_tokens = st.sampled_from(["a", "b", "c"])
_subjects = st.lists(_tokens, min_size=1, max_size=4).map(".".join)
_filters = st.builds(
    lambda body, tail: ".".join(body + tail),
    st.lists(st.sampled_from(["a", "b", "*"]), min_size=0, max_size=4),
    st.sampled_from([[], [">"]]),
).filter(bool)
_ops = st.lists(
    st.tuples(st.booleans(), _filters, st.integers(0, 5)), min_size=0, max_size=40
)


@given(ops=_ops, subjects=st.lists(_subjects, min_size=1, max_size=10))
def test_trie_agrees_with_brute_force(
    ops: list[tuple[bool, str, int]], subjects: list[str]
) -> None:
    trie: SubjectTrie[int] = SubjectTrie()
    model: list[tuple[str, int]] = []  # live pairs, in the order they were (last) added
    for is_add, f, v in ops:
        if is_add:
            assert trie.add(f, v) is ((f, v) not in model)
            if (f, v) not in model:
                model.append((f, v))
        else:
            assert trie.remove(f, v) is ((f, v) in model)
            if (f, v) in model:
                model.remove((f, v))
        assert len(trie) == len(model)
    for s in subjects:
        expected = list(dict.fromkeys(v for f, v in model if matches(f, s)))
        assert trie.match(s) == expected
