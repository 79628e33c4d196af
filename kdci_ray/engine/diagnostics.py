"""Shift diagnostics: how far the substitution data is from the data the teacher was trained for.

KDCI exists because substitution data is biased; these numbers show that bias while a run trains (the
paper's Fig. 1 reports class imbalance and FID of substitution data):
  - class proportions of the substitution data (teacher argmax) and their KL divergence from uniform and
    from the test split's label proportions;
  - the Frechet distance between substitution images and real test images in the teacher's penultimate
    feature space (FID's formula, the teacher as the feature extractor);
  - KDCI's prototype usage (mean attention mass per prototype on substitution data) and priors P(z).
Computed on rank 0 at the first epoch, at every dictionary (re)build and at the end; a few thousand teacher
forwards each time.
"""

from __future__ import annotations

import math

import numpy as np
import torch

SAMPLE = 2048  # substitution / test images per measurement


def class_proportions(labels: torch.Tensor, num_classes: int) -> np.ndarray:
    counts = torch.bincount(labels.reshape(-1).long().cpu(), minlength=num_classes).double().numpy()
    return counts / max(1.0, counts.sum())


def kl_divergence(p: np.ndarray, q: np.ndarray, eps: float = 1e-8) -> float:
    """KL(p || q) in nats over classes (eps keeps empty classes finite)."""
    p = np.asarray(p, np.float64) + eps
    q = np.asarray(q, np.float64) + eps
    p, q = p / p.sum(), q / q.sum()
    return float((p * np.log(p / q)).sum())


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(C_a + C_b - 2 (C_a C_b)^(1/2)) between two feature sets (rows), in float64.
    The trace of the matrix square root comes from the eigenvalues of C_a^(1/2) C_b C_a^(1/2) (symmetric PSD)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    mu = a.mean(0) - b.mean(0)
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    ca, cb = np.atleast_2d(ca), np.atleast_2d(cb)
    w, v = np.linalg.eigh(ca)
    root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    cross = np.linalg.eigvalsh(root_a @ cb @ root_a)
    value = mu @ mu + np.trace(ca) + np.trace(cb) - 2 * np.sqrt(np.clip(cross, 0, None)).sum()
    return float(max(value, 0.0))


@torch.no_grad()
def teacher_outputs(teacher, images: torch.Tensor, prepare, autocast, batch_size: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, penultimate features) of the teacher on uint8 images, float32."""
    logits, features = [], []
    for batch in images.split(batch_size):
        with autocast():
            out, feat = teacher(prepare(batch), return_features=True)
        logits.append(out.float())
        features.append(feat.float().flatten(1))
    return torch.cat(logits), torch.cat(features)


def take(batches, limit: int = SAMPLE) -> torch.Tensor | None:
    """The first `limit` images of an iterator of uint8 batches."""
    parts, n = [], 0
    for batch in batches:
        parts.append(batch[: limit - n])
        n += len(parts[-1])
        if n >= limit:
            break
    return torch.cat(parts) if parts else None


def shift_metrics(sub_logits: torch.Tensor, sub_features: torch.Tensor, num_classes: int,
                  test_labels: torch.Tensor | None = None, test_features: torch.Tensor | None = None) -> dict:
    """The scalars (for MLflow) and the class proportions (for the figure) of one measurement."""
    proportions = class_proportions(sub_logits.argmax(1), num_classes)
    out = {"shift_kl_uniform": kl_divergence(proportions, np.full(num_classes, 1.0 / num_classes)),
           "shift_classes_present": float((proportions > 0).sum()), "proportions": proportions.tolist()}
    if test_labels is not None:
        out["shift_kl_test"] = kl_divergence(proportions, class_proportions(test_labels, num_classes))
    if test_features is not None and len(sub_features) > 1:
        out["shift_frechet_test"] = frechet_distance(sub_features.cpu().numpy(), test_features.cpu().numpy())
    return out


@torch.no_grad()
def prototype_usage(intervention, sub_logits: torch.Tensor) -> dict:
    """Mean attention mass per prototype over substitution data, its entropy relative to uniform (1: every
    prototype used alike), and the dictionary's priors."""
    attention = intervention.attention(sub_logits.to(intervention.prototypes.device)).float().mean(0).cpu()
    n = attention.numel()
    entropy = float(-(attention.clamp_min(1e-12) * attention.clamp_min(1e-12).log()).sum())
    return {"prototype_usage_entropy": entropy / math.log(n) if n > 1 else 1.0, "prototype_usage_max": float(attention.max()),
            "usage": attention.tolist(), "priors": intervention.priors.float().cpu().tolist()}
