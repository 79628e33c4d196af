"""The distiller: any baseline's KD loss, with KDCI's compensated logits in place of the raw ones.

`Distiller(student, teacher, kd_loss, intervention)`:
- `forward_train(x)` -> `DistillOutput(logits, compensated, losses, attention)`; `total_loss(losses)`
  is what the loop back-propagates;
- in eval mode `forward(x)` is the student alone (KDCI is a training-time adjustment);
- `intervention=None` (KDCI off) is exactly the baseline: compensated is the raw logits.

The teacher is held outside the module tree on purpose: it is not in `state_dict()` (checkpoints stay
student-sized), not in `parameters()` (nothing can put it into the optimizer), not moved by `.to()`
and not synchronised when the distiller is wrapped in DDP. It always stays in eval mode, no grad.
"""

from __future__ import annotations

from typing import Callable, Mapping, NamedTuple

import torch
from torch import nn

from .intervention import CausalIntervention

KDLoss = Callable[..., "torch.Tensor | Mapping[str, torch.Tensor]"]


class DistillOutput(NamedTuple):
    logits: torch.Tensor  # raw student logits s (what synthesis and adversarial terms must use)
    compensated: torch.Tensor  # s' (== s when KDCI is off)
    losses: dict[str, torch.Tensor]
    attention: torch.Tensor | None  # lambda (B, N) when KDCI is on


def total_loss(losses: Mapping[str, torch.Tensor]) -> torch.Tensor:
    if not losses:
        raise ValueError("no losses to add up: the KD loss returned an empty dict")
    values = iter(losses.values())
    total = next(values)
    for value in values:
        total = total + value
    return total


class Distiller(nn.Module):
    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        kd_loss: KDLoss,
        intervention: CausalIntervention | None = None,
    ):
        super().__init__()
        if student is teacher:
            raise ValueError("the student and the teacher are the same module: pass the model being trained as the student")
        self.student = student
        self.intervention = intervention
        self.kd_loss = kd_loss
        teacher.eval().requires_grad_(False)
        object.__setattr__(self, "teacher", teacher)  # see the module docstring

    @property
    def kdci_enabled(self) -> bool:
        return self.intervention is not None

    def train(self, mode: bool = True) -> "Distiller":
        super().train(mode)
        self.teacher.eval()
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Student + intervention parameters: one optimizer trains both (the paper's joint training)."""
        return [p for p in self.parameters() if p.requires_grad]

    @torch.no_grad()
    def teacher_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.teacher(x)

    def forward_train(self, x: torch.Tensor, teacher_logits: torch.Tensor | None = None, **batch) -> DistillOutput:
        """One KD forward on images `x` (normalised); extra keyword args go to the KD loss."""
        t = self.teacher_logits(x) if teacher_logits is None else teacher_logits.detach()
        s = self.student(x)
        attention = None
        compensated = s
        if self.intervention is not None and self.intervention.has_dictionary:  # (none yet: plain KD until the first build)
            compensated, attention, _ = self.intervention(s)
        # The baseline's KD term sees s'; its other student terms may need the raw s ("unchanged").
        losses = self.kd_loss(compensated, t, raw_logits=s, **batch)
        if isinstance(losses, torch.Tensor):
            losses = {"kd": losses}
        return DistillOutput(s, compensated, dict(losses), attention)

    def forward(self, x: torch.Tensor, teacher_logits: torch.Tensor | None = None, **batch):
        # Training goes through forward() so that a DDP-wrapped distiller synchronises gradients.
        if self.training:
            return self.forward_train(x, teacher_logits, **batch)
        return self.student(x)

    def compensated_logits(self, x: torch.Tensor) -> torch.Tensor:
        """s' at test time (a diagnostic: the deployed student is used alone)."""
        s = self.student(x)
        return s if self.intervention is None or not self.intervention.has_dictionary else self.intervention(s).logits


class CompensatedStudent(nn.Module):
    """Student + intervention as one eval-time model, to score the compensated logits like any classifier."""

    def __init__(self, student: nn.Module, intervention: CausalIntervention):
        super().__init__()
        self.student, self.intervention = student, intervention

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.intervention(self.student(x)).logits
