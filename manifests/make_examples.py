"""Writes the example manifests of manifests/examples (Parquet, plus a JSON twin to read).

python -m manifests.make_examples
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.demo import DEMO_JOBS
from pipeline.manifest import MANIFEST_SCHEMA

HERE = Path(__file__).parent / "examples"


def demo_rows(inputs: str) -> list[dict]:
    """The demo's jobs, with inputs under `inputs` (as `dippipe demo` names them)."""
    rows = []
    for seed, (job_id, (task, _source, steps, params)) in enumerate(DEMO_JOBS.items(), start=1):
        row = {"id": job_id, "task": task, "seed": seed, "iterations": steps}
        row["image"] = f"{inputs}/{job_id}_image.png"
        row["reference"] = f"{inputs}/{job_id}_ref.png"
        row["mask"] = f"{inputs}/{job_id}_mask.png" if task == "inpaint" else None
        row["scale"] = 2 if task == "super_resolution" else None
        row["params"] = json.dumps(params)
        rows.append(row)
    return rows


def main() -> None:
    HERE.mkdir(exist_ok=True)
    for name, inputs in (
        ("demo", "demo-out/inputs"),
        ("s3", "s3://my-bucket/dippipe-demo/inputs"),
    ):
        rows = demo_rows(inputs)
        pq.write_table(pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA), HERE / f"{name}.parquet")
        (HERE / f"{name}.json").write_text(json.dumps(rows, indent=2) + "\n")
        print(f"wrote {HERE / name}.parquet")


if __name__ == "__main__":
    main()
