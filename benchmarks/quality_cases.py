"""The quality benchmark's cases: the paper's sample images, degraded with fixed seeds.

Images come from a dip-reference folder given by path (never copied into the repo).
Each case carries its classical baseline, computed on the same input.
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
    baseline: Callable[[], tuple[str, torch.Tensor]] | None = None


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


def _nlm_and_bm3d(noisy: torch.Tensor) -> tuple[str, torch.Tensor]:
    try:
        import bm3d  # optional: the GPU machine has no network to install it

        return "BM3D", from_numpy(bm3d.bm3d_rgb(to_numpy(noisy), sigma_psd=SIGMA))
    except ImportError:
        from skimage.restoration import denoise_nl_means

        out = denoise_nl_means(to_numpy(noisy), h=0.8 * SIGMA, sigma=SIGMA, fast_mode=True,
                               patch_size=5, patch_distance=6, channel_axis=-1)  # fmt: skip
        return "NL-means", from_numpy(out)


def _biharmonic(observation: torch.Tensor, mask: torch.Tensor) -> tuple[str, torch.Tensor]:
    from skimage.restoration import inpaint_biharmonic

    missing = (mask[0] < 0.5).numpy()
    return "biharmonic", from_numpy(inpaint_biharmonic(to_numpy(observation), missing,
                                                       channel_axis=-1))  # fmt: skip


def denoise(data: Path, size: int) -> Case:
    clean = to_tensor(load(data / "denoising/F16_GT.png", size))
    noisy = (clean + SIGMA * seeded_noise(clean.shape, 0)).clamp(0, 1)
    return Case("F16 sigma25", "denoise", noisy, clean, baseline=lambda: _nlm_and_bm3d(noisy))


def jpeg(data: Path, size: int) -> Case:
    image = load(data / "denoising/F16_GT.png", size)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=JPEG_QUALITY)
    compressed = to_tensor(Image.open(buffer).convert("RGB"))
    return Case(f"F16 jpeg q{JPEG_QUALITY}", "jpeg", compressed, to_tensor(image),
                baseline=lambda: ("JPEG input", compressed))  # fmt: skip


def inpaint(data: Path, size: int, name: str, mode: str = "RGB") -> Case:
    clean = to_tensor(load(data / f"inpainting/{name}.png", size, mode))
    mask = (to_tensor(load(data / f"inpainting/{name}_mask.png", size, "L")) > 0.5).float()
    holed = clean * mask
    return Case(f"{name} inpaint", "inpaint", holed, clean, mask=mask,
                baseline=lambda: _biharmonic(holed, mask))  # fmt: skip


def random_pixels(data: Path, size: int) -> Case:
    clean = to_tensor(load(data / "restoration/barbara.png", size, "L"))
    g = torch.Generator().manual_seed(0)
    mask = (torch.rand(clean.shape, generator=g) < 0.5).float()
    holed = clean * mask
    return Case("barbara 50%", "inpaint", holed, clean, mask=mask,
                baseline=lambda: _biharmonic(holed, mask))  # fmt: skip


def super_resolution(data: Path, size: int, factor: int) -> Case:
    # At small sizes the HR image is twice --size: x4 of a 64 px image would leave a
    # 16 px input, too little to judge anything by.
    hr_size = 2 * size
    hr_image = load(data / "sr/zebra_GT.png", hr_size, multiple=factor)
    lr_image = hr_image.resize((hr_image.width // factor, hr_image.height // factor),
                               Image.LANCZOS)  # fmt: skip
    hr, lr = to_tensor(hr_image), to_tensor(lr_image)

    def bicubic():
        return "bicubic", to_tensor(lr_image.resize(hr_image.size, Image.BICUBIC))

    return Case(f"zebra x{factor}", "super_resolution", lr, hr, scale=factor, baseline=bicubic)


def flash(data: Path, size: int) -> Case:
    no_flash = to_tensor(load(data / "flash_no_flash/cave01_01_noflash.jpg", size))
    with_flash = to_tensor(load(data / "flash_no_flash/cave01_00_flash.jpg", size))
    return Case("cave flash/no-flash", "flash_no_flash", no_flash, None, guide=with_flash)


def preimage(data: Path, size: int) -> Case:
    from pipeline.feature_weights import load_feature_net  # torch only

    source = to_tensor(load(data / "feature_inversion/building.jpg", size))
    return Case("building pre-image", "preimage", source, source,
                feature_net=load_feature_net())  # fmt: skip


CASES: dict[str, Callable[[Path, int], Case]] = {
    "denoise": denoise,
    "jpeg": jpeg,
    "text": lambda d, s: inpaint(d, s, "kate"),
    "region": lambda d, s: inpaint(d, s, "vase"),
    "hole": lambda d, s: inpaint(d, s, "library"),
    "pixels": random_pixels,
    "sr4": lambda d, s: super_resolution(d, s, 4),
    "sr8": lambda d, s: super_resolution(d, s, 8),
    "flash": flash,
    "preimage": preimage,
}


def load_case(name: str, data: Path, size: int) -> Case:
    if name not in CASES:
        raise SystemExit(f"unknown case {name!r}; choose from {', '.join(CASES)}")
    if not data.is_dir():
        raise SystemExit(f"no dip-reference folder at {data} (pass --data)")
    return CASES[name](data, size)
