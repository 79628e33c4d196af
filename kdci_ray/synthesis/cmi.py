"""CMI (Fang et al., IJCAI 2021): contrastive model inversion. Each call re-initialises the generator
and learns it together with the latent batch so that, besides BN matching, CE to sampled labels and the
masked adversarial KL, every image is *distinguishable* from the others and from earlier calls' images:
an instance-discrimination (contrastive) loss on the teacher's BN-input features of two views (a
pad-crop "global" view and a random-resized-crop "local" view), with negatives from a memory bank of
past images' features. Images go to the pool.

Defaults follow zju-vipa's Fast-Datafree `scripts/cmi_cifar.sh` #1 = CMI repo `scripts/cmi/cmi_cifar10.sh`
(docs/dfkd-public-defaults.md section 4): 200 steps per call, Adam 1e-3 betas (0.5, 0.999) over the
generator and z, bn 1, oh 1, adv 0.5, cr 0.8 at temperature 0.2, MLP head D -> D -> 256 with its own
Adam, bank of 40,960 feature rows, 4,096 negatives per step, local crops of scale (0.25, 1).
Features (`feature_layers`) are per-sample means of module inputs, as in the public code: for a ResNet
teacher the inputs of its four stages (`layer1..layer4`, D = 512 for resnet34), otherwise every BN
input (D = 2704 for wrn40_2). The bank lives on the training device; with cr = 0 there is no local view,
head or bank work at all (the public "tuned fast" setting).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import nn

from ..config import Betas, Int, SynthesisConfig
from ..data import apply_crop_flip, draw_crop_flip
from .augment import apply_resized_crop, draw_resized_crop
from .base import BestIterate, CallRandom, Synthesizer, adam, new_generator, synthesis_mode
from .hooks import BNStatistics, InputMeans, statistics_layers
from .losses import contrastive_loss, masked_adversarial_kl, onehot_loss
from .registry import register_method


class CMIConfig(SynthesisConfig):
    method: Literal["cmi"] = "cmi"
    g_steps: Int = Field(200, ge=1)
    lr_g: float = Field(1e-3, gt=0, description="Adam learning rate of the generator, the latents and the head")
    betas: Betas = (0.5, 0.999)
    nz: Int = Field(256, ge=1)
    ngf: Int = Field(64, ge=1)
    bn: float = Field(1.0, ge=0)
    oh: float = Field(1.0, ge=0)
    adv: float = Field(0.5, ge=0, description="masked adversarial KL (student vs teacher)")
    cr: float = Field(0.8, ge=0, description="contrastive loss weight (0: off)")
    cr_temperature: float = Field(0.2, gt=0)
    head_dim: Int = Field(256, ge=1)
    bank_size: Int = Field(40960, ge=1, description="memory bank rows (feature pairs of past images)")
    n_negatives: Int = Field(4096, ge=1, description="bank rows drawn as negatives per step")
    local_scale: tuple[float, float] = Field((0.25, 1.0), description="area range of the local view's crop")
    crop_padding: Int = Field(4, ge=0)
    feature_layers: Literal["auto", "stages", "bn_inputs"] = Field(
        "auto", description="contrastive features: stage inputs (ResNets), every BN input, or auto (stages when the teacher has them)"
    )

    @field_validator("local_scale")
    @classmethod
    def _scale_range(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not 0 < value[0] <= value[1] <= 1:
            raise ValueError(f"must be (low, high) with 0 < low <= high <= 1, got {list(value)}")
        return value


def feature_modules(teacher: nn.Module, which: str) -> list[nn.Module]:
    net = getattr(teacher, "net", teacher)  # an external model (torchvision's resnets have layer1..4 too)
    stages = [getattr(net, f"layer{i}", None) for i in range(1, 5)]
    has_stages = all(isinstance(m, nn.Module) for m in stages)
    if which == "stages" and not has_stages:
        raise ValueError(f"synthesis.feature_layers = 'stages' needs a teacher with layer1..layer4; {type(teacher).__name__} has none: use bn_inputs")
    if which == "stages" or (which == "auto" and has_stages):
        return stages
    return statistics_layers(teacher)


@register_method("cmi", config=CMIConfig)
class CMI(Synthesizer):
    cfg: CMIConfig

    def setup(self) -> None:
        c = self.cfg
        self.generator = new_generator(c.nz, c.ngf, self.image_shape, self.device)
        self.bn_stats = BNStatistics(self.teacher, rows=c.batch_size)  # of the global view (the first rows of a forward)
        self.feature_hooks = InputMeans(feature_modules(self.teacher, c.feature_layers))
        with torch.no_grad(), synthesis_mode(self.teacher), self.feature_hooks:
            self.teacher(torch.zeros(2, *self.image_shape, device=self.device))
            dim = self.feature_hooks.features().shape[1]
        self.dim = dim
        self.head = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(inplace=True), nn.Linear(dim, c.head_dim)).to(self.device)
        self.head_optimizer = adam(self.head.parameters(), self.device, lr=c.lr_g)
        # Fixed sizes (one compiled graph for every call): the whole bank up front, rows [local | global features];
        # each step takes `n_negatives` rows of it, the ones the bank does not hold yet masked out.
        self.bank = torch.zeros(c.bank_size if c.cr > 0 else 0, 2 * dim, device=self.device)
        self.bank_next = self.bank_filled = 0
        self.n_negatives = min(c.n_negatives, c.bank_size)
        # Kept across calls, started afresh in place by each.
        self.z = torch.zeros(c.batch_size, c.nz, device=self.device, requires_grad=True)
        self.targets = torch.zeros(c.batch_size, dtype=torch.long, device=self.device)
        self.optimizer = adam([*self.generator.parameters(), self.z], self.device, lr=c.lr_g, betas=c.betas)
        self.best = BestIterate()

    def _reinit_generator(self, generator: torch.Generator) -> None:
        for m in self.generator.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.normal_(m.weight, 0.0, 0.02, generator=generator)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02, generator=generator)
                nn.init.zeros_(m.bias)

    def _add_to_bank(self, rows: torch.Tensor) -> None:
        size = self.cfg.bank_size
        rows = rows[-size:]
        pos = (self.bank_next + torch.arange(rows.shape[0], device=self.device)) % size
        self.bank[pos] = rows.float()
        self.bank_next = (self.bank_next + rows.shape[0]) % size
        self.bank_filled = min(size, self.bank_filled + rows.shape[0])

    def _negative_rows(self, steps: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Every step's negatives, drawn up front: (steps, K) bank rows, a uniform subset of the filled rows
        without replacement (all of them while they are K or fewer), and (K,) which of the K hold features."""
        k, filled = self.n_negatives, self.bank_filled
        valid = torch.arange(k, device=self.device) < filled
        if filled <= k:
            return torch.arange(k, device=self.device).expand(steps, k), valid
        keys = torch.rand(steps, filled, device=self.device, generator=generator)
        return keys.argsort(dim=1)[:, :k], valid

    def synthesize(self, rng: CallRandom) -> None:
        c = self.cfg
        self._reinit_generator(rng.device)
        self.generator.train()
        with torch.no_grad():
            self.z.copy_(torch.randn(self.z.shape, device=self.device, generator=rng.device))
            self.targets.copy_(torch.randint(0, self.num_classes, (c.batch_size,), device=self.device, generator=rng.device).sort().values)
        self.fresh_state(self.optimizer)  # a new Adam per call over the re-initialised generator and z, as the public code
        self._steps = self.stepper(self.optimizer, *([self.head_optimizer] if c.cr > 0 else []))
        b, g = c.batch_size, c.g_steps
        # Every step's randomness up front, on the device: crops and flips of both views, negatives.
        crops = [None if r is None else r.view(g, b) for r in draw_crop_flip(g * b, c.crop_padding, True, rng.device, self.device)]
        local = draw_resized_crop(g * b, c.local_scale, generator=rng.device, device=self.device).view(g, b, 4) if c.cr > 0 else None
        negatives, self.valid = self._negative_rows(g, rng.device) if c.cr > 0 else (None, None)
        self.best.reset(torch.empty((b, *self.image_shape), device=self.device), *([torch.empty(b, 2 * self.dim, device=self.device)] if c.cr > 0 else []))
        step = self.inner(self.inner_step)
        with self.bn_stats, self.feature_hooks:
            for k in range(g):
                self.record_outputs(*step(*(None if r is None else r[k] for r in crops),
                                          None if local is None else local[k], None if negatives is None else negatives[k]))
        self.add_to_pool(self.best.values[0])
        if c.cr > 0:
            self._add_to_bank(self.best.values[1])

    def inner_step(self, dy, dx, flip, local_crop, negative_rows):
        """One step of the generator and the latents (and the contrastive head): both views in one teacher
        forward, BN statistics of the global view, contrastive loss against the step's negatives."""
        c = self.cfg
        b, dim = c.batch_size, self.dim
        x = self.generator(self.z)
        global_view = self.teacher_input(apply_crop_flip(x, c.crop_padding, dy, dx, flip))
        views = global_view
        if c.cr > 0:  # both views in one teacher forward (eval mode: each sample's output is its own)
            views = torch.cat([global_view, self.teacher_input(apply_resized_crop(x, local_crop))])
        with self.autocast():
            t = self.teacher(views)[:b]  # the BN loss comes from the global view only (bn_stats.rows)
        terms = {"bn": self.bn_stats.loss(), "oh": onehot_loss(t, self.targets)}
        features = self.feature_hooks.features()
        global_features, local_features = features[:b], features[b:]
        if c.adv > 0:
            with self.autocast():
                s = self.student(global_view)
            terms["adv"] = masked_adversarial_kl(s, t)
        if c.cr > 0:
            negatives = self.bank.index_select(0, negative_rows)
            h_local = F.normalize(self.head(torch.cat([local_features, negatives[:, :dim]])).float(), dim=1)
            h_global = F.normalize(self.head(torch.cat([global_features, negatives[:, dim:]])).float(), dim=1)
            valid = torch.cat([torch.ones(b, dtype=torch.bool, device=self.valid.device), self.valid])
            terms["cr"] = contrastive_loss(h_local, h_global, c.cr_temperature, n_current=b, valid=valid)
        loss = self.weighted(terms)
        if c.cr > 0:
            self.best.update(loss, x, torch.cat([local_features, global_features], dim=1))
        else:
            self.best.update(loss, x)
        loss.backward()
        self.optimizer_step(self._steps)
        return {name: value.detach() for name, value in terms.items()}, loss.detach()

    def extra_state(self) -> dict:
        filled = self.bank_filled
        return {
            "head": self.head.state_dict(), "head_optimizer": self.head_optimizer.state_dict(),
            "bank": self.bank[:filled].cpu(), "bank_next": self.bank_next, "bank_filled": filled,
        }

    def load_extra_state(self, state: dict) -> None:
        self.head.load_state_dict(state["head"])
        self.head_optimizer.load_state_dict(state["head_optimizer"])
        saved = state["bank"].to(self.device)
        self.bank.zero_()
        self.bank[: saved.shape[0]] = saved
        self.bank_next, self.bank_filled = state["bank_next"], state["bank_filled"]
