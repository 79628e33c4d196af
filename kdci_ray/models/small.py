"""Small CNNs for the 8x8 digits quickstart (teacher and student); they run in seconds on a CPU."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import Classifier, init_conv_bn_linear
from .registry import MODELS


def _conv_bn_relu(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class SmallCNN(Classifier):
    """conv-BN-ReLU stages (stride 2 marks a downsample), global average pool, linear head."""

    def __init__(self, stages: tuple[tuple[int, int], ...], num_classes: int = 10, in_channels: int = 1):
        super().__init__()
        layers, channels = [], in_channels
        for width, stride in stages:
            layers.append(_conv_bn_relu(channels, width, stride))
            channels = width
        self.body = nn.Sequential(*layers)
        self.num_classes = num_classes
        self.feature_dim = channels
        self.fc = nn.Linear(channels, num_classes)
        init_conv_bn_linear(self)

    @property
    def head(self) -> nn.Linear:
        return self.fc

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(F.adaptive_avg_pool2d(self.body(x), 1), 1)


@MODELS.register(kind="classifier")
def digits_cnn(num_classes: int = 10, in_channels: int = 1) -> SmallCNN:
    """Digits teacher: 4 conv stages, ~0.1 M parameters."""
    return SmallCNN(((32, 1), (64, 1), (64, 2), (128, 1)), num_classes, in_channels)


@MODELS.register(kind="classifier")
def digits_cnn_small(num_classes: int = 10, in_channels: int = 1) -> SmallCNN:
    """Digits student: 2 conv stages, ~6 k parameters."""
    return SmallCNN(((16, 1), (32, 2)), num_classes, in_channels)
