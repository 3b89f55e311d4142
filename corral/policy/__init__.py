"""Cedar policies: who may do what to which agents, topics, tools and namespaces.

See docs/policy.md. The runtime builds entities with :func:`agent`, :func:`topic` and
friends, and asks :meth:`PolicyEngine.check` (or :meth:`PolicyEngine.authorize`, which
raises :class:`~corral.errors.PolicyDenied`).
"""

from corral.policy._schema import ACTIONS, APPLIES_TO, SCHEMA_TEXT
from corral.policy.compiler import DEFAULT_ALLOW_ID, CompiledPolicies, PolicyInfo, compile_policies
from corral.policy.engine import Decision, PolicyEngine
from corral.policy.entities import Entity, agent, namespace, tool, topic, user
from corral.policy.sources import PolicySource, from_manifests, read_paths

__all__ = [
    "ACTIONS",
    "APPLIES_TO",
    "DEFAULT_ALLOW_ID",
    "SCHEMA_TEXT",
    "CompiledPolicies",
    "Decision",
    "Entity",
    "PolicyEngine",
    "PolicyInfo",
    "PolicySource",
    "agent",
    "compile_policies",
    "from_manifests",
    "namespace",
    "read_paths",
    "tool",
    "topic",
    "user",
]
