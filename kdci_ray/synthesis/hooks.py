"""BatchNorm-statistics hooks on the teacher, shared by every method that matches BN statistics.

DeepInversion's prior: for each BN layer, the batch mean/variance of its *input* should match the
running statistics the teacher stored in training. Per layer r = ||running_var - var||_2 +
||running_mean - mean||_2 (plain L2 norms, equal weight per layer, as in the public zju-vipa code);
the loss is the sum over layers. Fast's `bn_mmt` variant compares against an exponential moving
average blend of the current and past batches' statistics instead.

CMI reads per-sample spatial means of some modules' inputs as its contrastive feature (`InputMeans`).
Hooks are attached only inside a synthesis call (context managers), so KD teacher forwards pay nothing
for them.
"""

from __future__ import annotations

import torch
from torch import nn

from ..models import bn_layers


class _Hooks:
    modules: list[nn.Module]

    def __enter__(self):
        self._handles = [m.register_forward_hook(self._hook(i)) for i, m in enumerate(self.modules)]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _hook(self, index: int):  # pragma: no cover - abstract
        raise NotImplementedError


def statistics_layers(model: nn.Module) -> list[nn.BatchNorm2d]:
    """The BN layers whose statistics can be matched: 2-d, with running statistics."""
    return [m for m in bn_layers(model) if isinstance(m, nn.BatchNorm2d) and m.track_running_stats]


class BNStatistics(_Hooks):
    def __init__(self, model: nn.Module, momentum: float = 0.0):
        self.layers = self.modules = statistics_layers(model)
        if not self.layers:
            raise ValueError(
                f"{type(model).__name__} has no BatchNorm2d layers with running statistics: BN-statistics losses need "
                "a teacher with them; set bn=0"
            )
        self.momentum = momentum
        self.stats: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(self.layers)
        self.ema: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(self.layers)
        self._handles: list = []

    def _hook(self, index: int):
        def record(module, inputs, output):
            x = inputs[0].float()  # statistics in fp32 even under autocast
            mean = x.mean(dim=(0, 2, 3))
            var = x.var(dim=(0, 2, 3), unbiased=False)
            self.stats[index] = (mean, var)

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


class InputMeans(_Hooks):
    """Per-sample spatial means of the inputs of `modules` (CMI's contrastive features), concatenated."""

    def __init__(self, modules: list[nn.Module]):
        if not modules:
            raise ValueError("InputMeans needs at least one module to hook")
        self.modules = list(modules)
        self.means: list[torch.Tensor | None] = [None] * len(self.modules)
        self._handles: list = []

    def _hook(self, index: int):
        def record(module, inputs, output):
            self.means[index] = inputs[0].float().mean(dim=(2, 3))

        return record

    def features(self) -> torch.Tensor:
        if any(m is None for m in self.means):
            raise RuntimeError("input means read before a forward inside the hook context")
        return torch.cat(self.means, dim=1)
