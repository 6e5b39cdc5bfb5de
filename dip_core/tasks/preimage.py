"""Natural pre-image: an image whose features (a frozen network's) match the input's."""

from __future__ import annotations

from typing import Any

import torch

from ..energies import MeanSquaredError
from ..errors import DipInputError
from ..operators import FeatureMap
from ..params import integer
from ..presets import Preset, levels
from .base import Measurement, Observed, Task


class Preimage(Task):
    name = "preimage"
    param_keys = ("feature_layer", "feature_weights")
    needs_feature_net = True
    tileable = False  # the energy compares whole-image features: a tile has no meaning alone
    presets = {
        "preimage": Preset("noise", 32, channels_down=(16, 32, 64, 128, 128, 128),
                           channels_up=(16, 32, 64, 128, 128, 128), channels_skip=levels(4, 6),
                           kernels_down=(7, 7, 5, 5, 3, 3), kernels_up=(7, 7, 5, 5, 3, 3),
                           upsample=levels("nearest", 6), downsample="avg", padding="zero",
                           iterations=3100, lr=0.001, reg_noise_std=0.0, exp_weight=0.0),
    }  # fmt: skip

    def prepare(self, observation: torch.Tensor) -> torch.Tensor:
        return observation.expand(3, -1, -1) if observation.shape[0] == 1 else observation

    def task_params(self, params: dict) -> dict[str, Any]:
        if "feature_weights" in params and not isinstance(params["feature_weights"], str):
            raise DipInputError("params.feature_weights must be a path or URI string")
        if "feature_layer" in params:
            return {"feature_layer": integer(params["feature_layer"], "feature_layer", 1, 19)}
        return {}

    def measurement(self, job: Observed) -> Measurement:
        if job.feature_net is None:
            raise DipInputError("preimage needs a feature network (feature_net)")
        phi = FeatureMap(job.feature_net)
        with torch.no_grad():
            return phi, MeanSquaredError(), phi(job.image)
