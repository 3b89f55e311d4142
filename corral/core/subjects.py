"""NATS-style subjects and filters: validation, matching, and a trie for fan-out lookup.

A subject is tokens joined by ``.``, such as ``agents.billing.inbox``; each token is one or more
of ``A-Z a-z 0-9 _ -``. A subscription filter may also use two wildcards, each a whole token:

- ``*`` matches exactly one token: ``agents.*.inbox`` matches ``agents.billing.inbox``.
- ``>`` matches one or more tokens, and only as the last token: ``agents.>`` matches
  ``agents.billing`` and ``agents.billing.inbox`` but not ``agents``.

A publish subject never holds a wildcard. ``SubjectTrie`` finds every value whose filter
matches a subject without testing each filter: the cost grows with the subject's length and
the number of trie branches a subject can take (a literal and a ``*`` per token), not with
the number of filters.
"""

from __future__ import annotations

import re
from collections.abc import Hashable
from typing import Generic, TypeVar

__all__ = [
    "SubjectTrie",
    "matches",
    "tokens_match",
    "validate_filter",
    "validate_subject",
]

T = TypeVar("T", bound=Hashable)

_TOKEN = r"[A-Za-z0-9_-]+"
_TOKEN_RE = re.compile(_TOKEN)
# Whole-string fast paths; the slow path in _explain only runs to word an error.
_SUBJECT_RE = re.compile(rf"{_TOKEN}(?:\.{_TOKEN})*")
_FILTER_RE = re.compile(rf"(?:{_TOKEN}|\*)(?:\.(?:{_TOKEN}|\*))*(?:\.>)?|>")

_ONE = "*"
_REST = ">"


def validate_subject(subject: str) -> None:
    """Raise ValueError, naming the subject and its fault, unless it is a valid publish subject."""
    if not isinstance(subject, str):
        raise TypeError(f"subject must be a str, got {type(subject).__name__}")
    if _SUBJECT_RE.fullmatch(subject) is None:
        raise ValueError(_explain(subject, wildcards=False))


def validate_filter(filter: str) -> None:
    """Raise ValueError, naming the filter and its fault, unless it is a valid subscription filter."""
    if not isinstance(filter, str):
        raise TypeError(f"filter must be a str, got {type(filter).__name__}")
    if _FILTER_RE.fullmatch(filter) is None:
        raise ValueError(_explain(filter, wildcards=True))


def matches(filter: str, subject: str) -> bool:
    """Whether ``filter`` matches the publish subject ``subject``; ValueError if either is invalid."""
    validate_filter(filter)
    validate_subject(subject)
    return tokens_match(tuple(filter.split(".")), tuple(subject.split(".")))


def tokens_match(filter: tuple[str, ...], subject: tuple[str, ...]) -> bool:
    """``matches`` on pre-split, already validated tokens (for callers that cache them)."""
    for i, token in enumerate(filter):
        if token == _REST:
            return len(subject) > i
        if i >= len(subject) or (token != _ONE and token != subject[i]):
            return False
    return len(filter) == len(subject)


def _explain(text: str, *, wildcards: bool) -> str:
    """Say what is wrong with an invalid subject (``wildcards=False``) or filter."""
    kind = "filter" if wildcards else "subject"
    rule = "tokens are letters, digits, '_' and '-', joined by '.'"
    if not text:
        return f"invalid {kind} '': it is empty; {rule}"
    tokens = text.split(".")
    for i, token in enumerate(tokens, 1):
        where = f"token {i} of {len(tokens)}"
        if not token:
            return f"invalid {kind} {text!r}: {where} is empty (a leading, trailing or doubled '.')"
        if token in (_ONE, _REST):
            if not wildcards:
                return (f"invalid subject {text!r}: wildcard {token!r} ({where}) is allowed in "
                        f"subscription filters, not in a publish subject")
            if token == _REST and i != len(tokens):
                return f"invalid filter {text!r}: '>' ({where}) must be the last token"
            continue
        if _TOKEN_RE.fullmatch(token) is None:
            if wildcards and (_ONE in token or _REST in token):
                return (f"invalid filter {text!r}: {where} {token!r} mixes a wildcard with other "
                        f"characters; '*' and '>' must be whole tokens")
            bad = "".join(sorted({c for c in token if _TOKEN_RE.fullmatch(c) is None}))
            return f"invalid {kind} {text!r}: {where} {token!r} has {bad!r}; {rule}"
    return f"invalid {kind} {text!r}; {rule}"  # pragma: no cover - every fault is named above


class _Node(Generic[T]):
    """One trie level. ``children`` is keyed by literal token, plus ``"*"`` for that wildcard."""

    __slots__ = ("children", "here", "rest")

    def __init__(self) -> None:
        self.children: dict[str, _Node[T]] = {}
        # value -> insertion sequence number, for filters ending at this node ...
        self.here: dict[T, int] = {}
        # ... and for filters ending in ">" right after this node.
        self.rest: dict[T, int] = {}

    def empty(self) -> bool:
        """Whether the node holds nothing and can be pruned."""
        return not (self.children or self.here or self.rest)


class SubjectTrie(Generic[T]):
    """A set of ``(filter, value)`` pairs, looked up by publish subject.

    Values must be hashable; equal values count as one. ``match`` returns each matching value
    once, in the order its earliest surviving pair was added. Removing a pair prunes the nodes
    it alone used, so subscribe/unsubscribe churn does not grow memory.
    """

    def __init__(self) -> None:
        self._root: _Node[T] = _Node()
        self._len = 0
        self._seq = 0

    def add(self, filter: str, value: T) -> bool:
        """Add the pair; False if it was already present. ValueError for an invalid filter."""
        validate_filter(filter)
        tokens = filter.split(".")
        rest = tokens[-1] == _REST
        if rest:
            tokens.pop()
        node = self._root
        for token in tokens:
            child = node.children.get(token)
            if child is None:
                child = node.children[token] = _Node()
            node = child
        bucket = node.rest if rest else node.here
        if value in bucket:
            return False
        bucket[value] = self._seq
        self._seq += 1
        self._len += 1
        return True

    def remove(self, filter: str, value: T) -> bool:
        """Remove the pair; False if it was not present. ValueError for an invalid filter."""
        validate_filter(filter)
        tokens = filter.split(".")
        rest = tokens[-1] == _REST
        if rest:
            tokens.pop()
        path = [self._root]
        for token in tokens:
            child = path[-1].children.get(token)
            if child is None:
                return False
            path.append(child)
        bucket = path[-1].rest if rest else path[-1].here
        if value not in bucket:
            return False
        del bucket[value]
        self._len -= 1
        for depth in range(len(tokens), 0, -1):
            if not path[depth].empty():
                break
            del path[depth - 1].children[tokens[depth - 1]]
        return True

    def match(self, subject: str) -> list[T]:
        """Every value with a filter matching ``subject``, each once, in insertion order."""
        validate_subject(subject)
        tokens = subject.split(".")
        last = len(tokens)
        found: list[dict[T, int]] = []
        stack = [(self._root, 0)]
        while stack:
            node, i = stack.pop()
            if i == last:
                if node.here:
                    found.append(node.here)
                continue
            if node.rest:
                found.append(node.rest)
            children = node.children
            if children:
                child = children.get(tokens[i])
                if child is not None:
                    stack.append((child, i + 1))
                child = children.get(_ONE)
                if child is not None:
                    stack.append((child, i + 1))
        if not found:
            return []
        if len(found) == 1:
            return list(found[0])  # one node's dict is already in insertion order
        first: dict[T, int] = {}
        for bucket in found:
            for value, seq in bucket.items():
                old = first.get(value)
                if old is None or seq < old:
                    first[value] = seq
        return sorted(first, key=first.__getitem__)

    def __len__(self) -> int:
        """The number of ``(filter, value)`` pairs."""
        return self._len
