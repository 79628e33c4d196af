"""Differentiable, batched augmentations used *inside* synthesis (gradients flow back to the pixels or
the generator). All randomness comes from the caller's generator, so a synthesis call is reproducible
from (seed, call). Pad-crop + flip is `kdci_ray.data.random_crop_flip` (also differentiable)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..data import random_crop_flip

__all__ = ["apply_resized_crop", "draw_jitter_and_flip", "draw_resized_crop", "jitter_and_flip", "random_crop_flip", "random_resized_crop"]


def draw_jitter_and_flip(steps: int, jitter: int, flip: bool, generator: torch.Generator, device) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepInversion's randomness for a whole call, drawn up front on the device: per step one (dy, dx) in
    [-jitter, jitter] for the whole batch, and whether the batch is flipped (probability 1/2)."""
    shifts = torch.randint(-jitter, jitter + 1, (steps, 2), device=device, generator=generator)
    flips = torch.rand(steps, device=device, generator=generator) < 0.5
    return shifts, flips & flip


def jitter_and_flip(x: torch.Tensor, shift: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """Roll the whole batch by `shift` = (dy, dx) (as torch.roll) and flip it when `flip`: tensors, not Python
    numbers, so one compiled graph serves every step."""
    _, _, h, w = x.shape
    rows = (torch.arange(h, device=x.device) - shift[0]).remainder(h)
    cols = (torch.arange(w, device=x.device) - shift[1]).remainder(w)
    cols = torch.where(flip, cols.flip(0), cols)  # the flip is a reversed column order: no second image pass
    return x.index_select(2, rows).index_select(3, cols)


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
    return apply_resized_crop(x, draw_resized_crop(x.shape[0], scale, ratio, flip, generator, x.device))


def draw_resized_crop(n: int, scale=(0.25, 1.0), ratio=(3 / 4, 4 / 3), flip: bool = True, generator=None, device="cpu") -> torch.Tensor:
    """The random part of `random_resized_crop` for n images: (n, 4) = (x scale with flip sign, x centre,
    y scale, y centre) of each crop's affine map. Apart, so that a compiled step takes it as a tensor."""
    area = torch.empty(n, device=device).uniform_(scale[0], scale[1], generator=generator)
    log_r = torch.empty(n, device=device).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator)
    r = log_r.exp()
    # Crop width/height as fractions of the image; clipped to fit, like torchvision's fallback.
    w = (area * r).sqrt().clamp(max=1.0)
    h = (area / r).sqrt().clamp(max=1.0)
    cx = (torch.rand(n, device=device, generator=generator) * 2 - 1) * (1 - w)
    cy = (torch.rand(n, device=device, generator=generator) * 2 - 1) * (1 - h)
    sx = w
    if flip:
        sx = torch.where(torch.rand(n, device=device, generator=generator) < 0.5, -w, w)
    return torch.stack([sx, cx, h, cy], dim=1)


def apply_resized_crop(x: torch.Tensor, crops: torch.Tensor) -> torch.Tensor:
    n = x.shape[0]
    zero = torch.zeros(n, device=x.device, dtype=x.dtype)
    crops = crops.to(x.dtype)
    theta = torch.stack([crops[:, 0], zero, crops[:, 1], zero, crops[:, 2], crops[:, 3]], dim=1).view(n, 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
