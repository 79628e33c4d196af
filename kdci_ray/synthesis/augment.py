"""Differentiable, batched augmentations used *inside* synthesis (gradients flow back to the pixels or
the generator). All randomness comes from the caller's generator, so a synthesis call is reproducible
from (seed, call). Pad-crop + flip is `kdci_ray.data.random_crop_flip` (also differentiable)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..data import random_crop_flip

__all__ = ["jitter_and_flip", "random_crop_flip", "random_resized_crop"]


def jitter_and_flip(x: torch.Tensor, jitter: int, flip: bool, cpu_generator: torch.Generator) -> torch.Tensor:
    """DeepInversion: roll the whole batch by one random (dy, dx) in [-jitter, jitter], then flip the
    whole batch with probability 1/2. The draws are per batch, so they come from a CPU generator: no
    device sync per step."""
    if jitter > 0:
        dy, dx = torch.randint(-jitter, jitter + 1, (2,), generator=cpu_generator).tolist()
        x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
    if flip and torch.rand((), generator=cpu_generator).item() < 0.5:
        x = x.flip(3)
    return x


def random_resized_crop(
    x: torch.Tensor,
    scale: tuple[float, float] = (0.25, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    flip: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Per-sample random-resized crop (area fraction in `scale`, aspect ratio in `ratio`, log-uniform)
    resampled bilinearly to the input size, then a per-sample horizontal flip: CMI's local view.

    Done with one affine grid for the batch, so it is differentiable and has no per-sample loop."""
    n = x.shape[0]
    dev = x.device
    area = torch.empty(n, device=dev).uniform_(scale[0], scale[1], generator=generator)
    log_r = torch.empty(n, device=dev).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator)
    r = log_r.exp()
    # Crop width/height as fractions of the image; clipped to fit, like torchvision's fallback.
    w = (area * r).sqrt().clamp(max=1.0)
    h = (area / r).sqrt().clamp(max=1.0)
    cx = (torch.rand(n, device=dev, generator=generator) * 2 - 1) * (1 - w)
    cy = (torch.rand(n, device=dev, generator=generator) * 2 - 1) * (1 - h)
    sx = w
    if flip:
        sx = torch.where(torch.rand(n, device=dev, generator=generator) < 0.5, -w, w)
    theta = torch.zeros(n, 2, 3, device=dev, dtype=x.dtype)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = sx, cx, h, cy
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
