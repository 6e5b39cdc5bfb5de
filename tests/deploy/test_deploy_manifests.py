"""The files under deploy/ are valid Kubernetes / KubeRay objects and agree with the real CLI.

No cluster is needed: core kinds are checked with kubernetes-validate's bundled (offline)
schemas, RayJob / RayCluster with the KubeRay v1 CRD schemas in ../shared/schemas/kuberay
when that folder exists (it does not in a fresh clone; those tests then skip and say so).
"""

from __future__ import annotations

import copy
import json
import shlex
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
KUBERAY_SCHEMAS = REPO.parent / "shared" / "schemas" / "kuberay"
KUBERAY_API = "ray.io/v1"
# The newest Kubernetes whose schemas kubernetes-validate bundles: catches removed fields.
K8S_VERSION = kubernetes_validate.latest_version()


def _load(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


YAML_FILES = sorted([*DEPLOY.rglob("*.yaml"), *DEPLOY.rglob("*.yml")])
DOCS = [(f"{p.relative_to(DEPLOY)}#{i}", doc) for p in YAML_FILES for i, doc in enumerate(_load(p))]
CORE_DOCS = [(name, doc) for name, doc in DOCS if doc["apiVersion"] != KUBERAY_API]
KUBERAY_DOCS = [(name, doc) for name, doc in DOCS if doc["apiVersion"] == KUBERAY_API]


def _one(kind: str) -> dict[str, Any]:
    found = [doc for _, doc in KUBERAY_DOCS if doc["kind"] == kind]
    assert len(found) == 1, f"expected exactly one {kind} under deploy/, found {len(found)}"
    return found[0]


def _cluster_specs() -> dict[str, dict[str, Any]]:
    return {
        "RayCluster": _one("RayCluster")["spec"],
        "RayJob": _one("RayJob")["spec"]["rayClusterSpec"],
    }


def _entrypoint() -> list[str]:
    return shlex.split(_one("RayJob")["spec"]["entrypoint"])


def test_deploy_has_the_expected_objects():
    kinds = sorted(doc["kind"] for _, doc in DOCS)
    assert kinds == ["RayCluster", "RayJob", "Secret", "ServiceAccount"]


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: str(p.relative_to(DEPLOY)))
def test_every_yaml_file_parses_into_named_objects(path: Path):
    docs = _load(path)
    assert docs, f"{path} holds no YAML document"
    for doc in docs:
        assert isinstance(doc, dict), f"{path}: a document is not a mapping"
        assert {"apiVersion", "kind", "metadata"} <= doc.keys(), f"{path}: not a k8s object"
        assert doc["metadata"].get("name"), f"{path}: {doc['kind']} has no metadata.name"


@pytest.mark.parametrize(("name", "doc"), CORE_DOCS, ids=[n for n, _ in CORE_DOCS])
def test_core_kinds_validate_strictly(name: str, doc: dict[str, Any]):
    # strict: unknown fields are errors, as a typo would otherwise be silently ignored.
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        path = ".".join(str(p) for p in e.path)
        pytest.fail(f"{name}: {path}: {e.message}")


def _pod_templates() -> list[tuple[str, dict[str, Any]]]:
    out = []
    for kind, spec in _cluster_specs().items():
        out.append((f"{kind}.head", spec["headGroupSpec"]["template"]))
        for group in spec["workerGroupSpecs"]:
            out.append((f"{kind}.{group['groupName']}", group["template"]))
    return out


POD_TEMPLATES = _pod_templates()


@pytest.mark.parametrize(("name", "template"), POD_TEMPLATES, ids=[n for n, _ in POD_TEMPLATES])
def test_pod_templates_validate_as_core_pod_templates(name: str, template: dict[str, Any]):
    # The pod templates are most of the RayJob / RayCluster: checked against the core
    # PodTemplate schema here, so a fresh clone without ../shared still validates them.
    doc = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}}
    doc["template"] = template
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        pytest.fail(f"{name}: {'.'.join(str(p) for p in e.path)}: {e.message}")


def _forbid_unknown_fields(node: dict[str, Any]) -> None:
    """Make a CRD schema reject unknown keys in place, as `kubectl apply` strict would.

    A plain JSON-schema validator accepts unknown keys, and the API server prunes them
    silently, so a misspelt `minReplica` would vanish unnoticed. Nodes that declare
    `x-kubernetes-preserve-unknown-fields` or their own `additionalProperties` keep them.
    """
    props = node.get("properties")
    if props is not None:
        for sub in props.values():
            _forbid_unknown_fields(sub)
        if "additionalProperties" not in node and not node.get(
            "x-kubernetes-preserve-unknown-fields"
        ):
            node["additionalProperties"] = False
    for key in ("items", "additionalProperties", "not"):
        if isinstance(node.get(key), dict):
            _forbid_unknown_fields(node[key])
    for key in ("allOf", "anyOf", "oneOf"):
        for sub in node.get(key, []):
            _forbid_unknown_fields(sub)


def test_forbid_unknown_fields_catches_a_typo():
    schema = {"type": "object", "properties": {"spec": {"properties": {"replicas": {}}}}}
    _forbid_unknown_fields(schema)
    validator = jsonschema.Draft7Validator(schema)
    assert validator.is_valid({"spec": {"replicas": 1}})
    assert not validator.is_valid({"spec": {"replica": 1}})


@pytest.mark.parametrize(("name", "doc"), KUBERAY_DOCS, ids=[n for n, _ in KUBERAY_DOCS])
def test_kuberay_kinds_validate_against_crd_schema(name: str, doc: dict[str, Any]):
    schema_file = KUBERAY_SCHEMAS / f"{doc['kind'].lower()}.v1.schema.json"
    if not KUBERAY_SCHEMAS.is_dir():
        pytest.skip(
            f"KubeRay CRD schemas not found at {KUBERAY_SCHEMAS} (the project's shared/ "
            "folder beside the repository); RayJob / RayCluster were NOT validated"
        )
    schema = json.loads(schema_file.read_text())
    for strict in (False, True):  # the published schema as is, then without unknown keys
        checked = copy.deepcopy(schema)
        if strict:
            _forbid_unknown_fields(checked)
        errors = sorted(jsonschema.Draft7Validator(checked).iter_errors(doc), key=str)
        problems = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in errors]
        assert not problems, f"{name} (strict={strict}):\n" + "\n".join(problems)


def test_rayjob_tears_down_and_runs_dippipe():
    spec = _one("RayJob")["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    args = _entrypoint()
    assert args[:2] == ["dippipe", "run"]
    assert args[2].startswith("s3://") and args[2].endswith(".parquet")
    assert args[args.index("--out") + 1].startswith("s3://")
    assert args[args.index("--address") + 1] == "auto"


def test_rayjob_entrypoint_parses_with_the_real_cli():
    """A renamed or removed option of `dippipe run` breaks this test."""
    import typer

    from pipeline.cli import app

    run = typer.main.get_command(app).commands["run"]  # type: ignore[attr-defined]
    # Full parsing (not resilient_parsing, which silently drops unknown options): every
    # option must exist and every value must convert to the option's type.
    ctx = run.make_context("run", _entrypoint()[2:])
    values = set(map(str, ctx.params.values()))
    assert {"auto", "4"} <= values, ctx.params
    assert any(v.startswith("s3://") for v in values), ctx.params


def test_rayjob_gpus_match_its_worker_group():
    # --gpus N starts N one-GPU fitting workers; more than the cluster has would wait forever
    # (no autoscaler in the one-shot job), fewer would leave GPUs idle.
    args = _entrypoint()
    gpus = int(args[args.index("--gpus") + 1])
    groups = _one("RayJob")["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    total = sum(
        g["replicas"] * int(c["resources"]["limits"].get("nvidia.com/gpu", 0))
        for g in groups
        for c in g["template"]["spec"]["containers"]
    )
    assert gpus == total


def test_rayjob_and_raycluster_describe_the_same_pods():
    # The same pods in both files: a fix applied to one and forgotten in the other fails here.
    job, cluster = _cluster_specs()["RayJob"], _cluster_specs()["RayCluster"]
    assert job["rayVersion"] == cluster["rayVersion"]
    assert job["headGroupSpec"] == cluster["headGroupSpec"]

    def shape(spec: dict[str, Any]) -> list[tuple[Any, ...]]:
        keys = ("groupName", "rayStartParams", "template")
        return [tuple(g[k] for k in keys) for g in spec["workerGroupSpecs"]]

    assert shape(job) == shape(cluster)


@pytest.mark.parametrize("kind", ["RayCluster", "RayJob"])
def test_groups_have_guaranteed_resources_and_gpus_on_workers(kind: str):
    spec = _cluster_specs()[kind]
    groups = [("head", spec["headGroupSpec"])]
    groups += [(g["groupName"], g) for g in spec["workerGroupSpecs"]]
    for name, group in groups:
        for c in group["template"]["spec"]["containers"]:
            req, lim = c["resources"]["requests"], c["resources"]["limits"]
            for res in ("cpu", "memory"):
                assert str(req[res]) == str(lim[res]), f"{kind}.{name}: {res} request != limit"
            gpus = int(lim.get("nvidia.com/gpu", 0))
            assert (gpus >= 1) if name != "head" else (gpus == 0), f"{kind}.{name}: gpus"
    for group in spec["workerGroupSpecs"]:
        assert {"replicas", "minReplicas", "maxReplicas"} <= group.keys()
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    assert "enableInTreeAutoscaling" in _one("RayCluster")["spec"]


def test_ray_version_is_the_pinned_one():
    pins = dict(
        line.split("==", 1)
        for line in (REPO / "constraints.txt").read_text().splitlines()
        if "==" in line and not line.startswith("#")
    )
    for kind, spec in _cluster_specs().items():
        assert spec["rayVersion"] == pins["ray"], kind


def test_pods_refer_to_the_secret_and_service_account_defined_here():
    names = {doc["kind"]: doc["metadata"]["name"] for _, doc in CORE_DOCS}
    for name, template in POD_TEMPLATES:
        pod = template["spec"]
        assert pod["serviceAccountName"] == names["ServiceAccount"], name
        for c in pod["containers"]:
            refs = [e["secretRef"]["name"] for e in c.get("envFrom", []) if "secretRef" in e]
            assert refs == [names["Secret"]], f"{name}/{c['name']}: S3 credentials"


def test_example_secret_holds_only_placeholders():
    secret = next(doc for _, doc in CORE_DOCS if doc["kind"] == "Secret")
    assert secret["metadata"]["name"] == "dippipe-s3"
    for key, value in secret["stringData"].items():
        assert value.startswith("REPLACE-WITH-"), f"{key} looks like a real value"
    assert "data" not in secret  # base64 values would hide what they hold
