"""The GPU script (benchmarks/gpu_checks.py) in its --smoke CPU mode, so it cannot rot unseen
between the rare runs on a lent GPU; and its row runner: errors and the budget become rows.
Nothing here asserts a speed: rates only have to be finite."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks import gpu_checks
from benchmarks.peaks import peak_for

REPOSITORY = Path(__file__).resolve().parents[1]


def _run(out: Path, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "benchmarks.gpu_checks", "--smoke", "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(REPOSITORY), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [*command, *args], cwd=REPOSITORY, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return done


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines()]


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> tuple[list[dict], Path]:
    out = tmp_path_factory.mktemp("smoke")
    _run(out, "--budget", "240")  # the script's budget acts before the test's timeout
    return _rows(out), out


def test_smoke_run_has_every_stage_and_no_error_row(smoke):
    rows, out = smoke
    assert [r for r in rows if r["status"] == "error"] == []
    env = rows[0]
    assert (env["stage"], env["status"], env["device"]) == ("env", "ok", "cpu")
    assert env["torch"] and env["CPUs"] and env["dynamo"] != "no limit found"
    conv = [r for r in rows if r["stage"].startswith("conv")]
    assert len(conv) == 24 and all(r["status"] == "ok" for r in conv)
    assert all(_finite(r["ms per fit"]) and _finite(r["TFLOP/s"]) for r in conv)
    assert "| grouped K=4 NHWC bf16 cin=24 | ok |" in (out / "table.md").read_text()


def test_smoke_checks_the_engine_switches(smoke):
    """On a CPU the CUDA-only checks are skipped; every switch still fits (the whole-step
    graph runs eagerly there)."""
    rows, _ = smoke
    checks = {r["name"]: r for r in rows if r["stage"] == "engine on CUDA"}
    assert checks.pop("no step syncs the stream")["status"] == "skipped: needs CUDA"
    assert checks.pop("whole-step graph == eager")["status"] == "skipped: needs CUDA"
    assert len(checks) == 6 and all(r["status"] == "ok" for r in checks.values())
    assert all(r["energy last"] < r["energy first"] for r in checks.values())


def test_smoke_speed_rows_measure_the_plain_loop_and_the_engine(smoke):
    rows, _ = smoke
    speed = {(r["stage"], r["name"]): r for r in rows if r["stage"].startswith("speed")}
    stages = list(dict.fromkeys(stage for stage, _ in speed))
    assert stages == ["speed 32 px", "speed 16 px"]  # the large size first
    for stage in stages:
        plain, engine = speed[stage, "plain loop"], speed[stage, "engine fp32"]
        for row in (plain, engine):
            assert row["status"] == "ok"
            assert _finite(row["steps/s"]) and row["steps/s"] > 0 and _finite(row["PSNR"])
        assert _finite(engine["x plain"]) and _finite(engine["dB vs plain"])
        assert speed[stage, "engine fp32 graph"]["status"] == "ok"  # eager on a CPU
        assert speed[stage, "engine bf16 NHWC"]["status"] == "skipped: needs CUDA"
        assert speed[stage, "engine fp32 compile"]["status"] == "skipped: smoke mode"
    packed = [r for r in rows if r["stage"] == "packing 16 px" and r["name"] != "plain loop"]
    assert [(r["name"], r["status"], r["K"]) for r in packed] == [
        (f"packed K={k}", "ok", k) for k in (1, 2, 4)
    ]
    assert all(_finite(r["x K=1"]) for r in packed)


def test_smoke_compares_bf16_with_fp32(smoke):
    rows, _ = smoke
    quality = [r for r in rows if r["stage"] == "quality 32 px"]
    verdict = quality[-1]
    assert (verdict["name"], verdict["status"]) == ("verdict", "ok")
    assert verdict["bf16 keeps quality within 0.1 dB"] in ("yes", "no")
    fits = [r for r in quality[:-1] if r["status"] == "ok"]
    assert len(fits) == verdict["images"] == 3
    assert all(_finite(r["PSNR fp32"]) and _finite(r["PSNR bf16"]) for r in fits)


def test_a_spent_budget_skips_every_stage_and_exits_0(tmp_path):
    _run(tmp_path, "--budget", "0")
    rows = _rows(tmp_path)
    assert rows[0]["stage"] == "env" and rows[0]["status"] == "ok"  # always recorded
    assert [r for r in rows if r["status"] == "error"] == []
    measured = [r["name"] for r in rows[1:] if r["status"] == "ok"]
    assert measured == []
    budget = {r["stage"].split()[0] for r in rows if r["status"] == "skipped: budget"}
    assert {"images", "conv", "speed", "packing", "quality"} <= budget
    assert (tmp_path / "table.md").exists()


def test_the_script_imports_nothing_the_gpu_machine_lacks():
    """The lent machine has torch, numpy, Pillow and scikit-image, but no ray or s3fs."""
    code = "import json, sys, benchmarks.gpu_checks; print(json.dumps(sorted(sys.modules)))"
    env = {**os.environ, "PYTHONPATH": str(REPOSITORY), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPOSITORY, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    loaded = {name.split(".")[0] for name in json.loads(done.stdout)}
    assert loaded.isdisjoint({"ray", "s3fs", "fsspec", "pyarrow", "pipeline", "torchvision"})


def test_a_row_that_raises_becomes_an_error_row_and_later_rows_still_come(tmp_path):
    log = gpu_checks.RowLog(tmp_path)
    runner = gpu_checks.Runner(log, gpu_checks.Budget(60))

    def broken() -> dict:
        raise ValueError("no kernel for this shape")

    runner.row("conv", "broken", broken)
    runner.row("conv", "fine", lambda: {"ms": 1.5, "bad": float("nan")})
    first, second = _rows(tmp_path)
    assert first["status"] == "error" and first["error"] == "ValueError: no kernel for this shape"
    assert "broken" in first["traceback"]
    assert (second["name"], second["status"], second["ms"]) == ("fine", "ok", 1.5)
    assert second["bad"] is None  # JSON has no NaN
    table = (tmp_path / "table.md").read_text()
    assert "| broken | error | ValueError: no kernel for this shape |" in table
    assert "| fine | ok |" in table


def test_a_row_past_its_cap_is_stopped_and_a_row_over_budget_skipped(tmp_path):
    runner = gpu_checks.Runner(gpu_checks.RowLog(tmp_path), gpu_checks.Budget(60))

    def hangs() -> dict:
        time.sleep(30)
        return {}

    started = time.monotonic()
    runner.row("speed", "hangs", hangs, cap=0.3)
    assert time.monotonic() - started < 20
    runner.row("speed", "too long", lambda: {}, estimate=600)
    runner.row("speed", "would eat the reserve", lambda: {}, estimate=10, reserve=55)
    stopped, *skipped = _rows(tmp_path)
    assert stopped["status"] == "error" and stopped["error"].startswith("BudgetExceeded")
    assert [row["status"] for row in skipped] == ["skipped: budget"] * 2


def test_the_ladder_builds_each_compiled_variant_once_and_the_graph_before_compile():
    rungs = gpu_checks.ladder(cuda=True, compile_ok=True)
    names = [r.name for r in rungs]
    assert len(set(names)) == len(names) and all(r.skip is None for r in rungs)
    assert names[0] == "engine fp32" and names[-3:] == [
        "engine bf16 NHWC graph", "engine bf16 NHWC graph compile", "engine bf16 NHWC compile",
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("name", "model", "bf16"),
    [
        ("NVIDIA H200", "H200 (and GH200)", 989.5),
        ("NVIDIA H100 80GB HBM3", "H100 SXM", 989.5),
        ("NVIDIA H100 PCIe", "H100 PCIe", 756.0),
        ("NVIDIA A100-SXM4-80GB", "A100", 312.0),
        ("NVIDIA L4", "L4", 121.0),
        ("NVIDIA L40S", "L40S", 362.0),
    ],
)
def test_the_peak_is_chosen_from_the_device_name(name, model, bf16):
    peak = peak_for(name)
    assert peak is not None and (peak.model, peak.bf16) == (model, bf16)


def test_an_unknown_device_has_no_peak():
    assert peak_for("Some Future GPU") is None and peak_for(None) is None
