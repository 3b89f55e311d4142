"""Docs that are generated from code stay in step with it."""

from pathlib import Path

import corral.errors as errors
from corral.core.lifecycle import mermaid

ROOT = Path(__file__).parents[2]


def test_architecture_diagram_matches_the_lifecycle_table() -> None:
    doc = (ROOT / "docs" / "architecture.md").read_text()
    assert mermaid().strip() in doc, "regenerate the diagram in docs/architecture.md"


def _tree(cls: type, depth: int = 0) -> list[tuple[int, str]]:
    out = [(depth, cls.__name__)]
    for sub in cls.__subclasses__():
        if sub.__module__ == "corral.errors":
            out += _tree(sub, depth + 1)
    return out


def test_errors_docstring_is_the_real_tree() -> None:
    doc = errors.__doc__ or ""
    lines = [ln for ln in doc.splitlines() if ln.startswith("    ") and ln.strip()]
    documented = [((len(ln) - len(ln.lstrip()) - 4) // 2, ln.split()[0]) for ln in lines]
    assert documented == _tree(errors.CorralError)


def test_every_error_says_what_to_do_next() -> None:
    for _, name in _tree(errors.CorralError)[1:]:
        cls = getattr(errors, name)
        if cls in (errors.LimitExceeded, errors.TaskFailed, errors.IllegalTransition):
            continue  # their hint is built from the instance
        assert cls.hint or any(c.hint for c in cls.__mro__[1:] if hasattr(c, "hint")), name
