"""deploy/entrypoint.sh (the image's `dippipe-entrypoint`, the RayJob's entrypoint) maps
dippipe's exit codes so that KubeRay retries only what a rerun can fix, and agrees with the
RayJob manifest and the pipeline's exit-code table.

The script runs for real here, with a fake `dippipe` (a shell script) that exits with each
code of pipeline/exit_codes.py, or waits for a signal as the real one flushes on SIGTERM.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.exit_codes import ExitCode

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")

REPO = Path(__file__).resolve().parents[2]
ENTRYPOINT = REPO / "deploy" / "entrypoint.sh"
RAYJOB = yaml.safe_load((REPO / "deploy" / "kuberay" / "rayjob.yaml").read_text())

FAKE_DIPPIPE = """#!/usr/bin/env bash
printf 'arg:%s\\n' "$@"
echo "owner:${DIPPIPE_OWNER_ID:-}"
if [ -n "${FAKE_WAIT:-}" ]; then
    trap 'sleep 0.3; echo flushed; exit 130' TERM
    echo ready
    while :; do sleep 0.05; done
fi
exit "${FAKE_CODE:-0}"
"""

# What KubeRay must see for each code of the pipeline's table: 0 = the RayJob is done,
# non-zero = a failed attempt that backoffLimit retries on a new cluster.
EXPECTED = {
    ExitCode.OK: 0,
    ExitCode.JOBS_FAILED: 0,  # a rerun skips failed jobs: nothing would change
    ExitCode.UNUSABLE: 0,  # nothing ran; the same input stays unusable
    ExitCode.INFRASTRUCTURE: 3,  # a new cluster may well get further: retried, resumes
    ExitCode.INTERNAL: 4,  # kept visible as a Failed RayJob
    ExitCode.INTERRUPTED: 130,  # stopped mid-run: retried, resumes
}


@pytest.fixture
def fake(tmp_path: Path) -> dict[str, str]:
    script = tmp_path / "fake-dippipe"
    script.write_text(FAKE_DIPPIPE)
    script.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("DIPPIPE")}
    return {**env, "DIPPIPE": str(script)}


def _run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(ENTRYPOINT), *args], env=env, capture_output=True, text=True, timeout=30
    )


def test_every_exit_code_of_the_table_is_mapped_on_purpose():
    assert set(EXPECTED) == set(ExitCode), "a new exit code needs a decision here and in the script"


@pytest.mark.parametrize("code", list(EXPECTED), ids=lambda c: f"{c.name}-{int(c)}")
def test_exit_codes_become_what_kuberay_should_do(fake, code: ExitCode):
    done = _run({**fake, "FAKE_CODE": str(int(code))}, "s3://b/m.parquet", "--out", "s3://b/o")
    assert done.returncode == EXPECTED[code], done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"dippipe-entrypoint: dippipe exited {int(code)} ("), last
    assert f"; exiting {EXPECTED[code]}" in last or (code == 0 and last.endswith("(every job ok)"))


def test_an_unknown_code_such_as_a_kill_is_retried(fake):
    done = _run({**fake, "FAKE_CODE": "137"}, "m.parquet")
    assert done.returncode == 137 and "signal 9" in done.stderr


def test_final_codes_can_be_changed(fake):
    done = _run({**fake, "FAKE_CODE": "2", "DIPPIPE_FINAL_CODES": "1"}, "m.parquet")
    assert done.returncode == 2  # now retried
    done = _run({**fake, "FAKE_CODE": "4", "DIPPIPE_FINAL_CODES": "1 2 4"}, "m.parquet")
    assert done.returncode == 0


def test_arguments_pass_through_unchanged_after_run(fake):
    done = _run(fake, "s3://b/my manifest.parquet", "--out", "s3://b/o", "--gpus", "4")
    args = [line[4:] for line in done.stdout.splitlines() if line.startswith("arg:")]
    assert args == ["run", "s3://b/my manifest.parquet", "--out", "s3://b/o", "--gpus", "4"]


def test_the_owner_id_comes_from_the_rayjob_only(fake):
    owner = {**fake, "DIPPIPE_RAYJOB": "dippipe-run", "DIPPIPE_NAMESPACE": "batch"}
    assert "owner:rayjob/batch/dippipe-run" in _run(owner, "m").stdout
    assert "owner:\n" in _run(fake, "m").stdout + "\n"  # interactive: no owner, no takeover
    given = {**owner, "DIPPIPE_OWNER_ID": "mine"}
    assert "owner:mine" in _run(given, "m").stdout  # an explicit one wins


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process groups, signals")
def test_a_stop_reaches_dippipe_and_its_own_code_is_reported(fake):
    """`ray job stop` signals the entrypoint and its children; dippipe flushes and exits 130:
    the script must wait for it (not die first) and exit 130 so the RayJob is retried."""
    process = subprocess.Popen(
        ["bash", str(ENTRYPOINT), "m.parquet"],
        env={**fake, "FAKE_WAIT": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert process.stdout is not None
        while process.stdout.readline().strip() != "ready":
            assert process.poll() is None
        os.killpg(process.pid, signal.SIGTERM)  # the script and dippipe, as Ray does
        out, err = process.communicate(timeout=20)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert "flushed" in out
    assert process.returncode == 130, err
    assert "dippipe exited 130 (interrupted" in err


def test_the_rayjob_runs_the_entrypoint_with_its_own_name():
    words = shlex.split(RAYJOB["spec"]["entrypoint"])
    env = dict(w.split("=", 1) for w in words if "=" in w and not w.startswith("-"))
    assert env.get("DIPPIPE_RAYJOB") == RAYJOB["metadata"]["name"]
    command = [w for w in words if w not in {f"{k}={v}" for k, v in env.items()}]
    assert command[0] == "dippipe-entrypoint"


def test_backoff_limit_is_spent_only_on_what_a_retry_can_fix():
    spec = RAYJOB["spec"]
    assert spec["backoffLimit"] >= 1  # codes 3 and 130 deserve another cluster
    # The script's default final codes are the table's "nothing a rerun can fix" codes.
    text = ENTRYPOINT.read_text()
    assert 'final_codes=" ${DIPPIPE_FINAL_CODES:-1 2} "' in text
    # and the head gives dippipe time to flush when Ray stops the job
    head = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in head.get("env", [])}
    assert int(env["RAY_JOB_STOP_WAIT_TIME_S"]) >= 30
