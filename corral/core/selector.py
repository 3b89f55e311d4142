"""Label selectors, kubectl-style: ``team=nlp,tier!=gpu,canary`` (and-ed requirements)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

__all__ = ["Requirement", "Selector", "parse_selector"]

_KEY = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9_.\-/]*[A-Za-z0-9])?$")


@dataclass(frozen=True)
class Requirement:
    """One requirement: ``key=value``, ``key!=value``, ``key`` (exists) or ``!key``."""

    key: str
    op: str  # "=", "!=", "exists", "!exists"
    value: str = ""

    def matches(self, labels: Mapping[str, str]) -> bool:
        """Whether ``labels`` meet this requirement."""
        if self.op == "=":
            return labels.get(self.key) == self.value
        if self.op == "!=":
            return labels.get(self.key) != self.value
        if self.op == "exists":
            return self.key in labels
        return self.key not in labels


@dataclass(frozen=True)
class Selector:
    """All requirements must hold; the empty selector matches everything."""

    requirements: tuple[Requirement, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        """Whether ``labels`` meet every requirement."""
        return all(r.matches(labels) for r in self.requirements)


def parse_selector(text: str) -> Selector:
    """Parse ``a=b,c!=d,e,!f``; ValueError names the bad part and the expected form."""
    reqs: list[Requirement] = []
    for raw in (p.strip() for p in text.split(",")):
        if not raw:
            continue
        if "!=" in raw:
            key, _, value = raw.partition("!=")
            op = "!="
        elif "=" in raw:
            key, _, value = raw.partition("=")
            op = "="
            if value.startswith("="):  # accept kubectl's `==`
                value = value[1:]
        elif raw.startswith("!"):
            key, op, value = raw[1:], "!exists", ""
        else:
            key, op, value = raw, "exists", ""
        key, value = key.strip(), value.strip()
        if not _KEY.match(key):
            raise ValueError(f"bad label key {key!r} in selector {text!r}; expected requirements "
                             "like team=nlp, tier!=gpu, canary or !canary, separated by commas")
        reqs.append(Requirement(key, op, value))
    return Selector(tuple(reqs))
