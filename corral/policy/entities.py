"""Cedar entities for Corral's principals and resources: agents, users, topics, tools, namespaces.

An :class:`Entity` is a snapshot: its Cedar JSON is built once, when it is made, and that
text is both what Cedar reads and the entity's part of the decision-cache key. A changed
label therefore makes a different entity and can never be served a stale decision.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence, Set
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

__all__ = ["Entity", "agent", "namespace", "tool", "topic", "user"]

_LONG_MIN, _LONG_MAX = -(2**63), 2**63 - 1


def _cedar(value: Any, where: str) -> Any:
    """A Python value as Cedar JSON: str, int (Long), bool, set/list, record, entity ref."""
    if isinstance(value, bool | str):
        return value
    if isinstance(value, int):
        if not _LONG_MIN <= value <= _LONG_MAX:
            raise ValueError(f"{where}: {value} does not fit a Cedar Long (64-bit); "
                             "use a smaller unit")
        return value
    if isinstance(value, Entity):
        return {"__entity": value.uid}
    if isinstance(value, Mapping):
        return {str(k): _cedar(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, Sequence | Set) and not isinstance(value, bytes | bytearray):
        return [_cedar(v, f"{where}[]") for v in value]
    raise TypeError(f"{where}: Cedar has no {type(value).__name__} values; use a string, an "
                    "integer (e.g. bytes or milli-units instead of a float), a bool, a list, "
                    "a mapping or an Entity")


@dataclass(frozen=True, eq=False)
class Entity:
    """A Cedar entity: type and id, attributes, tags (labels) and parents as (type, id)."""

    type: str
    id: str
    attrs: Mapping[str, Any] = field(default_factory=dict)
    parents: tuple[tuple[str, str], ...] = ()
    tags: Mapping[str, str] = field(default_factory=dict)
    #: The entity as Cedar JSON text: what Cedar reads, and the entity's cache key.
    cedar_json: str = field(init=False, repr=False)
    #: {"type": ..., "id": ...}, the form a Cedar request names the entity by.
    uid: Mapping[str, str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        where = f"{self.type}::{json.dumps(self.id)}"
        for key, value in self.tags.items():
            if not isinstance(key, str) or not isinstance(value, str):
                raise TypeError(f"{where}: labels must map strings to strings, got "
                                f"{key!r}: {value!r}; quote the value in the manifest")
        attrs = MappingProxyType(dict(self.attrs))
        tags = MappingProxyType(dict(self.tags))
        uid = {"type": self.type, "id": self.id}  # a dict: cedarpy reads it as one
        doc = {"uid": dict(uid), "attrs": _cedar(attrs, f"{where}.attrs"), "tags": dict(tags),
               "parents": [{"type": t, "id": i} for t, i in self.parents]}
        set_ = object.__setattr__  # frozen: fill the derived fields once, here
        set_(self, "attrs", attrs)
        set_(self, "tags", tags)
        set_(self, "parents", tuple((str(t), str(i)) for t, i in self.parents))
        set_(self, "uid", uid)
        set_(self, "cedar_json", json.dumps(doc, sort_keys=True, separators=(",", ":")))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Entity) and other.cedar_json == self.cedar_json

    def __hash__(self) -> int:
        return hash(self.cedar_json)

    def __str__(self) -> str:
        return f"{self.type}::{json.dumps(self.id)}"


def _parents(ns: str | None) -> tuple[tuple[str, str], ...]:
    return (("Namespace", ns),) if ns else ()


def agent(name: str, *, namespace: str = "default", labels: Mapping[str, str] | None = None,
          isolation: str = "process", priority: str = "normal") -> Entity:
    """An agent (by its runtime-unique name), child of its namespace; labels become tags."""
    return Entity("Agent", name, {"name": name, "namespace": namespace, "isolation": isolation,
                                  "priority": priority},
                  _parents(namespace), dict(labels or {}))


def user(name: str, *, namespace: str | None = None,
         labels: Mapping[str, str] | None = None) -> Entity:
    """A human user; with no namespace its ``namespace`` attribute is "" and it has no parent."""
    return Entity("User", name, {"name": name, "namespace": namespace or ""},
                  _parents(namespace), dict(labels or {}))


def topic(subject: str, *, namespace: str = "default") -> Entity:
    """A bus topic (by its subject), child of the namespace the runtime assigns it."""
    return Entity("Topic", subject, {"subject": subject, "namespace": namespace},
                  _parents(namespace))


def tool(server: str, name: str, *, namespace: str = "default") -> Entity:
    """An MCP tool, id "server/name", child of the namespace of the agent that declares it."""
    return Entity("Tool", f"{server}/{name}", {"server": server, "name": name,
                                               "namespace": namespace},
                  _parents(namespace))


def namespace(name: str, *, labels: Mapping[str, str] | None = None) -> Entity:
    """A namespace; its ``namespace`` attribute is its own name, so namespace rules read alike."""
    return Entity("Namespace", name, {"name": name, "namespace": name}, (), dict(labels or {}))
