"""Synthesis losses shared by the DFKD methods (the KD loss itself is `kdci_ray.losses`).

Adversarial terms are *maximised* disagreement between the student and the teacher on synthetic
images, returned negated so every synthesis loss is minimised. They must be fed the **student's**
logits: with the teacher in its place they are identically zero (a bug in one public codebase).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def onehot_loss(teacher_logits: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy of the teacher to `targets` (sampled labels), or to its own argmax (DAFL)."""
    if targets is None:
        targets = teacher_logits.argmax(dim=1)
    return F.cross_entropy(teacher_logits.float(), targets)


def activation_loss(features: torch.Tensor) -> torch.Tensor:
    """DAFL: reward large penultimate activations (-mean |f|)."""
    return -features.float().abs().mean()


def class_balance_loss(teacher_logits: torch.Tensor) -> torch.Tensor:
    """DAFL: negative entropy (natural log) of the batch's mean class distribution; minimum = uniform classes."""
    p = F.softmax(teacher_logits.float(), dim=1).mean(dim=0)
    return (p * torch.log(p.clamp_min(1e-12))).sum()


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Image prior: mean absolute difference to the right, lower and both diagonal neighbours, summed."""
    return (
        (x[..., :, :-1] - x[..., :, 1:]).abs().mean()
        + (x[..., :-1, :] - x[..., 1:, :]).abs().mean()
        + (x[..., 1:, :-1] - x[..., :-1, 1:]).abs().mean()
        + (x[..., :-1, :-1] - x[..., 1:, 1:]).abs().mean()
    )


def kl_per_sample(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(p_t || p_s) for each sample (T = 1), in fp32."""
    t, s = teacher_logits.float(), student_logits.float()
    return (F.softmax(t, dim=1) * (F.log_softmax(t, dim=1) - F.log_softmax(s, dim=1))).sum(1)


def adversarial_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """-KL(p_t || p_s), batch mean (the generative synthesizers' adversarial term)."""
    return -kl_per_sample(student_logits, teacher_logits).mean()


def adversarial_js(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 3.0) -> torch.Tensor:
    """DeepInversion's adversarial term: -JS(p_s, p_t) at `temperature`, probabilities clamped to
    [0.01, 0.99] as in the public code (keeps the log finite and the gradient bounded)."""
    p = F.softmax(student_logits.float() / temperature, dim=1)
    q = F.softmax(teacher_logits.float() / temperature, dim=1)
    m = ((p + q) / 2).clamp(0.01, 0.99)
    p, q = p.clamp(0.01, 0.99), q.clamp(0.01, 0.99)
    js = 0.5 * (m * (m.log() - p.log())).sum(1) + 0.5 * (m * (m.log() - q.log())).sum(1)
    return -js.mean()


def masked_adversarial_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Fast / CMI: -mean_i[ 1(argmax s_i == argmax t_i) * KL(p_t,i || p_s,i) ].

    Only samples both networks put in the same class push the generator; the mean runs over the whole
    batch (not the masked count), as in the public code.
    """
    mask = (student_logits.argmax(1) == teacher_logits.argmax(1)).float()
    return -(mask * kl_per_sample(student_logits, teacher_logits)).mean()


def contrastive_loss(local_h: torch.Tensor, global_h: torch.Tensor, temperature: float, n_current: int,
                     valid: torch.Tensor | None = None) -> torch.Tensor:
    """CMI's instance discrimination: row i of the local view's embeddings must pick row i of the
    (detached) global view's. The first `n_current` rows are this batch, the rest come from the memory
    bank; both parts are averaged separately and summed (plain mean when there is no bank yet).
    `valid` (rows,) marks the bank rows that hold features (a fixed-size set of negatives, of which a young
    bank fills only some): the others are neither rows nor candidates, exactly as if they were absent."""
    logits = local_h @ global_h.detach().t() / temperature
    targets = torch.arange(logits.shape[0], device=logits.device)
    if valid is None:
        per_row = F.cross_entropy(logits, targets, reduction="none")
        if per_row.shape[0] == n_current:
            return per_row.mean()
        return per_row[:n_current].mean() + per_row[n_current:].mean()
    logits = logits.masked_fill(~valid[None, :], -1e4)  # exp() of it is 0 next to any real logit
    per_row = F.cross_entropy(logits, targets, reduction="none")
    bank_rows = valid[n_current:]
    bank = torch.where(bank_rows, per_row[n_current:], 0).sum() / bank_rows.sum().clamp_min(1)
    return per_row[:n_current].mean() + bank  # an empty bank adds 0: the plain mean


def prediction_entropy(teacher_logits: torch.Tensor) -> torch.Tensor:
    """MosaicKD's align term: mean per-image entropy (nats) of the teacher's prediction; minimised, so
    each synthetic image is confidently one class."""
    logp = F.log_softmax(teacher_logits.float(), dim=1)
    return -(logp.exp() * logp).sum(1).mean()


def patch_gan_loss(patch_logits: torch.Tensor, real: bool, reduction: str = "sum") -> torch.Tensor:
    """Non-saturating BCE GAN loss on a patch discriminator's logit map (N x 1 x h x w), mean over
    images; `sum` adds the patches of an image (the public MosaicKD scale), `mean` averages them."""
    target = torch.ones_like(patch_logits) if real else torch.zeros_like(patch_logits)
    per_patch = F.binary_cross_entropy_with_logits(patch_logits.float(), target.float(), reduction="none")
    per_image = per_patch.flatten(1)
    return (per_image.sum(1) if reduction == "sum" else per_image.mean(1)).mean()


def noise_adapted_nll(student_logits: torch.Tensor, transition: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """DFND's noise adaptation: the student's class probabilities pass through a row-stochastic
    transition matrix (p_noisy = p_s @ Q, Q[i, j] = P(teacher says j | true class i)) and are scored
    against the teacher's pseudo-labels; Q absorbs the teacher's label noise."""
    p_noisy = F.softmax(student_logits.float(), dim=1) @ transition.float()
    return F.nll_loss(torch.log(p_noisy.clamp_min(1e-12)), targets)
