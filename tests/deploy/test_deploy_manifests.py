"""The files under deploy/ are valid Kubernetes / KubeRay objects and agree with the real CLI.

No cluster is needed: core kinds are checked with kubernetes-validate's bundled (offline)
schemas, RayJob / RayCluster with the KubeRay v1 CRD schemas in ../shared/schemas/kuberay
when that folder exists (it does not in a fresh clone; those tests then skip and say so).
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from tests.deploy.k8s_schemas import (
    KUBERAY_API,
    core_problems,
    forbid_unknown_fields,
    kuberay_problems,
    pod_template_problems,
)

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"


def _load(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


# The objects as written. Kustomizations (kustomization.yaml, and the overlays, which hold only
# patches) are rendered and checked by test_deploy_kustomize.py.
YAML_FILES = sorted(
    p
    for p in [*DEPLOY.rglob("*.yaml"), *DEPLOY.rglob("*.yml")]
    if p.name != "kustomization.yaml" and "overlays" not in p.relative_to(DEPLOY).parts
)
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
    """The RayJob's command without its leading VAR=value words (the shell runs it)."""
    words = shlex.split(_one("RayJob")["spec"]["entrypoint"])
    while words and "=" in words[0] and not words[0].startswith("-"):
        words = words[1:]
    return words


def test_deploy_has_the_expected_objects():
    kinds = sorted(doc["kind"] for _, doc in DOCS)
    expected = ["Job", "NetworkPolicy", "RayCluster", "RayJob", "Secret"] + ["ServiceAccount"] * 3
    assert kinds == expected


def test_the_applied_folder_creates_no_secret():
    """`kubectl apply -f deploy/kuberay/` must not create the placeholder Secret: its keys
    would override IRSA / workload identity (the AWS SDKs read environment keys first)."""
    applied = [doc["kind"] for name, doc in DOCS if name.startswith("kuberay/")]
    assert "Secret" not in applied and "RayJob" in applied
    assert all(not name.startswith("kuberay/") for name, d in DOCS if d["kind"] == "Secret")


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
    assert not core_problems(doc), f"{name}: {core_problems(doc)}"


def _pod_templates() -> list[tuple[str, dict[str, Any]]]:
    out = []
    for kind, spec in _cluster_specs().items():
        out.append((f"{kind}.head", spec["headGroupSpec"]["template"]))
        for group in spec["workerGroupSpecs"]:
            out.append((f"{kind}.{group['groupName']}", group["template"]))
    out.append(("RayJob.submitter", _one("RayJob")["spec"]["submitterPodTemplate"]))
    (report,) = [doc for _, doc in CORE_DOCS if doc["kind"] == "Job"]
    out.append(("Job.report", report["spec"]["template"]))
    return out


POD_TEMPLATES = _pod_templates()


@pytest.mark.parametrize(("name", "template"), POD_TEMPLATES, ids=[n for n, _ in POD_TEMPLATES])
def test_pod_templates_validate_as_core_pod_templates(name: str, template: dict[str, Any]):
    # The pod templates are most of the RayJob / RayCluster: checked against the core
    # PodTemplate schema here, so a fresh clone without ../shared still validates them.
    assert not pod_template_problems(template), f"{name}: {pod_template_problems(template)}"


def test_forbid_unknown_fields_catches_a_typo():
    schema = {"type": "object", "properties": {"spec": {"properties": {"replicas": {}}}}}
    forbid_unknown_fields(schema)
    validator = jsonschema.Draft7Validator(schema)
    assert validator.is_valid({"spec": {"replicas": 1}})
    assert not validator.is_valid({"spec": {"replica": 1}})


@pytest.mark.parametrize(("name", "doc"), KUBERAY_DOCS, ids=[n for n, _ in KUBERAY_DOCS])
def test_kuberay_kinds_validate_against_crd_schema(name: str, doc: dict[str, Any]):
    problems = kuberay_problems(doc)
    assert not problems, f"{name}:\n" + "\n".join(problems)


def test_rayjob_tears_down_and_runs_dippipe():
    spec = _one("RayJob")["spec"]
    # KubeRay v1.7.0 validation.go: deletionRules exclude shutdownAfterJobFinishes and the
    # global ttlSecondsAfterFinished, and refuse DeleteWorkers while autoscaling is on.
    assert "shutdownAfterJobFinishes" not in spec and "ttlSecondsAfterFinished" not in spec
    rules = spec["deletionStrategy"]["deletionRules"]
    autoscaling = spec["rayClusterSpec"].get("enableInTreeAutoscaling", False)
    assert not (autoscaling and any(r["policy"] == "DeleteWorkers" for r in rules))
    conditions = {
        (c.get("jobStatus"), c.get("jobDeploymentStatus"))
        for c in (r["condition"] for r in rules if r["policy"] in ("DeleteCluster", "DeleteSelf"))
    }
    # The cluster goes in every terminal case, including attempts that never ran a job.
    assert {("SUCCEEDED", None), ("FAILED", None), (None, "Failed")} <= conditions
    assert spec["activeDeadlineSeconds"] > 0 and spec["preRunningDeadlineSeconds"] > 0
    args = _entrypoint()
    assert args[0] == "dippipe-entrypoint"  # deploy/entrypoint.sh: `dippipe run` + exit codes
    assert args[1].startswith("s3://") and args[1].endswith(".parquet")
    assert args[args.index("--out") + 1].startswith("s3://")
    assert args[args.index("--address") + 1] == "auto"


def test_rayjob_entrypoint_parses_with_the_real_cli():
    """A renamed or removed option of `dippipe run` breaks this test."""
    import typer

    from pipeline.cli import app

    run = typer.main.get_command(app).commands["run"]  # type: ignore[attr-defined]
    # Full parsing (not resilient_parsing, which silently drops unknown options): every
    # option must exist and every value must convert to the option's type.
    ctx = run.make_context("run", _entrypoint()[1:])
    values = set(map(str, ctx.params.values()))
    assert {"auto", "4"} <= values, ctx.params
    assert any(v.startswith("s3://") for v in values), ctx.params


def test_rayjob_gpus_match_its_worker_group():
    # --gpus N asks for N one-GPU fitting workers; the autoscaler adds GPU pods for them up
    # to maxReplicas. More than that would wait for GPUs that never come, fewer would never
    # use the GPUs the group may have.
    args = _entrypoint()
    gpus = int(args[args.index("--gpus") + 1])
    groups = _one("RayJob")["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    total = sum(
        g["maxReplicas"] * int(c["resources"]["limits"].get("nvidia.com/gpu", 0))
        for g in groups
        for c in g["template"]["spec"]["containers"]
    )
    assert gpus == total


@pytest.mark.parametrize("kind", ["RayCluster", "RayJob"])
def test_gpu_workers_scale_from_zero_with_autoscaler_v2(kind: str):
    spec = _cluster_specs()[kind]
    assert spec["enableInTreeAutoscaling"] is True
    options = spec["autoscalerOptions"]
    assert options["version"] == "v2" and options["idleTimeoutSeconds"] <= 120
    for group in spec["workerGroupSpecs"]:
        assert group["minReplicas"] == 0 and group["replicas"] == 0, group["groupName"]
    # autoscaler v2 needs restartPolicy Never or unset on every Ray pod (validation.go)
    templates = [spec["headGroupSpec"]["template"]] + [
        g["template"] for g in spec["workerGroupSpecs"]
    ]
    assert all(t["spec"].get("restartPolicy", "Never") == "Never" for t in templates)
    args = _entrypoint()
    assert float(args[args.index("--worker-wait") + 1]) > 0  # bounded wait for GPU nodes


@pytest.mark.parametrize("kind", ["RayCluster", "RayJob"])
def test_the_jobs_api_needs_a_token(kind: str):
    # KubeRay v1.7.0 authOptions: token mode needs Ray >= 2.52 (validation.go).
    spec = _cluster_specs()[kind]
    assert spec["authOptions"] == {"mode": "token"}
    major, minor = (int(x) for x in spec["rayVersion"].split(".")[:2])
    assert (major, minor) >= (2, 52)


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


# The container-level fields of the restricted Pod Security Standard
# (kubernetes.io/docs/concepts/security/pod-security-standards/, "Restricted").
RESTRICTED_CONTAINER = {
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
}


def _restricted_problems(pod: dict[str, Any], container: dict[str, Any]) -> list[str]:
    problems = []
    pod_ctx, ctx = pod.get("securityContext", {}), container.get("securityContext", {})
    if ctx.get("allowPrivilegeEscalation") is not False:
        problems.append("allowPrivilegeEscalation must be false")
    if "ALL" not in ctx.get("capabilities", {}).get("drop", []):
        problems.append("capabilities.drop must hold ALL")
    if set(ctx.get("capabilities", {}).get("add", [])) - {"NET_BIND_SERVICE"}:
        problems.append("capabilities.add beyond NET_BIND_SERVICE")
    if not ctx.get("runAsNonRoot", pod_ctx.get("runAsNonRoot")):
        problems.append("runAsNonRoot must be true (pod or container)")
    if ctx.get("runAsUser", pod_ctx.get("runAsUser")) == 0:
        problems.append("runAsUser 0")
    seccomp = ctx.get("seccompProfile", pod_ctx.get("seccompProfile", {})).get("type")
    if seccomp not in ("RuntimeDefault", "Localhost"):
        problems.append("seccompProfile must be RuntimeDefault or Localhost")
    if ctx.get("privileged") or pod.get("hostNetwork") or pod.get("hostPID"):
        problems.append("privileged / host namespaces")
    return problems


def test_the_restricted_check_catches_a_missing_field():
    pod = {"securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}}
    assert _restricted_problems(pod, {"securityContext": RESTRICTED_CONTAINER}) == []
    assert _restricted_problems(pod, {"securityContext": {"allowPrivilegeEscalation": False}})
    assert _restricted_problems({}, {"securityContext": RESTRICTED_CONTAINER})


@pytest.mark.parametrize(("name", "template"), POD_TEMPLATES, ids=[n for n, _ in POD_TEMPLATES])
def test_every_pod_meets_the_restricted_pod_security_standard(name: str, template: dict[str, Any]):
    pod = template["spec"]
    for c in pod.get("initContainers", []) + pod["containers"]:
        assert not _restricted_problems(pod, c), (
            f"{name}/{c['name']}: {_restricted_problems(pod, c)}"
        )
    for volume in pod.get("volumes", []):
        assert "hostPath" not in volume, f"{name}: hostPath volume"


@pytest.mark.parametrize("kind", ["RayCluster", "RayJob"])
def test_the_autoscaler_sidecar_is_restricted_too(kind: str):
    spec = _cluster_specs()[kind]
    head = spec["headGroupSpec"]["template"]["spec"]
    sidecar = {
        "name": "autoscaler",
        "securityContext": spec["autoscalerOptions"]["securityContext"],
    }
    assert not _restricted_problems(head, sidecar)


def test_ray_version_is_the_pinned_one():
    pins = dict(
        line.split("==", 1)
        for line in (REPO / "constraints.txt").read_text().splitlines()
        if "==" in line and not line.startswith("#")
    )
    for kind, spec in _cluster_specs().items():
        assert spec["rayVersion"] == pins["ray"], kind


def test_example_secret_holds_only_placeholders():
    secret = next(doc for _, doc in CORE_DOCS if doc["kind"] == "Secret")
    assert secret["metadata"]["name"] == "dippipe-s3"
    for key, value in secret["stringData"].items():
        assert value.startswith("REPLACE-WITH-"), f"{key} looks like a real value"
    assert "data" not in secret  # base64 values would hide what they hold


def test_each_role_has_its_own_service_account():
    accounts = {d["metadata"]["name"] for _, d in CORE_DOCS if d["kind"] == "ServiceAccount"}
    secret = next(doc["metadata"]["name"] for _, doc in CORE_DOCS if doc["kind"] == "Secret")
    roles = {"head": "dippipe-head", "gpu": "dippipe-worker", "submitter": "dippipe-submitter"}
    roles["report"] = "dippipe-head"  # reads OUT as the driver does; no API token
    assert accounts == set(roles.values())
    for name, template in POD_TEMPLATES:
        pod, role = template["spec"], name.split(".")[1]
        assert pod["serviceAccountName"] == roles[role], name
        # Only the head talks to the Kubernetes API (its autoscaler sidecar): KubeRay binds the
        # autoscaler Role to the head pod's service account (v1.7.0 common/rbac.go).
        assert pod.get("automountServiceAccountToken", True) is (name.endswith(".head")), name
        for c in pod["containers"]:
            refs = [e["secretRef"]["name"] for e in c.get("envFrom", []) if "secretRef" in e]
            # S3 keys (when not IRSA) for the pods that read and write S3, not the submitter
            assert refs == ([] if role == "submitter" else [secret]), f"{name}: S3 credentials"


def test_the_network_policy_admits_only_ray_pods_the_submitter_and_the_operator():
    (policy,) = [doc for _, doc in CORE_DOCS if doc["kind"] == "NetworkPolicy"]
    selected = policy["spec"]["podSelector"]["matchLabels"]
    for name, template in POD_TEMPLATES:
        labels = template["metadata"]["labels"]
        is_ray = all(labels.get(k) == v for k, v in selected.items())
        assert is_ray == (name.split(".")[1] in ("head", "gpu")), name
    rules = policy["spec"]["ingress"]
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    open_rules = [r for r in rules if "ports" not in r]
    assert [r["from"] for r in open_rules] == [[{"podSelector": {"matchLabels": selected}}]]
    for rule in rules:  # everything else: the Jobs API port only
        assert rule in open_rules or [p["port"] for p in rule["ports"]] == [8265]
