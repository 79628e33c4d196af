"""Top-1 / top-5 accuracy of a classifier over a dataset, accumulated on the device (one sync at the end)."""

from __future__ import annotations

import torch
from torch import nn

from ..data import DeviceBatches, ImageDataset, Normalize
from .runtime import Runtime, resolve_runtime


@torch.no_grad()
def evaluate(model: nn.Module, batches, normalize: Normalize, runtime: Runtime) -> dict[str, float]:
    """Accuracy in percent over `batches` of (uint8 images, labels); returns {'top1', 'top5', 'n'}."""
    was_training = model.training
    model.eval()
    device = runtime.device
    correct1 = torch.zeros((), dtype=torch.int64, device=device)
    correct5 = torch.zeros((), dtype=torch.int64, device=device)
    n = 0
    for images, labels in batches:
        x = normalize(images)
        if runtime.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with runtime.autocast():
            logits = model(x)
        k = min(5, logits.shape[1])
        topk = logits.float().topk(k, dim=1).indices
        hits = topk == labels[:, None]
        correct1 += hits[:, 0].sum()
        correct5 += hits.any(dim=1).sum()
        n += labels.shape[0]
    model.train(was_training)
    if n == 0:
        raise ValueError("evaluate: the dataset is empty")
    return {"top1": 100.0 * correct1.item() / n, "top5": 100.0 * correct5.item() / n, "n": n}


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
