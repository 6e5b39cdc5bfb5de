"""deploy/requirements.lock: the image's whole Python stack, exact versions with hashes.

The image is never built here (no Docker engine), so these tests check what a build would
rely on:
- the lock pins every package with sha256 hashes, agrees with pyproject.toml, constraints.txt
  and deploy/requirements.in, and names the command that regenerates it (also in the README);
- the Dockerfile installs Python packages only from that lock, with --require-hashes;
- the lock is a complete, installable set: for the image (CPython 3.12, manylinux x86_64,
  torch 2.11.0 with its CUDA wheels) and for this machine's Python with its CPU torch. pip
  resolves each pin against the registry (`--dry-run --report`: metadata only, no wheel is
  downloaded), the file it picks must carry a hash of the lock, and every dependency that
  file declares must be satisfied by the lock itself (so `pip install --no-deps` misses none).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import dockerfile
import pytest
from packaging.markers import Marker, default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

tomllib = pytest.importorskip("tomllib", reason="reads pyproject.toml with Python 3.11's tomllib")
REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
LOCK = DEPLOY / "requirements.lock"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
UV_CONFIG = tomllib.loads((DEPLOY / "uv.toml").read_text())
INSTRUCTIONS = dockerfile.parse_file(str(DEPLOY / "Dockerfile"))
# Packages whose declared dependencies uv.toml replaces (their own metadata is wrong for us).
NO_DEPS = {canonicalize_name(d["name"]) for d in UV_CONFIG.get("dependency-metadata", [])}
# The image's interpreter: Ubuntu 24.04's python3 (3.12.3) on x86_64 Linux.
IMAGE_ENV = {
    "implementation_name": "cpython",
    "implementation_version": "3.12.3",
    "os_name": "posix",
    "platform_machine": "x86_64",
    "platform_python_implementation": "CPython",
    "platform_system": "Linux",
    "python_full_version": "3.12.3",
    "python_version": "3.12",
    "sys_platform": "linux",
}
# pip's --platform takes exact tags: every manylinux tag glibc 2.39 (Ubuntu 24.04) accepts.
IMAGE_PLATFORMS = [f"manylinux_2_{minor}_x86_64" for minor in range(39, 4, -1)] + [
    "manylinux2014_x86_64",
    "manylinux2010_x86_64",
    "manylinux1_x86_64",
    "linux_x86_64",
]


@dataclass(frozen=True)
class Pin:
    name: str  # canonical
    version: str
    marker: Marker | None
    hashes: frozenset[str]
    via: tuple[str, ...]  # uv's annotations: who asked for it


def parse_lock(text: str) -> dict[str, Pin]:
    """One Pin per package; fails on anything but `name==version [; marker]` with hashes."""
    pins: dict[str, Pin] = {}
    # An entry starts at a line with no indentation that is not a comment.
    for block in re.split(r"\n(?=[^\s#])", text.strip()):
        if block.startswith("#"):
            continue  # the header
        first = block.split("\\", 1)[0].strip()
        requirement = Requirement(first)
        (spec,) = requirement.specifier
        assert spec.operator == "==" and "*" not in spec.version, f"not an exact pin: {first}"
        name = canonicalize_name(requirement.name)
        assert name not in pins, f"{name} is pinned twice (a fork by marker)"
        hashes = frozenset(re.findall(r"--hash=sha256:([0-9a-f]{64})", block))
        via = re.findall(r"^\s*#\s+(?:via\s+)?(\S.*?)\s*$", block, flags=re.MULTILINE)
        pins[name] = Pin(
            name, spec.version, requirement.marker, hashes, tuple(v for v in via if v != "via")
        )
    return pins


PINS = parse_lock(LOCK.read_text())
HEADER = LOCK.read_text().split("\n", 2)[1].lstrip("# ").strip()


def test_every_locked_package_is_an_exact_pin_with_hashes():
    assert len(PINS) > 50, "the lock should hold the whole stack, not just the top level"
    unhashed = [name for name, pin in PINS.items() if not pin.hashes]
    assert not unhashed, f"pinned without a hash: {unhashed}"


def test_parse_lock_refuses_what_pip_would_not_lock():
    good = "a==1.0 \\\n    --hash=sha256:" + "0" * 64 + "\n    # via b\n"
    assert parse_lock(good)["a"].hashes == {"0" * 64}
    with pytest.raises(AssertionError, match="exact pin"):
        parse_lock(good.replace("a==1.0", "a>=1.0"))
    with pytest.raises(AssertionError, match="twice"):
        parse_lock(good + good.replace("1.0", "2.0"))


def test_the_header_command_regenerates_it_and_the_readme_says_so():
    # The header is uv's own: the exact command that wrote this file. uv.toml pins uv's
    # version, so that command always resolves with the same resolver.
    assert HEADER.startswith("uv pip compile --config-file deploy/uv.toml "), HEADER
    for flag in ("--generate-hashes", "--universal", "--exclude-newer", "--fork-strategy fewest"):
        assert flag in HEADER, f"{flag} missing from the lock's command: {HEADER}"
    assert HEADER.endswith("-o deploy/requirements.lock")
    assert UV_CONFIG["required-version"] == "==0.13.8"
    readme = " ".join((DEPLOY / "README.md").read_text().split())
    assert HEADER in readme, "deploy/README.md must give the lock's regeneration command"


def _satisfied(requirement: Requirement) -> None:
    pin = PINS.get(canonicalize_name(requirement.name))
    assert pin is not None, f"{requirement} is not in the lock"
    assert requirement.specifier.contains(pin.version, prereleases=True), (
        f"lock has {pin.name}=={pin.version}, outside {requirement}"
    )


def test_the_lock_honours_pyproject_constraints_and_requirements_in():
    for line in PYPROJECT["project"]["dependencies"]:
        _satisfied(Requirement(line))
    for path in (REPO / "constraints.txt", DEPLOY / "requirements.in"):
        for line in path.read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            requirement = Requirement(line)
            if path.name == "constraints.txt" and requirement.name not in PINS:
                continue  # a constraint on a tool (mypy) the image does not carry
            _satisfied(requirement)
    # The stack the image is described with (deploy/README.md, rayVersion of the manifests).
    assert PINS["torch"].version == "2.11.0" and PINS["ray"].version == "2.60.0"


def _all(cmd: str) -> list[dockerfile.Command]:
    return [i for i in INSTRUCTIONS if i.cmd.upper() == cmd]


def _arg_default(name: str) -> str:
    pairs = (i.value[0].split("=", 1) for i in _all("ARG"))
    return next(p[1] for p in pairs if p[0] == name)


def _pip_installs() -> list[list[str]]:
    """The words of every `pip install` of every RUN (split at &&, ; and newlines)."""
    found = []
    for run in _all("RUN"):
        script = " ".join(run.value)
        for command in re.split(r"&&|;|\n", script):
            words = command.split()
            for i in range(len(words) - 1):
                if words[i].endswith("pip") and words[i + 1] == "install":
                    found.append(words[i + 2 :])
                    break
    return found


def test_the_dockerfile_installs_python_packages_only_from_the_lock():
    """Every Python distribution in the image is pinned in the lock with a hash: the only
    installs are the lock itself (--require-hashes) and dippipe's own source tree, with no
    index (so no dependency can come from elsewhere) and no build isolation (which would
    fetch an unhashed setuptools); the build backend comes from the lock."""
    installs = _pip_installs()
    assert installs, "no pip install found in the Dockerfile"
    copied = {i.value[-1]: i.value[0] for i in _all("COPY") if i.value[0] == "${REQUIREMENTS}"}
    assert _arg_default("REQUIREMENTS") == "deploy/requirements.lock"
    for words in installs:
        targets = [w for w in words if not w.startswith("-")]
        if "-r" in words:
            lock = words[words.index("-r") + 1]
            assert copied.get(f"./{lock}") == "${REQUIREMENTS}", (lock, copied)
            assert "--require-hashes" in words and targets == [lock], words
        else:
            assert targets == ["."], f"a package installed outside the lock: {words}"
            assert {"--no-deps", "--no-index", "--no-build-isolation"} <= set(words), words
    assert sum("-r" in w for w in installs) == 1 and sum("." in w for w in installs) == 1
    build_backend = Requirement(PYPROJECT["build-system"]["requires"][0])
    _satisfied(build_backend)


def test_the_dockerfile_helper_sees_an_unlocked_install():
    # The check above must notice a `pip install somepackage` added to any RUN.
    global INSTRUCTIONS
    saved = INSTRUCTIONS
    extra = dockerfile.parse_string("FROM x\nRUN apt-get update && pip install requests==2.0\n")
    INSTRUCTIONS = [*saved, *extra]
    try:
        with pytest.raises(AssertionError, match="outside the lock"):
            test_the_dockerfile_installs_python_packages_only_from_the_lock()
    finally:
        INSTRUCTIONS = saved


def test_the_image_stage_is_last_and_the_test_stage_runs_a_demo():
    stages = [i.value for i in _all("FROM")]
    assert stages[0][0] == "${BASE_IMAGE}" and stages[0][-1] == "runtime"
    assert stages[-1] == ("runtime", "AS", "image"), "plain `docker build` must give the image"
    test_stage = [i for i, s in enumerate(INSTRUCTIONS) if s.cmd.upper() == "FROM"][1]
    assert INSTRUCTIONS[test_stage].value == ("runtime", "AS", "test")
    run = " ".join(INSTRUCTIONS[test_stage + 1].value)
    assert re.search(r"dippipe demo --iterations \d+ ", run), run
    assert "['ok'] == 3" in run and "['failed'] == 0" in run  # the demo's three jobs ended ok


def test_the_base_image_is_pinned_by_digest():
    base = _arg_default("BASE_IMAGE")
    name, _, digest = base.partition("@")
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", digest), base
    assert name.startswith("nvidia/cuda:13.0.") and name.endswith("-base-ubuntu24.04"), name


def _dry_run(lines: list[str], *extra: str) -> dict[str, dict[str, Any]]:
    """pip's resolution of `lines` (name==version --hash=...), metadata only, as a report."""
    done = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--no-deps",
         "--require-hashes", "--quiet", "--report", "-", "-r", "/dev/stdin", *extra],
        input="\n".join(lines) + "\n", capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(done.stdout)
    return {canonicalize_name(i["metadata"]["name"]): i for i in report["install"]}


def _line(pin: Pin) -> str:
    hashes = " ".join(f"--hash=sha256:{h}" for h in sorted(pin.hashes))
    return f"{pin.name}=={pin.version} {hashes}"


def _check_closure(
    installed: dict[str, tuple[str, list[str]]], roots: list[Requirement], env: dict[str, str]
) -> set[str]:
    """Walk the dependency graph from `roots` through each installed package's declared
    requirements (markers evaluated for `env`, extras followed); every requirement reached
    must be met by `installed` (name -> (version, requires_dist)). Returns the names reached."""
    reached: set[str] = set()
    todo = [(r, "root") for r in roots]
    seen: set[tuple[str, frozenset[str]]] = set()
    while todo:
        requirement, parent = todo.pop()
        extras = {""} | set(requirement.extras)
        name = canonicalize_name(requirement.name)
        assert name in installed, f"{parent} needs {requirement}: not in the lock"
        version, requires = installed[name]
        assert requirement.specifier.contains(version, prereleases=True), (
            f"{parent} needs {requirement}, the lock has {version}"
        )
        reached.add(name)
        key = (name, frozenset(requirement.extras))
        if key in seen or name in NO_DEPS:
            continue
        seen.add(key)
        for text in requires:
            dep = Requirement(text)
            if dep.marker is None or any(dep.marker.evaluate({**env, "extra": e}) for e in extras):
                todo.append((dep, f"{name}=={version}"))
    return reached


def _roots(image: bool) -> list[Requirement]:
    """What the image asks for: the package's dependencies and deploy/requirements.in. Off
    the image, requirements.in's exact torch gives way to the package's range."""
    top = [line.split("#", 1)[0].strip() for line in (DEPLOY / "requirements.in").open()]
    roots = [Requirement(line) for line in top if line]
    if not image:
        roots = [r for r in roots if canonicalize_name(r.name) != "torch"]
    return [*map(Requirement, PYPROJECT["project"]["dependencies"]), *roots]


def _check_hashes(report: dict[str, dict[str, Any]]) -> None:
    for name, item in report.items():
        sha = item["download_info"]["archive_info"]["hashes"]["sha256"]
        assert sha in PINS[name].hashes, f"{name}: pip would install a file not in the lock"


def _torch_only(keep: set[str]) -> set[str]:
    """torch and what only torch (transitively) asked for, by uv's annotations, except what
    `keep` names (what the CPU torch needs too)."""
    dropped = {"torch"}
    while True:
        more = {
            name
            for name, pin in PINS.items()
            if name not in dropped | keep and pin.via and all(v in dropped for v in pin.via)
        }
        if not more:
            return dropped
        dropped |= more


@pytest.mark.registry
def test_the_lock_installs_on_the_image_python_with_torch_cuda():
    """CPython 3.12 on manylinux x86_64, as in the image: every pin has a wheel there (no
    sdist builds in the image: --only-binary), pip picks a file whose hash is locked, and the
    set is complete, torch 2.11.0 with its CUDA 13 wheels included."""
    platforms = [arg for p in IMAGE_PLATFORMS for arg in ("--platform", p)]
    lines = [_line(p) for p in PINS.values() if p.marker is None or p.marker.evaluate(IMAGE_ENV)]
    report = _dry_run(
        lines,
        "--python-version", "3.12", "--only-binary=:all:", "--target", "/nonexistent", *platforms,
    )  # fmt: skip
    assert report["torch"]["metadata"]["version"] == "2.11.0"
    assert any(n.startswith("nvidia-cudnn") for n in report), "torch's CUDA wheels are missing"
    assert all(
        "-cp312-" in i["download_info"]["url"] or "-none-" in i["download_info"]["url"]
        or "-abi3-" in i["download_info"]["url"]
        for i in report.values()
    ), [i["download_info"]["url"] for i in report.values()]  # fmt: skip
    _check_hashes(report)
    installed = {
        n: (i["metadata"]["version"], i["metadata"].get("requires_dist", []))
        for n, i in report.items()
    }
    reached = _check_closure(installed, _roots(image=True), IMAGE_ENV)
    assert reached == set(installed), f"locked but needed by nothing: {set(installed) - reached}"


@pytest.mark.registry
def test_the_lock_installs_here_with_the_cpu_torch():
    """This machine's Python with the CPU torch the Makefile installs (2.13.0+cpu): the lock
    minus torch and what only torch needs (its CUDA wheels) resolves with those hashes, and
    together with the installed torch it is complete. So the versions CI tests are the
    image's versions, torch aside."""
    torch = metadata.distribution("torch")
    assert Version(torch.version).local == "cpu", f"expected the CPU torch, found {torch.version}"
    env = {key: str(value) for key, value in default_environment().items()}
    needs = [Requirement(r) for r in torch.requires or []]
    dropped = _torch_only(
        {canonicalize_name(r.name) for r in needs if r.marker is None or r.marker.evaluate(env)}
    )
    assert {"torch", "triton", "nvidia-cudnn-cu13"} <= dropped and "numpy" not in dropped
    report = _dry_run([_line(p) for n, p in PINS.items() if n not in dropped])
    _check_hashes(report)
    installed = {
        n: (i["metadata"]["version"], i["metadata"].get("requires_dist", []))
        for n, i in report.items()
    }
    installed["torch"] = (torch.version, torch.requires or [])
    _check_closure(installed, _roots(image=False), env)
