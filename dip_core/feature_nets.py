"""Feature networks for the pre-image task.

MobileNetV2 with torchvision's module names, so torchvision's ImageNet checkpoint loads with
``strict=True`` (torchvision itself cannot be installed beside the CPU torch build). Loading
the weights from disk is the caller's business: dip_core does no I/O.
"""

from __future__ import annotations

from torch import nn

# (expansion, output channels, repeats, first stride) of MobileNetV2's inverted residuals.
_INVERTED_RESIDUALS = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
MOBILENET_V2_LAYERS = 19  # features.0 .. features.18


def _conv_bn_relu(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1):
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU6(inplace=True),
    )


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = cin * expansion
        self.use_residual = stride == 1 and cin == cout
        layers = [] if expansion == 1 else [_conv_bn_relu(cin, hidden, 1)]
        layers += [
            _conv_bn_relu(hidden, hidden, 3, stride, groups=hidden),
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.conv(x) if self.use_residual else self.conv(x)


class MobileNetV2(nn.Module):
    """ImageNet MobileNetV2 (width 1.0), module names as in torchvision."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        layers: list[nn.Module] = [_conv_bn_relu(3, 32, 3, stride=2)]
        cin = 32
        for expansion, cout, repeats, stride in _INVERTED_RESIDUALS:
            for i in range(repeats):
                layers.append(InvertedResidual(cin, cout, stride if i == 0 else 1, expansion))
                cin = cout
        layers.append(_conv_bn_relu(cin, 1280, 1))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, num_classes))

    def forward(self, x):
        pooled = self.features(x).mean(dim=(2, 3))
        return self.classifier(pooled)


def mobilenet_v2_features(state_dict: dict | None, layer: int = 12) -> nn.Module:
    """MobileNetV2's ``features[:layer]`` in eval mode, frozen.

    ``state_dict`` is torchvision's checkpoint (None leaves random weights, for tests).
    """
    if not 1 <= layer <= MOBILENET_V2_LAYERS:
        raise ValueError(f"feature_layer must be in 1..{MOBILENET_V2_LAYERS}, got {layer}")
    model = MobileNetV2()
    if state_dict is not None:
        model.load_state_dict(state_dict, strict=True)
    return model.features[:layer].eval().requires_grad_(False)
