"""The quality benchmark's cases: the paper's sample images, degraded with fixed seeds.

Images come from a dip-reference folder given by path (never copied into the repo).
The classical baseline of each case is its task's (baselines.py), on the same input.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

SIGMA = 25 / 255
JPEG_QUALITY = 10


@dataclass
class Case:
    name: str
    task: str
    observation: torch.Tensor
    reference: torch.Tensor | None
    mask: torch.Tensor | None = None
    guide: torch.Tensor | None = None
    scale: int | None = None
    feature_net: torch.nn.Module | None = None
    params: dict | None = None  # the task's own params (deblur: its kernel)
    kernel: torch.Tensor | None = None  # deblur: the blur, for the classical baselines
    notes: str = ""  # what the baseline tried, printed with the row


def to_tensor(image: Image.Image) -> torch.Tensor:
    array = np.asarray(image, dtype=np.float32) / 255.0
    array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
    return torch.from_numpy(np.ascontiguousarray(array))


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """(C, H, W) tensor -> (H, W, C) array for scikit-image."""
    return t.permute(1, 2, 0).numpy().astype(np.float64)


def from_numpy(a: np.ndarray) -> torch.Tensor:
    a = a[..., None] if a.ndim == 2 else a
    return torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1))).float().clamp(0, 1)


def load(path: Path, size: int, mode: str = "RGB", multiple: int = 1) -> Image.Image:
    """Open, resize so the longer side is ``size`` (0 keeps it), crop to a multiple."""
    image = Image.open(path).convert(mode)
    if size:
        ratio = size / max(image.size)
        resample = Image.NEAREST if mode == "L" and "mask" in path.name else Image.LANCZOS
        image = image.resize((max(1, round(image.width * ratio)),
                              max(1, round(image.height * ratio))), resample)  # fmt: skip
    w, h = image.width // multiple * multiple, image.height // multiple * multiple
    return image.crop((0, 0, w, h))


def seeded_noise(shape, seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


# Every colour image of the sample set, as a denoising case (paper: 9 colour images).
COLOUR_IMAGES = {
    "F16": "denoising/F16_GT.png",
    "snail": "denoising/snail.jpg",
    "kate": "inpainting/kate.png",
    "library": "inpainting/library.png",
    "vase": "inpainting/vase.png",
    "kate2": "restoration/kate.png",
    "zebra": "sr/zebra_GT.png",
    "zebracrop": "sr/zebra_crop.png",
    "flash": "flash_no_flash/cave01_00_flash.jpg",
    "noflash": "flash_no_flash/cave01_01_noflash.jpg",
    "building": "feature_inversion/building.jpg",
    "monkey": "feature_inversion/monkey.jpg",
}


def denoise(data: Path, size: int, name: str = "F16") -> Case:
    clean = to_tensor(load(data / COLOUR_IMAGES[name], size))
    noisy = (clean + SIGMA * seeded_noise(clean.shape, 0)).clamp(0, 1)
    return Case(f"{name} sigma25", "denoise", noisy, clean)


def jpeg(data: Path, size: int) -> Case:
    image = load(data / "denoising/F16_GT.png", size)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=JPEG_QUALITY)
    compressed = to_tensor(Image.open(buffer).convert("RGB"))
    return Case(f"F16 jpeg q{JPEG_QUALITY}", "jpeg", compressed, to_tensor(image))


def inpaint(data: Path, size: int, name: str, mode: str = "RGB") -> Case:
    clean = to_tensor(load(data / f"inpainting/{name}.png", size, mode))
    mask = (to_tensor(load(data / f"inpainting/{name}_mask.png", size, "L")) > 0.5).float()
    holed = clean * mask
    return Case(f"{name} inpaint", "inpaint", holed, clean, mask=mask)


def random_pixels(data: Path, size: int) -> Case:
    clean = to_tensor(load(data / "restoration/barbara.png", size, "L"))
    g = torch.Generator().manual_seed(0)
    mask = (torch.rand(clean.shape, generator=g) < 0.5).float()
    holed = clean * mask
    return Case("barbara 50%", "inpaint", holed, clean, mask=mask)


def super_resolution(data: Path, hr_size: int, factor: int, path: str) -> Case:
    """The HR image scaled so its longer side is ``hr_size`` (0: native), the LR input made
    the way users' low-resolution photos are: Pillow's LANCZOS, centred (not our operator)."""
    hr_image = load(data / path, hr_size, multiple=factor)
    lr_image = hr_image.resize((hr_image.width // factor, hr_image.height // factor),
                               Image.LANCZOS)  # fmt: skip
    name = Path(path).stem.replace("_GT", "")
    return Case(f"{name} x{factor}", "super_resolution", to_tensor(lr_image), to_tensor(hr_image),
                scale=factor)  # fmt: skip


def flash(data: Path, size: int) -> Case:
    no_flash = to_tensor(load(data / "flash_no_flash/cave01_01_noflash.jpg", size))
    with_flash = to_tensor(load(data / "flash_no_flash/cave01_00_flash.jpg", size))
    return Case("cave flash/no-flash", "flash_no_flash", no_flash, None, guide=with_flash)


def preimage(data: Path, size: int) -> Case:
    from pipeline.feature_weights import load_feature_net  # torch only

    source = to_tensor(load(data / "feature_inversion/building.jpg", size))
    return Case("building pre-image", "preimage", source, source,
                feature_net=load_feature_net())  # fmt: skip


def deblur(data: Path, size: int, name: str, blur: dict) -> Case:
    """The image blurred by the kernel ``blur`` describes (scipy's convolution, borders
    replicated: an independent implementation of the task's operator), plus sigma-5 noise."""
    from scipy.ndimage import convolve

    from dip_core.tasks.deblur import blur_kernel

    clean = to_tensor(load(data / COLOUR_IMAGES[name], size))
    kernel = blur_kernel(blur)
    blurred = np.stack([convolve(p, kernel.numpy(), mode="nearest") for p in clean.double()])
    noisy = torch.from_numpy(blurred).float() + DEBLUR_SIGMA * seeded_noise(clean.shape, 0)
    label = ", ".join(f"{k} {v}" for k, v in blur.items())
    return Case(f"{name} deblur ({label})", "deblur", noisy.clamp(0, 1), clean, params=blur,
                kernel=kernel)  # fmt: skip


DEBLUR_SIGMA = 5 / 255
GAUSSIAN_BLUR = {"blur_sigma": 1.6}
MOTION_BLUR = {"motion_length": 7, "motion_angle": 30}
DEBLUR_IMAGES = ("F16", "snail", "kate", "vase", "zebra", "building")


# Each case takes (data folder, size); SR cases take the HR size (--sr-size) instead.
CASES: dict[str, Callable[[Path, int], Case]] = {
    **{f"denoise-{name}": (lambda d, s, n=name: denoise(d, s, n)) for name in COLOUR_IMAGES},
    "jpeg": jpeg,
    "text": lambda d, s: inpaint(d, s, "kate"),
    "region": lambda d, s: inpaint(d, s, "vase"),
    "hole": lambda d, s: inpaint(d, s, "library"),
    "pixels": random_pixels,
    "sr4-zebra": lambda d, s: super_resolution(d, s, 4, "sr/zebra_GT.png"),
    "sr4-zebracrop": lambda d, s: super_resolution(d, s, 4, "sr/zebra_crop.png"),
    "sr8-zebra": lambda d, s: super_resolution(d, s, 8, "sr/zebra_GT.png"),
    "flash": flash,
    "preimage": preimage,
    **{f"deblur-{name}": (lambda d, s, n=name: deblur(d, s, n, GAUSSIAN_BLUR))
       for name in DEBLUR_IMAGES},
    **{f"deblur-motion-{name}": (lambda d, s, n=name: deblur(d, s, n, MOTION_BLUR))
       for name in ("library", "monkey", "kate2")},
}  # fmt: skip
SR_CASES = ("sr4-zebra", "sr4-zebracrop", "sr8-zebra")
GROUPS = {
    "denoise": [c for c in CASES if c.startswith("denoise-")],
    "inpaint": ["text", "region", "hole", "pixels"],
    "sr": list(SR_CASES),
    "deblur": [c for c in CASES if c.startswith("deblur-")],
}


def expand(names: str) -> list[str]:
    """Case names, with the group names (denoise, inpaint, sr) standing for their cases."""
    out = []
    for name in names.split(","):
        out += GROUPS.get(name, [name])
    return out


def load_case(name: str, data: Path, size: int) -> Case:
    if name not in CASES:
        raise SystemExit(f"unknown case {name!r}; choose from {', '.join(CASES)}")
    if not data.is_dir():
        raise SystemExit(f"no dip-reference folder at {data} (pass --data)")
    return CASES[name](data, size)
