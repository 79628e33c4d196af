"""Data parallelism as the core loops see it: `torch.distributed`, when a launcher (Ray Train's
`TorchTrainer`, torchrun) has initialised a process group; a single process (rank 0 of 1) otherwise.

Nothing here knows Ray. The loops ask who they are (`rank`, `world_size`, `is_primary`) and use the
few collectives below, each a no-op in a single process.
"""

from __future__ import annotations

import inspect
from typing import Any, Iterable

import torch
import torch.distributed as dist


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_primary() -> bool:
    """Rank 0 writes files and evaluates; the others only train."""
    return rank() == 0


def rank_seed(seed: int) -> int:
    """A seed per rank (rank 0 keeps `seed`, so one process is the single-process run exactly): ranks
    synthesize and augment differently instead of repeating each other's work."""
    return seed + 1000 * rank()


def wrap_ddp(module: torch.nn.Module, device: torch.device, sync_buffers: bool = True) -> torch.nn.Module:
    """`module` in DistributedDataParallel on `device` (its GPU, or the current one for a bare "cuda").
    `sync_buffers=False`: no broadcast of rank 0's buffers (BatchNorm statistics) before every forward;
    each rank keeps its own, which changes nothing on rank 0 (it only ever sends them)."""
    device_ids = None
    if device.type == "cuda":
        device_ids = [device.index if device.index is not None else torch.cuda.current_device()]
    options = {}
    if not sync_buffers:  # newer torch names it forward_sync_buffers (still syncing once at init); older ones broadcast_buffers
        known = inspect.signature(torch.nn.parallel.DistributedDataParallel.__init__).parameters
        options = {"forward_sync_buffers": False} if "forward_sync_buffers" in known else {"broadcast_buffers": False}
    return torch.nn.parallel.DistributedDataParallel(module, device_ids=device_ids, **options)


def to_cpu(obj: Any) -> Any:
    """Tensors (also nested in dicts, lists, tuples) moved to the CPU: object collectives pickle their
    input, and a CUDA tensor in a pickle would land on the receiver's GPU of the same index."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank."""
    if world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, to_cpu(obj))
    return out


def gather_to_primary(obj: Any) -> list[Any] | None:
    """Every rank's `obj`, in rank order, on rank 0 only (None elsewhere): for large states (synthesizer
    pools, teacher outputs) that only rank 0 needs."""
    if world_size() == 1:
        return [obj]
    out: list[Any] | None = [None] * world_size() if rank() == 0 else None
    dist.gather_object(to_cpu(obj), out, dst=0)
    return out


def mean_over_ranks(values: dict[str, float]) -> dict[str, float]:
    """Per-key mean of small scalar dicts over the ranks that have the key (keys may differ by rank)."""
    if world_size() == 1:
        return values
    every = gather_objects(values)
    keys = dict.fromkeys(k for d in every for k in d)
    return {k: sum(d[k] for d in every if k in d) / sum(k in d for d in every) for k in keys}


def sum_over_ranks(value: int) -> int:
    return value if world_size() == 1 else sum(gather_objects(value))


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """`obj` of rank `src` on every rank."""
    if world_size() == 1:
        return obj
    box = [to_cpu(obj) if rank() == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """The sum over ranks of a tensor (one collective; used once per epoch for the metrics)."""
    if world_size() == 1:
        return values
    values = values.clone()
    dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def average_gradients(parameters: Iterable[torch.nn.Parameter]) -> None:
    """Average the gradients of parameters trained outside the DDP-wrapped module (a method's own
    student-side parameters, such as DFND's noise-adaptation matrix), so every rank steps the same way."""
    if world_size() == 1:
        return
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()
