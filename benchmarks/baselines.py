"""Classical baselines of the quality benchmark, by the name a task declares
(``Task.baseline`` in dip_core/tasks/): each takes a Case and returns (label, image).

scikit-image and Pillow implement them; the benchmark only adapts their inputs. Where a
method has a free parameter, it is tuned per image on the clean reference (an oracle): the
baseline DIP is compared with is the strongest that method can be.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from PIL import Image

from benchmarks.quality_cases import SIGMA, Case, from_numpy, to_numpy
from dip_core import psnr


def nl_means(case: Case) -> tuple[str, torch.Tensor]:
    noisy = case.observation
    try:
        import bm3d  # optional: the GPU machine has no network to install it

        return "BM3D", from_numpy(bm3d.bm3d_rgb(to_numpy(noisy), sigma_psd=SIGMA))
    except ImportError:
        from skimage.restoration import denoise_nl_means

        out = denoise_nl_means(to_numpy(noisy), h=0.8 * SIGMA, sigma=SIGMA, fast_mode=True,
                               patch_size=5, patch_distance=6, channel_axis=-1)  # fmt: skip
        return "NL-means", from_numpy(out)


def jpeg_input(case: Case) -> tuple[str, torch.Tensor]:
    return "JPEG input", case.observation


def biharmonic(case: Case) -> tuple[str, torch.Tensor]:
    from skimage.restoration import inpaint_biharmonic

    missing = (case.mask[0] < 0.5).numpy()
    out = inpaint_biharmonic(to_numpy(case.observation), missing, channel_axis=-1)
    return "biharmonic", from_numpy(out)


def bicubic(case: Case) -> tuple[str, torch.Tensor]:
    """Pillow's bicubic upscaling of the 8-bit low-resolution image."""
    low = (to_numpy(case.observation) * 255).round().astype(np.uint8).squeeze()
    height, width = case.reference.shape[-2:]
    up = Image.fromarray(low).resize((width, height), Image.BICUBIC)
    return "bicubic", from_numpy(np.asarray(up, dtype=np.float64) / 255)


def richardson_lucy_or_wiener(case: Case) -> tuple[str, torch.Tensor]:
    """The better of Richardson-Lucy and Wiener, each with its parameter tuned on the
    reference. Both run on the image padded with its border pixels (the blur's own border
    model), as scikit-image pads with zeros (RL) or wraps around (Wiener's FFT)."""
    from skimage.restoration import richardson_lucy, wiener

    kernel = case.kernel.numpy()
    pad = kernel.shape[0]
    padded = np.pad(case.observation.double().numpy(), ((0, 0), (pad, pad), (pad, pad)), "edge")

    def run(method: Callable[[np.ndarray], np.ndarray]) -> torch.Tensor:
        out = np.stack([method(plane) for plane in padded])[:, pad:-pad, pad:-pad]
        return torch.from_numpy(np.clip(out, 0, 1)).float()

    tried = {}
    for steps in (5, 10, 20, 40, 80):
        tried[f"RL {steps} it"] = run(lambda p, n=steps: richardson_lucy(p, kernel, n, clip=False))
    for balance in (0.001, 0.003, 0.01, 0.03, 0.1, 0.3):
        tried[f"Wiener b={balance}"] = run(lambda p, b=balance: wiener(p, kernel, b, clip=False))
    scores = {name: psnr(image, case.reference).item() for name, image in tried.items()}
    best = {kind: max((n for n in scores if n.startswith(kind)), key=scores.get)
            for kind in ("RL", "Wiener")}  # fmt: skip
    case.notes = ", ".join(f"{best[k]}: {scores[best[k]]:.2f} dB" for k in best)
    winner = max(best.values(), key=scores.get)
    return winner, tried[winner]


BASELINES: dict[str, Callable[[Case], tuple[str, torch.Tensor]]] = {
    "nl_means": nl_means,
    "jpeg_input": jpeg_input,
    "biharmonic": biharmonic,
    "bicubic": bicubic,
    "richardson_lucy_or_wiener": richardson_lucy_or_wiener,
}
