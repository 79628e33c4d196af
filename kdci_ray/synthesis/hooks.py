"""BatchNorm-statistics hooks on the teacher, shared by every method that matches BN statistics.

DeepInversion's prior: for each BN layer, the batch mean/variance of its *input* should match the
running statistics the teacher stored in training. Per layer r = ||running_var - var||_2 +
||running_mean - mean||_2 (plain L2 norms, equal weight per layer, as in the public zju-vipa code);
the loss is the sum over layers. Fast's `bn_mmt` variant compares against an exponential moving
average blend of the current and past batches' statistics instead.

CMI reads per-sample spatial means of some modules' inputs as its contrastive feature (`InputMeans`).
Both act only inside a `with` block (a synthesis call): KD teacher forwards pay nothing for them.
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


class _NormalizeWithStatistics(torch.autograd.Function):
    """An eval-mode BatchNorm2d (y = a x + c per channel) that also returns its input's batch (mean, biased
    var), both with one hand-written backward: d/dx = a g_y + g_mean' + g_var' (x - mean), where the loss has
    already scaled g_mean' = g_mean / n and g_var' = 2 g_var / n for all layers at once (`_ScaledGradient`).
    Per layer and step that is 2 kernels forward and 3 backward, where BatchNorm plus a statistics hook
    through autograd launch about 10."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, rows: int):
        xf = x.float()  # statistics and output in fp32, as BatchNorm under autocast
        var, mean = torch.var_mean(xf[:rows], dim=(0, 2, 3), unbiased=False)  # rows: the batch the statistics are of
        ctx.save_for_backward(xf, mean, scale)
        ctx.dtype, ctx.rows = x.dtype, rows
        return torch.addcmul(shift, xf, scale), mean, var

    @staticmethod
    def backward(ctx, grad_y, grad_mean, grad_var):
        xf, mean, scale = ctx.saved_tensors
        shape, rows = (1, -1, 1, 1), ctx.rows
        if rows < xf.shape[0]:  # statistics of the first rows only: their gradient goes there
            grad = grad_y * scale
            head = grad[:rows]
            if grad_mean is not None:
                head.add_(grad_mean.view(shape))
            if grad_var is not None:
                head.addcmul_(xf[:rows] - mean.view(shape), grad_var.view(shape))
            return grad.to(ctx.dtype), None, None, None
        grad = grad_y * scale if grad_mean is None else torch.addcmul(grad_mean.view(shape), grad_y, scale)
        if grad_var is not None:
            grad = torch.addcmul(grad, xf - mean.view(shape), grad_var.view(shape))
        return grad.to(ctx.dtype), None, None, None


class _ScaledGradient(torch.autograd.Function):
    """Identity forward; the backward multiplies the gradient by `scale` (one kernel for every layer's
    statistics: the 1/n and 2/n of `_NormalizeWithStatistics`)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(scale)
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        (scale,) = ctx.saved_tensors
        return grad * scale, None


def statistics_layers(model: nn.Module) -> list[nn.BatchNorm2d]:
    """The BN layers whose statistics can be matched: 2-d, with running statistics."""
    return [m for m in bn_layers(model) if isinstance(m, nn.BatchNorm2d) and m.track_running_stats]


class BNStatistics:
    """The BN-statistics loss of a teacher's BN layers, inside a `with` block (a synthesis call). There each
    eval-mode BN layer runs as `_NormalizeWithStatistics`: its usual output plus its input's batch (mean,
    var), recorded per layer; the loss then treats all layers at once (statistics concatenated, scattered
    into one zero-padded (2, layers, widest) block, one norm per row). Same value and gradient as BatchNorm
    with a statistics hook and a per-layer loss, in a handful of kernels per layer instead of about 35.
    Outside the block the layers are untouched."""

    def __init__(self, model: nn.Module, momentum: float = 0.0, rows: int | None = None):
        """`rows`: the statistics are of the first `rows` samples of a forward (the rest of the batch, e.g.
        CMI's second view in the same forward, passes through the layers without counting)."""
        self.rows = rows
        self.layers = statistics_layers(model)
        if not self.layers:
            raise ValueError(
                f"the teacher ({getattr(model, 'spec', type(model).__name__)}) has no BatchNorm2d layers with running statistics: "
                "DeepInv, CMI and Fast match BN statistics and cannot use it (nor DAFL with bn > 0); DAFL, MosaicKD and DFND "
                "work without them"
            )
        self.momentum = momentum
        self.sizes = [layer.num_features for layer in self.layers]
        self.stats: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(self.layers)
        self.counts: list[int] = [0] * len(self.layers)  # elements per channel (N x H x W) of the last forward
        self.ema: tuple[torch.Tensor, torch.Tensor] | None = None  # (mean, var), all layers concatenated
        self.last: torch.Tensor | None = None  # (2, channels): the statistics the last loss() read
        self._targets: tuple[torch.Tensor, torch.Tensor] | None = None
        self._affine: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._scales: dict[tuple[int, ...], torch.Tensor] = {}

    def __enter__(self):
        # What the frozen teacher's layers hold, read once (again only if it moved to another device): the
        # running statistics as one (2, channels) block with each channel's place in the padded layout, and
        # each layer's eval-mode BatchNorm as y = a x + c.
        device = self.layers[0].running_mean.device
        if self._targets is None or self._targets[0].device != device:
            self._targets = self._running_targets()
            self._affine = [self._eval_affine(layer) for layer in self.layers]
        for index, layer in enumerate(self.layers):
            layer.forward = self._forward(index, layer)  # an instance attribute: Module.__call__ (and its hooks) run it
        return self

    def __exit__(self, *exc) -> None:
        for layer in self.layers:
            layer.__dict__.pop("forward", None)

    @staticmethod
    @torch.no_grad()
    def _eval_affine(layer: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
        scale = torch.rsqrt(layer.running_var.float() + layer.eps)
        shift = -layer.running_mean.float() * scale
        if layer.affine:
            scale, shift = scale * layer.weight.float(), shift * layer.weight.float() + layer.bias.float()
        return scale.view(1, -1, 1, 1), shift.view(1, -1, 1, 1)

    def _forward(self, index: int, layer: nn.BatchNorm2d):
        original = type(layer).forward

        def forward(x: torch.Tensor) -> torch.Tensor:
            rows = x.shape[0] if self.rows is None else min(self.rows, x.shape[0])
            if layer.training:  # BN normalising with batch statistics: its own forward, statistics beside it
                var, mean = torch.var_mean(x[:rows].float(), dim=(0, 2, 3), unbiased=False)
                self.stats[index], self.counts[index] = (mean, var), 0  # 0: autograd's own gradient, not to be scaled
                return original(layer, x)
            scale, shift = self._affine[index]
            y, mean, var = _NormalizeWithStatistics.apply(x, scale, shift, rows)
            self.stats[index], self.counts[index] = (mean, var), rows * x[0, 0].numel()
            return y

        return forward

    def _running_targets(self) -> tuple[torch.Tensor, torch.Tensor]:
        layers, widest = len(self.layers), max(self.sizes)
        with torch.no_grad():
            running = torch.stack([torch.cat([layer.running_mean.float() for layer in self.layers]),
                                   torch.cat([layer.running_var.float() for layer in self.layers])])
            device = running.device
            rows = torch.repeat_interleave(torch.arange(layers, device=device), torch.tensor(self.sizes, device=device))
            cols = torch.cat([torch.arange(n, device=device) for n in self.sizes])
        return running, rows * widest + cols

    def _gradient_scale(self, device) -> torch.Tensor:
        """(2, channels): 1/n for the means, 2/n for the variances (n per layer); cached per batch geometry."""
        key = tuple(self.counts)
        if key not in self._scales:
            means = [1.0 / n if n else 1.0 for n, size in zip(self.counts, self.sizes) for _ in range(size)]
            variances = [2.0 / n if n else 1.0 for n, size in zip(self.counts, self.sizes) for _ in range(size)]
            scale = torch.tensor([means, variances], device=device)
            if torch.compiler.is_compiling():  # a constant of the graph: caching it would change the guards
                return scale
            self._scales[key] = scale
        return self._scales[key]

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
        # The forward's statistics are consumed here: dropped (a compiled step must not hand tensors whose graph
        # its backward frees back to Python) and kept detached for `update_ema`.
        self.stats[:] = [None] * len(self.layers)  # in place: the list the forwards wrote to ends empty
        self.last = batch.detach()
        scaled = _ScaledGradient.apply(batch, self._gradient_scale(batch.device))
        m = self.momentum
        if m > 0 and self.ema is not None:
            scaled = (1 - m) * scaled + m * torch.stack(self.ema)
        padded = batch.new_zeros(2, len(self.layers) * max(self.sizes))
        padded[:, position] = running - scaled  # zeros elsewhere: each row's norm is its layer's
        return torch.linalg.vector_norm(padded.view(2, len(self.layers), -1), dim=2).sum()

    @torch.no_grad()
    def update_ema(self) -> None:
        """Fold the last forward's statistics into the moving averages (once per synthesis call)."""
        if self.momentum <= 0:
            return
        m = self.momentum
        mean, var = self.last if self.last is not None else self._batch_statistics().detach()
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
        """The last forward's features; consumed (the list emptied in place: a compiled step must not hand
        tensors whose graph its backward frees back to Python)."""
        if any(m is None for m in self.means):
            raise RuntimeError("input means read before a forward inside the hook context")
        features = torch.cat(self.means, dim=1)
        self.means[:] = [None] * len(self.modules)
        return features
