"""The input roles of a job: the one table every consumer is derived from.

A role is one image file a job names: the manifest has one string column per
role, ``restore`` one keyword, ``dippipe manifest`` one file-name suffix, and loading,
validation, the worker's payload relay and the report all iterate over this table. A task
says which roles it needs (``Task.required_roles``); ``reference`` is optional everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class InputRole:
    name: str  # manifest column, restore() keyword, key of Job.inputs
    kind: str  # "image": colour or grey, matched to the image's channels; "mask": one plane
    size_of: str  # whose size it must have: "image" (the observation) or "output"
    folder_suffix: str  # `dippipe manifest`: NAME<suffix>.* beside NAME.*
    meaning: str  # a few words, shown in errors: "inpaint needs a mask (<meaning>)"


IMAGE = InputRole("image", "image", "image", "", "the degraded image to restore")
INPUT_ROLES: tuple[InputRole, ...] = (
    IMAGE,
    InputRole("mask", "mask", "image", "_mask", "non-zero = known pixel"),
    InputRole("guide", "image", "image", "_flash", "the flash image"),
    InputRole("reference", "image", "output", "_ref", "the clean image, for PSNR only"),
)
# Roles other than the image itself: what a task may require and restore() takes by keyword.
COMPANION_ROLES: tuple[InputRole, ...] = tuple(r for r in INPUT_ROLES if r is not IMAGE)
