"""Dataset contract shared by every registered dataset.

A dataset yields `(uint8 CHW image tensor, int label)` pairs (label -1 when unlabelled). Normalisation
and augmentation are *not* applied here: they run batched on the training device (`batches.py`), so a
GPU never waits on per-image CPU transforms. Small datasets are decoded once into uint8 arrays and cached
as `.npy`; ImageNet-scale trees stay as files.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tarfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from ..registry import Registry

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".gif", ".tif", ".tiff")


class DatasetError(RuntimeError):
    """A dataset is missing or malformed; the message says where we looked and how to get the data."""


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    num_classes: int
    image_size: int
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    splits: tuple[str, ...]
    eval_split: str = "test"  # the labelled split accuracy is reported on
    classes: tuple[str, ...] = ()
    how_to_get: str = ""
    extra: dict = field(default_factory=dict)


#: name -> loader(root, split, download) -> ImageDataset; metadata `info` is the DatasetInfo.
DATASETS: Registry = Registry("dataset")


class ImageDataset(torch.utils.data.Dataset):
    info: DatasetInfo
    split: str

    @property
    def labeled(self) -> bool:
        raise NotImplementedError


class ArrayImageDataset(ImageDataset):
    """Images held as one uint8 NHWC array (+ int64 labels, or None when unlabelled)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray | None, info: DatasetInfo, split: str):
        if images.dtype != np.uint8 or images.ndim != 4:
            raise DatasetError(f"{info.name}/{split}: images must be uint8 NHWC, got {images.dtype} {images.shape}")
        if labels is not None and len(labels) != len(images):
            raise DatasetError(f"{info.name}/{split}: {len(images)} images but {len(labels)} labels")
        self.images, self.info, self.split = images, info, split
        self.labels = None if labels is None else np.asarray(labels, dtype=np.int64)

    @property
    def labeled(self) -> bool:
        return self.labels is not None

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        img = torch.from_numpy(np.ascontiguousarray(self.images[i])).permute(2, 0, 1)
        return img, int(self.labels[i]) if self.labels is not None else -1

    def subset(self, n: int) -> "ArrayImageDataset":
        labels = None if self.labels is None else self.labels[:n]
        return ArrayImageDataset(self.images[:n], labels, self.info, self.split)


class FileImageDataset(ImageDataset):
    """Images read from files on access (for trees too big to hold decoded), resized + center-cropped."""

    def __init__(self, samples: Sequence[tuple[str, int]], info: DatasetInfo, split: str, resize: int | None = None):
        self.samples, self.info, self.split = list(samples), info, split
        self.resize = resize or info.image_size
        self._labeled = all(label >= 0 for _, label in self.samples)

    @property
    def labeled(self) -> bool:
        return self._labeled

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, label = self.samples[i]
        arr = decode_image(path, self.info.image_size, self.info.channels, self.resize)
        return torch.from_numpy(arr).permute(2, 0, 1), label

    def subset(self, n: int) -> "FileImageDataset":
        return FileImageDataset(self.samples[:n], self.info, self.split, self.resize)


def decode_image(path: str | Path, size: int, channels: int = 3, resize: int | None = None) -> np.ndarray:
    """Decode one file to uint8 HWC; images of another size are resized (shorter side) and center-cropped."""
    try:
        im = Image.open(path)
    except (OSError, ValueError) as exc:  # missing, truncated or not an image
        raise DatasetError(f"cannot read image {path}: {exc}") from exc
    with im:
        im = im.convert("RGB" if channels == 3 else "L")
        if im.size != (size, size):
            resize = resize or size
            w, h = im.size
            scale = resize / min(w, h)
            im = im.resize((max(resize, round(w * scale)), max(resize, round(h * scale))), Image.BILINEAR)
            left, top = (im.size[0] - size) // 2, (im.size[1] - size) // 2
            im = im.crop((left, top, left + size, top + size))
        arr = np.array(im, dtype=np.uint8)  # a writable copy (torch refuses read-only arrays)
    return arr[:, :, None] if arr.ndim == 2 else arr


def decode_files(paths: Sequence[str | Path], size: int, channels: int = 3) -> np.ndarray:
    """Decode many files into one uint8 NHWC array; threads overlap Pillow's GIL-free decoding."""
    out = np.empty((len(paths), size, size, channels), dtype=np.uint8)

    def work(i: int) -> None:
        out[i] = decode_image(paths[i], size, channels)

    with ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1))) as pool:
        list(pool.map(work, range(len(paths)), chunksize=256))
    return out


def cache_root() -> Path:
    """Where decoded arrays and unpacked archives live: $KDCI_RAY_CACHE or ~/.cache/kdci_ray."""
    return Path(os.environ.get("KDCI_RAY_CACHE", Path.home() / ".cache" / "kdci_ray"))


def _file_fingerprint(paths: Sequence[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        try:
            st = p.stat()
        except FileNotFoundError:
            raise DatasetError(f"{p} is listed by the dataset but missing: the copy is incomplete; fetch it again") from None
        h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:24]


@contextmanager
def _build_lock(target: Path):
    """Held while one process fills a cache entry: the other processes of a node (Ray Train workers, actors)
    that want the same entry wait and then read it, instead of all decoding the same files at once."""
    try:
        import fcntl
    except ImportError:  # (no flock: each process builds its own copy; the renames keep the cache whole)
        yield
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.with_name(target.name + ".lock"), "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def cached_arrays(
    key_parts: dict, source_files: Sequence[Path], build: Callable[[], tuple[np.ndarray, np.ndarray | None]]
) -> tuple[np.ndarray, np.ndarray | None]:
    """Return `build()`'s (images, labels), cached as .npy under a key of `key_parts` + the files' stats.

    A changed, added or removed source file changes the key, so a stale cache is never read.
    """
    key = hashlib.sha256(
        (json.dumps(key_parts, sort_keys=True) + _file_fingerprint(source_files)).encode()
    ).hexdigest()[:24]
    folder = cache_root() / "arrays" / f"{key_parts.get('name', 'data')}-{key_parts.get('split', '')}-{key}"
    x_path, y_path = folder / "x.npy", folder / "y.npy"

    def read() -> tuple[np.ndarray, np.ndarray | None]:
        return np.load(x_path), (np.load(y_path) if y_path.exists() else None)

    if x_path.exists():
        return read()
    with _build_lock(folder):
        if x_path.exists():  # built by another process while this one waited
            return read()
        x, y = build()
        folder.mkdir(parents=True, exist_ok=True)
        # Write-then-rename so a crash mid-write never leaves a truncated cache behind.
        tmp_x = folder / f"x.{os.getpid()}.tmp.npy"
        np.save(tmp_x, x)
        if y is not None:
            tmp_y = folder / f"y.{os.getpid()}.tmp.npy"
            np.save(tmp_y, y)
            os.replace(tmp_y, y_path)
        os.replace(tmp_x, x_path)
    return x, y


def unpack_archive(archive: Path) -> Path:
    """Unpack a .tar/.tar.gz dataset archive once into the cache and return the folder."""
    st = archive.stat()
    key = hashlib.sha256(f"{archive.resolve()}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()[:16]
    dest = cache_root() / "unpacked" / f"{archive.name.split('.')[0]}-{key}"
    done = dest / ".complete"
    if done.exists():
        return dest
    with _build_lock(dest):
        if done.exists():  # unpacked by another process while this one waited
            return dest
        tmp = dest.with_name(dest.name + f".tmp{os.getpid()}")
        tmp.mkdir(parents=True, exist_ok=True)
        try:
            with tarfile.open(archive) as tar:
                safe_extract(tar, tmp)
            (tmp / ".complete").write_text("ok\n")
            try:
                os.replace(tmp, dest)
            except OSError:
                if not done.exists():  # not another process winning the race: a real failure
                    raise
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise DatasetError(f"could not unpack {archive}: {exc}") from exc
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def safe_extract(tar: tarfile.TarFile, dest: Path) -> None:
    """Extract refusing absolute paths, paths or links leaving `dest`, and device files."""
    if hasattr(tarfile, "data_filter"):  # Python >= 3.10.12 / 3.11.4
        tar.extractall(dest, filter="data")
        return
    root = dest.resolve()
    for member in tar.getmembers():
        target = (root / member.name).resolve()
        if not target.is_relative_to(root) or not (member.isfile() or member.isdir() or member.issym() or member.islnk()):
            raise tarfile.TarError(f"unsafe member {member.name!r}")
        if member.issym() or member.islnk():
            link = (target.parent / member.linkname) if member.issym() else (root / member.linkname)
            if not link.resolve().is_relative_to(root):
                raise tarfile.TarError(f"link {member.name!r} points outside the archive")
    tar.extractall(dest)


def resolve_root(root: str | Path | None, name: str) -> Path:
    if root is None:
        raise DatasetError(f"{name}: no data root given (set data.root / --data-root). {DATASETS.meta(name)['info'].how_to_get}")
    path = Path(root).expanduser()
    if path.is_file() and (path.name.endswith((".tar", ".tar.gz", ".tgz"))):
        return unpack_archive(path)
    if not path.exists():
        raise DatasetError(f"{name}: data root {path} does not exist. {DATASETS.meta(name)['info'].how_to_get}")
    return path


def list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def scan_class_folders(split_dir: Path, classes: Sequence[str] | None, name: str) -> tuple[list[Path], list[int], tuple[str, ...]]:
    """ImageFolder scan: `split_dir/<class>/<file>`; classes in the given official order, else sorted.

    Files are sorted by name inside each class, so the decoded array order is reproducible.
    """
    found = sorted(d.name for d in split_dir.iterdir() if d.is_dir())
    if not found:
        raise DatasetError(f"{name}: {split_dir} has no class folders (expected {split_dir}/<class>/<image>)")
    if classes:
        if sorted(classes) != found:
            missing = sorted(set(classes) - set(found))
            extra = sorted(set(found) - set(classes))
            raise DatasetError(
                f"{name}: class folders in {split_dir} do not match the {len(classes)} {name} classes "
                f"(missing: {missing[:5]}, unexpected: {extra[:5]})"
            )
        order = tuple(classes)
    else:
        order = tuple(found)
    paths, labels, empty = [], [], []
    for label, cls in enumerate(order):
        files = list_images(split_dir / cls)
        paths += files
        labels += [label] * len(files)
        if not files:
            empty.append(cls)
    if empty and paths:  # a class the model never sees (here) or is never scored on: worth a word, not a stop
        warnings.warn(f"{name}: {len(empty)} class folder(s) in {split_dir} hold no images ({', '.join(empty[:5])}"
                      f"{', ...' if len(empty) > 5 else ''}); those classes get no {split_dir.name} samples", stacklevel=2)
    if not paths:
        raise DatasetError(f"{name}: no images ({', '.join(IMAGE_EXTENSIONS[:3])}, ...) under {split_dir}")
    return paths, labels, order


def decode_folder_split(split_dir: Path, info: DatasetInfo, split: str) -> ArrayImageDataset:
    """An ImageFolder split decoded to arrays (cached)."""
    paths, labels, _ = scan_class_folders(split_dir, info.classes or None, info.name)
    x, y = cached_arrays(
        {"name": info.name, "split": split, "kind": "imagefolder", "size": info.image_size, "v": 1},
        paths,
        lambda: (decode_files(paths, info.image_size, info.channels), np.asarray(labels, dtype=np.int64)),
    )
    return ArrayImageDataset(x, y, info, split)


def check_split(info: DatasetInfo, split: str) -> None:
    if split not in info.splits:
        raise DatasetError(f"{info.name}: no split {split!r}; splits: {', '.join(info.splits)}")
