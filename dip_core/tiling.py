"""Tiled fitting: an image too large for one fit is fitted as overlapping tiles and blended.

**When.** ``plan_restore(..., tiling=Tiling(...))`` tiles an image when ``above_pixels`` is
set and the image has more pixels than that, or ``memory_limit`` is set and the whole-image
fit's estimate (``engine.fit_bytes``) exceeds it; with both None, whenever the image is larger
than one tile. ``tiling=None`` never tiles. A tile whose own fit would exceed
``memory_limit`` is halved (size and margin) until it fits; below ``MIN_TILE_SIZE`` px the job
fails with DipInputError. An image no larger than the (possibly halved) tile is fitted whole.
A task with ``Task.tileable = False`` (pre-image: its energy compares whole-image features)
is always fitted whole, whatever ``tiling`` says.

**Grid.** Every tile has the same size, ``size`` x ``size`` in image pixels (low-resolution
pixels for super-resolution), or the image's own side where the image is smaller than a tile
in that dimension (not tiled there): so all tiles of a job share one network and one padded
size, and pack together (fit.py buckets by spec and padded size). Along a side of L > size
pixels, n = 1 + ceil((L - size) / (size - o)) tiles are spread evenly from 0 to L - size (the
first starts at the border, the last ends at it; no tile is shrunk), o = ``margin`` + 2 * halo
being the least overlap of two neighbours; halo is the task's ``Task.tile_halo``, how far its
operator reaches past a tile's edge, which the tile cannot see (deblurring: the kernel's
radius; super-resolution: the downsampler's support, in low-resolution pixels; 0
otherwise). Tiles are numbered row by row.

**Blend.** A tile's weight is separable, w(y) w(x). Along each axis, two neighbours hand over
at the centre of their overlap, with a raised cosine (sin^2 / cos^2, summing to one) over
``BLEND_SHARE`` x ``margin`` pixels centred there: a tile's weight is 1 between the centres
of its overlaps and 0 over its outer (overlap - ramp) / 2 >= halo pixels. Weights are
normalised to sum to one at every pixel anyway (per axis, hence in 2-D), so identical tiles
blend to themselves. Super-resolution blends in output space: the tile boxes and the ramp
scaled by the factor. Measured (benchmarks/tiling.py: two 224 px photos, 128 px tiles of a
3-level network, 16 px at its deepest level as 512 px tiles of the 5-level presets): a ramp
over the whole margin beat one over half of it by 0.07-0.08 dB, with lower neighbour
differences where tiles meet; a hard cut raised those to 1.19x and 1.44x the whole fit's
(1.07x, 1.35x with the ramp; the whole fit is blurrier) and 0.97x and 1.21x the clean
photo's (0.90x, 1.06x), and its error near the cut to 1.47x and 1.25x the image's mean
(1.19x, 1.11x). 64 px tiles lost 0.5 dB to 128 px ones.

**Preset and inputs.** The preset is resolved once, for the whole image (inpainting's variant
from the whole mask), and every tile runs it; the stopping rule's noise floor is the whole
image's too. The mask and the flash guide are cropped with the image, the reference (output
sized) with the output tile. A hole larger than a tile cannot be filled tile by tile: when
an inpainting tile would hold no known pixel, the tiles are doubled (size and margin) until
every tile holds one or the image is fitted whole, as long as ``memory_limit`` allows (with
none, up to the whole image); beyond it the job fails, naming the tile.

**Seeds.** Tile t's fits use ``tile_seed(seed, t) + m`` for ensemble member m, with
``tile_seed(seed, t) = seed + t * TILE_SEED_STRIDE`` (2**20, far above the 64 members an
ensemble may have): tile 0 keeps the job's own seeds, and no two fits of one job share one.

**The job's one result** (``blend_results``). ``image``: the blended tiles. ``energy``: the
tiles' energies averaged with each tile's share of the blend (the sum of its normalised
weights; the shares sum to one). ``psnr``: the blended image's, against the whole reference.
``iterations``, ``seconds``, ``rollbacks``: summed over every fit (as an ensemble sums its
members). ``stopped_at``: the latest tile's. ``stop_reason``: the most common among the
tiles (ties: the first tile's of them). ``stop_decision`` and ``stop_stats``: None (each
tile's stopping rule judged its own fit). ``tiles``: the number of tiles. The trace has one
entry per step up to the longest tile's: its energy is the share-weighted mean over tiles, a
tile that stopped earlier carrying its last energy; its PSNR is that of the share-weighted
mean of the tiles' MSEs (close to, but not exactly, the blended image's PSNR).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from itertools import pairwise

import torch

from .config import FitResult
from .engine import fit_bytes
from .ensemble import combine
from .errors import DipInputError
from .metrics import psnr
from .padding import Placement
from .tasks import Problem, Task
from .tasks.problem import as_image, problem_for

MIN_TILE_SIZE = 64  # memory_limit halves tiles down to this side, then gives up
TILE_SEED_STRIDE = 2**20  # tile t's seeds start at seed + t * TILE_SEED_STRIDE
BLEND_SHARE = 1.0  # the blend ramp's width, as a share of the margin (module docstring)


@dataclass(frozen=True)
class Tiling:
    """When and how to tile (see the module docstring): ``size``, the tile's side in image
    pixels (low-resolution pixels for super-resolution); ``margin``, the least overlap of two
    neighbouring tiles (plus twice the task's halo) and the width of the blend across it;
    ``above_pixels``: tile an image with more pixels than this;
    ``memory_limit``: tile when the whole-image fit's estimated bytes exceed this, and halve
    a tile too big for it. Both None: tile whenever the image is larger than one tile."""

    size: int = 512
    margin: int = 64
    above_pixels: int | None = None
    memory_limit: int | None = None

    def __post_init__(self) -> None:
        for name in ("size", "margin", "above_pixels", "memory_limit"):
            value = getattr(self, name)
            if value is not None and (type(value) is not int or value < 0):
                raise ValueError(f"Tiling.{name} must be a non-negative integer, got {value!r}")
        if self.size < 1 or self.margin >= self.size:
            raise ValueError(f"Tiling needs size >= 1 and margin < size, got size "
                             f"{self.size}, margin {self.margin}")  # fmt: skip


@dataclass(frozen=True)
class Tile:
    """One tile's box in image pixels; ``index`` numbers tiles row by row."""

    index: int
    top: int
    left: int
    height: int
    width: int

    def box(self, factor: int = 1) -> tuple[slice, slice]:
        """(rows, columns) of the tile in an image ``factor`` times the image's size."""
        return (slice(self.top * factor, (self.top + self.height) * factor),
                slice(self.left * factor, (self.left + self.width) * factor))  # fmt: skip


def tile_starts(length: int, size: int, overlap: int) -> list[int]:
    """Where the tiles along one side of ``length`` pixels start: tiles of ``size`` (the
    whole side when it is no longer), neighbours overlapping by at least ``overlap``, the
    first at 0 and the last ending at the border, spread evenly in between.

    >>> tile_starts(960, 512, 64), tile_starts(1000, 512, 64), tile_starts(300, 512, 64)
    ([0, 448], [0, 244, 488], [0])
    """
    if length <= size:
        return [0]
    if overlap >= size:
        raise ValueError(f"overlap {overlap} must be smaller than the tile ({size})")
    count = 1 + math.ceil((length - size) / (size - overlap))
    return [i * (length - size) // (count - 1) for i in range(count)]


def smooth_step(u: torch.Tensor, width: float) -> torch.Tensor:
    """0 before -width / 2, sin^2 rising to 1 over ``width`` centred on 0, then 1 (a step,
    0.5 at 0, for width 0); ``smooth_step(u) + smooth_step(-u) == 1``.

    >>> [round(v, 3) for v in smooth_step(torch.tensor([-2.0, -0.5, 0.0, 0.5, 2.0]), 2).tolist()]
    [0.0, 0.146, 0.5, 0.854, 1.0]
    """
    if width <= 0:
        return (1 + torch.sign(u)) / 2
    return torch.sin(math.pi / 2 * (u / width + 0.5).clamp(0, 1)) ** 2


@dataclass(frozen=True)
class TileGrid:
    """The tiles of one image and their blend weights (see the module docstring)."""

    height: int  # the image, in image pixels
    width: int
    tile_height: int
    tile_width: int
    ramp: int  # the blend ramp's width, centred in each overlap
    tops: tuple[int, ...]
    lefts: tuple[int, ...]

    @classmethod
    def for_image(cls, height: int, width: int, size: int, margin: int, halo: int = 0) -> TileGrid:
        """Tiles of ``size`` (or the image's side where it is smaller) overlapping by at least
        ``margin`` + 2 * ``halo``, blended over ``BLEND_SHARE`` of the margin."""
        overlap = margin + 2 * halo
        tile_h, tile_w = min(size, height), min(size, width)
        for side, tile in ((height, tile_h), (width, tile_w)):
            if side > tile and overlap >= tile:
                raise DipInputError(
                    f"tiles of {tile} px cannot overlap by the {margin} px blend margin plus "
                    f"twice the task's {halo} px halo; use larger tiles")  # fmt: skip
        return cls(height, width, tile_h, tile_w, round(margin * BLEND_SHARE),
                   tuple(tile_starts(height, size, overlap)),
                   tuple(tile_starts(width, size, overlap)))  # fmt: skip

    @property
    def tiles(self) -> list[Tile]:
        return [Tile(row * len(self.lefts) + col, top, left, self.tile_height, self.tile_width)
                for row, top in enumerate(self.tops)
                for col, left in enumerate(self.lefts)]  # fmt: skip

    def _axis(self, starts: tuple[int, ...], tile: int, length: int, f: int) -> list[torch.Tensor]:
        """Each tile's weight along one axis at ``f`` times the image's size, float64: 1
        between the centres of its overlaps with its neighbours, a ramp across each centre.
        Normalised, though the ramps already sum to one where they do not meet."""
        cuts = [(a + b + tile) * f / 2 for a, b in pairwise(starts)]
        raw = []
        for i, start in enumerate(starts):
            x = torch.arange(start * f, (start + tile) * f, dtype=torch.float64) + 0.5
            weight = torch.ones_like(x)
            if i > 0:
                weight *= smooth_step(x - cuts[i - 1], self.ramp * f)
            if i + 1 < len(starts):
                weight *= smooth_step(cuts[i] - x, self.ramp * f)
            raw.append(weight)
        total = torch.zeros(length * f, dtype=torch.float64)
        for s, w in zip(starts, raw, strict=True):
            total[s * f : (s + tile) * f] += w
        return [w / total[s * f : (s + tile) * f] for s, w in zip(starts, raw, strict=True)]

    def weights(self, factor: int = 1) -> list[torch.Tensor]:
        """Every tile's normalised blend weight, (tile_height, tile_width) times ``factor``,
        float64, in tile order; they sum to one at every pixel of the image."""
        ys = self._axis(self.tops, self.tile_height, self.height, factor)
        xs = self._axis(self.lefts, self.tile_width, self.width, factor)
        return [wy[:, None] * wx[None, :] for wy in ys for wx in xs]

    def shares(self) -> list[float]:
        """Each tile's share of the blended image (its weights' sum over the image's area);
        they sum to one."""
        ys = self._axis(self.tops, self.tile_height, self.height, 1)
        xs = self._axis(self.lefts, self.tile_width, self.width, 1)
        area = self.height * self.width
        return [float(wy.sum() * wx.sum()) / area for wy in ys for wx in xs]

    def blend(self, images: Sequence[torch.Tensor], factor: int = 1) -> torch.Tensor:
        """One (C, H, W) image from (C, h, w) tiles in tile order, at ``factor`` times the
        image's size."""
        if len(images) != len(self.tops) * len(self.lefts):
            raise ValueError(f"{len(images)} tile images for {len(self.tiles)} tiles")
        channels = images[0].shape[0]
        out = torch.zeros(channels, self.height * factor, self.width * factor)
        for tile, image, weight in zip(self.tiles, images, self.weights(factor), strict=True):
            rows, cols = tile.box(factor)
            out[:, rows, cols] += (image.double() * weight).float()
        return out


def tile_seed(seed: int, index: int) -> int:
    """The first seed of tile ``index``'s fits (its ensemble members add 0, 1, ...)."""
    return seed + index * TILE_SEED_STRIDE


def plan_grid(
    task: Task,
    whole: Problem,
    tiling: Tiling | None,
    params: dict | None,
    factor: int,
    known: torch.Tensor | None = None,
) -> TileGrid | None:
    """The job's tiles, or None to fit it whole (the rules are the module docstring's).
    ``known``: an inpainting mask's known pixels, (1, H, W) bool; a tile without any (a
    hole larger than a tile) doubles the tiles while memory allows."""
    if tiling is None or not task.tileable:
        return None
    height, width = whole.placement.height // factor, whole.placement.width // factor
    spec = whole.spec

    def estimate(h: int, w: int) -> int:
        p = Placement.for_target(h * factor, w * factor, spec.minimum_side(), 2**spec.depth)
        return fit_bytes(spec, p.padded_height, p.padded_width)

    size, margin, limit = tiling.size, tiling.margin, tiling.memory_limit
    if tiling.above_pixels is None and limit is None:
        wanted = height > size or width > size
    else:
        above = tiling.above_pixels is not None and height * width > tiling.above_pixels
        wanted = above or (limit is not None and estimate(height, width) > limit)
    if not wanted:
        return None
    while limit is not None and estimate(min(size, height), min(size, width)) > limit:
        if size // 2 < MIN_TILE_SIZE:
            need = estimate(min(size, height), min(size, width))
            raise DipInputError(
                f"even a {min(size, height)}x{min(size, width)} px tile needs about "
                f"{need / 2**30:.2f} GiB to fit, more than the {limit / 2**30:.2f} GiB limit"
            )
        size, margin = size // 2, margin // 2
    while height > size or width > size:
        grid = TileGrid.for_image(height, width, size, margin, task.tile_halo(params or {}))
        hole = _tile_without_known_pixel(grid, known)
        if hole is None:
            return grid
        if limit is not None and estimate(min(2 * size, height), min(2 * size, width)) > limit:
            raise DipInputError(
                f"{_describe(hole)} has no known pixel, and tiles larger than {size} px would "
                f"not fit the {limit / 2**30:.2f} GiB memory limit: a hole larger than a tile "
                "cannot be filled tile by tile")  # fmt: skip
        size, margin = 2 * size, 2 * margin
    return None


def known_pixels(inputs: dict[str, torch.Tensor | None]) -> torch.Tensor | None:
    """(1, H, W) bool: the pixels an inpainting mask marks known; None without a mask."""
    mask = inputs.get("mask")
    return None if mask is None else as_image(mask, "mask")[:1] > 0.5


def _tile_without_known_pixel(grid: TileGrid, known: torch.Tensor | None) -> Tile | None:
    if known is None:
        return None
    for tile in grid.tiles:
        rows, cols = tile.box()
        if not known[:, rows, cols].any():
            return tile
    return None


def _describe(tile: Tile) -> str:
    return (f"tile {tile.index} (rows {tile.top}-{tile.top + tile.height - 1}, columns "
            f"{tile.left}-{tile.left + tile.width - 1})")  # fmt: skip


def tile_problems(
    task: Task,
    whole: Problem,
    grid: TileGrid,
    observation: torch.Tensor,
    inputs: dict[str, torch.Tensor | None],
    scale: int | None,
    params: dict | None,
) -> list[Problem]:
    """One Problem per tile, in tile order: the inputs cropped (the reference in output
    space), the whole image's preset and noise floor."""
    factor = task.output_scale(scale)
    problems = []
    hole = _tile_without_known_pixel(grid, known_pixels(inputs))
    if hole is not None:  # plan_grid grows tiles past holes: only a grid made elsewhere
        raise DipInputError(f"{_describe(hole)} has no known pixel: a hole larger than a "
                            "tile cannot be filled tile by tile")  # fmt: skip
    for tile in grid.tiles:
        rows, cols = tile.box()
        given = {}
        for role, value in inputs.items():
            if value is not None:
                box = tile.box(factor) if role == "reference" else (rows, cols)
                given[role] = value[..., box[0], box[1]]
        problem = problem_for(task, observation[..., rows, cols], given, scale, params, None,
                              preset=whole.preset)  # fmt: skip
        problem.energy_floor = whole.energy_floor
        problems.append(problem)
    return problems


def blend_results(
    grid: TileGrid,
    whole: Problem,
    problems: Sequence[Problem],
    results: Sequence[FitResult],
    members: int,
    seed: int,
    factor: int,
) -> FitResult:
    """The job's one result from its fits' (tile-major, ``members`` per tile): each tile's
    members combined (ensemble.py), then the tiles blended (see the module docstring)."""
    per_tile = [combine(problem, list(results[i * members : (i + 1) * members]))
                for i, problem in enumerate(problems)]  # fmt: skip
    image = grid.blend([r.image for r in per_tile], factor)
    shares = torch.tensor(grid.shares(), dtype=torch.float64)
    energies, psnrs = _traces(per_tile, shares)
    reference = whole.reference
    value = None
    if reference is not None:
        value = psnr(image.unsqueeze(0), reference.to(image.device)).item()
    reasons = Counter(r.stop_reason for r in per_tile)
    return replace(
        per_tile[0],
        image=image,
        steps=torch.arange(len(energies), dtype=torch.int64),
        energies=energies,
        psnrs=psnrs,
        stop_stats=None,
        energy=float(sum(s * r.energy for s, r in zip(shares.tolist(), per_tile, strict=True))),
        psnr=value,
        iterations=sum(r.iterations for r in per_tile),
        seconds=sum(r.seconds for r in per_tile),
        seed=seed,
        stopped_at=max(r.stopped_at for r in per_tile),
        stop_reason=reasons.most_common(1)[0][0],
        rollbacks=sum(r.rollbacks for r in per_tile),
        stop_decision=None,
        tiles=len(per_tile),
    )


def _carried(trace: torch.Tensor, length: int) -> torch.Tensor:
    """``trace`` extended to ``length`` entries by repeating its last one."""
    if len(trace) >= length:
        return trace[:length]
    return torch.cat([trace, trace[-1:].expand(length - len(trace))])


def _traces(
    per_tile: Sequence[FitResult], shares: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(energy, PSNR) per step: share-weighted means over the tiles that have a trace, a
    finished tile carrying its last value; the PSNR is that of the mean MSE."""
    length = max(len(r.energies) for r in per_tile)
    kept = [i for i, r in enumerate(per_tile) if len(r.energies)]
    if length == 0:  # no fit took a step
        empty = torch.zeros(0, dtype=torch.float64)
        return empty, None if per_tile[0].psnrs is None else empty.clone()
    w = shares[kept] / shares[kept].sum()
    energies = torch.stack([_carried(per_tile[i].energies.double(), length) for i in kept])
    energy = (w[:, None] * energies).sum(0)
    traces = [per_tile[i].psnrs for i in kept]
    if any(t is None for t in traces):
        return energy, None
    mse = torch.stack([10 ** (-_carried(t.double(), length) / 10) for t in traces if t is not None])
    return energy, -10 * torch.log10((w[:, None] * mse).sum(0))
