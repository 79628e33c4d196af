"""An unlabelled-pool view of any dataset: the "wild" / out-of-domain data of DFND and MosaicKD.

Labels are dropped and images are resized (and converted between gray and RGB) to what the teacher
expects. Batches are produced lazily, so a file-backed pool larger than memory streams.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

import torch
import torch.nn.functional as F

from .base import ImageDataset


def resize_uint8(images: torch.Tensor, size: int, channels: int) -> torch.Tensor:
    """uint8 NCHW -> uint8 NCHW at `size` x `size` with `channels` channels (antialiased bilinear)."""
    if images.shape[1] != channels:
        if channels == 1:  # ITU-R 601 luma, as Pillow's "L"
            weights = torch.tensor([0.299, 0.587, 0.114], device=images.device).view(1, 3, 1, 1)
            images = (images.float() * weights).sum(1, keepdim=True).round().clamp(0, 255).to(torch.uint8)
        else:
            images = images.expand(-1, channels, -1, -1)
    if images.shape[-1] == size and images.shape[-2] == size:
        return images.contiguous()
    out = F.interpolate(images.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return out.round().clamp(0, 255).to(torch.uint8)


class UnlabeledPool(torch.utils.data.Dataset):
    def __init__(self, dataset: ImageDataset, image_size: int | None = None, channels: int | None = None, workers: int | None = None):
        self.dataset = dataset
        self.image_size = image_size or dataset.info.image_size
        self.channels = channels or dataset.info.channels
        # File-backed datasets decode in threads (Pillow releases the GIL while decoding).
        self.workers = max(1, min(8, os.cpu_count() or 1)) if workers is None else max(1, workers)

    def _decode(self, rows) -> torch.Tensor:
        rows = [int(i) for i in rows]
        if self.workers == 1 or len(rows) < 2:
            return torch.stack([self.dataset[i][0] for i in rows])
        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            return torch.stack(list(pool.map(lambda i: self.dataset[i][0], rows)))

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> torch.Tensor:
        image, _ = self.dataset[i]
        return resize_uint8(image[None], self.image_size, self.channels)[0]

    def iter_batches(self, batch_size: int, start: int = 0, stop: int | None = None) -> Iterator[torch.Tensor]:
        """uint8 NCHW batches of rows [start, stop): a shard of the pool can be streamed on its own."""
        stop = len(self) if stop is None else min(stop, len(self))
        images = getattr(self.dataset, "images", None)
        for lo in range(start, stop, batch_size):
            hi = min(lo + batch_size, stop)
            if images is not None:  # in-memory arrays: slice, no per-image Python work
                batch = torch.from_numpy(images[lo:hi]).permute(0, 3, 1, 2)
            else:
                batch = self._decode(range(lo, hi))
            yield resize_uint8(batch, self.image_size, self.channels)

    def gather(self, indices) -> torch.Tensor:
        """uint8 NCHW images at `indices` (in that order), e.g. the rows a selection kept."""
        indices = torch.as_tensor(indices, dtype=torch.int64).cpu()
        if len(indices) and (int(indices.min()) < 0 or int(indices.max()) >= len(self)):
            raise IndexError(f"pool rows out of range [0, {len(self)}): {int(indices.min())}..{int(indices.max())}")
        if len(indices) == 0:
            return torch.empty(0, self.channels, self.image_size, self.image_size, dtype=torch.uint8)
        images = getattr(self.dataset, "images", None)
        if images is not None:
            batch = torch.from_numpy(images[indices.numpy()]).permute(0, 3, 1, 2)
        else:
            batch = self._decode(indices.tolist())
        return resize_uint8(batch, self.image_size, self.channels)
