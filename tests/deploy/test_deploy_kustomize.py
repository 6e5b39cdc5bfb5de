"""The kustomize overlays under deploy/overlays render to valid objects that agree with each other.

Users run `kubectl apply -k deploy/overlays/<name>` (kubectl's built-in kustomize). No kustomize
binary can be installed on the development machines (no Go toolchain; the PyPI packages
named like it are either a different tool, `kustomize` 0.6.0, or need Python >= 3.14,
`pykustomize` 0.1.4, whose wheel carries kustomize's Go library), so `render` below builds
the overlays itself. It implements only what the overlays use, as kustomize v5 does it, and
refuses anything else, so an overlay can never use a feature that is rendered wrongly here:

- `resources`: YAML files in or below the kustomization's folder (kustomize's default load
  restriction) and other kustomization folders (bases), in order;
- `patches` with a `target` (kind, name) and an inline JSON 6902 `patch` (a YAML list of
  `add` / `replace` / `remove` operations). kustomize applies a target that matches nothing
  as a no-op; here that is an error (it is always a mistake in these overlays);
- `images`: for every entry, every `image:` of an item of a `containers` or `initContainers`
  list anywhere in any object whose name part equals `name` gets `newName`, and `newTag` or
  `digest` (kustomize api/filters/imagetag/legacy.go walks every such list, custom resources
  included, which is how RayJob pod templates get the image). Applied after the patches, as
  in kustomize's builtin transformer order.
"""

from __future__ import annotations

import copy
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.k8s_schemas import (
    KUBERAY_API,
    core_problems,
    kuberay_problems,
    pod_template_problems,
)

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
OVERLAYS = sorted(p.parent for p in (DEPLOY / "overlays").glob("*/kustomization.yaml"))
BASE_IMAGE_NAME = "registry.example.com/dippipe"
FIELDS = {"apiVersion", "kind", "resources", "patches", "images"}


class RenderError(Exception):
    pass


def _pointer(path: str) -> list[str]:
    if not path.startswith("/"):
        raise RenderError(f"not a JSON pointer: {path!r}")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def _json6902(doc: dict[str, Any], ops: list[dict[str, Any]]) -> None:
    """RFC 6902 add / replace / remove, in place."""
    for op in ops:
        *parents, last = _pointer(op["path"])
        node: Any = doc
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        kind = op["op"]
        if isinstance(node, list):
            index = len(node) if (last == "-" and kind == "add") else int(last)
            if kind == "add":
                node.insert(index, copy.deepcopy(op["value"]))
            elif index >= len(node):
                raise RenderError(f"{kind} {op['path']}: no such element")
            elif kind == "replace":
                node[index] = copy.deepcopy(op["value"])
            elif kind == "remove":
                del node[index]
            else:
                raise RenderError(f"unsupported op {kind}")
        else:
            if kind in ("replace", "remove") and last not in node:
                raise RenderError(f"{kind} {op['path']}: no such field")  # RFC 6902: must exist
            if kind in ("add", "replace"):
                node[last] = copy.deepcopy(op["value"])
            elif kind == "remove":
                del node[last]
            else:
                raise RenderError(f"unsupported op {kind}")


def _set_images(node: Any, entry: dict[str, str], parent_key: str = "") -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            _set_images(value, entry, key)
    elif isinstance(node, list):
        for item in node:
            if parent_key in ("containers", "initContainers") and isinstance(item, dict):
                image = item.get("image", "")
                name = re.split(r"@", image)[0]
                name = re.sub(r":[^:/]+$", "", name)  # a tag is after the last '/'
                if image and name == entry["name"]:
                    if "digest" in entry and "newTag" in entry:
                        raise RenderError("newTag and digest together: choose one")
                    new = entry.get("newName", name)
                    rest = image[len(name) :]
                    if "digest" in entry:
                        rest = f"@{entry['digest']}"
                    elif "newTag" in entry:
                        rest = f":{entry['newTag']}"
                    item["image"] = new + rest
            _set_images(item, entry)


def render(folder: Path) -> list[dict[str, Any]]:
    """The objects `kubectl kustomize folder` gives, for the features listed above."""
    spec = yaml.safe_load((folder / "kustomization.yaml").read_text())
    if spec.get("kind") != "Kustomization" or set(spec) - FIELDS:
        raise RenderError(f"{folder}: the renderer does not implement {set(spec) - FIELDS}")
    docs: list[dict[str, Any]] = []
    for resource in spec.get("resources", []):
        path = (folder / resource).resolve()
        if path.is_dir():
            docs += render(path)
        elif folder.resolve() in path.parents:
            docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
        else:
            raise RenderError(f"{resource}: a file outside {folder} (kustomize refuses it)")
    for patch in spec.get("patches", []):
        target, ops = patch["target"], yaml.safe_load(patch["patch"])
        if set(target) - {"kind", "name"} or not isinstance(ops, list):
            raise RenderError("only JSON 6902 patches with a kind / name target")
        hits = [
            d
            for d in docs
            if d["kind"] == target["kind"] and d["metadata"]["name"] == target["name"]
        ]
        if not hits:
            raise RenderError(f"patch target {target} matches no object")
        for doc in hits:
            _json6902(doc, ops)
    for entry in spec.get("images", []):
        for doc in docs:
            if doc["kind"] != "CustomResourceDefinition":
                _set_images(doc, entry)
    ids = [(d["kind"], d["metadata"].get("namespace"), d["metadata"]["name"]) for d in docs]
    if len(ids) != len(set(ids)):
        raise RenderError(f"{folder}: the same object twice: {ids}")
    return docs


# ---------------------------------------------------------------- the renderer itself


def _write(folder: Path, kustomization: dict[str, Any], **files: Any) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    for name, doc in files.items():
        (folder / name).write_text(yaml.safe_dump(doc))
    return folder


def _pod(name: str, image: str) -> dict[str, Any]:
    return {
        "apiVersion": "example.io/v1",
        "kind": "Thing",
        "metadata": {"name": name},
        "spec": {"a": {"template": {"spec": {"containers": [{"name": "c", "image": image}]}}}},
    }


DIGEST = "sha256:" + "a" * 64


def test_render_sets_images_in_custom_resources_and_applies_patches(tmp_path: Path):
    _write(
        tmp_path / "base",
        {"kind": "Kustomization", "resources": ["thing.yaml"]},
        **{"thing.yaml": _pod("t", "reg.io/app:1.0")},
    )
    ops = [
        {"op": "replace", "path": "/metadata/name", "value": "u"},
        {"op": "add", "path": "/spec/a/template/spec/containers/-", "value": {"image": "x:1"}},
        {"op": "remove", "path": "/spec/a/template/spec/containers/0/name"},
    ]
    overlay = {
        "kind": "Kustomization",
        "resources": ["../base"],
        "images": [{"name": "reg.io/app", "newName": "other.io/app", "digest": DIGEST}],
        "patches": [{"target": {"kind": "Thing", "name": "t"}, "patch": yaml.safe_dump(ops)}],
    }
    (doc,) = render(_write(tmp_path / "overlay", overlay))
    containers = doc["spec"]["a"]["template"]["spec"]["containers"]
    assert doc["metadata"]["name"] == "u"
    assert containers == [{"image": f"other.io/app@{DIGEST}"}, {"image": "x:1"}]


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ({"namePrefix": "a-"}, "does not implement"),
        ({"patches": [{"target": {"kind": "Thing", "name": "nope"}, "patch": "[]"}]}, "no object"),
        (
            {"patches": [{"target": {"kind": "Thing", "name": "t"}, "patch": "spec: {}"}]},
            "JSON 6902",
        ),
        (
            {
                "patches": [
                    {
                        "target": {"kind": "Thing", "name": "t"},
                        "patch": "[{op: replace, path: /spec/missing, value: 1}]",
                    }
                ]
            },
            "no such field",
        ),
        ({"resources": ["../outside.yaml"]}, "outside"),
    ],
)
def test_render_refuses_what_it_does_not_implement(tmp_path: Path, change: dict, error: str):
    (tmp_path / "outside.yaml").write_text(yaml.safe_dump(_pod("o", "a:1")))
    spec = {"kind": "Kustomization", "resources": ["thing.yaml"], **change}
    if "resources" in change:
        spec["resources"] = ["thing.yaml", *change["resources"]]
    folder = _write(tmp_path / "k", spec, **{"thing.yaml": _pod("t", "reg.io/app:1.0")})
    with pytest.raises(RenderError, match=error):
        render(folder)


# ---------------------------------------------------------------- deploy/'s kustomizations


def test_the_bases_hold_the_files_they_should():
    batch = {d["kind"] for d in render(DEPLOY / "kuberay")}
    # The interactive RayCluster is not part of a batch run; the placeholder Secret never is.
    assert batch == {"ServiceAccount", "NetworkPolicy", "RayJob"}
    assert [d["kind"] for d in render(DEPLOY / "report")] == ["Job"]
    assert {p.name for p in OVERLAYS} >= {"example", "example-report"}


def _rendered() -> list[tuple[str, dict[str, Any]]]:
    return [
        (f"{folder.name}/{d['kind']}/{d['metadata']['name']}", d)
        for folder in OVERLAYS
        for d in render(folder)
    ]


RENDERED = _rendered()


@pytest.mark.parametrize(("name", "doc"), RENDERED, ids=[n for n, _ in RENDERED])
def test_rendered_objects_validate(name: str, doc: dict[str, Any]):
    if doc["apiVersion"] != KUBERAY_API:
        assert not core_problems(doc), f"{name}: {core_problems(doc)}"
        return
    for template in _templates(doc):  # offline, without ../shared
        assert not pod_template_problems(template), f"{name}: {pod_template_problems(template)}"
    problems = kuberay_problems(doc)  # skips here without ../shared/schemas/kuberay
    assert not problems, f"{name}:\n" + "\n".join(problems)


def _templates(doc: dict[str, Any]) -> list[dict[str, Any]]:
    if doc["kind"] == "Job":
        return [doc["spec"]["template"]]
    spec = doc["spec"]
    cluster = spec.get("rayClusterSpec", spec)
    out = [cluster["headGroupSpec"]["template"]]
    out += [g["template"] for g in cluster["workerGroupSpecs"]]
    return out + ([spec["submitterPodTemplate"]] if doc["kind"] == "RayJob" else [])


def _images(doc: dict[str, Any]) -> list[str]:
    return [c["image"] for t in _templates(doc) for c in t["spec"]["containers"]]


def _overlay(name: str) -> dict[str, dict[str, Any]]:
    return {d["kind"]: d for d in render(DEPLOY / "overlays" / name)}


def _run_args(rayjob: dict[str, Any]) -> tuple[dict[str, str], list[str]]:
    words = shlex.split(rayjob["spec"]["entrypoint"])
    env = {}
    while words and "=" in words[0] and not words[0].startswith("-"):
        key, value = words.pop(0).split("=", 1)
        env[key] = value
    return env, words


def test_the_example_overlay_changes_image_name_bucket_and_gpus_consistently():
    base = {d["kind"]: d for d in render(DEPLOY / "kuberay")}
    ours = _overlay("example")
    job = ours["RayJob"]
    (image,) = set(_images(job))
    assert not image.startswith(BASE_IMAGE_NAME + ":"), "the overlay did not set the image"
    assert image != _images(base["RayJob"])[0]
    # The lock owner id of the retries is the RayJob's name (deploy/entrypoint.sh).
    env, args = _run_args(job)
    assert job["metadata"]["name"] != base["RayJob"]["metadata"]["name"]
    assert env["DIPPIPE_RAYJOB"] == job["metadata"]["name"], env
    # --gpus = the GPUs the worker group can have.
    group = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    per_pod = int(
        group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
    )
    assert int(args[args.index("--gpus") + 1]) == group["maxReplicas"] * per_pod
    base_group = base["RayJob"]["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    assert group["maxReplicas"] != base_group["maxReplicas"]
    # One bucket for the manifest and OUT, not the base's placeholder.
    manifest, out = args[1], args[args.index("--out") + 1]
    buckets = {re.match(r"s3://([^/]+)/", uri).group(1) for uri in (manifest, out)}  # type: ignore[union-attr]
    assert len(buckets) == 1 and "my-bucket" not in buckets, (manifest, out)
    # Everything the base RayJob passes besides these is kept (device, CPUs, waits).
    _, base_args = _run_args(base["RayJob"])
    for flag in ("--address", "--device", "--cpus-per-worker", "--worker-wait"):
        assert args[args.index(flag) + 1] == base_args[base_args.index(flag) + 1], flag


def test_the_example_overlay_entrypoint_parses_with_the_real_cli():
    import typer

    from pipeline.cli import app

    _, args = _run_args(_overlay("example")["RayJob"])
    assert args[0] == "dippipe-entrypoint"
    run = typer.main.get_command(app).commands["run"]  # type: ignore[attr-defined]
    ctx = run.make_context("run", args[1:])
    assert ctx.params["gpus"] == 8, ctx.params


def test_the_report_overlay_reports_on_the_runs_out_with_the_same_image():
    run, report = _overlay("example")["RayJob"], _overlay("example-report")["Job"]
    _, args = _run_args(run)
    (container,) = report["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["dippipe", "report", args[args.index("--out") + 1]]
    assert container["image"] == _images(run)[0]


def test_the_report_command_parses_with_the_real_cli():
    import typer

    from pipeline.cli import app

    (container,) = _overlay("example-report")["Job"]["spec"]["template"]["spec"]["containers"]
    assert container["command"][:2] == ["dippipe", "report"]
    report = typer.main.get_command(app).commands["report"]  # type: ignore[attr-defined]
    ctx = report.make_context("report", container["command"][2:])
    assert ctx.params["out"].startswith("s3://")


def test_the_readme_applies_overlays_and_edits_no_tracked_file():
    readme = (DEPLOY / "README.md").read_text()
    assert "kubectl apply -k deploy/overlays/" in readme
    assert "sed -i" not in readme
    for folder in OVERLAYS:
        assert f"deploy/overlays/{folder.name}" in readme, folder.name
