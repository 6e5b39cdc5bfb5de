"""Writes the example manifests of manifests/examples (Parquet, plus a JSON twin to read).

python -m manifests.make_examples
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.demo import DEMO_JOBS, demo_row
from pipeline.manifest import MANIFEST_SCHEMA

HERE = Path(__file__).parent / "examples"


def demo_rows(inputs: str) -> list[dict]:
    """The demo's jobs, with inputs under `inputs` (as `dippipe demo` names them)."""
    jobs = enumerate(DEMO_JOBS.items(), start=1)
    return [demo_row(job_id, job, seed, inputs, None) for seed, (job_id, job) in jobs]


def main() -> None:
    HERE.mkdir(exist_ok=True)
    for name, inputs in (
        ("demo", "demo-out/inputs"),
        ("s3", "s3://my-bucket/dippipe-demo/inputs"),
    ):
        table = pa.Table.from_pylist(demo_rows(inputs), schema=MANIFEST_SCHEMA)
        pq.write_table(table, HERE / f"{name}.parquet")
        (HERE / f"{name}.json").write_text(json.dumps(table.to_pylist(), indent=2) + "\n")
        print(f"wrote {HERE / name}.parquet")


if __name__ == "__main__":
    main()
