"""A fixed substitution set held in memory (uint8 images), served as KD batches on the device.

This is the simplest substitution source the distillation loop accepts: a pool that does not change
during training (a sampled or selected set, or images exported by a synthesizer). Every epoch's order
comes from a generator seeded by (seed, epoch), so a resumed run sees the same batches as an
uninterrupted one without storing any RNG state.
"""

from __future__ import annotations

import hashlib
from typing import Iterator

import numpy as np
import torch


def epoch_generator(seed: int, epoch: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator that depends only on (seed, epoch): the basis of exact resume."""
    return torch.Generator(device=device).manual_seed((seed * 1_000_003 + epoch) % (2**63))


class SubstitutionSet:
    def __init__(self, images, seed: int = 0, name: str = "substitution"):
        if isinstance(images, np.ndarray):
            if images.ndim == 4 and images.shape[-1] in (1, 3) and images.shape[1] not in (1, 3):
                images = images.transpose(0, 3, 1, 2)  # NHWC -> NCHW
            images = torch.from_numpy(np.ascontiguousarray(images))
        if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.ndim != 4:
            got = f"{getattr(images, 'dtype', type(images).__name__)} {tuple(getattr(images, 'shape', ()))}"
            raise ValueError(f"{name}: images must be uint8 NCHW (or NHWC numpy), got {got}")
        if len(images) == 0:
            raise ValueError(f"{name}: the substitution set is empty")
        self.images, self.seed, self.name = images, seed, name
        self._fingerprint = None
        # Every batch full (a compiled step has one shape): a ragged last batch is topped up from the start of
        # the epoch's order. Only sets smaller than two batches have one (larger ones drop it).
        self.full_batches = False

    def __len__(self) -> int:
        return len(self.images)

    HELD_OUT_SEED = 1_000_003

    @property
    def fixed_rows(self) -> int:
        """The rows a validation hold-out takes its share of."""
        return len(self.images) + len(getattr(self, "held_out_rows", ()))

    def hold_out(self, count: int) -> None:
        """Move `count` rows (a seeded draw) out of training, for data-free validation: no batch and no
        dictionary ever sees them."""
        self.held_out_rows = torch.empty(0, dtype=torch.int64)
        self._held_out = self.images[:0]
        if count < 1:
            return
        if count >= len(self.images):
            raise ValueError(f"{self.name}: cannot hold out {count} of {len(self.images)} images for validation; lower validation.images")
        order = torch.randperm(len(self.images), generator=torch.Generator().manual_seed(self.seed + self.HELD_OUT_SEED))
        self.held_out_rows = order[:count].sort().values  # row ids in the set as given
        keep = torch.ones(len(self.images), dtype=torch.bool)
        keep[self.held_out_rows] = False
        self._held_out = self.images[self.held_out_rows.to(self.images.device)]
        self.images = self.images[keep.to(self.images.device)]
        self._fingerprint = None

    def validation_images(self) -> torch.Tensor:
        return getattr(self, "_held_out", self.images[:0])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])

    def to(self, device: torch.device | str) -> "SubstitutionSet":
        self.images = self.images.to(device)
        if hasattr(self, "_held_out"):
            self._held_out = self._held_out.to(device)
        return self

    def _drop_last(self, batch_size: int) -> bool:
        # Dropping a ragged last batch keeps BN statistics sane, unless it would drop most of the data.
        return len(self) >= 2 * batch_size

    def steps_per_epoch(self, batch_size: int) -> int:
        n = len(self)
        if self._drop_last(batch_size) or (n % batch_size == 1 and n > 1):
            return n // batch_size  # also never a 1-image last batch: BatchNorm cannot train on it
        return -(-n // batch_size)

    # The distillation loop's source interface -------------------------------------------------
    def begin_epoch(self, epoch: int, distiller) -> None:
        """Nothing to synthesize: the set is fixed."""

    def batches(self, epoch: int, batch_size: int) -> Iterator[torch.Tensor]:
        device = self.images.device
        order = torch.randperm(len(self), generator=epoch_generator(self.seed, epoch)).to(device)
        if self.full_batches and len(order) % batch_size:
            order = order.repeat(-(-batch_size // len(order)) + 1)  # wraps around, as often as a tiny set needs
        for step in range(self.steps_per_epoch(batch_size)):
            yield self.images.index_select(0, order[step * batch_size : (step + 1) * batch_size])

    def dictionary_images(self, batch_size: int = 1024) -> Iterator[torch.Tensor]:
        """All images once, in a fixed order (the dictionary is built over *all* substitution data)."""
        for start in range(0, len(self), batch_size):
            yield self.images[start : start + batch_size]

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = hashlib.sha256(self.images.cpu().contiguous().numpy().tobytes()).hexdigest()[:16]
        return self._fingerprint

    def state_dict(self) -> dict:
        return {"name": self.name, "size": len(self), "seed": self.seed, "fingerprint": self.fingerprint(),
                "held_out": len(getattr(self, "held_out_rows", ()))}

    def load_state_dict(self, state: dict) -> None:
        """Nothing to restore, but a run must resume on the same data in the same order."""
        mine = self.state_dict()
        if state != mine:
            diff = ", ".join(f"{k}: checkpoint {state.get(k)!r}, now {v!r}" for k, v in mine.items() if state.get(k) != v)
            raise ValueError(f"the substitution set differs from the one this run started with ({diff}); use another run name")
