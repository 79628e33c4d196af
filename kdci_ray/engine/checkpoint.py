"""Checkpoints of a distillation run: what they hold, how they are written and read back, and when.

- `save_atomic` / `load_checkpoint` / `load_rank_part`: write-then-rename, read with weights_only, each
  refusal one line naming the file and the fix; a data-parallel rank's own part beside rank 0's file;
- `check_resume`, `config_diff`: whether a checkpoint belongs to this config, teacher and rank count;
- `rng_state` / `set_rng_state`: the global RNGs in weights_only-loadable types (exact resume);
- `CheckpointPolicy`: which epochs write one (every N, or "auto": as often as keeps writing at <= 1 % of
  the training time), always the last, and the one a SIGTERM interrupts (`stop_on_sigterm`).
"""

from __future__ import annotations

import contextlib
import errno
import pickle
import random
import signal
import threading
from pathlib import Path

import numpy as np
import torch

from ..config import DistillConfig

CHECKPOINT_FORMAT = 1
# Config fields a resumption may change: where things are and how they are computed, not what is
# trained (device and precision can still change the numerics, the way any hardware change does).
RESUME_FREE = {
    "device", "precision", "channels_last", "compile", "resume", "eval_every", "checkpoint_every", "output", "data.root", "data.download",
    "synthesis.export_pool", "synthesis.precision", "synthesis.init_pool",  # a resumed run's pool comes from its checkpoint
    "teacher.weights",  # where the teacher is; what it is is checked by its content hash (teacher_id)
    "kdci.dictionary",  # a resumed run's dictionary comes from its checkpoint
}

RANK_PART = "checkpoint-rank{}.pt"  # a data-parallel rank's own part of a checkpoint (its source and RNG)


def config_diff(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """What differs between a checkpoint's config and this one, beyond the fields a resumption may change."""
    diffs = []
    for key in sorted(set(saved) | set(current)):
        if f"{prefix}{key}" in RESUME_FREE:
            continue
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += config_diff(a, b, f"{prefix}{key}.")
        elif a != b:
            diffs.append(f"{prefix}{key}: checkpoint has {a!r}, config has {b!r}")
    return diffs


def rng_state() -> dict:
    """Global RNG states in types `torch.load(weights_only=True)` accepts (tensors, lists, ints)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
        "python": list(random.getstate()),
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


def save_atomic(obj, path: Path) -> None:
    """Write-then-rename: a crash or a full disk mid-write leaves the previous checkpoint intact, and no
    partial file behind."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:  # through Python's file: a write error keeps its errno (torch's own writer drops it)
            torch.save(obj, f)
    except (OSError, RuntimeError) as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            raise OSError(errno.ENOSPC, f"no space left on the device writing {path}: the previous checkpoint is kept; "
                                        "free some space and run the same command again to resume") from None
        raise
    tmp.replace(path)


CHECKPOINT_FIX = "use another run name, set output.overwrite=true to start over, or delete it"


def load_checkpoint(path: Path, cfg: DistillConfig) -> dict:
    """Read a checkpoint (weights_only: no code runs) and check it belongs to this config."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as exc:
        reason = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"{path} cannot be read as a checkpoint (truncated, not a checkpoint, or holding pickled code: "
                         f"{reason}); {CHECKPOINT_FIX}") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a kdci_ray distillation checkpoint (format {CHECKPOINT_FORMAT}); {CHECKPOINT_FIX}")
    locate_journals(state, path.parent)
    diffs = config_diff(state["config"], cfg.model_dump(mode="json"))
    if diffs:
        raise ValueError(
            f"{path} was written by a different config ({'; '.join(diffs)}); "
            "use another name, set output.overwrite=true to start over, or resume=false"
        )
    return state


def locate_journals(state, folder: Path) -> None:
    """Tell every pool state kept in segment files (`ImagePool.journal_state`) the folder they are in: the
    checkpoint's own (a launcher may have copied the checkpoint elsewhere since it was written)."""
    if isinstance(state, dict):
        if "journal" in state and "written" in state:
            state["folder"] = str(folder)
        for value in state.values():
            locate_journals(value, folder)
    elif isinstance(state, list):
        for value in state:
            locate_journals(value, folder)


def load_rank_part(checkpoint: Path, rank: int, world: int, epoch: int) -> dict:
    """Rank `rank`'s part of a data-parallel checkpoint (next to `checkpoint`), checked to be of the same
    epoch and rank count."""
    path = checkpoint.with_name(RANK_PART.format(rank))
    if not path.is_file():
        raise ValueError(f"{path} is missing: {checkpoint} was not written by {world} data-parallel workers (rank {rank} "
                         f"has no part of it); resume with the worker count that wrote it, or {CHECKPOINT_FIX}")
    try:
        part = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as exc:
        raise ValueError(f"{path} cannot be read as a checkpoint part ({str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__}); "
                         f"{CHECKPOINT_FIX}") from None
    if not isinstance(part, dict) or part.get("format") != CHECKPOINT_FORMAT or part.get("rank") != rank:
        raise ValueError(f"{path} is not rank {rank}'s part of a kdci_ray checkpoint; {CHECKPOINT_FIX}")
    locate_journals(part, path.parent)
    if part.get("world_size") != world:
        raise ValueError(f"{path} was written by {part.get('world_size')} data-parallel worker(s), this run has {world}: "
                         f"resume with {part.get('world_size')}, or use another name")
    if part.get("epoch") != epoch:
        raise ValueError(f"{path} is of epoch {part.get('epoch')}, {checkpoint} of epoch {epoch}: the checkpoint is incomplete; "
                         f"{CHECKPOINT_FIX}")
    return part


def check_resume(state: dict, cfg: DistillConfig, teacher_id: str, world: int) -> None:
    """A checkpoint (already matched to the config by `load_checkpoint`) this run can continue: the same
    teacher weights and the same number of data-parallel ranks."""
    if state["teacher_id"] != teacher_id:
        raise ValueError(
            f"the teacher weights at {cfg.teacher.weights} changed since this run's checkpoint "
            f"(content hash {state['teacher_id']} -> {teacher_id}); use another name or set output.overwrite=true"
        )
    saved_world = state.get("world_size", 1)
    if saved_world != world:
        raise ValueError(
            f"this checkpoint was written by {saved_world} data-parallel worker(s), this run has {world}: "
            f"resume with {saved_world} (each worker continues its own substitution data), or use another name"
        )


# The share of training time "auto" lets its periodic writes take: half the 1 % budget, the rest is for the
# first write (which measures the cost) and the last.
AUTO_COST = 0.005


class CheckpointPolicy:
    """Which epochs write a checkpoint. `every` N: epochs N, 2N, ...; "auto": the first epoch (to measure a
    write), then whenever the training time since the last write reaches 200x that write's duration (so
    writing stays <= 1 % of the run, the first and last writes included). The last epoch, a requested stop
    and a SIGTERM always write."""

    def __init__(self, every: int | str):
        self.every = every
        self.last_write = None  # seconds the last write took
        self.trained = 0.0  # training seconds since the last write
        self.writes, self.write_seconds = 0, 0.0
        self.training_seconds = 0.0  # the whole run's epochs (synthesis, dictionary, KD, evaluation), writes left out

    def due(self, epoch: int, forced: bool) -> bool:
        if forced:
            return True
        if self.every != "auto":
            return epoch % int(self.every) == 0
        return self.last_write is None or self.trained * AUTO_COST >= self.last_write

    def trained_for(self, seconds: float) -> None:
        self.trained += seconds
        self.training_seconds += seconds

    def wrote(self, seconds: float) -> None:
        self.last_write, self.trained = seconds, 0.0
        self.writes += 1
        self.write_seconds += seconds


@contextlib.contextmanager
def stop_on_sigterm(enabled: bool = True):
    """A flag SIGTERM sets while the block runs (the loop then writes its checkpoint at the end of the epoch
    and stops), where a handler can be installed (the main thread); elsewhere a flag that stays unset."""
    flag = threading.Event()
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield flag
        return
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: flag.set())
    try:
        yield flag
    finally:
        signal.signal(signal.SIGTERM, previous)
