"""DFND's data selection as a function that runs shard by shard and merges exactly.

The teacher scores every wild image by how sure it is of its own prediction; the `k` best are kept.
`select_top_k` streams a shard (any row range of the pool) and keeps its k best (score, row) pairs;
`merge_selections` takes the k best of the shards' k best, which is the k best overall because every
shard kept each of its rows that could be in the global top k. Ties are broken by the row index
(lower first), so the result is one well-defined set whatever the sharding.

Score = minus the teacher's cross-entropy on its own argmax, -log p_max, written as
-log1p(sum_{j != argmax} exp(t_j - t_max)) so that very confident images (p_max within 1e-8 of 1, which
fp32 rounds to exactly 1) still get distinct scores. Ranking by confidence p_max gives the same order.
Exactness assumes an image's score does not depend on how it was batched: true in eval mode up to the
kernels' arithmetic (CPU: bit-identical here, tested; GPU: batch shape can change cuDNN/TF32 algorithms and
so the last bits of a score, which can only reorder images whose scores differ by that much).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import nn


@dataclass
class Selection:
    """The kept rows of a pool (int64) and their scores (fp32), best first; CPU tensors."""

    scores: torch.Tensor
    indices: torch.Tensor

    def __len__(self) -> int:
        return len(self.indices)

    @staticmethod
    def empty() -> "Selection":
        return Selection(torch.empty(0, dtype=torch.float32), torch.empty(0, dtype=torch.int64))


def self_confidence(teacher_logits: torch.Tensor) -> torch.Tensor:
    """-CE(teacher, its own argmax) per image, in fp32 (0 = certain; more negative = less sure)."""
    t = teacher_logits.float()
    top, argmax = t.max(dim=1, keepdim=True)
    # Sum over the other classes only (not "sum - 1", which rounds tiny remainders away in fp32).
    others = torch.exp(t - top).scatter(1, argmax, 0.0).sum(dim=1)
    # A non-finite output (overflow, a broken image) must rank last, never first.
    return (-torch.log1p(others)).nan_to_num(nan=float("-inf"))


def top_k(scores: torch.Tensor, indices: torch.Tensor, k: int) -> Selection:
    """The k highest scores (ties: lower index first), best first."""
    scores, indices = scores.float().cpu(), indices.long().cpu()
    by_index = torch.argsort(indices, stable=True)
    scores, indices = scores[by_index], indices[by_index]
    order = torch.argsort(scores, descending=True, stable=True)[:k]
    return Selection(scores[order], indices[order])


def merge_selections(parts: Iterable[Selection], k: int) -> Selection:
    """The k best of several shards' selections: equal to selecting from all rows at once."""
    parts = [p for p in parts if len(p)]
    if not parts:
        return Selection.empty()
    indices = torch.cat([p.indices for p in parts])
    if indices.unique().numel() != len(indices):
        raise ValueError("merge_selections: the shards overlap (a row was scored twice); split the pool into disjoint row ranges")
    return top_k(torch.cat([p.scores for p in parts]), indices, k)


@torch.no_grad()
def select_top_k(
    teacher: nn.Module,
    batches: Iterable[tuple[int, torch.Tensor]],
    prepare: Callable[[torch.Tensor], torch.Tensor],
    k: int,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    buffer: int = 65536,
) -> Selection:
    """Score `(first_row, uint8 batch)` pairs with the teacher and keep the k best rows.

    Memory stays O(k + batch): candidates are reduced to the k best whenever they pass max(k, buffer).
    The teacher must be in eval mode (an image's score must not depend on its batch-mates).
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if teacher.training:
        raise ValueError("select_top_k: put the teacher in eval mode (BatchNorm would mix images of a batch)")
    kept = Selection.empty()
    pending_scores, pending_rows, pending = [], [], 0
    for first_row, images in batches:
        with autocast():
            logits = teacher(prepare(images))
        pending_scores.append(self_confidence(logits))  # on the device: no sync per batch
        pending_rows.append(torch.arange(first_row, first_row + len(images), dtype=torch.int64))
        pending += len(images)
        if pending > max(k, buffer):
            kept = merge_selections([kept, Selection(torch.cat(pending_scores).cpu(), torch.cat(pending_rows))], k)
            pending_scores, pending_rows, pending = [], [], 0
    if pending:
        kept = merge_selections([kept, Selection(torch.cat(pending_scores).cpu(), torch.cat(pending_rows))], k)
    return kept
