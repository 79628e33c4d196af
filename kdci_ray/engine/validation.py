"""Data-free validation: how closely the student follows the teacher on substitution data it never trained on.

In the data-free setting nobody holds labelled data, so choosing N, alpha or an epoch on `test_top1` is
test-set tuning. Every run therefore holds out substitution images (a seeded share of a fixed pool or
selection; for synthesizers, images made once with held-out seeds) and reports at each evaluation:
  val_agreement: top-1 agreement with the teacher, in percent;  val_kl: KL(teacher || student) at T = 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import DistillConfig


def held_out_count(cfg: DistillConfig, source) -> int:
    """How many images the run holds out: validation.images, at most validation.share of a fixed set or selection
    (`source.fixed_rows`), at most one synthesis call's batch for a synthesizer (None: its held-out images take
    nothing from training, but each held-out call costs what a training call does: DeepInv at 224 px, minutes)."""
    v = cfg.validation
    if v.images == 0 or not hasattr(source, "hold_out"):
        return 0
    fixed = getattr(source, "fixed_rows", None)
    return min(v.images, source.cfg.batch_size) if fixed is None else min(v.images, int(v.share * fixed))


def with_protocols(row: dict, history: list[dict]) -> dict:
    """`row` (an evaluated epoch) with both reporting protocols, labelled: `test_top1_last` (this epoch: what we
    report), `test_top1_best` + `_best_epoch` (the best epoch so far by test labels: what the public code reports,
    a test-set selection), and `test_top1_val_selected` + `_epoch` (the epoch a data-free rule picks: the highest
    val_agreement so far). The same for the compensated top-1."""
    evaluated = [r for r in history if "test_top1" in r] + [row]
    for key in ("test_top1", "test_top1_compensated"):
        if key not in row:
            continue
        best = max((r for r in evaluated if key in r), key=lambda r: r[key])  # the earliest of equals
        row[f"{key}_last"] = row[key]
        row[f"{key}_best"], row[f"{key}_best_epoch"] = best[key], best["epoch"]
        if "val_agreement" in row:
            chosen = max((r for r in evaluated if key in r and "val_agreement" in r), key=lambda r: r["val_agreement"])
            row[f"{key}_val_selected"], row[f"{key}_val_selected_epoch"] = chosen[key], chosen["epoch"]
    return row


@dataclass
class Validation:
    images: torch.Tensor  # uint8 (V, C, H, W) on the device
    teacher_logits: torch.Tensor  # float32 (V, classes)

    def __len__(self) -> int:
        return len(self.images)

    @classmethod
    @torch.no_grad()
    def make(cls, images: torch.Tensor, teacher, prepare, autocast) -> "Validation":
        logits = []
        for batch in images.split(512):
            with autocast():
                logits.append(teacher(prepare(batch)).float())
        return cls(images, torch.cat(logits) if logits else images.new_zeros((0, 0), dtype=torch.float32))

    @torch.no_grad()
    def score(self, student, prepare, autocast, heads: dict | None = None) -> dict[str, torch.Tensor]:
        """{'val_agreement', 'val_kl'} (and '_<head>' versions), as device tensors (the caller syncs once)."""
        outputs: dict[str, list[torch.Tensor]] = {}
        was_training = student.training
        student.eval()
        for batch in self.images.split(512):
            with autocast():
                logits = student(prepare(batch))
                for name, fn in {"": None, **(heads or {})}.items():
                    outputs.setdefault(name, []).append((logits if fn is None else fn(logits)).float())
        student.train(was_training)
        target = self.teacher_logits.argmax(1)
        log_p = F.log_softmax(self.teacher_logits, 1)
        scores = {}
        for name, parts in outputs.items():
            s = torch.cat(parts)
            suffix = f"_{name}" if name else ""
            scores[f"val_agreement{suffix}"] = (s.argmax(1) == target).float().mean() * 100
            scores[f"val_kl{suffix}"] = F.kl_div(F.log_softmax(s, 1), log_p, log_target=True, reduction="batchmean")
        return scores

    def state_dict(self) -> dict:
        return {"images": self.images.cpu(), "teacher_logits": self.teacher_logits.cpu()}

    @classmethod
    def from_state(cls, state: dict, device) -> "Validation":
        return cls(state["images"].to(device), state["teacher_logits"].to(device))
