"""CIFAR-10 / CIFAR-100: the official python-pickle layout (downloadable through torchvision) or an
ImageFolder tree such as the shared JPEG copy (`cifar10-jpeg/{train,test}/<class>/*.jpg`, or its .tar.gz).
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from .base import DATASETS, ArrayImageDataset, DatasetError, DatasetInfo, check_split, decode_folder_split, resolve_root

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

CIFAR10 = DatasetInfo(
    name="cifar10",
    num_classes=10,
    image_size=32,
    channels=3,
    # The constants of the public DFKD code; the reference teachers were trained with them.
    mean=(0.4914, 0.4822, 0.4465),
    std=(0.2023, 0.1994, 0.2010),
    splits=("train", "test"),
    classes=CIFAR10_CLASSES,
    how_to_get=(
        "Get it with data.download=true / --download (official python version, 163 MB, into the root), "
        "or point the root at an ImageFolder tree {train,test}/<class>/*.jpg such as ../shared/data/cifar10-jpeg.tar.gz "
        "(the archive itself or its unpacked folder)."
    ),
    extra={"pickle_dir": "cifar-10-batches-py", "jpeg_dir": "cifar10-jpeg", "label_key": "labels"},
)

CIFAR100 = DatasetInfo(
    name="cifar100",
    num_classes=100,
    image_size=32,
    channels=3,
    mean=(0.5071, 0.4865, 0.4409),
    std=(0.2673, 0.2564, 0.2762),
    splits=("train", "test"),
    how_to_get=(
        "Get it with data.download=true / --download (official python version, 161 MB, into the root), "
        "or point the root at an ImageFolder tree {train,test}/<class>/*.png."
    ),
    extra={"pickle_dir": "cifar-100-python", "jpeg_dir": "cifar100-jpeg", "label_key": "fine_labels"},
)

_PICKLE_FILES = {
    "cifar10": {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]},
    "cifar100": {"train": ["train"], "test": ["test"]},
}

# The official files are pickles of dicts holding numpy arrays and lists; nothing else may be built
# while reading them, so a tampered file cannot run code.
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}


class _ArrayOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a dataset file")


def _read_batch(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            raw = _ArrayOnlyUnpickler(f, encoding="latin1").load()
    except FileNotFoundError:
        raise
    except Exception as exc:  # a truncated or foreign file: say which one
        raise DatasetError(f"malformed CIFAR batch file {path}: {exc}") from exc
    if not isinstance(raw, dict):
        raise DatasetError(f"malformed CIFAR batch file {path}: expected a dict, got {type(raw).__name__}")
    return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in raw.items()}


def _load_pickle_split(folder: Path, info: DatasetInfo, split: str) -> ArrayImageDataset:
    xs, ys = [], []
    for fname in _PICKLE_FILES[info.name][split]:
        path = folder / fname
        if not path.exists():
            raise DatasetError(f"{info.name}: {path} is missing (official layout {folder}/{', '.join(_PICKLE_FILES[info.name][split])}). {info.how_to_get}")
        batch = _read_batch(path)
        label_key = info.extra["label_key"]
        if "data" not in batch or label_key not in batch:
            raise DatasetError(f"malformed CIFAR batch file {path}: keys {sorted(batch)} lack 'data' / {label_key!r}")
        data = np.asarray(batch["data"], dtype=np.uint8)
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise DatasetError(f"malformed CIFAR batch file {path}: 'data' has shape {data.shape}, expected (N, 3072)")
        labels = np.asarray(batch[label_key], dtype=np.int64)
        if len(labels) != len(data) or (labels.size and (labels.min() < 0 or labels.max() >= info.num_classes)):
            raise DatasetError(f"malformed CIFAR batch file {path}: labels do not match the data or exceed {info.num_classes} classes")
        xs.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        ys.append(labels)
    return ArrayImageDataset(np.ascontiguousarray(np.concatenate(xs)), np.concatenate(ys), info, split)


def _download(root: Path, info: DatasetInfo) -> None:
    import torchvision

    cls = torchvision.datasets.CIFAR10 if info.name == "cifar10" else torchvision.datasets.CIFAR100
    root.mkdir(parents=True, exist_ok=True)
    try:  # torchvision downloads, checks the md5s and extracts into root/<pickle_dir>
        cls(str(root), train=True, download=True)
    except Exception as exc:
        raise DatasetError(f"{info.name}: download into {root} failed ({exc}). {info.how_to_get}") from exc


def load_cifar(info: DatasetInfo, root, split: str, download: bool) -> ArrayImageDataset:
    check_split(info, split)
    if download and root is not None and not Path(root).exists():
        Path(root).mkdir(parents=True)
    base = resolve_root(root, info.name)
    pickle_dir = base if base.name == info.extra["pickle_dir"] else base / info.extra["pickle_dir"]
    if pickle_dir.is_dir():
        return _load_pickle_split(pickle_dir, info, split)
    for candidate in (base, base / info.extra["jpeg_dir"]):
        if (candidate / split).is_dir():
            return decode_folder_split(candidate / split, info, split)
    if download:  # only when no copy of either layout is there
        _download(base, info)
        return _load_pickle_split(pickle_dir, info, split)
    raise DatasetError(
        f"{info.name}: no {split} split under {base}: looked for {pickle_dir} (official python pickle), "
        f"{base / split}/<class>/ and {base / info.extra['jpeg_dir'] / split}/<class>/ (ImageFolder). {info.how_to_get}"
    )


@DATASETS.register("cifar10", info=CIFAR10)
def cifar10(root, split: str = "train", download: bool = False) -> ArrayImageDataset:
    return load_cifar(CIFAR10, root, split, download)


@DATASETS.register("cifar100", info=CIFAR100)
def cifar100(root, split: str = "train", download: bool = False) -> ArrayImageDataset:
    return load_cifar(CIFAR100, root, split, download)
