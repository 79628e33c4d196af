"""Dataset registry: `load_dataset(name, root, split)` and `dataset_info(name)`.

Registered: cifar10, cifar100, tiny-imagenet, imagenet, digits, and for unlabelled wild data imagefolder and
digits-wild. Importing this package registers them.
"""

from __future__ import annotations

from pathlib import Path

from . import cifar as _cifar  # noqa: F401  (registers)
from . import digits as _digits  # noqa: F401
from . import tiny_imagenet as _tiny  # noqa: F401
from . import wild as _wild  # noqa: F401
from .base import DATASETS, ArrayImageDataset, DatasetError, DatasetInfo, FileImageDataset, ImageDataset, cache_root
from .batches import DeviceBatches, Normalize, apply_crop_flip, draw_crop_flip, random_crop_flip
from .pool import UnlabeledPool, resize_uint8
from .substitution import SubstitutionSet, epoch_generator


def dataset_info(name: str) -> DatasetInfo:
    return DATASETS.meta(name)["info"]


def load_dataset(
    name: str, root: str | Path | None = None, split: str = "train", download: bool = False, limit: int | None = None
) -> ImageDataset:
    """Load split `split` of dataset `name` from `root` (a folder, or a .tar.gz archive of one)."""
    if limit is not None and limit < 1:  # before any decoding
        raise ValueError(f"limit must be >= 1, got {limit}")
    dataset = DATASETS.get(name)(root, split=split, download=download)
    if limit is not None:
        dataset = dataset.subset(min(limit, len(dataset)))
    return dataset


def load_pool(
    name: str, root: str | Path | None = None, split: str = "train", image_size: int | None = None, channels: int | None = None
) -> UnlabeledPool:
    """Any dataset as an unlabelled pool, resized to `image_size` (e.g. tiny-imagenet at 32 px for CIFAR teachers)."""
    return UnlabeledPool(load_dataset(name, root, split), image_size, channels)


__all__ = [
    "DATASETS",
    "ArrayImageDataset",
    "DatasetError",
    "DatasetInfo",
    "DeviceBatches",
    "FileImageDataset",
    "ImageDataset",
    "SubstitutionSet",
    "Normalize",
    "UnlabeledPool",
    "cache_root",
    "dataset_info",
    "epoch_generator",
    "load_dataset",
    "load_pool",
    "random_crop_flip",
    "draw_crop_flip",
    "apply_crop_flip",
    "resize_uint8",
]
