"""Tiling benchmark: one noisy image denoised whole and in tiles, at equal steps per fit.

For each SIZE:MARGIN[:SHARE] it prints the PSNR of the whole-image fit and of the tiled one
against the clean image, and the seam ratio: the mean squared difference of neighbouring
pixels over the pairs inside a blend ramp (where two tiles hand over), divided by the same
mean over every pair of the image. The whole-image fit's ratio over the same pairs is
printed beside it, and the clean image's: content alone moves the ratio (and a sharper
result has more of it), a seam shows as the tiled ratio rising above the clean one. "err
ramp/all": the tiled result's squared error near the hand-overs over its mean error. Margin
0 (a hard cut in the middle of the overlap, no blend) shows what a seam looks like. SHARE
overrides ``dip_core.tiling.BLEND_SHARE``, the ramp's share of the margin. Settings whose
tiles fall at the same places reuse one set of tile fits (tiles never shrink, so e.g. 128 px
tiles over 224 px sit at 0 and 96 for any margin up to 32): their rows differ only by the
blend.

    PYTHONPATH=. python -m benchmarks.tiling --side 224 \
        --tiles 128:0,128:16,128:32,128:32:1,96:32,64:16                    # CPU, ~3 min
    PYTHONPATH=. python -m benchmarks.tiling --side 2048 --tiles 512:0,512:32,512:64,512:128 \
        --iterations 2000 --channels 128 --depth 5 --reg-noise 0.0333 --exp-weight 0.99  # GPU

The image is scikit-image's astronaut, or ``--image`` another of its samples by name
(camera, coffee, chelsea...) or a file's path, resized so its longer side is ``--side``;
Gaussian noise of sigma ``--sigma`` / 255 with a fixed seed. Runs on torch, numpy,
scikit-image (and Pillow for a file).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from itertools import pairwise
from pathlib import Path

import numpy as np
import torch

import dip_core.tiling
from dip_core import FitResult, RestorePlan, Tiling, fit, plan_restore, psnr, restore, run_plan
from dip_core.tiling import TileGrid


def load_image(name: str | None, side: int) -> torch.Tensor:
    """(3, H, W) in [0, 1]: scikit-image's sample ``name`` (default astronaut) or the file at
    that path, its longer side resized to ``side``."""
    from skimage import data, transform

    if name is not None and Path(name).is_file():
        from PIL import Image

        array = np.asarray(Image.open(name).convert("RGB"))
    else:
        array = getattr(data, name or "astronaut")()
    array = np.repeat(array[..., None], 3, axis=2) if array.ndim == 2 else array[..., :3]
    height, width = array.shape[:2]
    ratio = side / max(height, width)
    shape = (max(1, round(height * ratio)), max(1, round(width * ratio)))
    resized = transform.resize(array / 255.0, shape, anti_aliasing=True)
    return torch.from_numpy(resized.transpose(2, 0, 1).copy()).float().clamp(0, 1)


def ramp_pairs(grid: TileGrid):
    """Boolean (H, W - 1) and (H - 1, W) masks of the neighbouring-pixel pairs with a pixel
    inside a blend ramp: within ramp / 2 (at least half a pixel) of the centre of an overlap
    of two neighbouring tiles, where they hand over."""

    def zone(starts, tile: int, length: int) -> np.ndarray:
        centres = np.arange(length) + 0.5
        inside = np.zeros(length, bool)
        for a, b in pairwise(starts):
            cut = (a + b + tile) / 2
            inside |= np.abs(centres - cut) <= max(grid.ramp, 1) / 2
        return inside

    across = zone(grid.lefts, grid.tile_width, grid.width)
    down = zone(grid.tops, grid.tile_height, grid.height)
    horizontal = np.broadcast_to(across[:-1] | across[1:], (grid.height, grid.width - 1))
    vertical = np.broadcast_to((down[:-1] | down[1:])[:, None], (grid.height - 1, grid.width))
    return horizontal, vertical


def seam_ratio(image: torch.Tensor, masks) -> float:
    """Mean squared neighbour difference over the masked pairs / over all pairs."""
    x = image.double().numpy()
    dx, dy = np.diff(x, axis=2) ** 2, np.diff(x, axis=1) ** 2
    horizontal, vertical = masks
    inside = (dx[:, horizontal].sum() + dy[:, vertical].sum()) / (
        x.shape[0] * (horizontal.sum() + vertical.sum())
    )
    return float(inside / ((dx.sum() + dy.sum()) / (dx.size + dy.size)))


def error_ratio(image: torch.Tensor, clean: torch.Tensor, masks) -> float:
    """The squared error over the pixels of the ramp pairs / over all pixels: above 1 where
    tiles are worse near where they hand over (their edges lack context) than elsewhere."""
    horizontal, vertical = masks
    near = np.zeros(image.shape[1:], bool)
    near[:, :-1] |= horizontal
    near[:, 1:] |= horizontal
    near[:-1] |= vertical
    near[1:] |= vertical
    error = ((image.double() - clean.double()) ** 2).numpy()
    return float(error[:, near].mean() / error.mean())


def already(results: list[FitResult]) -> Callable[[RestorePlan], list[FitResult]]:
    """A ``fit_members`` that returns fits made before (for a plan with the same tiles)."""
    return lambda _plan: results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image", help="a scikit-image sample's name or an image file")
    parser.add_argument("--side", type=int, default=224, help="longer side after resizing")
    parser.add_argument(
        "--tiles", default="128:0,128:16,128:32", help="comma-separated SIZE:MARGIN[:SHARE]"
    )
    parser.add_argument("--iterations", type=int, default=250)
    parser.add_argument("--sigma", type=float, default=25.0, help="noise sigma, of 255")
    parser.add_argument("--channels", type=int, default=16)
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument(
        "--reg-noise", type=float, default=0.0, help="input jitter (the preset's: 1/30)"
    )
    parser.add_argument(
        "--exp-weight", type=float, default=0.0, help="output averaging (the preset's: 0.99)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None)
    args = parser.parse_args()

    clean = load_image(args.image, args.side)
    noise = torch.randn(clean.shape, generator=torch.Generator().manual_seed(args.seed))
    noisy = (clean + args.sigma / 255 * noise).clamp(0, 1)
    params = {
        "channels": args.channels,
        "depth": args.depth,
        "input_depth": 8,
        "stop": "fixed",
        "reg_noise_std": args.reg_noise,
        "exp_weight": args.exp_weight,
    }
    job = {"iterations": args.iterations, "seed": args.seed, "params": params}
    _, height, width = clean.shape
    print(
        f"{args.image or 'astronaut'} {height}x{width}, sigma {args.sigma}/255, "
        f"{args.iterations} steps per fit, channels {args.channels}, depth {args.depth}, "
        f"reg noise {args.reg_noise}, exp weight {args.exp_weight}; "
        f"noisy {psnr(noisy, clean).item():.2f} dB"
    )
    started = time.perf_counter()
    whole = restore("denoise", noisy, device=args.device, **job)
    whole_seconds = time.perf_counter() - started
    whole_psnr = psnr(whole.image, clean).item()
    print(f"whole: {whole_psnr:.2f} dB in {whole_seconds:.1f} s")
    print(
        f"{'size:margin:share':>17} {'tiles':>5} {'ramp':>4} {'tiled dB':>8} {'vs whole':>8} "
        f"{'seam tiled':>10} {'whole':>6} {'clean':>6} {'err ramp/all':>12} {'s fits':>7}"
    )
    fitted: dict[tuple, tuple[list[FitResult], float]] = {}
    default_share = dip_core.tiling.BLEND_SHARE
    for setting in args.tiles.split(","):
        size, margin, *share = setting.split(":")
        dip_core.tiling.BLEND_SHARE = float(share[0]) if share else default_share
        plan = plan_restore("denoise", noisy, tiling=Tiling(int(size), int(margin)), **job)
        grid = plan.grid
        assert grid is not None, f"{setting}: the image fits in one tile"
        where = (grid.tile_height, grid.tile_width, grid.tops, grid.lefts)
        if where not in fitted:  # same tiles, same seeds: the same fits
            started = time.perf_counter()
            results = [fit(p, c, device=args.device) for p, c in plan.fits]
            fitted[where] = (results, time.perf_counter() - started)
        results, seconds = fitted[where]
        tiled = run_plan(plan, already(results))
        masks = ramp_pairs(grid)
        tiled_psnr = psnr(tiled.image, clean).item()
        seams = [seam_ratio(image, masks) for image in (tiled.image, whole.image, clean)]
        label = f"{size}:{margin}:{dip_core.tiling.BLEND_SHARE:g}"
        print(
            f"{label:>17} {tiled.tiles:>5} {grid.ramp:>4} {tiled_psnr:>8.2f} "
            f"{tiled_psnr - whole_psnr:>+8.2f} {seams[0]:>10.3f} {seams[1]:>6.3f} "
            f"{seams[2]:>6.3f} {error_ratio(tiled.image, clean, masks):>12.3f} {seconds:>7.1f}",
            flush=True,
        )
    dip_core.tiling.BLEND_SHARE = default_share


if __name__ == "__main__":
    main()
