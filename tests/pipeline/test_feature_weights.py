"""The packaged MobileNetV2 checkpoint loads strictly and gives ImageNet-like features."""

import pytest
import torch

from dip_core.feature_nets import MobileNetV2
from pipeline.feature_weights import FeatureWeightsError, load_feature_net, packaged_checkpoint


def test_packaged_checkpoint_loads_strictly_with_weights_only():
    state = torch.load(packaged_checkpoint(), map_location="cpu", weights_only=True)
    MobileNetV2().load_state_dict(state, strict=True)
    phi = load_feature_net(layer=12)
    out = phi(torch.rand(1, 3, 64, 64))
    assert out.shape == (1, 96, 4, 4)
    assert not any(p.requires_grad for p in phi.parameters())


def test_torchscript_file_is_used_whole(tmp_path):
    scripted = torch.jit.script(torch.nn.Conv2d(3, 5, 3))
    scripted.save(str(tmp_path / "phi.pt"))
    assert load_feature_net(tmp_path / "phi.pt")(torch.rand(1, 3, 8, 8)).shape == (1, 5, 6, 6)


def test_unusable_files_give_clear_errors(tmp_path):
    with pytest.raises(FeatureWeightsError, match="not found"):
        load_feature_net(tmp_path / "missing.pth")
    torch.save({"weight": torch.zeros(2)}, tmp_path / "other.pth")
    with pytest.raises(FeatureWeightsError, match="not a MobileNetV2"):
        load_feature_net(tmp_path / "other.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(FeatureWeightsError, match="cannot load"):
        load_feature_net(tmp_path / "junk.pth")
