"""MobileNetV2 (ImageNet-1K) as a plain nn.Module in torchvision's layout, so its state dict loads strictly.

torchvision does not import beside the torch 2.13 CPU build here, and reparameterization wants a plain module anyway.
Layer names match torchvision's: `features.N.conv.M...` and `classifier.1`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from compress.errors import UserError

# (expansion t, output channels c, repeats n, first stride s), from the MobileNetV2 paper / torchvision.
SETTINGS = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]
WEIGHTS_FILE = "mobilenet_v2-b0353104.pth"


class ConvBNReLU6(nn.Sequential):
    """Conv2d (no bias) -> BatchNorm2d -> ReLU6: torchvision's Conv2dNormActivation (keys .0, .1)."""

    def __init__(self, inp: int, out: int, kernel: int = 3, stride: int = 1, groups: int = 1):
        super().__init__(
            nn.Conv2d(inp, out, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
            nn.BatchNorm2d(out),
            nn.ReLU6(inplace=True),
        )


class InvertedResidual(nn.Module):
    """1x1 expand -> 3x3 depthwise -> 1x1 linear projection, with a residual when shapes allow."""

    def __init__(self, inp: int, out: int, stride: int, expand: int):
        super().__init__()
        hidden = inp * expand
        self.use_residual = stride == 1 and inp == out
        layers: list[nn.Module] = [ConvBNReLU6(inp, hidden, kernel=1)] if expand != 1 else []
        layers += [ConvBNReLU6(hidden, hidden, stride=stride, groups=hidden),
                   nn.Conv2d(hidden, out, 1, bias=False), nn.BatchNorm2d(out)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_residual else self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 width 1.0: `features` (19 stages) -> global average pool -> `classifier` (dropout, Linear)."""

    def __init__(self, num_classes: int = 1000, dropout: float = 0.2):
        super().__init__()
        channels = 32
        features: list[nn.Module] = [ConvBNReLU6(3, channels, stride=2)]
        for t, c, n, s in SETTINGS:
            for i in range(n):
                features.append(InvertedResidual(channels, c, s if i == 0 else 1, t))
                channels = c
        features.append(ConvBNReLU6(channels, 1280, kernel=1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(1280, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.adaptive_avg_pool2d(self.features(x), 1)
        return self.classifier(torch.flatten(x, 1))


def load_mobilenet_v2(weights: Path) -> MobileNetV2:
    """MobileNetV2 with torchvision's ImageNet state dict from `weights`, loaded strictly with weights_only=True."""
    model = MobileNetV2()
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
        model.load_state_dict(state, strict=True)
    except (RuntimeError, OSError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise UserError(f"cannot load MobileNetV2 weights from {weights}: {first}") from exc
    return model.eval()
