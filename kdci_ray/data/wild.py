"""Unlabelled "wild" data sources that are not a standard benchmark: any image folder, and a perturbed
digits set that plays the out-of-domain pool for the offline digits quickstart.

Used without labels through `load_pool(name, root, split, image_size, channels)`.
"""

from __future__ import annotations

import numpy as np

from .base import DATASETS, ArrayImageDataset, DatasetError, DatasetInfo, FileImageDataset, check_split, list_images, resolve_root
from .digits import DIGITS, digits_split

IMAGEFOLDER = DatasetInfo(
    name="imagefolder",
    num_classes=0,  # unlabelled: class folders, if any, are ignored
    image_size=64,
    channels=3,
    mean=(0.5, 0.5, 0.5),
    std=(0.5, 0.5, 0.5),
    splits=("train", "val", "test", "all"),
    how_to_get=(
        "Point the root at a folder of images: root/<split>/**/*.jpg (e.g. an ImageFolder tree), or root/**/*.jpg "
        "with split 'all'. Images are decoded on access (shorter side to 64, centre crop), so the tree may be larger "
        "than memory."
    ),
)


@DATASETS.register("imagefolder", info=IMAGEFOLDER)
def imagefolder(root, split: str = "all", download: bool = False) -> FileImageDataset:
    """Every image under root/<split> (or under root for split 'all'), recursively, sorted by path."""
    check_split(IMAGEFOLDER, split)
    if download:
        raise DatasetError(f"imagefolder: nothing to download. {IMAGEFOLDER.how_to_get}")
    base = resolve_root(root, "imagefolder")
    folder = base if split == "all" else base / split
    if not folder.is_dir():
        raise DatasetError(f"imagefolder: missing {folder}. {IMAGEFOLDER.how_to_get}")
    paths = sorted(p for d in [folder, *sorted(q for q in folder.rglob("*") if q.is_dir())] for p in list_images(d))
    if not paths:
        raise DatasetError(f"imagefolder: no images under {folder}. {IMAGEFOLDER.how_to_get}")
    return FileImageDataset([(str(p), -1) for p in paths], IMAGEFOLDER, split)


DIGITS_WILD = DatasetInfo(
    name="digits-wild",
    num_classes=0,
    image_size=8,
    channels=1,
    mean=DIGITS.mean,
    std=DIGITS.std,
    splits=("train",),
    how_to_get="Made from scikit-learn's digits (teacher's train split), perturbed; no download, no root needed.",
)

WILD_SEED = 12345


def digits_wild_arrays() -> np.ndarray:
    """Three out-of-domain variants of each digits *train* image (the split the teacher saw; the test split,
    which scores students, is never used): heavy Gaussian noise, a 50/50 blend with another digit, and a
    mosaic of quadrants from four digits. Fixed seed: the same 4,041 images everywhere."""
    train = digits_split("train")[0].astype(np.float32)  # N,8,8,1 in 0..255
    rng = np.random.default_rng(WILD_SEED)
    n = len(train)
    noisy = train + rng.normal(0.0, 0.35 * 255, train.shape)
    blend = 0.5 * train + 0.5 * train[rng.permutation(n)]
    mosaic = train.copy()
    for rows in (slice(0, 4), slice(4, 8)):
        for cols in (slice(0, 4), slice(4, 8)):
            mosaic[:, rows, cols] = train[rng.permutation(n)][:, rows, cols]
    wild = np.concatenate([noisy, blend, mosaic])
    return np.clip(np.round(wild), 0, 255).astype(np.uint8)


@DATASETS.register("digits-wild", info=DIGITS_WILD)
def digits_wild(root=None, split: str = "train", download: bool = False) -> ArrayImageDataset:
    check_split(DIGITS_WILD, split)
    return ArrayImageDataset(digits_wild_arrays(), None, DIGITS_WILD, split)
