"""OUT/run.json and OUT/runs/<run id>.json: what a run was (configuration, versions, workers)
and how it went (counts, pack occupancy). run.json is the latest run's; runs/ keeps every
run's, named by the run id that its results rows carry (the ``run_id`` column), so a row's
provenance survives later runs. Never credentials.
"""

from __future__ import annotations

import json
import re
import socket
import sys
from dataclasses import asdict
from datetime import datetime, timezone
from importlib import metadata
from typing import TYPE_CHECKING

from pipeline.outputs import new_run_id
from pipeline.storage import Storage, join
from pipeline.summary import RunSummary

if TYPE_CHECKING:
    from pipeline.runner import RunConfig

VERSIONED = (
    *("dippipe", "torch", "ray", "pyarrow", "fsspec", "s3fs", "pillow", "numpy"),
    *("tifffile", "imagecodecs"),
)


class RunRecord:
    """One run's record (see the module docstring). ``packing`` (null when no worker packs
    fits, e.g. one lane each, or the run was interrupted): ``mean_occupancy``, the share of
    pack slots that held a fit over every packed step of every worker (1.0 = packs always
    full), ``mean_fits`` per step, ``steps``, ``workers``, ``lanes``, and ``lookahead`` (null
    when off): buffer size, fairness bound, picks, matched picks, picks forced by the fairness
    bound, header reads, unknown keys, mean seconds per header read. Gathered when the
    scheduling ends (packing.summarize, lookahead.py)."""

    def __init__(self, storage: Storage, config: RunConfig, run_id: str | None = None) -> None:
        self.storage, self.config = storage, config
        self.run_id = run_id or new_run_id()
        self.started = datetime.now(timezone.utc).isoformat()
        self.workers: list[dict] = []
        self.packing: dict | None = None

    def write(self, summary: RunSummary, finished: bool = False) -> None:
        record = {
            "run_id": self.run_id,
            "started_at": self.started,
            "finished_at": datetime.now(timezone.utc).isoformat() if finished else None,
            "host": socket.gethostname(),
            "python": sys.version.split()[0],
            "versions": _versions(),
            "config": _recorded_config(self.config),
            "workers": self.workers,
            "summary": summary.as_dict(),
            "packing": self.packing,
        }
        data = json.dumps(record, indent=2, default=str).encode()
        self.storage.write_bytes(join(self.config.out, "runs", f"{self.run_id}.json"), data)
        self.storage.write_bytes(join(self.config.out, "run.json"), data)


def _recorded_config(config: RunConfig) -> dict:
    """The run's settings and its workers' in one flat object, as scripts read them
    (``config.manifest``, ``config.storage``...): no credentials, not even in a URI."""
    recorded = asdict(config)
    recorded.update(recorded.pop("worker"))
    recorded["storage"] = config.storage.public()
    recorded["manifest"], recorded["out"] = redact(config.manifest), redact(config.out)
    return recorded


def redact(uri: str) -> str:
    """Drop any user:password@ from a URI before it is recorded."""
    return re.sub(r"://[^/@]*@", "://", uri)


def _versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in VERSIONED:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions
