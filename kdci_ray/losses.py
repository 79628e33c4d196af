"""Knowledge-distillation losses shared by every DFKD method and by KDCI (written once, here)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def kd_kl_div(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Hinton KD: KL(softmax(t/T) || softmax(s/T)) * T^2, mean over the batch, computed in fp32."""
    s = student_logits.float() / temperature
    t = teacher_logits.float() / temperature
    return F.kl_div(F.log_softmax(s, dim=1), F.log_softmax(t, dim=1), reduction="batchmean", log_target=True) * temperature**2


class KLDivergenceKD:
    """The default baseline KD loss: `{'kd': kd_kl_div(s, t, T)}`.

    A KD loss is any callable `(student_logits, teacher_logits, **batch) -> tensor | dict[str, tensor]`;
    KDCI hands it the compensated logits in place of the raw ones and does not care which one it is.
    """

    def __init__(self, temperature: float = 1.0):
        if temperature <= 0:
            raise ValueError(f"KD temperature must be > 0, got {temperature}")
        self.temperature = temperature

    def __call__(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, **batch) -> dict[str, torch.Tensor]:
        return {"kd": kd_kl_div(student_logits, teacher_logits, self.temperature)}

    def __repr__(self) -> str:
        return f"KLDivergenceKD(temperature={self.temperature})"
