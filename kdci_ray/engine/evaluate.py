"""Top-1 / top-5 accuracy of a classifier over a dataset, accumulated on the device (one sync at the end)."""

from __future__ import annotations

import torch
from torch import nn

from ..data import DeviceBatches, ImageDataset, Normalize
from .runtime import Runtime, resolve_runtime


@torch.no_grad()
def evaluate(model: nn.Module, batches, normalize: Normalize, runtime: Runtime, heads: dict | None = None) -> dict[str, float]:
    """Accuracy in percent over `batches` of (uint8 images, labels); returns {'top1', 'top5', 'n'}.
    `heads`: {name: fn(logits) -> logits} scored from the same forward (e.g. KDCI's compensated logits),
    reported as '<name>_top1' / '<name>_top5': one model pass for all of them."""
    was_training = model.training
    model.eval()
    device = runtime.device
    names = ["", *(heads or {})]
    correct = torch.zeros(len(names), 2, dtype=torch.int64, device=device)  # (head, top1/top5)
    n = 0
    for images, labels in batches:
        x = normalize(images)
        if runtime.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with runtime.autocast():
            logits = model(x)
            outputs = [logits, *(fn(logits) for fn in (heads or {}).values())]
        for i, out in enumerate(outputs):
            topk = out.float().topk(min(5, out.shape[1]), dim=1).indices
            hits = topk == labels[:, None]
            correct[i, 0] += hits[:, 0].sum()
            correct[i, 1] += hits.any(dim=1).sum()
        n += labels.shape[0]
    model.train(was_training)
    if n == 0:
        raise ValueError("evaluate: the dataset is empty")
    counts = correct.tolist()  # the one host sync
    result = {"n": n}
    for name, (top1, top5) in zip(names, counts):
        prefix = f"{name}_" if name else ""
        result.update({f"{prefix}top1": 100.0 * top1 / n, f"{prefix}top5": 100.0 * top5 / n})
    return result


def check_labeled(dataset: ImageDataset) -> None:
    """Scoring against the -1 labels of an unlabelled split would silently report 0 %."""
    if not dataset.labeled:
        raise ValueError(
            f"{dataset.info.name}/{dataset.split} has no labels to evaluate against; "
            f"use a labelled split (e.g. {dataset.info.eval_split!r})"
        )


def evaluate_classifier(
    model: nn.Module,
    dataset: ImageDataset,
    batch_size: int = 256,
    runtime: Runtime | None = None,
    mean=None,
    std=None,
) -> dict[str, float]:
    """Evaluate on a labelled dataset with its own (or the given) normalisation constants."""
    check_labeled(dataset)
    runtime = runtime or resolve_runtime()
    model = runtime.prepare(model)
    normalize = Normalize(mean or dataset.info.mean, std or dataset.info.std).to(runtime.device)
    return evaluate(model, DeviceBatches(dataset, batch_size, runtime.device), normalize, runtime)
