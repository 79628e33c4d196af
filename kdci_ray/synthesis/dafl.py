"""DAFL (Chen et al., ICCV 2019): a generator trained so the teacher is confident, strongly activated
and class-balanced on its samples; KD draws fresh generator samples every step (no pool for KD).

Defaults follow zju-vipa's Fast-Datafree `scripts/dafl_cifar.sh` + `datafree_kd.py` (commit 0dcecbc;
see docs/dfkd-public-defaults.md section 1): Adam 1e-3 betas (0.5, 0.999), nz 512, 80 calls x 5 KD
steps per epoch, weights oh 1, act 0.001, balance 20, bn 0, adv 0; the KD loss there is KL at T = 1
(its `--T 20` is overwritten), which our DAFL configs set as kd.temperature: 1.
Each call's batch also goes into the bounded pool (for Parquet export); the KDCI dictionary is built
from `dictionary_samples` fresh generator samples (../shared/KDCI.md, stage a).
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Literal

import torch
from pydantic import Field

from ..config import Betas, Int, SynthesisConfig
from .base import CallRandom, Synthesizer, adam, new_generator
from .hooks import BNStatistics
from .losses import activation_loss, adversarial_kl, class_balance_loss, onehot_loss
from .registry import register_method


class DAFLConfig(SynthesisConfig):
    method: Literal["dafl"] = "dafl"
    calls_per_epoch: Int = Field(80, ge=1)
    kd_steps_per_call: Int = Field(5, ge=1)
    pool_size: Int = Field(16384, ge=1, description="exported samples kept (KD itself draws fresh samples)")
    nz: Int = Field(512, ge=1, description="latent size")
    ngf: Int = Field(64, ge=1, description="generator width")
    betas: Betas = (0.5, 0.999)
    oh: float = Field(1.0, ge=0, description="one-hot loss: CE of the teacher to its own argmax")
    act: float = Field(0.001, ge=0, description="activation loss: -mean |teacher penultimate features|")
    balance: float = Field(20.0, ge=0, description="class-balance loss: negative entropy of the mean prediction")
    bn: float = Field(0.0, ge=0, description="BN-statistics matching (0 in the public DAFL script)")
    adv: float = Field(0.0, ge=0, description="adversarial -KL(teacher || student) (0 in the public DAFL script)")
    dictionary_samples: Int = Field(10240, ge=1, description="fresh samples the KDCI dictionary is built from")
    variant: Literal["fast", "cmi"] = Field(
        "fast", description="fast: Fast-Datafree's DAFL (generator starts at 2 ngf = 128 channels, KD samples in train mode); cmi: the "
        "CMI repository's, whose DAFL numbers the public tables quote (4 ngf = 256 channels, KD samples in eval mode)")


@register_method("dafl", config=DAFLConfig)
class DAFL(Synthesizer):
    cfg: DAFLConfig

    def setup(self) -> None:
        c = self.cfg
        self.generator = new_generator(c.nz, c.ngf, self.image_shape, self.device, start_mult=4 if c.variant == "cmi" else 2)
        self.optimizer = adam(self.generator.parameters(), self.device, lr=c.lr_g, betas=c.betas)
        self.bn_stats = BNStatistics(self.teacher) if c.bn > 0 else None

    def synthesize(self, rng: CallRandom) -> None:
        c = self.cfg
        self.generator.train()
        self._steps = self.stepper(self.optimizer)
        noise = torch.randn(c.g_steps, c.batch_size, c.nz, device=self.device, generator=rng.device)  # every step's, up front
        step = self.inner(self.inner_step)
        with self.bn_stats or contextlib.nullcontext():
            for k in range(c.g_steps):
                terms, loss, x = step(noise[k])
                self.record_outputs(terms, loss)
        self.add_to_pool(x)

    def inner_step(self, z: torch.Tensor):
        """One generator step: the teacher's confidence, activations and class balance on fresh samples."""
        c = self.cfg
        x = self.generator(z)
        inputs = self.teacher_input(x)
        with self.autocast():
            t, features = self.teacher(inputs, return_features=True)
        terms = {"oh": onehot_loss(t), "act": activation_loss(features), "balance": class_balance_loss(t)}
        if c.bn > 0:
            terms["bn"] = self.bn_stats.loss()
        if c.adv > 0:
            with self.autocast():
                s = self.student(inputs)
            terms["adv"] = adversarial_kl(s, t)
        loss = self.weighted(terms)
        loss.backward()
        self.optimizer_step(self._steps)
        return {name: value.detach() for name, value in terms.items()}, loss.detach(), x.detach()

    @torch.no_grad()
    def sample(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        # Fast-Datafree samples in train mode (batch BN statistics); the CMI repository's DAFL in eval mode.
        z = torch.randn(batch_size, self.cfg.nz, device=self.device, generator=generator)
        self.generator.train(self.cfg.variant == "fast")
        return self.generator(z)

    def dictionary_logits(self, batch_size: int = 1024) -> None:
        return None  # its dictionary images are not (only) its pool: the teacher computes their logits

    growing = False  # the dictionary is built from fresh samples, as many as asked for

    def dictionary_size(self) -> int:
        return self.cfg.dictionary_samples

    def dictionary_images(self, batch_size: int = 1024) -> Iterator[torch.Tensor]:
        generator = torch.Generator(device=self.device).manual_seed(self.seed * 1_000_003 + self.calls)
        # Train-mode sampling updates the generator's BN running statistics; building a dictionary
        # must not change the method's state, so they are put back afterwards.
        buffers = {name: b.clone() for name, b in self.generator.named_buffers()}
        try:
            left = self.cfg.dictionary_samples
            while left > 0:
                n = min(batch_size, left)
                yield self.sample(max(n, 2), generator)  # BN in train mode needs >= 2 samples
                left -= n
        finally:
            with torch.no_grad():
                for name, b in self.generator.named_buffers():
                    b.copy_(buffers[name])

    def min_dictionary_images(self) -> int:
        return self.cfg.dictionary_samples

    def extra_state(self) -> dict:
        return {"generator": self.generator.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_extra_state(self, state: dict) -> None:
        self.generator.load_state_dict(state["generator"])
        self.optimizer.load_state_dict(state["optimizer"])
