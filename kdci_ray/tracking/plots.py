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
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=2, fontsize="small", frameon=False)  # below: bars stay visible
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")  # legends beside or below the axes are kept
    plt.close(fig)
    return Path(path)


METRIC_LABELS = {
    "test_top1": "test top-1 (%)", "test_top1_compensated": "test top-1, compensated (%)",
    "val_agreement": "agreement with the teacher on held-out substitution data (%)", "val_kl": "KL(teacher || student), held out",
}


def metric_vs_n(rows: Sequence[dict], path: Path, metric: str = "test_top1", group: str = "alpha", group_label: str | None = None) -> Path:
    """`metric` against the dictionary size N, one line per value of `group` (trials of a sweep), the legend
    named `group_label = value` and placed beside the axes (never over the lines)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 3.5))
    for key in sorted({r.get(group) for r in rows}, key=str):
        points = sorted((r["n"], r[metric]) for r in rows if r.get(group) == key and r.get(metric) is not None)
        if points:
            ax.plot(*zip(*points), marker="o", label=f"{group_label or group} = {key}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("dictionary size N")
    ax.set_ylabel(METRIC_LABELS.get(metric, metric), fontsize="small")
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize="small", frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")  # legends beside or below the axes are kept
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
    fig.savefig(path, dpi=120, bbox_inches="tight")  # legends beside or below the axes are kept
    plt.close(fig)
    return Path(path)


def shift_over_epochs(records: Sequence[dict], path: Path) -> Path:
    """The shift diagnostics of one run over its measurements (engine/diagnostics.py): class proportions of the
    substitution data as a heat map (epochs x classes), the divergences and the Frechet distance to the test
    features, and KDCI's prototype usage at the last measurement (with the priors)."""
    plt = _pyplot()
    epochs = [r["epoch"] for r in records]
    usage = next((r for r in reversed(records) if "usage" in r), None)
    fig, axes = plt.subplots(1, 3 if usage else 2, figsize=(15 if usage else 10, 3.6))
    heat = np.asarray([r["proportions"] for r in records])
    image = axes[0].imshow(heat, aspect="auto", cmap="viridis", interpolation="nearest")
    axes[0].set_yticks(range(len(epochs)), [str(e) for e in epochs])
    axes[0].set_xlabel("class (teacher's argmax)")
    axes[0].set_ylabel("epoch")
    axes[0].set_title("share of substitution images per class")
    fig.colorbar(image, ax=axes[0], fraction=0.046)
    ax = axes[1]
    for key, label in (("shift_kl_uniform", "KL(classes || uniform)"), ("shift_kl_test", "KL(classes || test labels)")):
        if all(key in r for r in records):
            ax.plot(epochs, [r[key] for r in records], marker="o", label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel("KL divergence (nats)")
    if all("shift_frechet_test" in r for r in records):
        twin = ax.twinx()
        twin.plot(epochs, [r["shift_frechet_test"] for r in records], marker="s", color="tab:red", label="Frechet distance to test")
        twin.set_ylabel("Frechet distance (teacher features)", color="tab:red")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=2, fontsize="small", frameon=False)  # below the axes, off the data
    ax.set_title("shift of the substitution data")
    if usage:
        ax = axes[2]
        n = len(usage["usage"])
        ax.bar(np.arange(n) - 0.2, usage["usage"], 0.4, label="attention mass")
        ax.bar(np.arange(n) + 0.2, usage["priors"], 0.4, label="prior P(z)")
        ax.set_xlabel("prototype")
        ax.set_ylabel("share")
        ax.set_title(f"KDCI prototypes at epoch {usage['epoch']}")
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=2, fontsize="small", frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")  # legends beside or below the axes are kept
    plt.close(fig)
    return Path(path)
