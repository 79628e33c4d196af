"""Teacher outputs over substitution images, as the (features, logits) blocks a dictionary is built from."""

from __future__ import annotations

import contextlib
import hashlib
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
from torch import nn


def teacher_fingerprint(teacher: nn.Module) -> str:
    """A short content hash of the teacher's weights: part of a dictionary's identity (and cache key)."""
    h = hashlib.sha256()
    for name, tensor in sorted(teacher.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


@torch.no_grad()
def teacher_blocks(
    teacher: nn.Module,
    images: Iterable[torch.Tensor],
    prepare: Callable[[torch.Tensor], torch.Tensor],
    feature: str = "logits",
    autocast=None,
) -> Iterator[tuple[np.ndarray | None, np.ndarray]]:
    """Yield `(penultimate features or None, logits)` as float32 numpy blocks, one per image batch.

    `prepare` turns a raw batch (uint8 or [0,1] float) into the teacher's input (normalise, memory format).
    """
    was_training = teacher.training
    teacher.eval()
    try:
        for batch in images:
            x = prepare(batch)
            with autocast() if autocast is not None else contextlib.nullcontext():
                if feature == "logits":
                    logits, feats = teacher(x), None
                else:
                    logits, feats = teacher(x, return_features=True)
            yield (None if feats is None else feats.float().cpu().numpy()), logits.float().cpu().numpy()
    finally:
        teacher.train(was_training)
