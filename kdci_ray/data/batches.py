"""Batches on the training device: uint8 in, normalised float out, augmentation done batched there.

Keeping images as uint8 until the last moment makes host->device copies 4x smaller; with in-memory
datasets the whole split is copied to the device once and batches are index gathers, so an epoch has
no per-step host work and no host sync.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import torch
import torch.nn.functional as F

from .base import ArrayImageDataset, ImageDataset


class Normalize(torch.nn.Module):
    """uint8 (or [0,1] float) NCHW -> (x/255 - mean) / std, on whatever device the input lives."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.uint8:
            x = x.float().div_(255.0)
        return (x - self.mean.to(x.device)) / self.std.to(x.device)


def random_crop_flip(
    x: torch.Tensor, padding: int = 4, flip: bool = True, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Per-sample pad-and-random-crop (zero padding) and horizontal flip of an NCHW batch, batched."""
    return apply_crop_flip(x, padding, *draw_crop_flip(x.shape[0], padding, flip, generator, x.device))


def draw_crop_flip(
    n: int, padding: int, flip: bool, generator: torch.Generator | None, device: torch.device | str
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """The random numbers of `random_crop_flip` for `n` images: (row offsets, column offsets, flip mask),
    None where that part is off. Kept apart so that a compiled step can take them as device tensors
    (a generator argument breaks a graph) while drawing exactly what the eager step draws."""
    dy = dx = mask = None
    if padding > 0:
        dy = torch.randint(0, 2 * padding + 1, (n,), device=device, generator=generator)
        dx = torch.randint(0, 2 * padding + 1, (n,), device=device, generator=generator)
    if flip:
        mask = torch.rand(n, device=device, generator=generator) < 0.5
    return dy, dx, mask


def apply_crop_flip(x: torch.Tensor, padding: int, dy: torch.Tensor | None, dx: torch.Tensor | None, mask: torch.Tensor | None) -> torch.Tensor:
    n, c, h, w = x.shape
    if dy is not None:
        padded = F.pad(x, (padding, padding, padding, padding))
        rows = (dy[:, None] + torch.arange(h, device=x.device)[None]).view(n, 1, h, 1).expand(n, c, h, w + 2 * padding)
        padded = padded.gather(2, rows)
        cols = (dx[:, None] + torch.arange(w, device=x.device)[None]).view(n, 1, 1, w).expand(n, c, h, w)
        x = padded.gather(3, cols)
    if mask is not None:
        x = torch.where(mask.view(n, 1, 1, 1), x.flip(3), x)
    return x


class DeviceBatches:
    """Iterate `(uint8 NCHW images, int64 labels)` batches of a dataset on `device`.

    In-memory datasets are copied to the device once (at construction); file datasets stream through a
    DataLoader with worker processes and pinned memory.
    """

    def __init__(
        self,
        dataset: ImageDataset,
        batch_size: int,
        device: torch.device | str = "cpu",
        shuffle: bool = False,
        drop_last: bool = False,
        seed: int = 0,
        num_workers: int = 4,
        rank: int = 0,
        world_size: int = 1,
    ):
        self.dataset, self.batch_size, self.device = dataset, batch_size, torch.device(device)
        self.shuffle, self.drop_last = shuffle, drop_last
        self.generator = torch.Generator(device="cpu").manual_seed(seed)
        self.seed, self.epoch = seed, 0
        self.num_workers = num_workers
        # Data parallel: rank r reads every world_size-th item of the shared order (the same permutation
        # on every rank, from the same seed), cut to an equal share so all ranks take the same steps.
        self.rank, self.world_size = rank, world_size
        self._images = self._labels = None
        if isinstance(dataset, ArrayImageDataset):
            self._images = torch.from_numpy(dataset.images).to(self.device).permute(0, 3, 1, 2)
            labels = dataset.labels if dataset.labels is not None else [-1] * len(dataset)
            self._labels = torch.as_tensor(labels, dtype=torch.int64).to(self.device)

    def _share(self) -> int:
        return len(self.dataset) // self.world_size if self.world_size > 1 else len(self.dataset)

    def __len__(self) -> int:
        n = self._share()
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self.epoch += 1
        if self._images is None:
            yield from self._iter_files()
            return
        n = len(self.dataset)
        order = torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)
        if self.world_size > 1:
            order = order[self.rank : self._share() * self.world_size : self.world_size]
        order = order.to(self.device)
        for b in range(len(self)):
            idx = order[b * self.batch_size : (b + 1) * self.batch_size]
            yield self._images.index_select(0, idx), self._labels.index_select(0, idx)

    def _iter_files(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        sampler = None
        if self.world_size > 1:
            sampler = torch.utils.data.DistributedSampler(
                self.dataset, self.world_size, self.rank, shuffle=self.shuffle, seed=self.seed, drop_last=True
            )
            sampler.set_epoch(self.epoch)
        loader = torch.utils.data.DataLoader(
            self.dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            shuffle=self.shuffle and sampler is None,
            drop_last=self.drop_last,
            num_workers=self.num_workers,
            pin_memory=self.device.type == "cuda",
            generator=self.generator,
            persistent_workers=False,
        )
        for images, labels in loader:
            yield images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)
