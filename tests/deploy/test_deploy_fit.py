"""Every pod of deploy/kuberay fits the node shapes it declares, after the kubelet's reserve.

Each Ray pod template names the node shapes it must fit in its annotation
``dippipe.io/node-shapes``; deploy/node-shapes.csv gives each shape's vCPUs and memory. A node's
allocatable resources are modelled here, with the providers' published rules:

- GKE (cloud.google.com/kubernetes-engine/docs/concepts/plan-node-sizes): memory reserve 25 %
  of the first 4 GiB, 20 % of the next 4, 10 % of the next 8, 6 % of the next 112, 2 % above;
  CPU reserve 6 % of the first core, 1 % of the next, 0.5 % of the next 2, 0.25 % above 4;
  eviction threshold 100 MiB.
- EKS AMIs (awslabs/amazon-eks-ami, also Bottlerocket): kube-reserved memory 11 MiB x max pods
  + 255 MiB, the same CPU tiers, eviction threshold 100 MiB. Max pods taken as 110 (the
  kubelet's default cap): the largest value, hence the smallest allocatable memory.
- The kernel reports less memory than the nominal size: 0.970 of it, from the GKE page's own
  example (a 4 vCPU / 16 GB node shows allocatable cpu 3920m, memory 13498416Ki, 0.43 GiB
  below its formula applied to 16 GiB).
- DaemonSets on every GPU node (device plugin, CNI, kube-proxy, log and metrics agents) are an
  assumption, not a measurement: 300m CPU and 1 GiB. Check yours with
  `kubectl describe node` (Allocated resources) and adjust DAEMONSETS.
"""

from __future__ import annotations

import csv
import re
import shlex
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
SHAPES_ANNOTATION = "dippipe.io/node-shapes"
MEMORY_FRACTION = 0.970  # kernel-visible memory / nominal (GKE docs example, above)
EVICTION_MIB = 100
EKS_MAX_PODS = 110
DAEMONSETS = (300, 1024)  # (millicores, MiB): an assumption, see the module docstring


class Shape(NamedTuple):
    name: str
    cloud: str
    gpus: int
    vcpu: int
    memory_gib: float
    gpu: str = ""  # the GPU model, for the README


def _shapes() -> dict[str, Shape]:
    with (DEPLOY / "node-shapes.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    return {
        r["shape"]: Shape(
            r["shape"], r["cloud"], int(r["gpus"]), int(r["vcpu"]), float(r["memory_gib"]), r["gpu"]
        )
        for r in rows
    }


SHAPES = _shapes()


def _tiered(amount: float, tiers: list[tuple[float, float]]) -> float:
    """Sum of rate x the part of `amount` in each (width, rate) tier; the last one unbounded."""
    total, left = 0.0, amount
    for width, rate in tiers:
        part = min(left, width)
        total, left = total + part * rate, left - part
        if left <= 0:
            break
    return total


def cpu_reserve_milli(vcpu: int) -> float:
    return 1000 * _tiered(vcpu, [(1, 0.06), (1, 0.01), (2, 0.005), (1e9, 0.0025)])


def allocatable(shape: Shape) -> tuple[int, int]:
    """(millicores, MiB) that pods may request on an empty node of this shape."""
    capacity_mib = shape.memory_gib * 1024 * MEMORY_FRACTION
    if shape.cloud == "gke":
        gib = capacity_mib / 1024
        tiers = [(4, 0.25), (4, 0.20), (8, 0.10), (112, 0.06), (1e9, 0.02)]
        reserved_mib = 1024 * _tiered(gib, tiers)
    else:
        reserved_mib = 11 * EKS_MAX_PODS + 255
    cpu = 1000 * shape.vcpu - cpu_reserve_milli(shape.vcpu)
    return int(cpu), int(capacity_mib - reserved_mib - EVICTION_MIB)


def quantity(value: Any, *, cpu: bool) -> float:
    """A Kubernetes quantity as millicores (cpu) or MiB (memory)."""
    text = str(value)
    if cpu:
        return float(text[:-1]) if text.endswith("m") else float(text) * 1000
    number, unit = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", text).groups()  # type: ignore[union-attr]
    factor = {"Ki": 1 / 1024, "Mi": 1, "Gi": 1024, "Ti": 1024**2, "": 1 / 1024**2}[unit]
    return float(number) * factor


def requests(containers: list[dict[str, Any]]) -> tuple[float, float]:
    cpu = sum(quantity(c["resources"]["requests"]["cpu"], cpu=True) for c in containers)
    mem = sum(quantity(c["resources"]["requests"]["memory"], cpu=False) for c in containers)
    return cpu, mem


def fits(need: tuple[float, float], shape: Shape) -> bool:
    cpu, mem = allocatable(shape)
    return need[0] <= cpu - DAEMONSETS[0] and need[1] <= mem - DAEMONSETS[1]


def _docs() -> list[dict[str, Any]]:
    return [
        doc
        for path in sorted((DEPLOY / "kuberay").glob("*.yaml"))
        for doc in yaml.safe_load_all(path.read_text())
        if doc and doc.get("apiVersion") == "ray.io/v1"
    ]


def _pods() -> list[tuple[str, dict[str, Any], tuple[float, float]]]:
    """(name, template, requests on its node) for every Ray pod of every manifest. The head's
    node also holds the autoscaler sidecar and, for a RayJob, the submitter pod (which has a
    required podAffinity to the head)."""
    pods = []
    for doc in _docs():
        kind, spec = doc["kind"], doc["spec"]
        cluster = spec["rayClusterSpec"] if kind == "RayJob" else spec
        head = cluster["headGroupSpec"]["template"]
        cpu, mem = requests(head["spec"]["containers"])
        if cluster.get("enableInTreeAutoscaling"):
            side = requests([{"resources": cluster["autoscalerOptions"]["resources"]}])
            cpu, mem = cpu + side[0], mem + side[1]
        if kind == "RayJob":
            submitter = spec["submitterPodTemplate"]["spec"]
            terms = submitter["affinity"]["podAffinity"][
                "requiredDuringSchedulingIgnoredDuringExecution"
            ]
            assert terms[0]["labelSelector"]["matchLabels"]["ray.io/node-type"] == "head"
            side = requests(submitter["containers"])
            cpu, mem = cpu + side[0], mem + side[1]
        pods.append((f"{kind}.head", head, (cpu, mem)))
        for group in cluster["workerGroupSpecs"]:
            template = group["template"]
            pods.append(
                (f"{kind}.{group['groupName']}", template, requests(template["spec"]["containers"]))
            )
    return pods


PODS = _pods()


def test_the_reserve_model_matches_the_published_example():
    # GKE's page: a 4 vCPU / 16 GB node shows allocatable cpu 3920m, memory 13498416Ki.
    cpu, mem = allocatable(Shape("example", "gke", 0, 4, 16))
    assert cpu == 3920
    assert abs(mem - 13498416 / 1024) < 10, mem  # within 10 MiB of the published figure


def test_the_old_worker_request_would_not_fit():
    """What issue 16 found: 4 CPU / 16 GiB per GPU pod stays Pending on a 4 vCPU / 16 GiB node."""
    for name in ("g6.xlarge", "g5.xlarge", "g4dn.xlarge", "g2-standard-4"):
        assert not fits((4000, 16 * 1024), SHAPES[name]), name


@pytest.mark.parametrize(("name", "template", "need"), PODS, ids=[p[0] for p in PODS])
def test_every_pod_fits_the_node_shapes_it_declares(name, template, need):
    declared = template.get("metadata", {}).get("annotations", {}).get(SHAPES_ANNOTATION, "")
    shapes = declared.split()
    assert shapes, f"{name}: no {SHAPES_ANNOTATION} annotation"
    unknown = [s for s in shapes if s not in SHAPES]
    assert not unknown, f"{name}: shapes not in deploy/node-shapes.csv: {unknown}"
    gpus = sum(
        int(c["resources"]["limits"].get("nvidia.com/gpu", 0))
        for c in template["spec"]["containers"]
    )
    for shape in map(SHAPES.get, shapes):
        assert shape is not None
        cpu, mem = allocatable(shape)
        assert fits(need, shape), (
            f"{name} asks {need[0]:.0f}m / {need[1]:.0f} MiB; {shape.name} allows "
            f"{cpu - DAEMONSETS[0]}m / {mem - DAEMONSETS[1]} MiB after DaemonSets"
        )
        assert gpus <= shape.gpus and (gpus > 0) == (shape.gpus > 0), f"{name} on {shape.name}"


def test_the_entrypoint_uses_cuda_and_the_worker_cpus():
    job = next(d for d in _docs() if d["kind"] == "RayJob")
    args = shlex.split(job["spec"]["entrypoint"])
    assert args[args.index("--device") + 1] == "cuda"
    workers = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    (cpu_request,) = {quantity(c["resources"]["requests"]["cpu"], cpu=True)
                      for g in workers for c in g["template"]["spec"]["containers"]}  # fmt: skip
    assert float(args[args.index("--cpus-per-worker") + 1]) * 1000 == cpu_request


def readme_rows() -> list[str]:
    """The rows of deploy/README.md's node-shape table, as this model computes them."""
    rows = []
    for shape in SHAPES.values():
        cpu, mem = allocatable(shape)
        gpus = f"{shape.gpus}x {shape.gpu}" if shape.gpus else "none"
        rows.append(
            f"| {shape.name} | {shape.cloud.upper()} | {gpus} | {shape.vcpu} / "
            f"{shape.memory_gib:g} GiB | {cpu / 1000:.2f} / {mem / 1024:.1f} GiB | "
            f"{(cpu - DAEMONSETS[0]) / 1000:.2f} / {(mem - DAEMONSETS[1]) / 1024:.1f} GiB |"
        )
    return rows


def test_the_readme_table_is_the_computed_one():
    readme = (DEPLOY / "README.md").read_text()
    missing = [row for row in readme_rows() if row not in readme]
    assert not missing, "deploy/README.md node-shape table differs; expected rows:\n" + "\n".join(
        readme_rows()
    )
