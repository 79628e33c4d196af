"""Models a user might bring with `import:models_for_import:<callable>` (the tests' own code)."""

from torch import nn


def tiny_net(num_classes: int = 10, in_channels: int = 3, width: int = 8) -> nn.Module:
    """A small CNN with BatchNorm."""
    return nn.Sequential(
        nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes),
    )


def no_bn_net(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """A classifier without BatchNorm: methods that match BN statistics must refuse it as a teacher."""
    return nn.Sequential(nn.Conv2d(in_channels, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes))
