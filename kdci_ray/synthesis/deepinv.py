"""DeepInversion (Yin et al., CVPR 2020): optimise a batch of pixels from noise so the teacher's BN
statistics match, the teacher predicts sampled labels, the image is smooth, and the student disagrees
with the teacher (adversarial Jensen-Shannon term); random jitter + flip each step. Images go to the pool.

Defaults follow zju-vipa's `scripts/deepinv/deepinv_cifar10_wrn402_wrn161.sh` (CMI repo @9e79fa9; see
docs/dfkd-public-defaults.md section 2): pixels in normalised space, Adam lr 0.1 betas (0.5, 0.99),
1000 steps per call, bn 10, oh 1, adv 1 (JS at T = 3), tv 0.001 (CMI repo; Fast-Datafree uses 0),
l2 0, jitter 4 + flip, one call per epoch and 400 KD steps. The iterate with the lowest total loss is
kept (the public `best_inputs` rule). Not copied: Fast-Datafree's extra "-0.001 x student BN loss",
which is in neither the paper nor the CMI repository.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from ..config import Betas, Int, SynthesisConfig
from .augment import draw_jitter_and_flip, jitter_and_flip
from .base import BestIterate, CallRandom, Synthesizer, adam
from .hooks import BNStatistics
from .losses import adversarial_js, onehot_loss, total_variation
from .registry import register_method


class DeepInvConfig(SynthesisConfig):
    method: Literal["deepinv"] = "deepinv"
    g_steps: Int = Field(1000, ge=1)
    lr_g: float = Field(0.1, gt=0, description="Adam learning rate on the pixels")
    betas: Betas = (0.5, 0.99)
    bn: float = Field(10.0, ge=0)
    oh: float = Field(1.0, ge=0, description="CE of the teacher to the sampled labels")
    adv: float = Field(1.0, ge=0, description="adversarial -JS(student, teacher)")
    adv_temperature: float = Field(3.0, gt=0)
    tv: float = Field(0.001, ge=0, description="total-variation prior (on the un-jittered image)")
    l2: float = Field(0.0, ge=0, description="L2 prior on the (normalised) pixels")
    jitter: Int | None = Field(None, ge=0, description="random roll in pixels per step (default: image size / 8, 4 px at 32 px)")
    flip: bool = True
    multires_steps: Int = Field(0, ge=0, description="the first N steps of a call show the teacher the image at half resolution "
                                "(2x2 average-pooled), as DeepInversion does at 224 px (2k of 3k steps); 0: off")


@register_method("deepinv", config=DeepInvConfig)
class DeepInversion(Synthesizer):
    cfg: DeepInvConfig

    def setup(self) -> None:
        c = self.cfg
        self.bn_stats = BNStatistics(self.teacher)
        mean, std = self.normalize.mean.to(self.device), self.normalize.std.to(self.device)
        # Valid pixel range in normalised space, per channel: what [0, 1] maps to.
        self.low, self.high = -mean / std, (1 - mean) / std
        # Kept across calls (each call starts them afresh in place): one compiled graph reads them every step.
        self.x = torch.zeros((c.batch_size, *self.image_shape), device=self.device, requires_grad=True)
        self.targets = torch.zeros(c.batch_size, dtype=torch.long, device=self.device)
        self.optimizer = adam([self.x], self.device, lr=c.lr_g, betas=c.betas)
        self.best = BestIterate()

    def synthesize(self, rng: CallRandom) -> None:
        c = self.cfg
        with torch.no_grad():
            self.x.copy_(torch.randn(self.x.shape, device=self.device, generator=rng.device))
            self.targets.copy_(torch.randint(0, self.num_classes, (c.batch_size,), device=self.device, generator=rng.device).sort().values)
        self.fresh_state(self.optimizer)  # a new Adam per call, as the public code
        self._steps = self.stepper(self.optimizer)
        self.best.reset(self.x)
        jitter = c.jitter if c.jitter is not None else self.image_shape[-1] // 8
        shifts, flips = draw_jitter_and_flip(c.g_steps, jitter, c.flip, rng.device, self.device)
        step = self.inner(self.inner_step)
        with self.bn_stats:  # the teacher's BN layers report their statistics for the whole call
            for k in range(c.g_steps):
                self.record_outputs(*step(shifts[k], flips[k], k < c.multires_steps))
        (best_x,) = self.best.values
        self.add_to_pool(best_x * self.normalize.std.to(self.device) + self.normalize.mean.to(self.device))

    def inner_step(self, shift: torch.Tensor, flip: torch.Tensor, low_resolution: bool = False):
        """One pixel update: jitter/flip, teacher (+ student) forward, the weighted terms, backward, Adam, clamp.
        `low_resolution`: the networks see the image 2x2 average-pooled (multi-resolution schedule)."""
        c, x = self.cfg, self.x
        inputs = jitter_and_flip(x, shift, flip)
        if low_resolution:
            inputs = F.avg_pool2d(inputs, 2)
        inputs = self.to_input(inputs)
        with self.autocast():
            t = self.teacher(inputs)
        terms = {"bn": self.bn_stats.loss(), "oh": onehot_loss(t, self.targets)}
        if c.adv > 0:
            with self.autocast():
                s = self.student(inputs)
            terms["adv"] = adversarial_js(s, t, c.adv_temperature)
        if c.tv > 0:
            terms["tv"] = total_variation(x)
        if c.l2 > 0:
            terms["l2"] = x.norm()
        loss = self.weighted(terms)
        self.best.update(loss, x)
        loss.backward()
        self.optimizer_step(self._steps)
        with torch.no_grad():
            x.copy_(torch.maximum(torch.minimum(x, self.high), self.low))
        return {name: value.detach() for name, value in terms.items()}, loss.detach()
