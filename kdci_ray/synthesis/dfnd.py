"""DFND (Chen et al., CVPR 2021, "Learning Student Networks in the Wild"): no synthesis; the teacher picks
the wild images it is most sure about, and the student learns from them with KD plus a noise-adaptation
loss on the teacher's pseudo-labels.

Implemented from the method (the public script, huawei-noah/Efficient-Computing @225ddd2
DFND/DFND-train.py, does not run as published: docs/dfkd-public-defaults-sampling.md section 2):
- selection once, before KD: score = -CE(teacher, own argmax) on the un-augmented wild image, keep the
  top `num_select` (600k there, of ImageNet at 32 px), no class balancing (`selection.py`: shardable,
  exact merge, used by the Ray layer too);
- student loss = KD (kd.temperature 4 in the public script) + `noise_adaptation` x NLL of the student's
  probabilities passed through a transition matrix Q, against the teacher's argmax on the same augmented
  batch. Q's diagonal is fixed (`transition_diagonal`; the public code hard-codes its teacher's test
  accuracy), each row's off-diagonal mass 1 - diagonal is spread by a softmax over learnable logits
  (zeros at start: uniform), trained by its own Adam (lr 1e-3);
- an epoch is one shuffled pass over the selected set; the KDCI dictionary is built once from it
  (../shared/KDCI.md stage a, 3: configs set kdci.rebuild_every 0).
With KDCI on, the KD term sees the compensated logits s' and the noise-adapted NLL the raw s (KDCI.md
stage b: "the baseline's other student terms unchanged").
Departures from the public script: wild images are normalised with the teacher's statistics (the public
code scores and trains on them with ImageNet's while testing with CIFAR's); they are resized by the wild
dataset's loader (ImageNet: shorter side 256, centre 224) and then an antialiased resize to the teacher's
input (the public code squashes each image to 32 x 32, aspect ratio lost); the x0.1 steps of
`optim.schedule: step` fall per step at 40 % / 80 % of the run (public: per epoch, the same points).
"""

from __future__ import annotations

import logging
import time
from typing import Iterator, Literal

import torch
from pydantic import Field, model_validator

from ..config import Int, SynthesisConfig, WildDataConfig
from ..data import epoch_generator
from .base import Synthesizer, adam
from .losses import noise_adapted_nll
from .pool import ImagePool
from .registry import register_method
from .selection import Selection, select_top_k
from .wild import WildImages

log = logging.getLogger(__name__)

# Base-class settings of generation methods that have no meaning here; setting one is a mistake.
_NOT_USED = ("batch_size", "pool_size", "calls_per_epoch", "kd_steps_per_call", "warmup_calls", "g_steps", "lr_g", "init_pool")


class DFNDConfig(SynthesisConfig):
    method: Literal["dfnd"] = "dfnd"
    wild: WildDataConfig = Field(description="the unlabelled wild pool the teacher selects from")
    num_select: Int = Field(600_000, ge=1, description="images kept (at most the whole pool)")
    score_batch_size: Int = Field(1024, ge=1, description="teacher batch while scoring the wild pool")
    noise_adaptation: float = Field(1.0, ge=0, description="weight of the noise-adapted NLL on teacher pseudo-labels (0: KD only)")
    transition_diagonal: float = Field(
        0.95, gt=0, le=1, description="fixed P(teacher label = true class); the public code uses its teacher's test accuracy"
    )
    lr_transition: float = Field(1e-3, gt=0, description="Adam learning rate of the transition matrix's off-diagonal logits")

    @model_validator(mode="after")
    def _no_synthesis_settings(self) -> "DFNDConfig":
        # Non-default values, not "keys present": a dumped config (config.yaml, checkpoints) lists every field.
        given = sorted(f for f in _NOT_USED if getattr(self, f) != SynthesisConfig.model_fields[f].default)
        if given:
            raise ValueError(
                f"{', '.join(given)}: dfnd synthesizes nothing and does not use these; remove them "
                "(its size is num_select, an epoch is one pass over the selected images)"
            )
        return self


class NoiseAdaptation(torch.nn.Module):
    """Q = diag(d) + (1 - d) x row-softmax of learnable off-diagonal logits."""

    def __init__(self, num_classes: int, diagonal: float):
        super().__init__()
        self.diagonal = diagonal
        self.logits = torch.nn.Parameter(torch.zeros(num_classes, num_classes))
        self.register_buffer("eye", torch.eye(num_classes, dtype=torch.bool), persistent=False)

    def matrix(self) -> torch.Tensor:
        off = torch.softmax(self.logits.float().masked_fill(self.eye, float("-inf")), dim=1)
        return torch.where(self.eye, torch.full_like(off, self.diagonal), (1 - self.diagonal) * off)


@register_method("dfnd", config=DFNDConfig)
class DFND(Synthesizer):
    cfg: DFNDConfig

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.wild: WildImages | None = None
        if self.cfg.transition_diagonal <= 1 / self.num_classes:
            raise ValueError(
                f"synthesis.transition_diagonal = {self.cfg.transition_diagonal} is at most 1/{self.num_classes}: the teacher's "
                "labels would be no better than chance; set it to the teacher's test accuracy (e.g. 0.95)"
            )

    def setup(self) -> None:
        c = self.cfg
        if self.wild is None:
            self.wild = WildImages(c.wild, self.image_shape)
        self.wild.to(self.device, hold=False)  # scored in one streamed pass; only the selected rows are kept
        self.n_select = min(c.num_select, len(self.wild))
        self._new_pool()
        self.adaptation = NoiseAdaptation(self.num_classes, c.transition_diagonal).to(self.device)
        self.adaptation_optimizer = adam(self.adaptation.parameters(), self.device, lr=c.lr_transition)
        self.selection: Selection | None = None

    # -- selection ----------------------------------------------------------------------------------
    def select(self) -> Selection:
        """Score the whole wild pool with the teacher and keep the best `n_select` rows (their images go
        into the pool with the teacher's logits)."""
        t0 = time.perf_counter()
        self.teacher.eval()
        selection = select_top_k(
            self.teacher, self.wild.batches(self.cfg.score_batch_size), self.teacher_input, self.n_select, self.autocast
        )
        self.selection = selection
        self._fill_pool()
        _, logits, _ = self.pool.filled()
        counts = torch.bincount(logits.argmax(1), minlength=self.num_classes).tolist()
        log.info(
            "dfnd: kept %d of %d wild images (%s) in %.1f s; scores %.3g..%.3g; teacher classes of the kept images: %s",
            len(selection), len(self.wild), self.wild.name, time.perf_counter() - t0,
            float(selection.scores[-1]), float(selection.scores[0]), counts,
        )
        return selection

    growing = False  # the selection is made once

    # -- data-free validation: a seeded share of the selection, never trained on -------------------
    @property
    def fixed_rows(self) -> int:
        return getattr(self, "n_select", self.cfg.num_select)

    def hold_out(self, count: int) -> None:
        self.held_out = int(count)
        if hasattr(self, "n_select"):
            self._new_pool()

    def _new_pool(self) -> None:
        rows = self.n_select - getattr(self, "held_out", 0)
        if rows < 1:
            raise ValueError(f"dfnd: holding out {self.held_out} of {self.n_select} selected images leaves none to train on; "
                             "lower validation.images or raise synthesis.num_select")
        if self.pool.capacity != rows or self.pool.device != self.device:
            self.pool = ImagePool(rows, self.image_shape, self.num_classes, self.device)

    def _split(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(training rows, held-out rows) of the selection, the held-out ones a seeded draw."""
        indices, count = self.selection.indices, getattr(self, "held_out", 0)
        order = torch.randperm(len(indices), generator=torch.Generator().manual_seed(self.seed + self.HELD_OUT_SEED))
        held = torch.zeros(len(indices), dtype=torch.bool)
        held[order[:count]] = True
        return indices[~held], indices[held]

    def _fill_pool(self) -> None:
        self.pool = ImagePool(1, self.image_shape, self.num_classes, self.device)
        self._new_pool()  # a fresh pool of the training rows' size
        train, held = self._split()
        for lo in range(0, len(train), 4096):
            self.add_to_pool(self.wild.gather(train[lo : lo + 4096]).float() / 255)
        self._held_out = self.wild.gather(held).to(self.device)

    def validation_images(self) -> torch.Tensor:
        return getattr(self, "_held_out", torch.empty(0, *self.image_shape, dtype=torch.uint8, device=self.device))

    # -- the loop's source interface -----------------------------------------------------------------
    def steps_per_epoch(self, batch_size: int) -> int:
        n = self.n_select - getattr(self, "held_out", 0)
        if n >= 2 * batch_size or (n % batch_size == 1 and n > 1):
            return n // batch_size  # no ragged (or single-image) last batch for BatchNorm
        return -(-n // batch_size)

    def begin_epoch(self, epoch: int, distiller) -> None:
        if len(self.pool) == 0:
            self.select()

    def batches(self, epoch: int, batch_size: int) -> Iterator[torch.Tensor]:
        images, _, _ = self.pool.filled()
        order = torch.randperm(len(images), generator=epoch_generator(self.seed + 2, epoch)).to(self.device)
        for step in range(self.steps_per_epoch(batch_size)):
            yield images.index_select(0, order[step * batch_size : (step + 1) * batch_size])

    def min_dictionary_images(self) -> int:
        """The selected count (before `setup`, e.g. on a launcher's driver: num_select, an upper bound)."""
        return getattr(self, "n_select", self.cfg.num_select) - getattr(self, "held_out", 0)

    def kd_loss(self, base):
        """KD + the noise-adapted NLL on the teacher's pseudo-labels (the weight 0 gives plain KD)."""
        if self.cfg.noise_adaptation == 0:
            return base
        weight = self.cfg.noise_adaptation

        def loss(student_logits, teacher_logits, raw_logits=None, **batch):
            terms = dict(base(student_logits, teacher_logits, raw_logits=raw_logits, **batch))
            targets = teacher_logits.argmax(dim=1)
            # KDCI.md stage (b): the KD term takes s', the method's other student terms stay on the raw s.
            student = student_logits if raw_logits is None else raw_logits
            terms["noise_adaptation"] = weight * noise_adapted_nll(student, self.adaptation.matrix(), targets)
            return terms

        return loss

    def kd_optimizers(self) -> list[torch.optim.Optimizer]:
        return [self.adaptation_optimizer] if self.cfg.noise_adaptation > 0 else []

    def transition_matrix(self) -> torch.Tensor:
        with torch.no_grad():
            return self.adaptation.matrix()

    def epoch_metrics(self) -> dict[str, float]:
        q = self.transition_matrix()
        off = q.masked_fill(torch.eye(self.num_classes, dtype=torch.bool, device=q.device), 0)
        selected = len(self.selection) if self.selection is not None else len(self.pool)  # trained on + held out
        metrics = {"dfnd_selected": float(selected), "dfnd_transition_offdiag_max": float(off.max())}
        if self.selection is not None:
            metrics["dfnd_score_min"] = float(self.selection.scores[-1])
        return metrics

    def state_dict(self) -> dict:
        # The selected images are a function of (wild pool, selection): checkpoints carry the rows, not
        # the pixels (600k images would be 1.8 GB per checkpoint).
        return {**super().state_dict(), "pool": None}

    def extra_state(self) -> dict:
        selection = self.selection or Selection.empty()
        return {
            "adaptation": self.adaptation.state_dict(), "optimizer": self.adaptation_optimizer.state_dict(),
            "selection": {"scores": selection.scores, "indices": selection.indices},
            "wild": {"name": self.wild.name, "size": len(self.wild)},
        }

    def load_extra_state(self, state: dict) -> None:
        mine = {"name": self.wild.name, "size": len(self.wild)}
        if state["wild"] != mine:
            raise ValueError(f"dfnd: the checkpoint selected from wild pool {state['wild']}, this run's is {mine}; use another run name")
        self.adaptation.load_state_dict(state["adaptation"])
        self.adaptation_optimizer.load_state_dict(state["optimizer"])
        sel = state["selection"]
        self.selection = Selection(sel["scores"], sel["indices"]) if len(sel["indices"]) else None
        if self.selection is not None:
            self._fill_pool()
