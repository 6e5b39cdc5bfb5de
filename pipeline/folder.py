"""`dippipe manifest`: a manifest from a folder of images, so nobody writes Parquet by hand.

Naming convention, next to each image ``NAME.EXT``: ``NAME<suffix>.*`` for each companion
input role (dip_core/roles.py): ``NAME_mask.*`` (inpainting mask), ``NAME_flash.*`` (flash
guide), ``NAME_ref.*`` (clean reference, for metrics). The job id is
NAME with any character outside ``[A-Za-z0-9._-]`` replaced by ``_``.
"""

from __future__ import annotations

import json
import posixpath
import re
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from dip_core import COMPANION_ROLES
from pipeline.manifest import MANIFEST_SCHEMA
from pipeline.storage import Storage

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")
ROLE_SUFFIXES = {role.name: role.folder_suffix for role in COMPANION_ROLES}


@dataclass(frozen=True)
class FolderSpec:
    folder: str
    task: str
    scale: int | None = None
    iterations: int | None = None
    params: dict | None = None


def safe_id(stem: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", stem)[:128].strip(".") or "image"


def build_from_folder(storage: Storage, spec: FolderSpec) -> pa.Table:
    """One row per image of the folder (companions by suffix); raises ValueError when empty."""
    files = [u for u in storage.list_files(spec.folder) if u.lower().endswith(IMAGE_SUFFIXES)]
    by_stem = {posixpath.splitext(posixpath.basename(u))[0]: u for u in files}
    companions = tuple(ROLE_SUFFIXES.values())
    rows: list[dict[str, Any]] = []
    seen: dict[str, str] = {}
    for stem, uri in sorted(by_stem.items()):
        if stem.endswith(companions):
            continue
        job_id = safe_id(stem)
        if job_id in seen:
            raise ValueError(f"{uri} and {seen[job_id]} both give the id {job_id!r}; rename one")
        seen[job_id] = uri
        row: dict[str, Any] = {"id": job_id, "task": spec.task, "image": uri}
        for role, suffix in ROLE_SUFFIXES.items():
            row[role] = by_stem.get(stem + suffix)
        row.update(scale=spec.scale, iterations=spec.iterations, seed=None)
        row["params"] = json.dumps(spec.params) if spec.params else None
        rows.append(row)
    if not rows:
        raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {spec.folder}")
    return pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA)
