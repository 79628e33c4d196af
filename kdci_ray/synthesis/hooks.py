"""BatchNorm-statistics hooks on the teacher, shared by every method that matches BN statistics.

DeepInversion's prior: for each BN layer, the batch mean/variance of its *input* should match the
running statistics the teacher stored in training. Per layer r = ||running_var - var||_2 +
||running_mean - mean||_2 (plain L2 norms, equal weight per layer, as in the public zju-vipa code);
the loss is the sum over layers. Fast's `bn_mmt` variant compares against an exponential moving
average blend of the current and past batches' statistics instead.

CMI also reads the per-sample spatial mean of each BN input as its contrastive feature; the same hook
collects it when asked. Hooks are attached only inside a synthesis call (a context manager), so KD
teacher forwards pay nothing for them.
"""

from __future__ import annotations

import torch
from torch import nn

from ..models import bn_layers


class BNStatistics:
    def __init__(self, model: nn.Module, momentum: float = 0.0, instance_means: bool = False):
        self.layers = bn_layers(model)
        if not self.layers:
            raise ValueError(
                f"{type(model).__name__} has no BatchNorm layers: BN-statistics losses need a teacher with BatchNorm; set bn=0"
            )
        self.momentum, self.instance_means = momentum, instance_means
        self.stats: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(self.layers)
        self.means: list[torch.Tensor | None] = [None] * len(self.layers)
        self.ema: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(self.layers)
        self._handles: list = []

    def __enter__(self) -> "BNStatistics":
        self._handles = [layer.register_forward_hook(self._hook(i)) for i, layer in enumerate(self.layers)]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _hook(self, index: int):
        def record(module, inputs, output):
            x = inputs[0].float()  # statistics in fp32 even under autocast
            mean = x.mean(dim=(0, 2, 3))
            var = x.var(dim=(0, 2, 3), unbiased=False)
            self.stats[index] = (mean, var)
            if self.instance_means:
                self.means[index] = x.mean(dim=(2, 3))

        return record

    def loss(self) -> torch.Tensor:
        """Sum over BN layers of the distance between batch and running statistics (last forward)."""
        total = 0.0
        m = self.momentum
        for layer, stat, ema in zip(self.layers, self.stats, self.ema):
            if stat is None:
                raise RuntimeError("BN-statistics loss read before a teacher forward inside the hook context")
            mean, var = stat
            if m > 0 and ema is not None:
                mean = (1 - m) * mean + m * ema[0]
                var = (1 - m) * var + m * ema[1]
            total = total + torch.norm(layer.running_var.float() - var, 2) + torch.norm(layer.running_mean.float() - mean, 2)
        return total

    def features(self) -> torch.Tensor:
        """Per-sample spatial means of every BN input of the last forward, concatenated: (B, sum of channels)."""
        if not self.instance_means or any(m is None for m in self.means):
            raise RuntimeError("instance means were not recorded: create BNStatistics(instance_means=True) and run a forward")
        return torch.cat(self.means, dim=1)

    def feature_dim(self) -> int:
        return sum(layer.num_features for layer in self.layers)

    @torch.no_grad()
    def update_ema(self) -> None:
        """Fold the last forward's statistics into the moving averages (once per synthesis call)."""
        if self.momentum <= 0:
            return
        m = self.momentum
        for i, stat in enumerate(self.stats):
            mean, var = stat[0].detach(), stat[1].detach()
            self.ema[i] = (mean, var) if self.ema[i] is None else (m * self.ema[i][0] + (1 - m) * mean, m * self.ema[i][1] + (1 - m) * var)

    def state_dict(self) -> dict:
        return {"ema": [] if self.ema[0] is None else [torch.stack(e).cpu() for e in self.ema]}

    def load_state_dict(self, state: dict, device: torch.device | str) -> None:
        saved = state["ema"]
        if saved and len(saved) != len(self.layers):
            raise ValueError(f"BN-statistics state has {len(saved)} layers; the teacher has {len(self.layers)}")
        self.ema = [(s[0].to(device), s[1].to(device)) for s in saved] if saved else [None] * len(self.layers)
