"""`dippipe run`'s exit codes (pipeline/exit_codes.py): what each outcome maps to, including
the errors that stop a run before or after work ran."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

import pipeline.cli as cli
from pipeline.exit_codes import ExitCode
from pipeline.lock import OutLockedError
from pipeline.outputs import KIND_INFRA, KIND_JOB, OutputWriteError
from pipeline.scheduler import WorkersKeepDying
from pipeline.summary import RunSummary

runner = CliRunner()


def _row(kind: str | None, status: str = "failed") -> dict:
    return {"id": "x", "status": status, "error": "e", "error_kind": kind, "iterations": 3}


def test_the_summary_maps_outcomes_to_the_table():
    summary = RunSummary()
    summary.record(_row(None, "ok"))
    assert summary.exit_code() == ExitCode.OK
    summary.record(_row(KIND_JOB))
    assert summary.exit_code() == ExitCode.JOBS_FAILED
    assert summary.exit_code(ok_on_bad_input=True) == ExitCode.OK
    summary.record(_row("died"))  # killed its worker alone: not a bad input
    assert summary.exit_code(ok_on_bad_input=True) == ExitCode.JOBS_FAILED
    summary.record(_row(KIND_INFRA))
    assert summary.exit_code() == ExitCode.INFRASTRUCTURE  # a rerun is worth it
    summary.interrupted = True
    assert summary.exit_code() == ExitCode.INTERRUPTED


def test_failures_of_earlier_runs_count_unless_they_were_bad_inputs():
    summary = RunSummary(skipped_failed=2, skipped_failed_bad_input=2)
    assert summary.exit_code() == ExitCode.JOBS_FAILED
    assert summary.exit_code(ok_on_bad_input=True) == ExitCode.OK
    summary.skipped_failed = 3  # one earlier failure of another kind
    assert summary.exit_code(ok_on_bad_input=True) == ExitCode.JOBS_FAILED


@pytest.mark.parametrize(
    ("error", "code", "said"),
    [
        (WorkersKeepDying("workers keep dying: CUDA error"), ExitCode.INFRASTRUCTURE, "CUDA"),
        (OutputWriteError("cannot write results"), ExitCode.INFRASTRUCTURE, "cannot write"),
        (OutLockedError("OUT is locked by run 7"), ExitCode.INFRASTRUCTURE, "locked by run 7"),
        (ZeroDivisionError("a defect"), ExitCode.INTERNAL, "internal error"),
    ],
)
def test_errors_that_stop_the_run_exit_with_their_code(monkeypatch, tmp_path, error, code, said):
    def failing_run(config, console):
        raise error

    monkeypatch.setattr(cli, "run", failing_run)
    result = runner.invoke(cli.app, ["run", "m.parquet", "--out", str(tmp_path), "--no-progress"])
    assert result.exit_code == code, result.output
    assert said in result.output
    if code == ExitCode.INTERNAL:
        assert "ZeroDivisionError" in result.output  # the traceback to report


def test_no_storage_credentials_is_the_infrastructure_not_an_internal_error(monkeypatch, tmp_path):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance role to ask
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    args = ["run", "s3://no-creds-bucket/m.parquet", "--out", "s3://no-creds-bucket/out",
            "--s3-endpoint-url", "http://127.0.0.1:9", "--no-progress"]  # fmt: skip
    result = runner.invoke(cli.app, args)
    text = " ".join(result.output.split())
    assert result.exit_code == ExitCode.INFRASTRUCTURE, text
    assert "cannot use the storage: NoCredentialsError" in text and "nothing was run" in text
