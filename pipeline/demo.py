"""`dippipe demo`: three bundled scikit-image photos, degraded with fixed seeds, restored.

Writes under OUT: ``inputs/`` (clean references, degraded observations, the mask),
``manifest.parquet``, and everything a run writes (``images/``, ``results/``, ``traces/``,
``run.json``). Sizes and networks are small so it finishes in a few minutes on 2 CPU cores.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from PIL import Image
from rich.console import Console
from rich.table import Table
from skimage import data

from dip_core import psnr
from pipeline.images import decode_image, encode_png
from pipeline.manifest import MANIFEST_SCHEMA
from pipeline.outputs import read_results
from pipeline.runner import RunConfig, run
from pipeline.storage import Storage, join
from pipeline.worker import WorkerConfig

SIZE = 64
NOISE_SIGMA = 25 / 255
SMALL_NET = {"channels": 32, "depth": 4, "skip_channels": 4, "input_depth": 16}


def _clean(name: str) -> np.ndarray:
    """A centred square crop of a bundled photo, SIZE px, as (3, H, W) floats."""
    pixels = getattr(data, name)()
    side = min(pixels.shape[:2])
    top, left = (pixels.shape[0] - side) // 2, (pixels.shape[1] - side) // 2
    crop = Image.fromarray(pixels[top : top + side, left : left + side])
    small = crop.resize((SIZE, SIZE), Image.Resampling.LANCZOS)
    return np.asarray(small, dtype=np.float32).transpose(2, 0, 1) / 255.0


def _add_noise(clean: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    noisy = clean + rng.normal(0.0, NOISE_SIGMA, clean.shape).astype(np.float32)
    return {"image": noisy.clip(0, 1)}


def _lose_half_the_pixels(clean: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    known = (rng.random(clean.shape[1:]) >= 0.5).astype(np.float32)
    return {"image": clean * known, "mask": known[None]}


def _halve(clean: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    hr = Image.fromarray(np.rint(clean.transpose(1, 2, 0) * 255).astype(np.uint8))
    low = hr.resize((SIZE // 2, SIZE // 2), Image.Resampling.LANCZOS)
    return {"image": np.asarray(low, dtype=np.float32).transpose(2, 0, 1) / 255.0}


@dataclass(frozen=True)
class DemoJob:
    task: str
    source: str  # a scikit-image sample photo
    iterations: int
    params: dict
    degrade: Callable[[np.ndarray, np.random.Generator], dict[str, np.ndarray]]  # by role
    scale: int | None = None


DEMO_JOBS = {
    "astronaut-denoise": DemoJob("denoise", "astronaut", 900, SMALL_NET, _add_noise),
    "coffee-inpaint": DemoJob("inpaint", "coffee", 1200, {**SMALL_NET, "lr": 0.01},
                              _lose_half_the_pixels),
    "chelsea-sr-x2": DemoJob("super_resolution", "chelsea", 800, SMALL_NET, _halve, scale=2),
}  # fmt: skip


def demo_row(job_id: str, job: DemoJob, seed: int, inputs: str, iterations: int | None) -> dict:
    """The manifest row of a demo job whose files are under ``inputs`` (what build_demo
    writes there: the degraded image and companions by role, and the clean reference)."""
    blank = np.zeros((3, SIZE, SIZE), dtype=np.float32)
    roles = job.degrade(blank, np.random.default_rng(0))  # which files, not their pixels
    row: dict[str, Any] = {"id": job_id, "task": job.task, "seed": seed,
                           "iterations": iterations or job.iterations}  # fmt: skip
    row.update({role: join(inputs, f"{job_id}_{role}.png") for role in roles})
    row["reference"] = join(inputs, f"{job_id}_ref.png")
    row.update(scale=job.scale, params=json.dumps(job.params))
    return row


def build_demo(storage: Storage, out: str, iterations: int | None = None) -> str:
    """Write the inputs and the manifest; returns the manifest's URI."""
    rows = []
    inputs = join(out, "inputs")
    for seed, (job_id, job) in enumerate(DEMO_JOBS.items(), start=1):
        row = demo_row(job_id, job, seed, inputs, iterations)
        clean = _clean(job.source)
        storage.write_bytes(row["reference"], encode_png(clean))
        for role, pixels in job.degrade(clean, np.random.default_rng(seed)).items():
            storage.write_bytes(row[role], encode_png(pixels))
        rows.append(row)
    manifest = join(out, "manifest.parquet")
    storage.write_parquet(manifest, pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA))
    return manifest


def _psnr_of(storage: Storage, uri: str | None, reference: str) -> float | None:
    """PSNR of a file against the reference (dip_core's metric), when the sizes agree."""
    if not uri:
        return None
    image = torch.from_numpy(decode_image(storage.read_bytes(uri)).pixels)
    ref = torch.from_numpy(decode_image(storage.read_bytes(reference)).pixels)
    return float(psnr(image, ref)) if image.shape == ref.shape else None


def _table(storage: Storage, manifest: str, out: str) -> Table:
    jobs = {row["id"]: row for row in storage.read_parquet(manifest).to_pylist()}
    table = Table(title="demo: PSNR against the clean image (dB)")
    for column in ("job", "task", "status", "degraded", "restored", "steps", "output"):
        table.add_column(column)
    for row in read_results(storage, out).to_pylist():
        job = jobs[row["id"]]
        degraded = _psnr_of(storage, job["image"], job["reference"])
        restored = row["psnr"]
        table.add_row(
            row["id"],
            row["task"],
            row["status"],
            "-" if degraded is None else f"{degraded:.2f}",
            "-" if restored is None else f"{restored:.2f}",
            str(row["iterations"]),
            row["output"] or (row["error"] or ""),
        )
    return table


def run_demo(
    out: str, console: Console, iterations: int | None = None, workers: int | None = None
) -> int:
    storage = Storage()
    manifest = build_demo(storage, out, iterations)
    console.print(f"demo inputs and manifest written under {out}/inputs, {manifest}")
    summary = run(RunConfig(manifest, WorkerConfig(out), workers=workers), console)
    console.print(_table(storage, manifest, out))
    console.print(
        f"look at: {join(out, 'images')} (restored), {join(out, 'inputs')} (degraded and clean), "
        f"{join(out, 'results')} and {join(out, 'traces')} (Parquet), {join(out, 'run.json')}; "
        f"for pictures and curves: dippipe report {out}"
    )
    return summary.exit_code()
