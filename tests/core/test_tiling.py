"""Tiled fitting (dip_core/tiling.py): the grid, the blend, the plan, and tiled fits against
whole ones. Expected values come from closed forms, numpy and scikit-image's sample photos,
never from the code under test."""

from __future__ import annotations

import math
from itertools import pairwise
from typing import Any

import numpy as np
import pytest
import torch
from skimage import data
from torch import nn

from benchmarks.tiling import ramp_pairs, seam_ratio  # the benchmark's seam measure
from dip_core import (
    TASKS,
    DipInputError,
    FitResult,
    Tiling,
    fit_bytes,
    plan_restore,
    psnr,
    resolve_preset,
    restore,
    run_plan,
    slots_that_fit,
)
from dip_core.engine import activation_bytes
from dip_core.networks import build_network
from dip_core.padding import Placement
from dip_core.tasks import classify_mask
from dip_core.tiling import BLEND_SHARE, MIN_TILE_SIZE, TILE_SEED_STRIDE, TileGrid, tile_starts

torch.set_num_threads(1)
SMALL = {"channels": 8, "depth": 3, "input_depth": 4, "stop": "fixed"}
GiB = 2**30


def block_mean(array: np.ndarray, side: int) -> torch.Tensor:
    """A (H, W) or (H, W, 3) uint8 photo of side 512, averaged down to side x side, as
    (C, side, side) in [0, 1]."""
    k = array.shape[0] // side
    array = array.reshape(side, k, side, k, -1).mean((1, 3)) / 255.0
    return torch.from_numpy(array.transpose(2, 0, 1).copy()).float()


def astronaut(side: int) -> torch.Tensor:
    return block_mean(data.astronaut(), side)


def camera(side: int) -> torch.Tensor:
    return block_mean(data.camera(), side)


def noisy_copy(clean: torch.Tensor, sigma: float = 25 / 255, seed: int = 0) -> torch.Tensor:
    noise = torch.randn(clean.shape, generator=torch.Generator().manual_seed(seed))
    return (clean + sigma * noise).clamp(0, 1)


def fake_result(image: torch.Tensor, steps: int, energy: float = 0.0, reason="iterations",
                energies=None, psnrs=None) -> FitResult:  # fmt: skip
    return FitResult(
        image=image, steps=torch.arange(steps),
        energies=torch.full((steps,), energy, dtype=torch.float64) if energies is None
        else torch.tensor(energies, dtype=torch.float64),
        psnrs=None if psnrs is None else torch.tensor(psnrs, dtype=torch.float64),
        stop_stats=None, energy=energy, psnr=None, iterations=steps, seconds=1.0, seed=0,
        device="cpu", stopped_at=steps, stop_reason=reason,
    )  # fmt: skip


# --- the grid ---------------------------------------------------------------------------

GRIDS = [  # (height, width, size, margin, halo)
    (100, 70, 32, 8, 0),
    (256, 256, 128, 16, 0),
    (300, 40, 64, 16, 0),  # narrower than a tile: not tiled across
    (64, 64, 64, 8, 0),  # exactly one tile
    (200, 130, 48, 8, 5),  # a task's halo widens the overlap
    (513, 1000, 512, 64, 0),
    (300, 300, 100, 64, 0),  # a small tile with the default margin: ramps wider than strides
]


@pytest.mark.parametrize(("height", "width", "size", "margin", "halo"), GRIDS)
def test_tiles_cover_every_pixel_are_one_size_and_overlap_by_the_margin(
    height, width, size, margin, halo
):
    grid = TileGrid.for_image(height, width, size, margin, halo)
    tiles = grid.tiles
    count = np.zeros((height, width), int)
    for index, tile in enumerate(tiles):
        assert tile.index == index
        assert (tile.height, tile.width) == (min(size, height), min(size, width))
        assert tile.top >= 0 and tile.top + tile.height <= height
        assert tile.left >= 0 and tile.left + tile.width <= width
        count[tile.box()] += 1
    assert count.min() >= 1
    for starts, tile_side, length in ((grid.tops, grid.tile_height, height),
                                      (grid.lefts, grid.tile_width, width)):  # fmt: skip
        assert starts[0] == 0 and starts[-1] + tile_side == length  # no tile shrunk at the end
        assert all(a + tile_side - b >= margin + 2 * halo for a, b in pairwise(starts))
        stride = size - margin - 2 * halo  # the most a tile may start after its neighbour
        assert len(starts) == (1 if length <= size else 1 + math.ceil((length - size) / stride))
    assert TileGrid.for_image(height, width, size, margin, halo) == grid  # deterministic


def test_the_issues_scan_is_cut_into_sixty_three_tiles_of_512():
    """4000 x 3000 at 512 px with 64 px overlap: 1 + ceil(3488 / 448) = 9 across,
    1 + ceil(2488 / 448) = 7 down, spread evenly from the first border to the last."""
    assert tile_starts(4000, 512, 64) == [436 * i for i in range(9)]  # 3488 / 8 apart
    assert len(tile_starts(3000, 512, 64)) == 7
    assert tile_starts(960, 512, 64) == [0, 448] and tile_starts(300, 512, 64) == [0]


def _summed_weights(grid: TileGrid, factor: int) -> np.ndarray:
    total = np.zeros((grid.height * factor, grid.width * factor))
    for tile, weight in zip(grid.tiles, grid.weights(factor), strict=True):
        assert weight.shape == (grid.tile_height * factor, grid.tile_width * factor)
        assert float(weight.min()) >= 0
        total[tile.box(factor)] += weight.numpy()
    return total


@pytest.mark.parametrize(("height", "width", "size", "margin", "halo"), GRIDS)
@pytest.mark.parametrize("factor", [1, 2, 3])
def test_blend_weights_sum_to_one(height, width, size, margin, halo, factor):
    total = _summed_weights(TileGrid.for_image(height, width, size, margin, halo), factor)
    assert np.abs(total - 1).max() < 1e-12
    assert sum(TileGrid.for_image(height, width, size, margin, halo).shares()) == pytest.approx(1)


def test_neighbours_hand_over_with_a_raised_cosine_at_the_centre_of_their_overlap():
    """224 px in tiles of 128 with a 16 px margin: tiles at 0 and 96 (tiles never shrink),
    overlapping over [96, 128), centre 112; the ramp, 16 * BLEND_SHARE px wide, is sin^2 /
    cos^2, and each tile's outer part of the overlap beyond the ramp weighs nothing."""
    grid = TileGrid.for_image(1, 224, 128, 16)
    assert grid.lefts == (0, 96)
    width = 16 * BLEND_SHARE
    x = np.arange(96, 128) + 0.5
    rising = np.sin(np.pi / 2 * np.clip((x - 112) / width + 0.5, 0, 1)) ** 2
    first, second = (w.numpy()[0] for w in grid.weights())
    np.testing.assert_allclose(second[:32], rising, atol=1e-12)
    np.testing.assert_allclose(first[96:], 1 - rising, atol=1e-12)
    assert (first[:96] == 1).all() and (second[32:] == 1).all()
    outer = int((32 - width) // 2)
    assert outer > 0 and (second[:outer] == 0).all() and (first[128 - outer :] == 0).all()


@pytest.mark.parametrize("factor", [1, 2])
def test_blending_identical_constant_tiles_gives_the_constant(factor):
    grid = TileGrid.for_image(100, 70, 32, 8)
    tile = torch.full((3, 32 * factor, 32 * factor), 0.3)
    blended = grid.blend([tile] * len(grid.tiles), factor)
    assert blended.shape == (3, 100 * factor, 70 * factor)
    assert (blended - 0.3).abs().max() < 1e-6


@pytest.mark.parametrize("factor", [1, 2])
def test_blending_tiles_cut_from_an_image_gives_the_image_back(factor):
    image = camera(256)[:, :200, :130]  # the output; the tiles are in pixels factor x smaller
    grid = TileGrid.for_image(200 // factor, 130 // factor, 48, 8, 3)
    tiles = [image[:, rows, cols] for rows, cols in (t.box(factor) for t in grid.tiles)]
    assert (grid.blend(tiles, factor) - image).abs().max() < 1e-6


# --- the plan ---------------------------------------------------------------------------


def test_without_tiling_or_below_one_tile_the_plan_and_the_result_are_todays():
    noisy = noisy_copy(camera(32).expand(3, -1, -1))
    job: dict[str, Any] = {"iterations": 4, "seed": 7, "params": {**SMALL, "ensemble": 2}}
    untiled = plan_restore("denoise", noisy, **job)
    assert untiled.grid is None and untiled.tiles == 1 and untiled.members == 2
    assert [p is untiled.problem for p, _ in untiled.fits] == [True, True]
    assert [c.seed for _, c in untiled.fits] == [7, 8]
    small_image = plan_restore("denoise", noisy, tiling=Tiling(64, 8), **job)
    assert small_image.grid is None and [c for _, c in small_image.fits] == [
        c for _, c in untiled.fits
    ]
    a = restore("denoise", noisy, **job)
    b = restore("denoise", noisy, tiling=Tiling(64, 8), **job)
    assert torch.equal(a.image, b.image) and torch.equal(a.energies, b.energies)
    assert a.tiles == b.tiles == 1 and a.iterations == 8


def _plan(height, width, tiling, task="denoise", **job):
    image = torch.rand(3, height, width, generator=torch.Generator().manual_seed(0))
    return plan_restore(task, image, params=job.pop("params", SMALL), tiling=tiling, **job)


def test_tiling_is_triggered_by_the_tile_size_the_pixel_count_or_the_memory_estimate():
    assert _plan(100, 60, Tiling(64, 8)).tiles == 2  # both None: larger than a tile
    assert _plan(100, 60, Tiling(64, 8, above_pixels=6000)).grid is None  # not above
    assert _plan(100, 60, Tiling(64, 8, above_pixels=5999)).tiles == 2
    whole = _plan(100, 60, None).problem
    p = whole.placement
    need = fit_bytes(whole.spec, p.padded_height, p.padded_width)
    assert _plan(100, 60, Tiling(64, 8, memory_limit=need)).grid is None  # it fits
    assert _plan(100, 60, Tiling(64, 8, memory_limit=need - 1)).tiles == 2
    # Either rule is enough.
    assert _plan(100, 60, Tiling(64, 8, above_pixels=10**6, memory_limit=need - 1)).tiles == 2


def test_the_memory_estimate_is_activations_plus_weights_gradient_and_adam():
    spec = _plan(64, 64, None).problem.spec
    weights = sum(p.numel() for p in build_network(spec).parameters())
    assert fit_bytes(spec, 64, 96) == activation_bytes(spec, 64, 96) + 16 * weights
    per_fit = fit_bytes(spec, 64, 96)
    assert slots_that_fit(spec, 64, 96, int(10 * per_fit / 0.7) + 10, 64) == 10
    assert slots_that_fit(spec, 64, 96, int(10 * per_fit / 0.7) + 10, 4) == 4


def test_a_tile_too_big_for_the_memory_limit_is_halved_down_to_a_floor():
    whole = _plan(300, 300, None).problem
    spec = whole.spec

    def need(side):
        p = Placement.for_target(side, side, spec.minimum_side(), 2**spec.depth)
        return fit_bytes(spec, p.padded_height, p.padded_width)

    plan = _plan(300, 300, Tiling(256, 32, memory_limit=need(128)))
    assert (plan.grid.tile_height, plan.grid.tile_width) == (128, 128)  # 256 halved once
    assert plan.grid.ramp == round(16 * BLEND_SHARE)  # the margin halved with it
    assert all(a + 128 - b >= 16 for a, b in pairwise(plan.grid.lefts))
    plan = _plan(300, 300, Tiling(256, 32, memory_limit=need(MIN_TILE_SIZE)))
    assert plan.grid.tile_height == MIN_TILE_SIZE
    with pytest.raises(DipInputError, match="limit"):
        _plan(300, 300, Tiling(256, 32, memory_limit=need(MIN_TILE_SIZE) - 1))


def test_the_issues_scan_is_tiled_from_the_estimate_into_one_packing_bucket():
    """The denoising preset on 4000 x 3000: ~185 GiB by the estimate, far above an 80 GiB
    device; tiled into 63 tiles of 512 px that share one network and one padded size."""
    scan = torch.full((3, 3000, 4000), 0.5)
    whole = plan_restore("denoise", scan).problem
    p = whole.placement
    assert fit_bytes(whole.spec, p.padded_height, p.padded_width) > 150 * GiB
    plan = plan_restore("denoise", scan, tiling=Tiling(memory_limit=80 * GiB))
    assert plan.tiles == 63 and len(plan.fits) == 63
    buckets = {(t.spec, t.placement.padded_height, t.placement.padded_width) for t, _ in plan.fits}
    assert buckets == {(whole.spec, 512, 512)}
    assert all(t.preset == whole.preset for t, _ in plan.fits)
    assert all(t.energy_floor == whole.energy_floor for t, _ in plan.fits)


def test_tile_seeds_differ_keep_clear_of_ensemble_members_and_reproduce():
    plan = _plan(100, 60, Tiling(64, 8), seed=11, params={**SMALL, "ensemble": 3})
    seeds = [c.seed for _, c in plan.fits]
    assert plan.tiles == 2 and plan.members == 3
    assert seeds == [11 + t * TILE_SEED_STRIDE + m for t in range(2) for m in range(3)]
    assert seeds[:3] == [11, 12, 13]  # tile 0: the job's own seed and member seeds
    assert len(set(seeds)) == 6 and TILE_SEED_STRIDE > 64  # 64: the largest ensemble
    again = _plan(100, 60, Tiling(64, 8), seed=11, params={**SMALL, "ensemble": 3})
    assert [c.seed for _, c in again.fits] == seeds
    noisy = noisy_copy(camera(64)[:, :48, :48])
    runs = [restore("denoise", noisy, iterations=3, seed=5, params=SMALL, tiling=Tiling(32, 8))
            for _ in range(2)]  # fmt: skip
    assert runs[0].tiles == 4 and torch.equal(runs[0].image, runs[1].image)


def test_only_tasks_that_opt_out_are_never_tiled():
    assert [name for name, task in TASKS.items() if not task.tileable] == ["preimage"]
    features = nn.Conv2d(3, 4, 3)
    plan = _plan(100, 100, Tiling(32, 8), task="preimage", feature_net=features, params={})
    assert plan.grid is None and plan.tiles == 1 and len(plan.fits) == 1


def test_a_tile_without_context_beyond_its_edge_costs_deblurring_the_kernels_radius():
    """A Gaussian of sigma 2 has a radius of ceil(3 * 2) = 6 px: neighbours overlap by at
    least 8 + 2 * 6 = 20 px; denoising's tiles overlap by the margin alone."""
    params = {**SMALL, "blur_sigma": 2.0}
    plan = _plan(100, 100, Tiling(32, 8), task="deblur", params=params)
    assert min(a + 32 - b for a, b in pairwise(plan.grid.lefts)) >= 20
    assert plan.grid.lefts == tuple(tile_starts(100, 32, 20))
    assert _plan(100, 100, Tiling(32, 8)).grid.lefts == tuple(tile_starts(100, 32, 8))


def test_super_resolution_tiles_in_low_resolution_and_crops_the_reference_in_output_space():
    high = astronaut(128)[:, :80, :96]
    low = high.reshape(3, 40, 2, 48, 2).mean((2, 4))
    plan = plan_restore("super_resolution", low, scale=2, reference=high, params=SMALL,
                        tiling=Tiling(24, 8))  # fmt: skip
    grid = plan.grid
    # Lanczos-2 reaches 2 low-resolution px past a tile: neighbours overlap by at least
    # 8 + 2 * 2 = 12 px, so 1 + ceil((40 - 24) / 12) = 3 rows and 1 + ceil((48 - 24) / 12) = 3
    # columns, spread evenly.
    assert grid is not None and grid.tops == (0, 8, 16) and grid.lefts == (0, 12, 24)
    for (problem, _), tile in zip(plan.fits, grid.tiles, strict=True):
        top, left = tile.top, tile.left
        assert torch.equal(problem.data[0], low[:, top : top + 24, left : left + 24])
        assert problem.reference is not None and torch.equal(problem.reference[0],
                           high[:, 2 * top : 2 * top + 48, 2 * left : 2 * left + 48])  # fmt: skip
        assert (problem.placement.height, problem.placement.width) == (48, 48)

    def return_references(plan):  # a "fit" that returns exactly its tile's reference
        return [fake_result(problem.reference[0], 2) for problem, _ in plan.fits]

    result = run_plan(plan, return_references)
    assert (result.image - high).abs().max() < 1e-6
    assert result.psnr is not None and result.psnr > 100
    fitted = restore("super_resolution", low, scale=2, iterations=5, params=SMALL,
                     tiling=Tiling(24, 8))  # fmt: skip
    assert fitted.image.shape == (3, 80, 96) and fitted.tiles == 9 and fitted.iterations == 45


def test_inpainting_tiles_run_the_whole_masks_variant_and_refuse_an_empty_tile():
    image = astronaut(128)[:, :96, :96]
    mask = torch.ones(96, 96)
    mask[10:42, 10:42] = 0  # 11% of the image, one compact hole: "large_hole" as a whole
    plan = plan_restore("inpaint", image, mask=mask, tiling=Tiling(48, 8))
    whole_variant = resolve_preset("inpaint", None, mask=mask)
    assert plan.problem.preset == whole_variant and plan.tiles == 9
    assert all(problem.preset == whole_variant for problem, _ in plan.fits)
    # Alone, the tile away from the hole would have picked another variant.
    assert classify_mask(mask[48:, 48:]) != classify_mask(mask) == "large_hole"
    mask[:48, :48] = 0  # a hole covering tile 0 entirely: tiles twice as large cover it
    grown = plan_restore("inpaint", image, mask=mask, tiling=Tiling(48, 8))
    assert grown.grid is None and grown.tiles == 1  # 96 px tiles: the image, fitted whole
    spec = plan_restore("inpaint", image, mask=mask, params=SMALL).problem.spec
    tile = Placement.for_target(48, 48, spec.minimum_side(), 2**spec.depth)
    limit = fit_bytes(spec, tile.padded_height, tile.padded_width)  # 48 px fit, no more
    with pytest.raises(DipInputError, match=r"no known pixel.*memory limit"):
        plan_restore("inpaint", image, mask=mask, params=SMALL,
                     tiling=Tiling(48, 8, memory_limit=limit))  # fmt: skip


@pytest.mark.slow
def test_tiled_inpainting_keeps_the_known_pixels():
    """Half the pixels missing, 48 px in tiles of 32 (2 x 2), 150 steps: on the known pixels
    the tiled result is as close to the photo as the whole fit's (the tiles' masks line up
    with their images), and closer there than in the holes."""
    image = astronaut(64)[:, :48, :48]
    mask = (torch.rand(48, 48, generator=torch.Generator().manual_seed(1)) < 0.5).float()
    known = mask.bool().expand(3, -1, -1)
    job: dict[str, Any] = {"mask": mask, "iterations": 150, "params": SMALL}
    whole = restore("inpaint", image, **job)
    tiled = restore("inpaint", image, tiling=Tiling(32, 8), **job)

    def db(result, where):
        return 10 * math.log10(1 / float(((result.image - image)[where] ** 2).mean()))

    assert tiled.tiles == 4 and tiled.image.shape == image.shape
    assert db(tiled, known) >= db(whole, known) - 0.5 and db(tiled, known) > 23
    assert db(tiled, known) > db(tiled, ~known) + 2


def test_the_flash_guide_is_cut_with_the_image():
    flash, ambient = astronaut(128)[:, :80, :64], camera(128)[:, :80, :64].expand(3, -1, -1)
    plan = plan_restore("flash_no_flash", ambient, guide=flash, tiling=Tiling(32, 8),
                        params={"channels": 8, "depth": 3})  # fmt: skip
    assert plan.grid is not None
    for (problem, _), tile in zip(plan.fits, plan.grid.tiles, strict=True):
        assert problem.image_input is not None
        guide = problem.placement.crop(problem.image_input)[0]
        assert torch.equal(guide, flash[:, tile.top : tile.top + 32, tile.left : tile.left + 32])


def test_a_tiled_jobs_result_aggregates_its_tiles_as_documented():
    """48 x 48 in tiles of 32: 2 x 2 tiles, symmetric, so each has a quarter of the blend.
    Two members per tile, their images a constant apart from the tile's reference crop."""
    reference = camera(64)[:, :48, :48] * 0.8
    noisy = noisy_copy(reference)
    plan = plan_restore("denoise", noisy, reference=reference, seed=3, tiling=Tiling(32, 8),
                        params={**SMALL, "ensemble": 2})  # fmt: skip
    assert plan.grid is not None and plan.grid.shares() == pytest.approx([0.25] * 4)
    lengths, reasons = [5, 3, 5, 4], ["auto", "iterations", "auto", "iterations"]
    tile_psnrs = [[20.0 + t] * lengths[t] for t in range(4)]
    energies = [[float(10 * t + s) for s in range(lengths[t])] for t in range(4)]

    def members(plan):
        out = []
        for t, (problem, _) in enumerate(plan.fits[::2]):
            crop = problem.reference[0]
            for offset in (0.05, 0.15):  # the members' mean is the crop + 0.1
                out.append(fake_result(crop + offset, lengths[t], reason=reasons[t],
                                       energies=energies[t], psnrs=tile_psnrs[t]))  # fmt: skip
        return out

    result = run_plan(plan, members)
    assert result.tiles == 4 and result.seed == 3
    assert (result.image - (reference + 0.1)).abs().max() < 1e-5
    assert result.psnr == pytest.approx(20.0, abs=1e-4)  # an error of 0.1 everywhere
    assert result.iterations == 2 * sum(lengths) and result.stopped_at == 5
    assert result.stop_reason == "auto"  # 2 against 2: the first tile's
    assert result.stop_stats is None and result.stop_decision is None
    # Each tile's energy: its members' mean image against its noisy crop (ensemble combine).
    tile_energies = []
    for tile in plan.grid.tiles:
        rows, cols = tile.box()
        tile_energies.append(float(((reference[:, rows, cols] + 0.1 - noisy[:, rows, cols])
                                    ** 2).double().mean()))  # fmt: skip
    assert result.energy == pytest.approx(np.mean(tile_energies), rel=1e-5)
    expected_energy = [np.mean([e[min(s, len(e) - 1)] for e in energies]) for s in range(5)]
    np.testing.assert_allclose(result.energies.numpy(), expected_energy)
    mse = [np.mean([10 ** (-p[min(s, len(p) - 1)] / 10) for p in tile_psnrs]) for s in range(5)]
    assert result.psnrs is not None
    np.testing.assert_allclose(result.psnrs.numpy(), -10 * np.log10(mse))
    assert result.steps.tolist() == [0, 1, 2, 3, 4]


def test_tiling_settings_are_checked():
    for bad in ({"size": 0}, {"margin": -1}, {"size": 64, "margin": 64}, {"size": 64.0},
                {"memory_limit": -5}):  # fmt: skip
        with pytest.raises(ValueError):
            Tiling(**bad)


# --- tiled fits against whole ones ------------------------------------------------------

# 224 px, not 256: tiles never shrink, so 128 px tiles cover 256 px only with 3 x 3 of them
# (2.25 times the whole fit's pixels, ~100 s here); 224 px takes 2 x 2, overlapping by 32.
QUALITY_SIDE, QUALITY_TILE, QUALITY_MARGIN, QUALITY_STEPS = 224, 128, 32, 250


@pytest.fixture(scope="module")
def denoised():
    """A 224 px crop of the astronaut at half size with noise of sigma 25/255, denoised whole
    and in 128 px tiles by the same small network for the same steps per fit (no input jitter
    nor averaging: a few hundred steps then suffice). ~45 s on 2 shared CPU cores."""
    clean = astronaut(256)[:, :QUALITY_SIDE, :QUALITY_SIDE]
    noisy = noisy_copy(clean)
    params = {"channels": 16, "depth": 3, "input_depth": 8, "stop": "fixed",
              "reg_noise_std": 0.0, "exp_weight": 0.0}  # fmt: skip
    job: dict[str, Any] = {"iterations": QUALITY_STEPS, "seed": 0, "params": params,
                           "reference": clean}  # fmt: skip
    whole = restore("denoise", noisy, **job)
    tiled = restore("denoise", noisy, tiling=Tiling(QUALITY_TILE, QUALITY_MARGIN), **job)
    return clean, noisy, whole, tiled


@pytest.mark.slow
def test_tiled_denoising_is_as_good_as_the_whole_fit(denoised):
    """At equal steps per fit the tiles do better (measured +2.6 to +2.8 dB over three
    seeds): a quarter of the image each, they converge sooner. The check is that tiling
    costs nothing (0.3 dB), and that the blend loses nothing against the tiles themselves
    (the trace's last PSNR is that of the tiles' mean MSE)."""
    clean, noisy, whole, tiled = denoised
    assert tiled.tiles == 4 and tiled.image.shape == clean.shape
    whole_db, tiled_db = psnr(whole.image, clean).item(), psnr(tiled.image, clean).item()
    assert whole_db > psnr(noisy, clean).item() + 2
    assert tiled_db >= whole_db - 0.3, (tiled_db, whole_db)
    assert tiled.psnr == pytest.approx(tiled_db, abs=1e-4) and tiled.psnrs is not None
    assert tiled_db >= float(tiled.psnrs[-1]) - 0.1
    assert tiled.iterations == 4 * QUALITY_STEPS


@pytest.mark.slow
def test_no_seam_shows_where_tiles_are_blended(denoised):
    """The mean squared difference of neighbouring pixels over the pairs in the blend ramps
    (where tiles hand over), relative to its mean over all pairs, is no higher than 1.15
    (measured 0.98 to 1.03 over three seeds). A seam raises it: tiles cut side by side gave
    1.19 and 1.44 times the whole fit's ratio on two photos in the benchmark. The
    photo's content moves the ratio too, so it is also held to 1.15 times the clean crop's
    own ratio (1.09) and the whole fit's (0.96 to 1.04 times it over the three seeds): the
    fits differ pixel by pixel, seeds and context apart, by a few percent of it."""
    clean, _, whole, tiled = denoised
    grid = TileGrid.for_image(QUALITY_SIDE, QUALITY_SIDE, QUALITY_TILE, QUALITY_MARGIN)
    masks = ramp_pairs(grid)
    assert masks[0].any() and masks[1].any()
    ratio = seam_ratio(tiled.image, masks)
    assert ratio <= 1.15
    assert ratio <= 1.15 * seam_ratio(clean, masks)
    assert ratio <= 1.15 * seam_ratio(whole.image, masks)
