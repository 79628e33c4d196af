"""KDCI stage (b): the causal intervention that compensates the student's logits (backdoor adjustment).

    e_i    = w^T tanh(W_q s + W_k z_i)       (additive attention; W_q, W_k: C->h, w: h->1, no bias)
    lambda = softmax_i(e_i)
    F      = sum_i lambda_i P(z_i) z_i
    s'     = s + alpha F

The dictionary (z, P(z)) is a constant: it lives in non-persistent buffers that receive no gradient and
is swapped in with `set_dictionary` whenever it is rebuilt (N may change; the learned weights do not
depend on N). Gradients flow through F into W_q, W_k, w and, through the query, into the student.

It always computes in fp32, also inside a bf16 autocast region: the work is only (B, N, h), and bf16
scores would move lambda by several percent.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import torch
from torch import nn

Attention = Literal["additive", "dot"]


class InterventionOutput(NamedTuple):
    logits: torch.Tensor  # s' = s + alpha F, float32
    attention: torch.Tensor  # lambda, (B, N)
    compensation: torch.Tensor  # F, (B, C)


def attention_entropy(attention: torch.Tensor) -> torch.Tensor:
    """Mean entropy (nats) of the attention rows: log N for uniform, 0 when one prototype takes it all."""
    p = attention.float().clamp_min(1e-12)
    return -(p * p.log()).sum(dim=1).mean()


class CausalIntervention(nn.Module):
    """Compensated logits from raw student logits and a confounder dictionary.

    Ablations (the paper's): `uniform_attention` (lambda = 1/N), `use_prior=False` (P(z) := 1),
    `random_prototypes` (z replaced by Gaussian noise with the real prototypes' mean and std, seeded),
    and `attention="dot"` (scaled dot product (W_q s).(W_k z)/sqrt(h) instead of additive attention).
    """

    def __init__(
        self,
        num_classes: int,
        hidden: int = 256,
        attention: Attention = "additive",
        alpha: float = 1.0,
        uniform_attention: bool = False,
        use_prior: bool = True,
        random_prototypes: bool = False,
        seed: int = 0,
    ):
        super().__init__()
        if attention not in ("additive", "dot"):
            raise ValueError(f"attention must be 'additive' or 'dot', got {attention!r}")
        if num_classes < 1 or hidden < 1:
            raise ValueError(f"num_classes and hidden must be >= 1, got {num_classes} and {hidden}")
        self.num_classes, self.hidden, self.attention_kind = num_classes, hidden, attention
        self.alpha = float(alpha)
        self.uniform_attention, self.use_prior, self.random_prototypes = uniform_attention, use_prior, random_prototypes
        self.seed = seed
        self.query = nn.Linear(num_classes, hidden, bias=False)
        self.key = nn.Linear(num_classes, hidden, bias=False)
        # The dot-product variant has no score vector; keeping the parameter set fixed per kind keeps
        # checkpoints of one kind loadable, and an unused parameter would confuse DDP.
        self.score = nn.Linear(hidden, 1, bias=False) if attention == "additive" else None
        if uniform_attention:
            # lambda = 1/N ignores the attention weights: freeze them, so no optimizer or DDP waits on them.
            for p in self.parameters():
                p.requires_grad_(False)
        self.register_buffer("prototypes", torch.zeros(0, num_classes), persistent=False)
        self.register_buffer("priors", torch.zeros(0), persistent=False)
        self.register_buffer("weighted_prototypes", torch.zeros(0, num_classes), persistent=False)  # P(z) z

    def extra_repr(self) -> str:
        flags = [f"attention={self.attention_kind}", f"alpha={self.alpha}"]
        flags += [name for name in ("uniform_attention", "random_prototypes") if getattr(self, name)]
        if not self.use_prior:
            flags.append("no_prior")
        return f"C={self.num_classes}, h={self.hidden}, N={self.prototypes.shape[0]}, " + ", ".join(flags)

    @property
    def has_dictionary(self) -> bool:
        return self.prototypes.shape[0] > 0

    def set_dictionary(self, prototypes: torch.Tensor, priors: torch.Tensor) -> None:
        prototypes = prototypes.detach().float()
        priors = priors.detach().float()
        if prototypes.ndim != 2 or prototypes.shape[1] != self.num_classes:
            raise ValueError(f"prototypes must be (N, {self.num_classes}) teacher logits, got {tuple(prototypes.shape)}")
        if priors.shape != (prototypes.shape[0],):
            raise ValueError(f"priors must be ({prototypes.shape[0]},), got {tuple(priors.shape)}")
        if prototypes.shape[0] == 0:
            raise ValueError("empty dictionary: N must be >= 1")
        if self.random_prototypes:
            gen = torch.Generator().manual_seed(self.seed)
            noise = torch.randn(prototypes.shape, generator=gen)
            prototypes = noise * prototypes.std().clamp_min(1e-6) + prototypes.mean()
        device = self.query.weight.device
        weighted = (priors[:, None] * prototypes) if self.use_prior else prototypes  # P(z) folded in once per dictionary
        if self.prototypes.shape == prototypes.shape:
            # A rebuild of the same size writes into the same buffers: a compiled (graph-captured) step reads
            # them at fixed addresses and keeps its graph.
            self.prototypes.copy_(prototypes)
            self.priors.copy_(priors)
            self.weighted_prototypes.copy_(weighted)
        else:
            self.prototypes, self.priors, self.weighted_prototypes = prototypes.to(device), priors.to(device), weighted.to(device)

    def attention(self, logits: torch.Tensor) -> torch.Tensor:
        n = self.prototypes.shape[0]
        if self.uniform_attention:
            return torch.full((logits.shape[0], n), 1.0 / n, device=logits.device, dtype=torch.float32)
        q = self.query(logits)  # (B, h)
        k = self.key(self.prototypes)  # (N, h)
        if self.attention_kind == "additive":
            scores = self.score(torch.tanh(q[:, None, :] + k[None, :, :])).squeeze(-1)  # (B, N)
        else:
            scores = q @ k.t() / math.sqrt(self.hidden)
        return torch.softmax(scores.float(), dim=1)

    def forward(self, logits: torch.Tensor) -> InterventionOutput:
        if not self.has_dictionary:
            raise RuntimeError("CausalIntervention has no dictionary yet: call set_dictionary() first")
        with torch.autocast(logits.device.type, enabled=False):
            s = logits.float()
            lam = self.attention(s)
            compensation = lam @ self.weighted_prototypes  # (B, C): sum_z lambda_z P(z) z
            return InterventionOutput(torch.add(s, compensation, alpha=self.alpha), lam, compensation)
