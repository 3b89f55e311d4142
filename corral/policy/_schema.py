"""The Cedar schema shipped in ``schema.cedarschema``: its text, parsed handle and names."""

from __future__ import annotations

import functools
import re
from importlib import resources

import cedarpy

__all__ = ["ACTIONS", "APPLIES_TO", "ATTRIBUTES", "ENTITY_TYPES", "HAS_ATTRIBUTE", "SCHEMA_TEXT",
           "schema"]

SCHEMA_TEXT = resources.files("corral.policy").joinpath("schema.cedarschema").read_text("utf-8")

_CODE = re.sub(r"//[^\n]*", "", SCHEMA_TEXT)  # names in comments are not declarations

_DECLS = re.findall(r"\baction\s+(.*?)\s+appliesTo\s*\{(.*?)\};", _CODE, re.S)


def _types(body: str, role: str) -> tuple[str, ...]:
    m = re.search(rf"\b{role}\s*:\s*\[([^\]]*)\]", body)
    return tuple(re.findall(r"[A-Za-z_]\w*", m.group(1))) if m else ()


#: Every action of the schema -> (its principal types, its resource types), in schema order.
APPLIES_TO: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    name: (_types(body, "principal"), _types(body, "resource"))
    for names, body in _DECLS
    for name in re.findall(r'"([^"]+)"', names)
}
#: Every action of the schema, in the order declared.
ACTIONS: tuple[str, ...] = tuple(APPLIES_TO)
#: Every entity type of the schema.
ENTITY_TYPES: tuple[str, ...] = tuple(re.findall(r"\bentity\s+([A-Za-z_]\w*)", _CODE))


def _owners() -> dict[str, tuple[str, ...]]:
    owners: dict[str, tuple[str, ...]] = {}
    for type_, body in re.findall(r"\bentity\s+(\w+)[^{;]*\{(.*?)\}", _CODE, re.S):
        for attr in re.findall(r"(\w+)\??\s*:", body):
            owners[attr] = (*owners.get(attr, ()), type_)
    return owners


#: Entity attribute -> the entity types that have it.
HAS_ATTRIBUTE: dict[str, tuple[str, ...]] = _owners()
#: Every attribute and context field name, for "did you mean" hints.
ATTRIBUTES: tuple[str, ...] = tuple(sorted(set(re.findall(r"([A-Za-z_]\w*)\??\s*:\s*[A-Z{]",
                                                         _CODE)) - {"principal", "resource",
                                                                    "context"}))


@functools.cache
def schema() -> cedarpy.Schema:
    """The parsed schema, built once and shared (the handle is immutable)."""
    return cedarpy.Schema.from_str(SCHEMA_TEXT)
