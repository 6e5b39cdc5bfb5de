"""Pad to the network's size and crop back, so no pixel of the user's image is lost."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Placement:
    """Where a (height, width) target sits, centred, inside the padded network domain."""

    height: int
    width: int
    padded_height: int
    padded_width: int

    @classmethod
    def for_target(cls, height: int, width: int, minimum_side: int, multiple: int) -> Placement:
        def padded(side: int) -> int:
            side = max(side, minimum_side)
            return -(-side // multiple) * multiple

        return cls(height, width, padded(height), padded(width))

    @property
    def top(self) -> int:
        return (self.padded_height - self.height) // 2

    @property
    def left(self) -> int:
        return (self.padded_width - self.width) // 2

    def crop(self, x: torch.Tensor) -> torch.Tensor:
        """The target region of a padded (..., H, W) tensor."""
        return x[..., self.top : self.top + self.height, self.left : self.left + self.width]

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """Pad a target-sized (N, C, H, W) tensor to the domain: reflect where the image is
        large enough for it, replicate otherwise."""
        bottom = self.padded_height - self.height - self.top
        right = self.padded_width - self.width - self.left
        pads = (self.left, right, self.top, bottom)
        fits_reflect = max(self.left, right) < self.width and max(self.top, bottom) < self.height
        return F.pad(x, pads, mode="reflect" if fits_reflect else "replicate")
