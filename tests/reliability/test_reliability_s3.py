"""The S3 endpoint goes away mid-run for several seconds and comes back: transient errors are
retried with backoff (bounded, configurable), and the run ends with every job exactly once.

How the outage is made, honestly: the endpoint the pipeline talks to is a TCP forwarder process
in front of the session's moto server (tests.support.network.TcpProxy). It is SIGKILLed (open
connections reset, new ones refused: what a crashed S3 endpoint looks like from the client) and
started again on the same port after a pause longer than botocore's own retries. moto's
in-memory store sits behind it and survives, as a real S3 or MinIO keeps its objects across a
restart; killing moto itself would instead lose every object, which no real S3 does.
"""

from __future__ import annotations

import json
import threading
import time

import pyarrow as pa
import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.images import decode_image, encode_png
from pipeline.manifest import MANIFEST_SCHEMA
from pipeline.retry import RetryPolicy, StorageUnavailableError, call_with_retry, is_transient
from pipeline.storage import Storage, StorageOptions, join
from tests.support.builders import tiny_image
from tests.support.network import TcpProxy
from tests.support.results import assert_exactly_once, results

OUTAGE_SECONDS = 8.0  # longer than botocore's internal retries (about 3 to 6 s)


def _outage(proxy: TcpProxy, storage: Storage, out: str, events: dict) -> None:
    while len(results(out, storage)) < 3:
        if events.get("run over"):
            return
        time.sleep(0.1)
    proxy.kill()
    events["down"] = time.monotonic()
    time.sleep(OUTAGE_SECONDS)
    proxy.start()
    events["up"] = time.monotonic()


@pytest.mark.s3
@pytest.mark.ray
@pytest.mark.slow
def test_s3_endpoint_down_mid_run_is_ridden_out_by_retries(
    s3_bucket, s3_endpoint, ray_local, monkeypatch, capfd
):
    direct = Storage(StorageOptions.from_env(endpoint_url=s3_endpoint))  # the test's own view
    ids = [f"s{i:02d}" for i in range(40)]  # enough work left after the outage starts
    image = join(s3_bucket, "in", "a.png")
    direct.write_bytes(image, encode_png(tiny_image(3)))
    rows = [{"id": i, "task": "denoise", "image": image, "iterations": 5} for i in ids]
    manifest = join(s3_bucket, "m.parquet")
    direct.write_parquet(manifest, pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA))
    out = join(s3_bucket, "out")

    port = int(s3_endpoint.rsplit(":", 1)[1])
    proxy, events = TcpProxy(port), {}
    proxy.start()
    monkeypatch.setenv("DIPPIPE_IO_RETRY_WAIT", "0.5")  # first wait; doubled, up to 30 s
    outage = threading.Thread(target=_outage, args=(proxy, direct, out, events))
    outage.start()
    try:
        args = ["run", manifest, "--out", out, "--s3-endpoint-url", proxy.url, "--gpus", "2"]
        args += ["--flush-rows", "1", "--io-retries", "8", "--fake-fit-seconds", "0.4"]
        result = CliRunner().invoke(app, [*args, "--no-progress"])
    finally:
        events["run over"] = True
        outage.join()
        proxy.kill()
    output = " ".join((result.output + capfd.readouterr().err).split())
    assert "down" in events and "up" in events, output
    assert result.exit_code == 0, output
    # (The workers' "retry 1 of 8 ... EndpointConnectionError" log lines reach this process
    # through Ray's asynchronous log forwarding, which on a loaded machine can lag past the
    # end of the test; the rows below prove the retries instead.)
    rows = assert_exactly_once(out, ids, direct)
    assert all(row["status"] == "ok" for row in rows.values()), output
    # Some job was held up by the outage and still finished (rather than failing):
    assert max(row["seconds"] for row in rows.values()) > OUTAGE_SECONDS / 2
    for row in rows.values():  # every PNG whole and where its row says
        assert decode_image(direct.read_bytes(row["output"])).size == (24, 24)
    assert not direct.exists(join(out, ".lock"))
    record = json.loads(direct.read_bytes(join(out, "run.json")))
    assert record["config"]["storage"]["retries"] == 8
    assert record["summary"]["ok"] == len(ids)


def test_only_transient_errors_are_retried_and_the_bound_holds():
    calls, waits = [], []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionResetError(104, "Connection reset by peer")
        return "done"

    policy = RetryPolicy(retries=4, wait=0.5, max_wait=1.5)
    assert call_with_retry(flaky, policy, "read x", sleep=waits.append) == "done"
    assert len(calls) == 3 and 0.5 <= waits[0] <= 0.625 and 1.0 <= waits[1] <= 1.25
    assert policy.delays() == [0.5, 1.0, 1.5, 1.5]

    def down():
        raise TimeoutError("timed out")

    with pytest.raises(StorageUnavailableError, match="read y failed 5 times") as caught:
        call_with_retry(down, policy, "read y", sleep=waits.append)
    assert not is_transient(caught.value)  # an outer layer does not retry it again

    for permanent in (FileNotFoundError("x"), PermissionError(13, "denied"), OSError(28, "full")):
        calls.clear()

        def fails(error=permanent):
            calls.append(1)
            raise error

        with pytest.raises(type(permanent)):
            call_with_retry(fails, policy, "write z", sleep=waits.append)
        assert len(calls) == 1  # raised at once: the job fails with the real reason
