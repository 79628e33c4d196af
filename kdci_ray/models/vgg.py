"""VGG-11 with BatchNorm for 32x32 inputs (five 2x2 pools down to 1x1, one linear head)."""

from __future__ import annotations

import torch
from torch import nn

from .base import Classifier, init_conv_bn_linear
from .registry import MODELS

_VGG11 = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


class VGG(Classifier):
    def __init__(self, cfg: tuple, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(channels, v, 3, padding=1, bias=False), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
                channels = v
        self.features = nn.Sequential(*layers)
        self.num_classes = num_classes
        self.feature_dim = channels
        self.classifier = nn.Linear(channels, num_classes)
        init_conv_bn_linear(self)

    @property
    def head(self) -> nn.Linear:
        return self.classifier

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        # Adaptive pool keeps non-32px inputs working; at 32px the map is already 1x1.
        return torch.flatten(nn.functional.adaptive_avg_pool2d(self.features(x), 1), 1)


@MODELS.register(kind="classifier")
def vgg11_bn(num_classes: int = 10, in_channels: int = 3) -> VGG:
    return VGG(_VGG11, num_classes, in_channels)
