"""The DCGAN-style generator of the public DFKD code (DAFL / CMI / Fast-Datafree / MosaicKD) and
MosaicKD's patch discriminator.

latent z -> linear to a `start_mult * ngf`-channel `init_size` x `init_size` map (img_size // 4 by
default, 8x8 for 32 px) -> [upsample x2 + conv3x3 + BN + LeakyReLU] blocks up to `img_size` (2 ngf
channels, ngf in the last) -> conv3x3 -> sigmoid or tanh. start_mult 2 is the DAFL/CMI/Fast width,
4 MosaicKD's (256 -> 128 -> 64 for ngf 64).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .registry import MODELS

_ACTIVATIONS = {"sigmoid": nn.Sigmoid, "tanh": nn.Tanh}


class Generator(nn.Module):
    def __init__(
        self,
        nz: int = 256,
        ngf: int = 64,
        img_size: int = 32,
        nc: int = 3,
        init_size: int | None = None,
        activation: str = "sigmoid",
        start_mult: int = 2,
    ):
        super().__init__()
        init_size = init_size or max(1, img_size // 4)
        n_up = math.log2(img_size / init_size) if img_size >= init_size else -1
        if n_up < 0 or n_up != int(n_up):
            raise ValueError(
                f"generator: img_size / init_size must be a power of two, got {img_size} / {init_size}"
            )
        if activation not in _ACTIVATIONS:
            raise ValueError(f"generator: activation must be one of {sorted(_ACTIVATIONS)}, got {activation!r}")
        self.nz, self.img_size, self.nc, self.init_size = nz, img_size, nc, init_size
        if start_mult < 1:
            raise ValueError(f"generator: start_mult must be >= 1, got {start_mult}")
        self.l1 = nn.Linear(nz, ngf * start_mult * init_size**2)
        self.ngf = ngf
        blocks: list[nn.Module] = [nn.BatchNorm2d(ngf * start_mult)]
        n_blocks = max(int(n_up), 1)  # an 8 px output from an 8 px map still gets one conv block
        cin = ngf * start_mult
        for i in range(n_blocks):
            cout = ngf if i == n_blocks - 1 else ngf * 2
            if i < n_up:
                blocks.append(nn.Upsample(scale_factor=2))
            blocks += [nn.Conv2d(cin, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), nn.LeakyReLU(0.2, inplace=True)]
            cin = cout
        blocks += [nn.Conv2d(ngf, nc, 3, 1, 1), _ACTIVATIONS[activation]()]
        self.conv_blocks = nn.Sequential(*blocks)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        out = self.l1(z.flatten(1)).view(z.shape[0], -1, self.init_size, self.init_size)
        return self.conv_blocks(out)

    def sample_latent(self, n: int, device=None, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.randn(n, self.nz, device=device, generator=generator)


@MODELS.register(kind="generator")
def generator(
    nz: int = 256, ngf: int = 64, img_size: int = 32, nc: int = 3, init_size: int | None = None, activation: str = "sigmoid",
    start_mult: int = 2,
) -> Generator:
    return Generator(nz, ngf, img_size, nc, init_size, activation, start_mult)


class PatchDiscriminator(nn.Module):
    """MosaicKD's local discriminator: two 4x4 stride-2 convs (the second with BN) and a 1x1 conv to one
    logit per patch (8x8 patches of 10x10 px, stride 4, for a 32 px image); no sigmoid."""

    def __init__(self, nc: int = 3, ndf: int = 128):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(nc, ndf, 4, 2, 1),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(ndf, ndf * 2, 4, 2, 1, bias=False),
            nn.BatchNorm2d(ndf * 2),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(ndf * 2, 1, 1, 1, 0, bias=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@MODELS.register(kind="discriminator")
def patch_discriminator(nc: int = 3, ndf: int = 128) -> PatchDiscriminator:
    return PatchDiscriminator(nc, ndf)
