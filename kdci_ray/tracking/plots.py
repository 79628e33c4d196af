"""Figures people would rather look at than read, written as PNG files for MLflow: a grid of substitution
images, class proportions of the substitution data against the original class balance, top-1 against the
dictionary size N across trials, t-SNE of student features (raw vs KDCI)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on clusters and CI
    import matplotlib.pyplot as plt

    return plt


def image_grid(images: torch.Tensor, path: Path, columns: int = 16) -> Path:
    """uint8 (or [0, 1] float) NCHW images as one PNG grid."""
    from PIL import Image
    from torchvision.utils import make_grid

    images = images.detach().cpu()
    if images.dtype == torch.uint8:
        images = images.float() / 255
    grid = make_grid(images.clamp(0, 1), nrow=columns, padding=1)
    array = (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    if array.shape[2] == 1:
        array = array[:, :, 0]
    scale = max(1, 256 // max(images.shape[-1], 1) // 4)  # 8x8 digits would be a smudge: enlarge small images
    Image.fromarray(array).resize((array.shape[1] * scale, array.shape[0] * scale), Image.NEAREST).save(path)
    return Path(path)


def class_proportions(substitution: Sequence[int], original: Sequence[int], path: Path, class_names: Sequence[str] | None = None) -> Path:
    """Bars: the share of each class (the teacher's argmax) in the substitution data next to the original
    data's class balance — the bias KDCI corrects is visible as the gap."""
    plt = _pyplot()
    sub = np.asarray(substitution, dtype=float)
    orig = np.asarray(original, dtype=float)
    sub, orig = sub / max(sub.sum(), 1), orig / max(orig.sum(), 1)
    x = np.arange(len(sub))
    fig, ax = plt.subplots(figsize=(max(6, len(sub) * 0.5), 3.5))
    ax.bar(x - 0.2, sub, 0.4, label="substitution data (teacher's class)")
    ax.bar(x + 0.2, orig, 0.4, label="original data")
    ax.set_xticks(x, class_names or [str(i) for i in x], rotation=45 if len(x) > 12 else 0)
    ax.set_ylabel("share of images")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def metric_vs_n(rows: Sequence[dict], path: Path, metric: str = "test_top1", group: str = "alpha") -> Path:
    """`metric` against the dictionary size N, one line per value of `group` (trials of a sweep)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for key in sorted({r.get(group) for r in rows}, key=str):
        points = sorted((r["n"], r[metric]) for r in rows if r.get(group) == key and r.get(metric) is not None)
        if points:
            ax.plot(*zip(*points), marker="o", label=f"{group}={key}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("dictionary size N")
    ax.set_ylabel(metric)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def tsne(features: dict[str, np.ndarray], labels: np.ndarray, path: Path, seed: int = 0) -> Path:
    """One t-SNE panel per named feature set (e.g. raw vs KDCI student), points coloured by true class."""
    from sklearn.manifold import TSNE

    plt = _pyplot()
    fig, axes = plt.subplots(1, len(features), figsize=(4 * len(features), 4), squeeze=False)
    for ax, (name, feats) in zip(axes[0], features.items()):
        perplexity = float(min(30, max(2, (len(feats) - 1) // 3)))
        points = TSNE(2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(np.asarray(feats, dtype=np.float32))
        ax.scatter(points[:, 0], points[:, 1], c=labels, cmap="tab10", s=4)
        ax.set_title(name)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
