"""Tiny-ImageNet-200 in its official layout, and ImageNet as an ImageFolder train/val tree."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .base import (
    DATASETS,
    ArrayImageDataset,
    DatasetError,
    DatasetInfo,
    FileImageDataset,
    cached_arrays,
    check_split,
    decode_files,
    list_images,
    resolve_root,
    scan_class_folders,
)

TINY_IMAGENET = DatasetInfo(
    name="tiny-imagenet",
    num_classes=200,
    image_size=64,
    channels=3,
    mean=(0.4802, 0.4481, 0.3975),
    std=(0.2770, 0.2691, 0.2821),
    splits=("train", "val", "test"),
    eval_split="val",  # the official test split has no labels
    how_to_get=(
        "Download tiny-imagenet-200.zip from the Stanford CS231n site and unzip it into the root, or point the "
        "root at ../shared/data/tiny-imagenet-200-subset.tar.gz (the archive or its unpacked folder)."
    ),
)

IMAGENET = DatasetInfo(
    name="imagenet",
    num_classes=1000,
    image_size=224,
    channels=3,
    mean=(0.485, 0.456, 0.406),
    std=(0.229, 0.224, 0.225),
    splits=("train", "val"),
    eval_split="val",
    how_to_get=(
        "ImageNet cannot be downloaded automatically (license): get ILSVRC2012 from image-net.org and arrange "
        "root/{train,val}/<wnid>/*.JPEG (e.g. with the usual valprep.sh)."
    ),
)


def _tiny_root(base: Path) -> Path:
    for candidate in (base, base / "tiny-imagenet-200"):
        if (candidate / "wnids.txt").is_file():
            return candidate
    raise DatasetError(
        f"tiny-imagenet: no wnids.txt under {base} or {base / 'tiny-imagenet-200'} "
        f"(official layout: wnids.txt, train/<wnid>/images/*.JPEG, val/images + val/val_annotations.txt). "
        f"{TINY_IMAGENET.how_to_get}"
    )


def _tiny_samples(root: Path, split: str) -> tuple[list[Path], list[int]]:
    # Classes are the sorted wnids (the order an ImageFolder over train/ gives), not wnids.txt's order.
    wnids = sorted(w.strip() for w in (root / "wnids.txt").read_text().split() if w.strip())
    if len(wnids) != TINY_IMAGENET.num_classes:
        raise DatasetError(f"tiny-imagenet: {root / 'wnids.txt'} lists {len(wnids)} classes, expected 200")
    index = {w: i for i, w in enumerate(wnids)}
    paths: list[Path] = []
    labels: list[int] = []
    if split == "train":
        for w in wnids:
            folder = root / "train" / w / "images"
            if not folder.is_dir():
                raise DatasetError(f"tiny-imagenet: missing {folder}. {TINY_IMAGENET.how_to_get}")
            files = list_images(folder)
            paths += files
            labels += [index[w]] * len(files)
    elif split == "val":
        ann = root / "val" / "val_annotations.txt"
        if not ann.is_file():
            raise DatasetError(f"tiny-imagenet: missing {ann}. {TINY_IMAGENET.how_to_get}")
        rows = []
        for lineno, line in enumerate(ann.read_text().splitlines(), start=1):
            fields = line.split("\t")
            if line.strip() and len(fields) < 2:
                raise DatasetError(f"tiny-imagenet: {ann}:{lineno} is not '<file>\\t<wnid>\\t...': {line[:80]!r}")
            if line.strip():
                rows.append(fields[:2])
        for fname, wnid in sorted(rows):
            if wnid not in index:
                raise DatasetError(f"tiny-imagenet: {ann} names unknown class {wnid!r} for {fname}")
            paths.append(root / "val" / "images" / fname)
            labels.append(index[wnid])
    else:  # test: unlabelled
        folder = root / "test" / "images"
        if not folder.is_dir():
            raise DatasetError(f"tiny-imagenet: missing {folder}. {TINY_IMAGENET.how_to_get}")
        paths = list_images(folder)
        labels = [-1] * len(paths)
    if not paths:
        raise DatasetError(f"tiny-imagenet: no images for split {split!r} under {root}")
    return paths, labels


@DATASETS.register("tiny-imagenet", info=TINY_IMAGENET)
def tiny_imagenet(root, split: str = "train", download: bool = False) -> ArrayImageDataset:
    check_split(TINY_IMAGENET, split)
    if download:
        raise DatasetError(f"tiny-imagenet: automatic download is not supported. {TINY_IMAGENET.how_to_get}")
    base = _tiny_root(resolve_root(root, "tiny-imagenet"))
    paths, labels = _tiny_samples(base, split)
    # Labels come from wnids.txt / val_annotations.txt: they belong to the cache key too.
    label_files = [f for f in (base / "wnids.txt", base / "val" / "val_annotations.txt") if f.is_file()]
    x, y = cached_arrays(
        {"name": "tiny-imagenet", "split": split, "v": 1},
        paths + label_files,
        lambda: (decode_files(paths, 64, 3), np.asarray(labels, dtype=np.int64)),
    )
    return ArrayImageDataset(x, None if split == "test" else y, TINY_IMAGENET, split)


@DATASETS.register("imagenet", info=IMAGENET)
def imagenet(root, split: str = "train", download: bool = False) -> FileImageDataset:
    check_split(IMAGENET, split)
    if download:
        raise DatasetError(f"imagenet: automatic download is not possible. {IMAGENET.how_to_get}")
    base = resolve_root(root, "imagenet")
    split_dir = base / split
    if not split_dir.is_dir():
        raise DatasetError(f"imagenet: missing {split_dir}. {IMAGENET.how_to_get}")
    paths, labels, classes = scan_class_folders(split_dir, None, "imagenet")
    if len(classes) != IMAGENET.num_classes:
        # Subsets are legitimate (e.g. ImageNet-100): keep their own class count.
        info = DatasetInfo(**{**IMAGENET.__dict__, "num_classes": len(classes), "classes": classes})
    else:
        info = DatasetInfo(**{**IMAGENET.__dict__, "classes": classes})
    # Shorter side to 256, centre 224: the usual ImageNet evaluation view.
    return FileImageDataset([(str(p), label) for p, label in zip(paths, labels)], info, split, resize=256)
