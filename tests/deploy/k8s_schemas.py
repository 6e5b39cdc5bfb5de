"""Offline schema checks of Kubernetes objects, shared by the deploy/ tests.

- Core kinds: kubernetes-validate's bundled schemas of the newest Kubernetes it knows, strict
  (an unknown field is an error, as a typo would otherwise be silently dropped).
- RayJob / RayCluster: the KubeRay v1 CRD schemas in ../shared/schemas/kuberay, the project's
  folder beside the repository. A fresh clone has none: the check then skips and says so;
  nothing else depends on it (pod templates are checked as core PodTemplates instead).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest

REPO = Path(__file__).resolve().parents[2]
KUBERAY_SCHEMAS = REPO.parent / "shared" / "schemas" / "kuberay"
KUBERAY_API = "ray.io/v1"
# The newest Kubernetes whose schemas kubernetes-validate bundles: catches removed fields.
K8S_VERSION = kubernetes_validate.latest_version()


def core_problems(doc: dict[str, Any]) -> list[str]:
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        return [f"{'.'.join(str(p) for p in e.path)}: {e.message}"]
    return []


def pod_template_problems(template: dict[str, Any]) -> list[str]:
    """A pod template as the core PodTemplate schema sees it (no CRD schema needed)."""
    doc = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}}
    return core_problems({**doc, "template": template})


def forbid_unknown_fields(node: dict[str, Any]) -> None:
    """Make a CRD schema reject unknown keys in place, as `kubectl apply` strict would.

    A plain JSON-schema validator accepts unknown keys, and the API server prunes them
    silently, so a misspelt `minReplica` would vanish unnoticed. Nodes that declare
    `x-kubernetes-preserve-unknown-fields` or their own `additionalProperties` keep them.
    """
    props = node.get("properties")
    if props is not None:
        for sub in props.values():
            forbid_unknown_fields(sub)
        if "additionalProperties" not in node and not node.get(
            "x-kubernetes-preserve-unknown-fields"
        ):
            node["additionalProperties"] = False
    for key in ("items", "additionalProperties", "not"):
        if isinstance(node.get(key), dict):
            forbid_unknown_fields(node[key])
    for key in ("allOf", "anyOf", "oneOf"):
        for sub in node.get(key, []):
            forbid_unknown_fields(sub)


def kuberay_problems(doc: dict[str, Any]) -> list[str]:
    """Errors of a RayJob / RayCluster against the CRD schema, as published and strict.
    Skips the calling test when the schemas are not there."""
    if not KUBERAY_SCHEMAS.is_dir():
        pytest.skip(
            f"KubeRay CRD schemas not found at {KUBERAY_SCHEMAS} (the project's shared/ "
            "folder beside the repository); RayJob / RayCluster were NOT validated"
        )
    schema = json.loads((KUBERAY_SCHEMAS / f"{doc['kind'].lower()}.v1.schema.json").read_text())
    problems = []
    for strict in (False, True):  # the published schema as is, then without unknown keys
        checked = copy.deepcopy(schema)
        if strict:
            forbid_unknown_fields(checked)
        errors = sorted(jsonschema.Draft7Validator(checked).iter_errors(doc), key=str)
        problems += [
            f"(strict={strict}) {'.'.join(map(str, e.absolute_path))}: {e.message}" for e in errors
        ]
    return problems
