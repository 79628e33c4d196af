"""The wild / out-of-domain image pool of the sampling methods (DFND, MosaicKD).

Any registered dataset, labels unused, resized to the teacher's input. A pool that fits (`in_memory`)
is decoded once into one uint8 tensor on the training device; a larger one streams: ordered passes
read it batch by batch, random batches decode only the rows they draw.
"""

from __future__ import annotations

import logging
import time
from typing import Iterator

import torch

from ..config import WildDataConfig
from ..data import UnlabeledPool, load_dataset

log = logging.getLogger(__name__)


class WildImages:
    def __init__(self, cfg: WildDataConfig, image_shape: tuple[int, int, int]):
        channels, size, _ = image_shape
        self.cfg = cfg
        self.pool = UnlabeledPool(load_dataset(cfg.dataset, cfg.root, cfg.split, limit=cfg.limit), size, channels, cfg.workers)
        self.images: torch.Tensor | None = None  # the whole pool on the device, when held in memory
        self.device = torch.device("cpu")
        self.name = f"{cfg.dataset}/{cfg.split}"

    def __len__(self) -> int:
        return len(self.pool)

    @property
    def in_memory(self) -> bool:
        return self.cfg.in_memory == "on" or (self.cfg.in_memory == "auto" and len(self) <= self.cfg.max_in_memory)

    def to(self, device: torch.device, hold: bool = True) -> "WildImages":
        """Use `device`; with `hold`, also load the pool there when `in_memory` allows (else it streams)."""
        self.device = torch.device(device)
        if hold and self.in_memory and (self.images is None or self.images.device != self.device):
            t0 = time.perf_counter()
            c, s = self.pool.channels, self.pool.image_size
            self.images = torch.empty(len(self), c, s, s, dtype=torch.uint8, device=self.device)
            for start, batch in self._stream(4096):
                self.images[start : start + len(batch)] = batch.to(self.device)
            log.info("wild pool %s: %d images at %dx%d (%.2f GB) on %s in %.1f s", self.name, len(self), s, s,
                     self.images.numel() / 1e9, self.device, time.perf_counter() - t0)
        elif not hold:
            self.images = None
        return self

    def _stream(self, batch_size: int, start: int = 0, stop: int | None = None) -> Iterator[tuple[int, torch.Tensor]]:
        row = start
        for batch in self.pool.iter_batches(batch_size, start, stop):
            yield row, batch
            row += len(batch)

    def batches(self, batch_size: int = 1024, start: int = 0, stop: int | None = None) -> Iterator[tuple[int, torch.Tensor]]:
        """(first row, uint8 batch on the device) over rows [start, stop), in order: a shard of the pool."""
        stop = len(self) if stop is None else min(stop, len(self))
        if self.images is not None:
            for lo in range(start, stop, batch_size):
                yield lo, self.images[lo : min(lo + batch_size, stop)]
        else:
            for lo, batch in self._stream(batch_size, start, stop):
                yield lo, batch.to(self.device, non_blocking=True)

    def gather(self, rows: torch.Tensor) -> torch.Tensor:
        """uint8 images at `rows` (in that order) on the device."""
        if self.images is not None:
            return self.images.index_select(0, rows.to(self.device))
        return self.pool.gather(rows.cpu()).to(self.device)

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """n uniformly drawn images (with replacement), from a generator on the device."""
        rows = torch.randint(len(self), (n,), device=generator.device, generator=generator)
        return self.gather(rows)  # streamed pools sync here to read the rows from storage

    def images_only(self, batch_size: int = 1024) -> Iterator[torch.Tensor]:
        for _, batch in self.batches(batch_size):
            yield batch
