"""What every classifier in the zoo offers: logits, optionally penultimate features, and its BN layers."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


def bn_layers(module: nn.Module) -> list[_BatchNorm]:
    """All BatchNorm layers of `module` in forward-definition order (what BN-statistics hooks attach to)."""
    return [m for m in module.modules() if isinstance(m, _BatchNorm)]


class Classifier(nn.Module):
    """Base class: subclasses define `forward_features` (to the pooled penultimate vector) and `head`.

    `forward(x)` returns logits; `forward(x, return_features=True)` returns `(logits, features)` so the
    KDCI dictionary and t-SNE plots can read features without a second pass.
    """

    num_classes: int
    feature_dim: int
    head: nn.Linear

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x: torch.Tensor, return_features: bool = False):
        features = self.forward_features(x)
        logits = self.head(features)
        return (logits, features) if return_features else logits

    def bn_layers(self) -> list[_BatchNorm]:
        return bn_layers(self)


def init_conv_bn_linear(module: nn.Module) -> None:
    """He init for convs, unit BN, zero biases: the init the public CIFAR model definitions use."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, _BatchNorm) and m.affine:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)
