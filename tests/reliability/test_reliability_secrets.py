"""Credentials never leak: not in logs, run.json, results, the report or error messages; and
nothing from the inputs is ever unpickled (weights load with weights_only=True)."""

from __future__ import annotations

import ast
import os
import pickle
import subprocess
from pathlib import Path

import pyarrow as pa
import pytest
import torch
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.feature_weights import FeatureWeightsError, load_feature_net
from pipeline.images import encode_png
from pipeline.manifest import MANIFEST_SCHEMA
from pipeline.outputs import read_results, read_traces
from pipeline.storage import Storage, StorageOptions, join
from tests.support.builders import TINY_PARAMS, tiny_image
from tests.support.processes import DIPPIPE

SECRET = "dippipe-SECRET-KEY-7f3c9a1e5b2d"
TOKEN = "dippipe-SESSION-TOKEN-2d8e4b6a0c9f"
ROOT = Path(__file__).resolve().parents[2]


def _leaks(text: str) -> list[str]:
    return [value for value in (SECRET, TOKEN) if value in text]


@pytest.mark.s3
@pytest.mark.slow
def test_credentials_appear_in_no_output(s3_bucket, s3_endpoint, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_SESSION_TOKEN", TOKEN)
    storage = Storage(StorageOptions.from_env())
    inputs = join(s3_bucket, "in")
    storage.write_bytes(join(inputs, "a.png"), encode_png(tiny_image(4)))
    storage.write_bytes(join(inputs, "corrupt.png"), b"\x89PNG\r\n\x1a\n broken")
    common = {"task": "denoise", "iterations": 5, "params": TINY_PARAMS}
    rows = [
        {"id": "good", "image": join(inputs, "a.png"), **common},
        {"id": "missing", "image": join(inputs, "nope.png"), **common},
        {"id": "corrupt", "image": join(inputs, "corrupt.png"), **common},
        {"id": "no-bucket", "image": "s3://no-such-bucket-dippipe/x.png", **common},
    ]
    manifest, out = join(s3_bucket, "m.parquet"), join(s3_bucket, "out")
    storage.write_parquet(manifest, pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA))

    # `run` in its own process, so its Ray workers start with these credentials too; their
    # log lines come back through the driver's output.
    run = subprocess.run(
        [*DIPPIPE, "run", manifest, "--out", out, "--gpus", "0", "--workers", "1"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_SESSION_TOKEN": TOKEN},
    )
    assert run.returncode == 1, run.stdout + run.stderr  # three jobs fail, with errors
    runner = CliRunner()
    validate = runner.invoke(app, ["validate", manifest])
    report = runner.invoke(app, ["report", out])
    assert report.exit_code == 0, report.output

    texts = {"run output": run.stdout + run.stderr, "validate": validate.output}
    texts["report command"] = report.output
    results = read_results(storage, out)
    errors = {row["id"]: row["error"] for row in results.to_pylist()}
    assert errors["good"] is None and "not found" in errors["missing"]
    assert errors["no-bucket"], errors
    texts["results"] = str(results.to_pylist())
    texts["traces"] = str(read_traces(storage, out).to_pylist())
    fs, path = storage.resolve(out)
    for key in fs.find(path):  # every object the run wrote: run.json, report.html, ...
        if not key.endswith(".png"):
            texts[key] = storage.read_bytes(f"s3://{key}").decode("utf-8", errors="replace")
    assert any(key.endswith("run.json") for key in texts)
    assert any(key.endswith("report.html") for key in texts)
    leaked = {name: _leaks(text) for name, text in texts.items() if _leaks(text)}
    assert not leaked


def test_a_pickle_posing_as_weights_is_never_executed(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    (tmp_path / "evil.pth").write_bytes(pickle.dumps({"weight": Payload()}))
    torch.save({"w": Payload()}, tmp_path / "evil-zip.pth")  # torch's own container
    for name in ("evil.pth", "evil-zip.pth"):
        with pytest.raises(FeatureWeightsError, match="cannot load"):
            load_feature_net(tmp_path / name)
    assert not marker.exists()


UNSAFE_MODULES = {"pickle", "cPickle", "cloudpickle", "dill", "marshal", "shelve", "joblib"}


def _unsafe_calls(tree: ast.AST) -> list[str]:
    """torch.load without weights_only=True, np.load(allow_pickle=True), yaml.load, eval, exec,
    and any import of a pickle-like module."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            names.append(getattr(node, "module", None) or "")
            found += [f"import {n}" for n in names if n.split(".")[0] in UNSAFE_MODULES]
        if not isinstance(node, ast.Call):
            continue
        name = ast.unparse(node.func)
        keywords = {k.arg: ast.unparse(k.value) for k in node.keywords}
        if name.endswith("torch.load") and keywords.get("weights_only") != "True":
            found.append(ast.unparse(node))
        if name.endswith("np.load") and keywords.get("allow_pickle") == "True":
            found.append(ast.unparse(node))
        if name in ("eval", "exec", "yaml.load", "yaml.unsafe_load", "pd.read_pickle"):
            found.append(ast.unparse(node))
    return found


def test_no_code_path_unpickles_or_evaluates_inputs():
    files = sorted((ROOT / "pipeline").glob("*.py")) + sorted((ROOT / "dip_core").glob("*.py"))
    assert len(files) > 20
    offenders = {
        str(path.relative_to(ROOT)): calls
        for path in files
        if (calls := _unsafe_calls(ast.parse(path.read_text())))
    }
    assert not offenders
    assert _unsafe_calls(ast.parse("import torch\ntorch.load(f)"))  # the check does bite
