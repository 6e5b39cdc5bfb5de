"""A run's Ray metrics (``ray.util.metrics``), recorded by the driver as results come in, so
the Ray dashboard and Prometheus show a run: jobs finished by status and error kind, seconds
per job, steps per second per worker, jobs running and pending.

Ray exports them (prefixed ``ray_``) through each node's metrics agent, which comes with
``ray[default]``; the embedded local Ray serves them on ``--metrics-port``. Recording never
fails a run: a metric that Ray refuses is logged once and dropped.
"""

from __future__ import annotations

import logging
from typing import Any

from ray.util.metrics import Counter, Gauge, Histogram

log = logging.getLogger("dippipe")
JOB_SECONDS_BOUNDARIES = [1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0,
                          3600.0, 7200.0, 14400.0]  # fmt: skip


class RunMetrics:
    """The run's metrics; made after Ray is connected (a metric needs its core worker)."""

    def __init__(self) -> None:
        self.failed_once = False
        self.jobs = Counter(
            "dippipe_jobs_finished",
            description="Jobs with a committed result, by status and error kind.",
            tag_keys=("status", "error_kind"),
        )
        self.job_seconds = Histogram(
            "dippipe_job_seconds",
            description="Wall-clock seconds of a finished job on its worker.",
            boundaries=JOB_SECONDS_BOUNDARIES,
            tag_keys=("status",),
        )
        self.steps_per_second = Gauge(
            "dippipe_worker_steps_per_second",
            description="Fitting steps per second of a worker's last finished job.",
            tag_keys=("worker",),
        )
        self.running = Gauge("dippipe_jobs_running", description="Jobs being fitted now.")
        self.pending = Gauge("dippipe_jobs_pending", description="Jobs not yet finished.")

    def job_finished(self, row: dict[str, Any]) -> None:
        status = row.get("status") or "unknown"
        seconds = row.get("seconds")
        self._record(
            self.jobs.inc, 1, {"status": status, "error_kind": row.get("error_kind") or ""}
        )
        if seconds:
            self._record(self.job_seconds.observe, seconds, {"status": status})
            if row.get("iterations") and row.get("worker"):
                rate = row["iterations"] / seconds
                self._record(self.steps_per_second.set, rate, {"worker": row["worker"]})

    def progress(self, running: int, pending: int) -> None:
        self._record(self.running.set, running, None)
        self._record(self.pending.set, pending, None)

    def _record(self, method: Any, value: float, tags: dict[str, str] | None) -> None:
        try:
            method(value, tags=tags)
        except Exception as error:  # metrics must never stop a run
            if not self.failed_once:
                self.failed_once = True
                log.warning("Ray metrics not recorded: %s", error)
