"""Device, precision and memory-format choices, made once per run instead of sprinkled `.cuda()` calls."""

from __future__ import annotations

import contextlib
import os
import random
from dataclasses import dataclass

import numpy as np
import torch

_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    amp_dtype: torch.dtype | None  # None: full fp32
    channels_last: bool

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def prepare(self, module: torch.nn.Module) -> torch.nn.Module:
        module = module.to(self.device)
        return module.to(memory_format=torch.channels_last) if self.channels_last else module

    def grad_scaler(self) -> torch.amp.GradScaler:
        """fp16 needs loss scaling (its small gradients underflow); a disabled scaler is a no-op otherwise."""
        return torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)

    def describe(self) -> str:
        amp = "fp32" if self.amp_dtype is None else str(self.amp_dtype).removeprefix("torch.")
        return f"{self.device} {amp}{' channels-last' if self.channels_last else ''}"


def resolve_runtime(device: str = "auto", precision: str = "auto", channels_last: str = "auto") -> Runtime:
    """'auto' means: CUDA when present with bf16 autocast and channels-last; plain fp32 on the CPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for but CUDA is not available here; use device: auto or cpu")
    if precision == "auto":
        precision = "bf16" if dev.type == "cuda" else "fp32"
    if precision not in _DTYPES:
        raise ValueError(f"precision must be one of auto, {', '.join(_DTYPES)}; got {precision!r}")
    cl = dev.type == "cuda" if channels_last == "auto" else channels_last == "on"
    if dev.type == "cuda":
        # Static shapes all run long: let cuDNN pick the fastest convolution algorithms once, and run fp32
        # matmuls (the KDCI attention, fp32 layers under autocast) on tensor cores as TF32.
        torch.backends.cudnn.benchmark = True
        torch.set_float32_matmul_precision("high")
    return Runtime(dev, _DTYPES[precision], cl)


def device_memory_bytes(device: torch.device) -> int:
    """Total memory of `device`: the GPU's own, or the host's RAM for the CPU (0 where unknown)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not a POSIX host
        return 0


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
