"""Fast DFKD (Fang et al., AAAI 2022): one meta-learned generator; each call adapts a copy of it (and a
fresh latent batch) for only a few steps, then the meta-generator takes one step on what the copy
learned (first-order MAML, or Reptile). Losses: BN matching against moving-average statistics, CE to
sampled labels, and after a warm-up the masked adversarial KL. Images go to the pool.

Defaults follow zju-vipa's Fast-Datafree `scripts/fast_cifar.sh` for wrn40_2 -> wrn16_1 (commit
0dcecbc; docs/dfkd-public-defaults.md section 3), Fast-10: g_steps 10, lr_g 2e-3, lr_z 0.01, meta
lr = lr_g x g_steps, bn 10 with bn_momentum 0.9, oh 0.4, adv 1.1 (resnet34 -> resnet18: oh 0.5, adv
1.33), 20 synthesis-only warm-up calls, adversarial term from call 20, first generator layers
re-initialised once at call 140 (`reset_l0`). Fast-2 / Fast-5 use (5e-3, 0.015) / (3e-3, 0.01).
"fomaml" reproduces the public meta-gradient: the sum of the inner gradients over all steps, taken at
the pre-step weights.
"""

from __future__ import annotations

import copy
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from ..config import Betas, Int, SynthesisConfig
from ..data import apply_crop_flip, draw_crop_flip
from .base import BestIterate, CallRandom, Synthesizer, adam, new_generator
from .hooks import BNStatistics
from .losses import masked_adversarial_kl, onehot_loss
from .registry import register_method


class FastConfig(SynthesisConfig):
    method: Literal["fast"] = "fast"
    g_steps: Int = Field(10, ge=1, description="inner adaptation steps per call (Fast-2/5/10)")
    lr_g: float = Field(2e-3, gt=0, description="inner learning rate of the generator copy")
    lr_z: float = Field(0.01, gt=0, description="inner learning rate of the latent batch")
    meta_lr: float | None = Field(None, gt=0, description="meta-optimiser learning rate (default lr_g * g_steps)")
    betas: Betas = (0.5, 0.999)
    meta: Literal["fomaml", "reptile"] = "fomaml"
    reptile_scale: float = Field(67.0, gt=0, description="Reptile: meta-gradient = scale * (meta - adapted)")
    nz: Int = Field(256, ge=1)
    ngf: Int = Field(64, ge=1)
    bn: float = Field(10.0, ge=0)
    bn_momentum: float = Field(0.9, ge=0, lt=1, description="BN statistics moving average (0: plain DeepInversion loss)")
    oh: float = Field(0.4, ge=0)
    adv: float = Field(1.1, ge=0, description="masked adversarial KL (student vs teacher)")
    adv_after_calls: Int = Field(20, ge=0, description="the adversarial term is on from this call on")
    warmup_calls: Int = Field(20, ge=0)
    reset_l0_at_call: Int | None = Field(140, ge=1, description="re-initialise the first linear + BN layer once (None: never)")
    crop_padding: Int = Field(4, ge=0)


@register_method("fast", config=FastConfig)
class Fast(Synthesizer):
    cfg: FastConfig

    def setup(self) -> None:
        c = self.cfg
        self.generator = new_generator(c.nz, c.ngf, self.image_shape, self.device)
        self.adapted = copy.deepcopy(self.generator)  # reused every call: no model allocation in the loop
        self.meta_optimizer = adam(self.generator.parameters(), self.device, lr=c.meta_lr or c.lr_g * c.g_steps, betas=c.betas)
        self.bn_stats = BNStatistics(self.teacher, momentum=c.bn_momentum)
        # Kept across calls, started afresh in place by each: one compiled graph reads them every step.
        self.z = torch.zeros(c.batch_size, c.nz, device=self.device, requires_grad=True)
        self.targets = torch.zeros(c.batch_size, dtype=torch.long, device=self.device)
        self.inner_optimizer = adam([{"params": self.adapted.parameters(), "lr": c.lr_g}, {"params": [self.z], "lr": c.lr_z}],
                                    self.device, betas=c.betas)
        self.best = BestIterate()

    def _reset_first_layers(self, generator: torch.Generator) -> None:
        # The public reset draws N(0, 0.02) for both the linear layer and the first BN's weight.
        for module in (self.generator.l1, self.generator.conv_blocks[0]):
            nn.init.normal_(module.weight, 0.0, 0.02, generator=generator)
            nn.init.zeros_(module.bias)

    def synthesize(self, rng: CallRandom) -> None:
        c = self.cfg
        if c.reset_l0_at_call is not None and self.calls == c.reset_l0_at_call:
            self._reset_first_layers(rng.device)
        self.adapted.load_state_dict(self.generator.state_dict())  # copies into the same tensors
        self.adapted.train()
        with torch.no_grad():
            self.z.copy_(torch.randn(self.z.shape, device=self.device, generator=rng.device))
            self.targets.copy_(torch.randint(0, self.num_classes, (c.batch_size,), device=self.device, generator=rng.device))
        self.fresh_state(self.inner_optimizer)  # a new inner Adam per call, as the public code
        self._steps = self.stepper(self.inner_optimizer)
        self.adversarial = c.adv > 0 and self.calls >= c.adv_after_calls
        meta_params = list(self.generator.parameters())
        self.meta_optimizer.zero_grad(set_to_none=False)
        for p in meta_params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        # Every step's crop offsets and flips, drawn up front on the device.
        b = c.batch_size
        crops = [None if r is None else r.view(c.g_steps, b) for r in draw_crop_flip(c.g_steps * b, c.crop_padding, True, rng.device, self.device)]
        self.best.reset(torch.empty((b, *self.image_shape), device=self.device))
        step = self.inner(self.inner_step)
        with self.bn_stats:
            for k in range(c.g_steps):
                self.record_outputs(*step(*(None if r is None else r[k] for r in crops)))
        if c.meta == "reptile":
            with torch.no_grad():
                for p, q in zip(meta_params, self.adapted.parameters()):
                    p.grad.copy_((p - q) * c.reptile_scale)
        self.meta_optimizer.step()
        self.bn_stats.update_ema()
        (best_x,) = self.best.values
        self.add_to_pool(best_x)

    def inner_step(self, dy, dx, flip):
        """One adaptation step of the generator copy and the latents; first-order MAML sums its gradients into
        the meta-generator's."""
        c = self.cfg
        x = self.adapted(self.z)
        inputs = self.teacher_input(apply_crop_flip(x, c.crop_padding, dy, dx, flip))
        with self.autocast():
            t = self.teacher(inputs)
        terms = {"bn": self.bn_stats.loss(), "oh": onehot_loss(t, self.targets)}
        if self.adversarial:
            with self.autocast():
                s = self.student(inputs)
            terms["adv"] = masked_adversarial_kl(s, t)
        loss = self.weighted(terms)
        self.best.update(loss, x)
        loss.backward()
        if c.meta == "fomaml":
            torch._foreach_add_([p.grad for p in self.generator.parameters()], [q.grad for q in self.adapted.parameters()])
        self.optimizer_step(self._steps)
        return {name: value.detach() for name, value in terms.items()}, loss.detach()

    def extra_state(self) -> dict:
        return {
            "generator": self.generator.state_dict(), "meta_optimizer": self.meta_optimizer.state_dict(),
            "bn_stats": self.bn_stats.state_dict(),
        }

    def load_extra_state(self, state: dict) -> None:
        self.generator.load_state_dict(state["generator"])
        self.meta_optimizer.load_state_dict(state["meta_optimizer"])
        self.bn_stats.load_state_dict(state["bn_stats"], self.device)
