"""Label selectors."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from corral.core.selector import parse_selector

LABELS = {"team": "nlp", "tier": "cpu", "canary": "yes"}


@pytest.mark.parametrize(("text", "expected"), [
    ("", True), ("team=nlp", True), ("team==nlp", True), ("team=vision", False),
    ("tier!=gpu", True), ("tier!=cpu", False), ("canary", True), ("!canary", False),
    ("missing", False), ("!missing", True), ("team=nlp, tier!=gpu ,canary", True),
    ("team=nlp,tier=gpu", False),
])
def test_matches(text: str, expected: bool) -> None:
    assert parse_selector(text).matches(LABELS) is expected


@pytest.mark.parametrize("bad", ["=x", "!=x", "bad key=1", "-x=1", "a=b,,!"])
def test_bad_selectors_say_what_is_expected(bad: str) -> None:
    with pytest.raises(ValueError, match="expected requirements like"):
        parse_selector(bad)


keys = st.from_regex(r"[a-z][a-z0-9]{0,5}", fullmatch=True)
vals = st.from_regex(r"[a-z0-9]{0,5}", fullmatch=True)


@given(st.dictionaries(keys, vals, max_size=5), st.dictionaries(keys, vals, max_size=3))
def test_a_selector_built_from_labels_matches_them(labels: dict, extra: dict) -> None:
    text = ",".join(f"{k}={v}" for k, v in labels.items())
    assert parse_selector(text).matches({**extra, **labels})
