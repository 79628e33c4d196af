"""scikit-learn's bundled 8x8 handwritten digits (1,797 images): the offline quickstart dataset."""

from __future__ import annotations

import numpy as np

from .base import DATASETS, ArrayImageDataset, DatasetInfo, check_split

DIGITS = DatasetInfo(
    name="digits",
    num_classes=10,
    image_size=8,
    channels=1,
    # Measured on all 1,797 images after scaling 0..16 -> 0..255.
    mean=(0.3053,),
    std=(0.3759,),
    splits=("train", "test"),
    classes=tuple(str(i) for i in range(10)),
    how_to_get="Bundled with scikit-learn: no download, no root needed.",
)

TEST_FRACTION = 0.25
SPLIT_SEED = 0


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)[..., None]  # N,8,8,1
    return images, bunch.target.astype(np.int64)


def split_indices(labels: np.ndarray) -> dict[str, np.ndarray]:
    """Fixed, seeded, stratified 75/25 split: the same indices on every machine."""
    from sklearn.model_selection import train_test_split

    train, test = train_test_split(
        np.arange(len(labels)), test_size=TEST_FRACTION, random_state=SPLIT_SEED, stratify=labels
    )
    return {"train": np.sort(train), "test": np.sort(test)}


@DATASETS.register("digits", info=DIGITS)
def digits(root=None, split: str = "train", download: bool = False) -> ArrayImageDataset:
    check_split(DIGITS, split)
    images, labels = digits_arrays()
    idx = split_indices(labels)[split]
    return ArrayImageDataset(images[idx], labels[idx], DIGITS, split)
