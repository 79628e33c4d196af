"""MosaicKD (Fang et al., NeurIPS 2021): a generator learns to compose in-domain-looking images out of
real out-of-domain (OOD) patches. A patch discriminator tells its outputs' local patches from OOD ones;
the teacher makes them confident (align) and class-balanced (balance); an adversarial term seeks where
the student disagrees with the teacher. The student trains on synthetic + OOD images.

Defaults = zju-vipa/MosaicKD @a8d8e2c, `kd_mosaic.py` with its README flags (docs/dfkd-public-defaults-
sampling.md section 1): nz 100, generator width 4 x 64 -> 128 -> 64, patch discriminator ndf 128;
G and D Adam 1e-3 betas (0.5, 0.999) on a per-call cosine over the run; weights local 1, align 1, adv 1,
balance 10 (log2 entropy), patch losses summed over the patches; per call one D step then one G step on
the same z; 5 KD steps per call on 256 synthetic + 256 OOD images; KD KL at T = 1 (configs set
kd.temperature 1). Departures: teacher and student are frozen in eval mode while G trains (the public
code leaves the student in train mode there, so one synthetic-only batch per call moves its BN
statistics); the OOD images are normalised with the teacher's statistics (the public code uses the OOD
set's own for the student half); both halves of the KD batch get the loop's crop+flip augmentation; OOD
images are drawn uniformly with replacement (the public code: shuffled passes). For CIFAR-10 teachers
KDCI.md names CIFAR-100 as the OOD set; it is not available offline here, so the configs use the shared
Tiny-ImageNet subset (set synthesis.wild to cifar100 where it is).
The KDCI dictionary is built once (configs: kdci.rebuild_every 0) from the collected data: the OOD set
plus the synthetic images made so far (../shared/KDCI.md stage a, 3).
"""

from __future__ import annotations

import math
from typing import Iterator, Literal

import torch
from pydantic import Field

from ..config import Betas, Int, SynthesisConfig, WildDataConfig
from .base import CallRandom, Synthesizer, adam
from .losses import adversarial_kl, class_balance_loss, patch_gan_loss, prediction_entropy
from .registry import register_method
from .wild import WildImages


class MosaicKDConfig(SynthesisConfig):
    method: Literal["mosaickd"] = "mosaickd"
    wild: WildDataConfig = Field(description="the unlabelled OOD set: real patches for D, half of every KD batch")
    calls_per_epoch: Int = Field(196, ge=1, description="G/D steps per epoch (public: one pass of the OOD loader, 196 for 50k images)")
    kd_steps_per_call: Int = Field(5, ge=1)
    pool_size: Int = Field(16384, ge=1, description="synthetic images kept (dictionary, Parquet export); KD draws fresh ones")
    nz: Int = Field(100, ge=1, description="latent size")
    ngf: Int = Field(64, ge=1, description="generator width")
    ndf: Int = Field(128, ge=1, description="patch discriminator width")
    betas: Betas = (0.5, 0.999)
    lr_d: float = Field(1e-3, gt=0, description="discriminator learning rate")
    lr_schedule: Literal["cosine", "constant"] = Field("cosine", description="G and D learning rates over the run's calls")
    local: float = Field(1.0, ge=0, description="G fools the patch discriminator (also scales D's loss, as the public code)")
    align: float = Field(1.0, ge=0, description="teacher prediction entropy (minimised)")
    adv: float = Field(1.0, ge=0, description="-KL(teacher || student): seek disagreement")
    balance: float = Field(10.0, ge=0, description="negative entropy (bits) of the teacher's mean prediction")
    patch_reduction: Literal["sum", "mean"] = Field("sum", description="patch GAN losses per image: sum (public scale) or mean")
    synthetic_fraction: float = Field(0.5, gt=0, lt=1, description="share of synthetic images in a KD batch (public: 256 + 256)")


@register_method("mosaickd", config=MosaicKDConfig)
class MosaicKD(Synthesizer):
    cfg: MosaicKDConfig

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.wild: WildImages | None = None

    def setup(self) -> None:
        from ..models import create_model

        c = self.cfg
        channels, size, _ = self.image_shape
        if self.wild is None:
            self.wild = WildImages(c.wild, self.image_shape)
        self.wild.to(self.device)  # held on the device when it fits: every D and KD step draws from it
        self.generator = create_model("generator", nz=c.nz, ngf=c.ngf, img_size=size, nc=channels, start_mult=4).to(self.device)
        self.discriminator = create_model("patch_discriminator", nc=channels, ndf=c.ndf).to(self.device)
        self.optimizer_g = adam(self.generator.parameters(), self.device, lr=c.lr_g, betas=c.betas)
        self.optimizer_d = adam(self.discriminator.parameters(), self.device, lr=c.lr_d, betas=c.betas)
        if c.lr_schedule == "cosine":
            if self.total_epochs is None:
                raise ValueError(
                    "mosaickd: synthesis.lr_schedule = cosine spans the run, so bind(..., epochs=N) must give its length "
                    "(the distillation loop does); or set synthesis.lr_schedule=constant"
                )
            total = c.warmup_calls + c.calls_per_epoch * self.total_epochs
            factor = lambda call: 0.5 * (1 + math.cos(math.pi * min(call, total) / total))  # noqa: E731
        else:
            factor = lambda call: 1.0  # noqa: E731
        self.schedulers = [torch.optim.lr_scheduler.LambdaLR(o, factor) for o in (self.optimizer_g, self.optimizer_d)]

    def synthesize(self, rng: CallRandom) -> None:
        c = self.cfg
        self.generator.train()
        self.discriminator.train()
        self._steps_d, self._steps_g = self.stepper(self.optimizer_d), self.stepper(self.optimizer_g)  # this call's rates
        # Every step's latents and OOD rows, drawn up front on the device.
        noise = torch.randn(c.g_steps, c.batch_size, c.nz, device=self.device, generator=rng.device)
        rows = torch.randint(len(self.wild), (c.g_steps, c.batch_size), device=self.device, generator=rng.device)
        step = self.inner(self.inner_step)
        for k in range(c.g_steps):
            real = self.wild.gather(rows[k]).float() / 255  # streamed OOD pools read rows from storage here
            terms, loss, x = step(noise[k], real)
            self.record_outputs(terms, loss)
        for scheduler in self.schedulers:
            scheduler.step()
        self.add_to_pool(x)

    def inner_step(self, z: torch.Tensor, real: torch.Tensor):
        """One D step (OOD patches real, the generator's fake), then one G step on the same images scored by the
        updated D. G's gradient is taken with respect to G alone, so D keeps none of it."""
        c = self.cfg
        x = self.generator(z)
        with self.autocast():
            d_fake = self.discriminator(self.teacher_input(x.detach()))
            d_real = self.discriminator(self.teacher_input(real))
        loss_d = c.local * 0.5 * (patch_gan_loss(d_fake, False, c.patch_reduction) + patch_gan_loss(d_real, True, c.patch_reduction))
        loss_d.backward()
        self.optimizer_step(self._steps_d)
        inputs = self.teacher_input(x)
        with self.autocast():
            t = self.teacher(inputs)
            s = self.student(inputs)
            d = self.discriminator(inputs)
        terms = {
            "local": patch_gan_loss(d, True, c.patch_reduction),
            "align": prediction_entropy(t),
            "adv": adversarial_kl(s, t),
            "balance": class_balance_loss(t) / math.log(2),  # in bits, as the public code
        }
        loss = self.weighted(terms)
        params = list(self.generator.parameters())
        for p, grad in zip(params, torch.autograd.grad(loss, params)):
            p.grad = grad
        self.optimizer_step(self._steps_g)
        return {**{name: value.detach() for name, value in terms.items()}, "disc": loss_d.detach()}, loss.detach(), x.detach()

    @torch.no_grad()
    def sample(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        """Fresh synthetic images (generator in train mode, as the public code) next to OOD images, in [0, 1]."""
        n_synthetic = min(batch_size - 1, max(1, round(batch_size * self.cfg.synthetic_fraction)))
        z = torch.randn(n_synthetic, self.cfg.nz, device=self.device, generator=generator)
        ood = self.wild.sample(batch_size - n_synthetic, generator).float() / 255
        return torch.cat([self.generator(z).float(), ood])

    def dictionary_logits(self, batch_size: int = 1024) -> None:
        return None  # its dictionary images are not (only) its pool: the teacher computes their logits

    def dictionary_size(self) -> int:
        return len(self.wild) + len(self.pool)

    def dictionary_images(self, batch_size: int = 1024) -> Iterator[torch.Tensor]:
        yield from self.wild.images_only(batch_size)
        yield from self.pool.batches(batch_size)

    def min_dictionary_images(self) -> int:
        if self.wild is None:  # before bind() (a launcher's preflight): the wild set's index, its images stay on disk
            self.wild = WildImages(self.cfg.wild, self.image_shape)
        return len(self.wild) + super().min_dictionary_images()

    def extra_state(self) -> dict:
        return {
            "generator": self.generator.state_dict(), "discriminator": self.discriminator.state_dict(),
            "optimizer_g": self.optimizer_g.state_dict(), "optimizer_d": self.optimizer_d.state_dict(),
            "schedulers": [s.state_dict() for s in self.schedulers], "wild": {"name": self.wild.name, "size": len(self.wild)},
        }

    def load_extra_state(self, state: dict) -> None:
        mine = {"name": self.wild.name, "size": len(self.wild)}
        if state["wild"] != mine:
            raise ValueError(f"mosaickd: the checkpoint trained on OOD set {state['wild']}, this run's is {mine}; use another run name")
        self.generator.load_state_dict(state["generator"])
        self.discriminator.load_state_dict(state["discriminator"])
        self.optimizer_g.load_state_dict(state["optimizer_g"])
        self.optimizer_d.load_state_dict(state["optimizer_d"])
        for scheduler, saved in zip(self.schedulers, state["schedulers"]):
            scheduler.load_state_dict(saved)
