"""scikit-learn's bundled 8x8 handwritten digits (1,797 images): the offline quickstart dataset."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .base import DATASETS, ArrayImageDataset, DatasetInfo, cached_arrays, check_split

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


def _sklearn_source() -> tuple[dict, list[Path]]:
    """scikit-learn's version and its digits file, found without importing it (the import costs every
    process that loads digits a second or more: each Ray worker and actor of a digits run)."""
    import importlib.metadata
    import importlib.util

    spec = importlib.util.find_spec("sklearn")
    data = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data" / "digits.csv.gz" if spec else None
    version = importlib.metadata.version("scikit-learn") if spec else None
    return {"sklearn": version}, [data] if data is not None and data.is_file() else []


def digits_split(split: str) -> tuple[np.ndarray, np.ndarray]:
    """One split's (images, labels), cached as arrays after the first load (see cached_arrays)."""

    def build() -> tuple[np.ndarray, np.ndarray]:
        images, labels = digits_arrays()
        idx = split_indices(labels)[split]
        return images[idx], labels[idx]

    version, files = _sklearn_source()
    if not files:  # an unusual scikit-learn layout: load it every time
        return build()
    key = {"name": "digits", "split": split, "test_fraction": TEST_FRACTION, "seed": SPLIT_SEED, **version}
    images, labels = cached_arrays(key, files, build)
    return images, labels


@DATASETS.register("digits", info=DIGITS)
def digits(root=None, split: str = "train", download: bool = False) -> ArrayImageDataset:
    check_split(DIGITS, split)
    images, labels = digits_split(split)
    return ArrayImageDataset(images, labels, DIGITS, split)
