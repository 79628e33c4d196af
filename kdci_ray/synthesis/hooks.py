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
    """The BN-statistics loss of a teacher's BN layers. Per layer the hook records the input's batch
    (mean, var) in one op; the loss then treats all layers at once (their statistics concatenated, scattered
    into one zero-padded (2, layers, widest) block, one norm per row): a handful of kernels for any depth,
    where a per-layer loop launches about 25 per layer (forward and backward). Same value."""

    def __init__(self, model: nn.Module, momentum: float = 0.0):
        self.layers = self.modules = statistics_layers(model)
        if not self.layers:
            raise ValueError(
                f"{type(model).__name__} has no BatchNorm2d layers with running statistics: BN-statistics losses need "
                "a teacher with them; set bn=0"
            )
        self.momentum = momentum
        self.sizes = [layer.num_features for layer in self.layers]
        self.stats: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(self.layers)
        self.ema: tuple[torch.Tensor, torch.Tensor] | None = None  # (mean, var), all layers concatenated
        self._targets: tuple[torch.Tensor, torch.Tensor] | None = None
        self._handles: list = []

    def __enter__(self):
        # The running statistics (what the batch statistics are matched to), as one (2, channels) block, and
        # the position of each channel in the padded (layers x widest) layout: built once (the teacher is
        # frozen), again only if it moved to another device.
        device = self.layers[0].running_mean.device
        if self._targets is None or self._targets[0].device != device:
            self._targets = self._running_targets()
        return super().__enter__()

    def _running_targets(self) -> tuple[torch.Tensor, torch.Tensor]:
        layers, widest = len(self.layers), max(self.sizes)
        with torch.no_grad():
            running = torch.stack([torch.cat([layer.running_mean.float() for layer in self.layers]),
                                   torch.cat([layer.running_var.float() for layer in self.layers])])
            device = running.device
            rows = torch.repeat_interleave(torch.arange(layers, device=device), torch.tensor(self.sizes, device=device))
            cols = torch.cat([torch.arange(n, device=device) for n in self.sizes])
        return running, rows * widest + cols

    def _hook(self, index: int):
        def record(module, inputs, output):
            var, mean = torch.var_mean(inputs[0].float(), dim=(0, 2, 3), unbiased=False)  # fp32 even under autocast
            self.stats[index] = (mean, var)

        return record

    def _batch_statistics(self) -> torch.Tensor:
        if any(stat is None for stat in self.stats):
            raise RuntimeError("BN-statistics loss read before a teacher forward inside the hook context")
        return torch.stack([torch.cat([stat[0] for stat in self.stats]), torch.cat([stat[1] for stat in self.stats])])

    def loss(self) -> torch.Tensor:
        """Sum over BN layers of ||running_var - var||_2 + ||running_mean - mean||_2 (last forward)."""
        if self._targets is None:
            raise RuntimeError("BN-statistics loss read outside the hook context")
        running, position = self._targets
        batch = self._batch_statistics()
        m = self.momentum
        if m > 0 and self.ema is not None:
            batch = (1 - m) * batch + m * torch.stack(self.ema)
        padded = batch.new_zeros(2, len(self.layers) * max(self.sizes))
        padded[:, position] = running - batch  # zeros elsewhere: each row's norm is its layer's
        return torch.linalg.vector_norm(padded.view(2, len(self.layers), -1), dim=2).sum()

    @torch.no_grad()
    def update_ema(self) -> None:
        """Fold the last forward's statistics into the moving averages (once per synthesis call)."""
        if self.momentum <= 0:
            return
        m = self.momentum
        mean, var = self._batch_statistics().detach()
        self.ema = (mean, var) if self.ema is None else (m * self.ema[0] + (1 - m) * mean, m * self.ema[1] + (1 - m) * var)

    def state_dict(self) -> dict:
        """Per layer a (2, channels) tensor of (mean, var) moving averages (empty before the first call)."""
        if self.ema is None:
            return {"ema": []}
        pairs = torch.stack(self.ema).cpu().split(self.sizes, dim=1)
        return {"ema": [pair.clone() for pair in pairs]}

    def load_state_dict(self, state: dict, device: torch.device | str) -> None:
        saved = state["ema"]
        if saved and len(saved) != len(self.layers):
            raise ValueError(f"BN-statistics state has {len(saved)} layers; the teacher has {len(self.layers)}")
        if not saved:
            self.ema = None
            return
        both = torch.cat([s.float() for s in saved], dim=1).to(device)
        self.ema = (both[0], both[1])


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
