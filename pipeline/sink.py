"""Where a job's final outcome goes on the driver: its process-local files written, its row
stamped with the job's spec fingerprint, buffered for the results shards, counted, logged and
metered. One place, whatever the scheduler decided (ok, failed, failed after retries)."""

from __future__ import annotations

import logging
from collections.abc import Iterator

from pipeline.manifest import Job
from pipeline.outputs import JobOutcome, ShardWriter
from pipeline.run_metrics import RunMetrics
from pipeline.storage import Storage
from pipeline.summary import RunSummary

log = logging.getLogger("dippipe")


class OutcomeSink:
    def __init__(
        self,
        storage: Storage,
        writer: ShardWriter,
        summary: RunSummary,
        metrics: RunMetrics | None = None,
    ) -> None:
        self.storage, self.writer, self.summary, self.metrics = storage, writer, summary, metrics
        # The spec of each job handed out and not yet finished: bounded by the jobs in
        # flight, buffered or waiting for a retry, not by the manifest.
        self.specs: dict[str, str | None] = {}

    def track(self, jobs: Iterator[Job]) -> Iterator[Job]:
        """``jobs``, remembering each one's spec until its outcome comes."""
        for job in jobs:
            self.specs[job.id] = job.spec
            yield job

    def __call__(self, outcome: JobOutcome) -> None:
        for uri, data in outcome.files.items():  # memory:// outputs of a worker process
            self.storage.write_bytes(uri, data)
        row = outcome.row
        row["spec"] = self.specs.pop(row["id"], row.get("spec"))
        self.writer.add(outcome)
        self.summary.record(row)
        if self.metrics is not None:
            self.metrics.job_finished(row)
        where = f"{row.get('worker')} on node {row.get('node')}"
        if outcome.ok:
            log.info("job %s ok on %s in %.1f s", row["id"], where, row.get("seconds") or 0.0)
        else:
            log.warning("job %s failed on %s: %s", row["id"], where, row.get("error"))
