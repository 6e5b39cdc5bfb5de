"""Manifest, inputs and outputs all on S3 (moto's server on 127.0.0.1), through the CLI."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.images import decode_image, encode_png
from pipeline.manifest import MANIFEST_SCHEMA
from pipeline.outputs import read_results, read_traces
from pipeline.storage import Storage, StorageOptions, join
from tests.support.builders import TINY_PARAMS, tiny_image

runner = CliRunner()


@pytest.mark.s3
@pytest.mark.ray
def test_run_and_validate_on_s3(s3_bucket, ray_local):
    storage = Storage(StorageOptions.from_env())
    inputs = join(s3_bucket, "inputs")
    storage.write_bytes(join(inputs, "a.png"), encode_png(tiny_image(7)))
    storage.write_bytes(join(inputs, "lr.png"), encode_png(tiny_image(8, 12)))
    common = {"iterations": 10, "params": TINY_PARAMS}
    rows = [
        {"id": "s3-denoise", "task": "denoise", "image": join(inputs, "a.png"), **common},
        {
            "id": "s3-sr",
            "task": "super_resolution",
            "image": join(inputs, "lr.png"),
            "scale": 2,
            "reference": join(inputs, "a.png"),
            **common,
        },
        {"id": "s3-missing", "task": "denoise", "image": join(inputs, "gone.png"), **common},
    ]
    manifest = join(s3_bucket, "manifests", "m.parquet")
    storage.write_parquet(manifest, pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA))

    checked = runner.invoke(app, ["validate", manifest])
    assert checked.exit_code == 1 and "gone.png" in checked.output

    out = join(s3_bucket, "out")
    result = runner.invoke(app, ["run", manifest, "--out", out, "--gpus", "2", "--no-progress"])
    assert result.exit_code == 1, result.output
    results = {row["id"]: row for row in read_results(storage, out).to_pylist()}
    assert results["s3-denoise"]["status"] == "ok", results["s3-denoise"]["error"]
    assert results["s3-sr"]["status"] == "ok", results["s3-sr"]["error"]
    assert results["s3-sr"]["psnr"] is not None
    assert results["s3-missing"]["error"] == f"image not found: {join(inputs, 'gone.png')}"
    sr = decode_image(storage.read_bytes(results["s3-sr"]["output"]))
    assert results["s3-sr"]["output"].startswith(f"{out}/images/") and sr.size == (24, 24)
    traces = read_traces(storage, out).to_pylist()
    assert sorted({t["id"] for t in traces}) == ["s3-denoise", "s3-sr"] and len(traces) == 20
    record = json.loads(storage.read_bytes(join(out, "run.json")))
    assert record["config"]["storage"]["endpoint_url"].startswith("http://127.0.0.1")
    assert "testing-secret-value" not in json.dumps(record)

    again = runner.invoke(app, ["run", manifest, "--out", out, "--no-progress"])
    assert again.exit_code == 1 and "nothing to do" in " ".join(again.output.split())
    assert len(read_results(storage, out)) == 3
