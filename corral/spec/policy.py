"""``kind: Policy`` manifests: Cedar policies given inline or as a file next to the manifest.

::

    apiVersion: corral/v1
    kind: Policy
    metadata: {name: trusted-tools, namespace: research}
    spec:
      file: policies/tools.cedar     # relative to the manifest's folder
      # or: policy: |
      #   forbid (principal, action == Action::"tool.call", resource) unless { ... };

The model only checks the shape; the Cedar text is parsed and validated against the
schema by :mod:`corral.policy` when the policies are loaded.
"""

from __future__ import annotations

import os
from typing import Annotated, Literal, Self

from pydantic import Field, model_validator

from corral.spec.models import FieldProblem, Manifest, _Model

__all__ = ["PolicyManifest", "PolicySpec"]


class PolicySpec(_Model):
    """Cedar policy text inline (``policy``) or in a file (``file``), exactly one of them."""

    policy: Annotated[str, Field(min_length=1)] | None = None
    file: Annotated[str, Field(min_length=1)] | None = None

    @model_validator(mode="after")
    def _one_source(self) -> Self:
        if (self.policy is None) == (self.file is None):
            both = self.policy is not None
            raise FieldProblem(
                "set exactly one of spec.policy or spec.file" + (", not both" if both else ""),
                field="file" if both else None,
                expected="Cedar text in policy (e.g. 'permit (principal, action, resource);') "
                         "or a path in file (e.g. 'policies/tools.cedar'), not both")
        if self.policy is not None and not self.policy.strip():
            raise FieldProblem("spec.policy is blank", field="policy",
                               expected="Cedar policy text such as "
                                        "'permit (principal, action, resource);'")
        return self


class PolicyManifest(Manifest):
    """``kind: Policy``: Cedar policies, validated against Corral's schema when loaded."""

    kind: Literal["Policy"]
    spec: PolicySpec

    @property
    def source_name(self) -> str:
        """The name errors and policy ids use: the .cedar path, or "Policy/<ns>/<name>"."""
        if self.spec.file is None:
            return f"Policy/{self.namespace}/{self.name}"
        if os.path.isabs(self.spec.file):
            return self.spec.file
        # Shown next to the manifest as the user named it (source is "dir/x.yaml" or "...#2").
        manifest_file = self.source.rsplit("#", 1)[0]
        folder = os.path.dirname(manifest_file) if manifest_file else self.base_dir
        return os.path.join(folder, self.spec.file)

    @property
    def file_path(self) -> str | None:
        """Absolute path of spec.file (relative paths start at the manifest's folder)."""
        if self.spec.file is None:
            return None
        return os.path.join(self.base_dir, self.spec.file)
