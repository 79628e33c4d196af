"""The contract every DFKD method implements, in the spirit of the public `synthesize()` / `sample()` split.

A method subclasses `Synthesizer` and writes two things:
  - `synthesize(rng)`: one synthesis call (the method's optimisation); each inner step weighs its named
    loss terms with `self.weighted(terms)` (weights are the config fields of the same names) and
    records them with `self.record(terms, loss)`; the call adds its images with `self.add_to_pool(...)`;
  - optionally `sample(batch_size, generator)`: a KD batch (default: uniform draws from the pool;
    DAFL draws fresh generator samples instead), `setup()` to build generators and optimisers once the
    teacher and student are known, and `extra_state()` / `load_extra_state()` for what a checkpoint
    must carry (generator, optimisers, memory banks).

The base class turns that into the distillation loop's substitution source (see
`kdci_ray.engine.distill.SubstitutionSource`): the first call of an epoch runs in `begin_epoch` (so the
KDCI dictionary is built from a fresh pool), the rest interleave with KD steps inside `batches`.
Every call draws its randomness from generators seeded by (seed, call index), so a fixed seed gives the
same images and a resumed run continues exactly. The method gets the *raw* student being distilled
(never the teacher, never KDCI's compensated logits) for its adversarial terms.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pyarrow.parquet as pq
import torch
from torch import nn

from ..config import SynthesisConfig
from ..data import epoch_generator
from .pool import ImagePool, read_pool_parquet

log = logging.getLogger(__name__)


@dataclass
class CallRandom:
    """The random sources of one synthesis call: `device` for tensors on the training device, `cpu` for
    per-batch decisions that would otherwise need a device->host sync."""

    device: torch.Generator
    cpu: torch.Generator


class BestIterate:
    """Keeps the iterate with the lowest loss seen so far (the public code's `best_inputs` rule), on the
    device and without a host sync: each update is a `torch.where` on a 0-d comparison. `reset()` reuses
    the buffers of an earlier call (a compiled inner step keeps one graph: no first-step branch)."""

    def __init__(self):
        self.loss: torch.Tensor | None = None
        self.values: tuple[torch.Tensor, ...] = ()

    def reset(self, *like: torch.Tensor) -> "BestIterate":
        """Start over with buffers shaped like `like` (kept when they already are)."""
        if self.loss is None or [v.shape for v in self.values] != [v.shape for v in like]:
            self.loss = torch.zeros((), device=like[0].device)
            self.values = tuple(torch.zeros_like(v, memory_format=torch.contiguous_format) for v in like)
        self.loss.fill_(float("nan"))  # NaN: the first iterate is taken, whatever its loss
        return self

    def update(self, loss: torch.Tensor, *values: torch.Tensor) -> None:
        loss = loss.detach().float()
        values = tuple(v.detach() for v in values)
        if self.loss is None:
            self.reset(*values)
        with torch.no_grad():
            # A NaN loss is never "best"; a NaN first iterate is replaced by any finite one.
            better = (loss < self.loss) | self.loss.isnan()
            better = better & ~(loss.isnan() & ~self.loss.isnan())
            for new, old in zip(values, self.values):
                torch.where(better, new, old, out=old)  # elementwise, in place: one kernel
            torch.where(better, loss, self.loss, out=self.loss)


@contextlib.contextmanager
def synthesis_mode(*models: nn.Module):
    """Eval mode and no parameter gradients for the teacher/student during synthesis (gradients still
    flow *through* them to the images); both restored afterwards."""
    saved = [(m, m.training, [(p, p.requires_grad) for p in m.parameters()]) for m in models]
    try:
        for m in models:
            m.eval().requires_grad_(False)
        yield
    finally:
        for m, training, flags in saved:
            m.train(training)
            for p, flag in flags:
                p.requires_grad_(flag)


class Synthesizer:
    method: str = ""  # set by @register_method

    def __init__(self, cfg: SynthesisConfig, image_shape: tuple[int, int, int], num_classes: int, seed: int = 0):
        self.cfg = cfg
        self.image_shape, self.num_classes, self.seed = tuple(image_shape), int(num_classes), int(seed)
        self.pool = ImagePool(cfg.pool_size, self.image_shape, self.num_classes)
        self.calls = 0
        self.teacher: nn.Module | None = None
        self.student: nn.Module | None = None
        self.device = torch.device("cpu")
        self.channels_last = False
        self.autocast = contextlib.nullcontext
        # Per inner step of the last call (diagnostics, tests): the total loss and the named terms.
        self.loss_trace: list[torch.Tensor] = []
        self.term_trace: list[dict[str, torch.Tensor]] = []
        self._call_sums: dict[str, torch.Tensor] = {}
        self._epoch_sums: dict[str, torch.Tensor] = {}
        self._epoch_counts: dict[str, int] = {}
        # compile: each inner step one fullgraph graph (set by bind from the run's `compile`); what that needs
        # from a method: state in buffers kept across calls, randomness drawn before the loop as tensors.
        self.compiled = False
        self.compile_backend = "inductor"  # benchmarks/launches.py counts graph breaks with "eager"
        self._inner_steps: dict[str, object] = {}

    @property
    def name(self) -> str:
        return self.method

    def __len__(self) -> int:
        return len(self.pool)

    # -- binding to the teacher and the student ---------------------------------------------------
    def bind(self, teacher: nn.Module, student: nn.Module, normalize: nn.Module, runtime=None, epochs: int | None = None,
             compiled: bool = False) -> None:
        """Called by the distillation loop once the models exist (`runtime`: its device/precision;
        `epochs`: the run's length, for methods whose own schedules span the run; `compiled`: inner steps
        as compiled graphs)."""
        if student is None or student is teacher:
            raise ValueError(
                f"{self.method}: the student passed to the synthesizer is the teacher; adversarial terms would be "
                "identically zero. Pass the student being distilled."
            )
        self.teacher, self.student, self.normalize = teacher, student, normalize
        self.total_epochs = epochs
        self.compiled = compiled
        if runtime is not None:
            self.device, self.channels_last = runtime.device, runtime.channels_last
        else:
            self.device = next(teacher.parameters()).device
        # Synthesis has its own precision (fp32 by default, as the public runs): small BN-statistic
        # gradients on pixels would underflow in fp16, and DeepInv's long pixel optimisation is
        # sensitive to bf16 rounding.
        if self.cfg.precision == "bf16":
            device_type = self.device.type
            self.autocast = lambda: torch.autocast(device_type, dtype=torch.bfloat16)
        else:
            self.autocast = contextlib.nullcontext
        self.pool.to(self.device)
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(self.seed)  # generator / head init: a function of the seed, not of what ran before
            self.setup()

    @torch.no_grad()
    def import_parquet(self, path) -> int:
        """Add a Parquet pool's images (e.g. exported by an earlier run or a Ray generation job) to this
        pool; their teacher logits are recomputed with this teacher. Returns the number of rows."""
        data = read_pool_parquet(path)
        if tuple(data.meta["image_shape"]) != self.image_shape:
            raise ValueError(f"{path}: images are {tuple(data.meta['image_shape'])}, this run needs {self.image_shape}")
        for start in range(0, len(data.images), 1024):
            images = data.images[start : start + 1024].to(self.device)
            with self.autocast():
                logits = self.teacher(self.teacher_input(images))
            self.pool.add(images, logits.float(), 0)
        log.info("%s: %d images from %s in the pool", self.method, len(data.images), path)
        return len(data.images)

    def setup(self) -> None:
        """Build generators and optimisers (called once the device, teacher and student are known)."""

    def to_input(self, x: torch.Tensor) -> torch.Tensor:
        """An already-normalised batch in the memory format the networks run in."""
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def teacher_input(self, images01: torch.Tensor) -> torch.Tensor:
        return self.to_input(self.normalize(images01))

    # -- what a method implements ------------------------------------------------------------------
    def synthesize(self, rng: CallRandom) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def sample(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        """A KD batch (uint8, or float in [0, 1]) on the device."""
        return self.pool.sample(batch_size, generator)

    def dictionary_images(self, batch_size: int = 1024) -> Iterator[torch.Tensor]:
        """The substitution data the KDCI dictionary is built from: the whole current pool."""
        return self.pool.batches(batch_size)

    def dictionary_logits(self, batch_size: int = 1024) -> Iterator[torch.Tensor] | None:
        """The teacher's logits on `dictionary_images()`, stored with the pool rows when they were added:
        a logits dictionary is built from them without running the teacher over the pool again. None where
        a method's dictionary images are not its pool (they are then computed)."""
        _, logits, _ = self.pool.filled()
        return iter(logits.split(batch_size))

    def dictionary_size(self) -> int:
        """Images `dictionary_images()` yields now."""
        return len(self.pool)

    @property
    def growing(self) -> bool:
        """Whether later calls add images the dictionary would cover (a pool not yet full)."""
        return len(self.pool) < self.pool.capacity

    def min_dictionary_images(self) -> int:
        """Images available at the first dictionary build (checked against kdci.n before any work)."""
        initial = self._init_pool_rows() if self.cfg.init_pool is not None else 0
        return min(self.cfg.pool_size, initial + (self.cfg.warmup_calls + 1) * self.cfg.batch_size)

    def _init_pool_rows(self) -> int:
        """Rows of synthesis.init_pool from the Parquet footers (no image is read)."""
        path = Path(self.cfg.init_pool)
        files = sorted(path.glob("*.parquet")) if path.is_dir() else [path]
        if not files or not all(f.is_file() for f in files):
            raise FileNotFoundError(f"synthesis.init_pool = {path}: no Parquet pool there")
        return sum(pq.read_metadata(f).num_rows for f in files)

    # -- data-free validation -------------------------------------------------------------------
    HELD_OUT_SEED = 1_000_003  # added to the run's seed: held-out calls draw numbers no training call draws
    fixed_rows = None  # held-out images are made, not taken from training (DFND's are: a share of its selection)

    def hold_out(self, count: int) -> None:
        """Keep `count` images from held-out seeds for validation (made by `validation_images`)."""
        self.held_out = int(count)

    def validation_images(self) -> torch.Tensor:
        """`hold_out`'s images (uint8, on the device), made once by synthesis calls with a held-out seed from the
        synthesizer's current state, into a pool of their own; everything those calls change (generator and
        optimiser state, banks, counters, RNGs) is put back, so training goes on exactly as without them."""
        count = getattr(self, "held_out", 0)
        if count < 1:
            return torch.empty(0, *self.image_shape, dtype=torch.uint8, device=self.device)
        saved_extra = copy.deepcopy(self.extra_state())
        saved = (self.pool, self.seed, self.calls, self.loss_trace, self.term_trace, self._call_sums, self._epoch_sums, self._epoch_counts)
        self.pool = ImagePool(count, self.image_shape, self.num_classes, self.device)
        self.seed += self.HELD_OUT_SEED
        try:
            with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
                for _ in range(max(1, -(-count // max(1, self.cfg.batch_size))) * 4):
                    if self.pool.total_added >= count:
                        break
                    self.step()
            images = self.pool.filled()[0].clone()
        finally:
            (self.pool, self.seed, self.calls, self.loss_trace, self.term_trace, self._call_sums, self._epoch_sums,
             self._epoch_counts) = saved
            self.load_extra_state(saved_extra)
        return images

    def kd_loss(self, base):
        """The student's loss on a KD batch, given the run's KD loss: the KD loss itself, unless the method
        adds student terms of its own (DFND's noise adaptation). Same call signature as `base`."""
        return base

    def kd_optimizers(self) -> list[torch.optim.Optimizer]:
        """Optimisers of parameters that `kd_loss` trains next to the student (stepped with it)."""
        return []

    def extra_state(self) -> dict:
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass

    # -- shared helpers --------------------------------------------------------------------------
    def weighted(self, terms: dict[str, torch.Tensor]) -> torch.Tensor:
        """The step's loss: each named term times the config weight of the same name."""
        return sum(getattr(self.cfg, name) * value for name, value in terms.items())

    def record(self, terms: dict[str, torch.Tensor], loss: torch.Tensor) -> None:
        """Keep an inner step's terms for the call's mean (on the device: no host sync)."""
        self.loss_trace.append(loss.detach())
        self.term_trace.append({name: value.detach() for name, value in terms.items()})
        for name, value in {**terms, "loss": loss}.items():
            self._call_sums[name] = self._call_sums.get(name, 0) + value.detach()

    def inner(self, fn):
        """`fn`, a method's inner step, as this run runs it: itself, or compiled into one graph (fullgraph, static
        shapes; on CUDA replayed as a CUDA graph). Compiled once per synthesizer and kept."""
        if not self.compiled:
            return fn
        name = fn.__name__
        if name not in self._inner_steps:
            from ..engine.step import enable_backward_tracing

            enable_backward_tracing()
            torch._dynamo.eval_frame.remove_from_cache(fn)  # an earlier synthesizer's graphs of this code
            mode = "reduce-overhead" if self.device.type == "cuda" and self.compile_backend == "inductor" else None
            self._inner_steps[name] = torch.compile(fn, fullgraph=True, dynamic=False, mode=mode, backend=self.compile_backend)
        return self._inner_steps[name]

    def fresh_state(self, optimizer: torch.optim.Optimizer) -> None:
        """A new call's optimizer over the kept buffers: its state zeroed in place (what a new Adam starts
        from), created up front so a compiled step reads it at fixed addresses."""
        from ..engine.step import create_state

        create_state(optimizer)
        for state in optimizer.state.values():
            for value in state.values():
                value.zero_()
        for group in optimizer.param_groups:
            for p in group["params"]:
                p.grad = None

    def stepper(self, *optimizers: torch.optim.Optimizer) -> list:
        """What `optimizer_step` takes for `optimizers`, made before a call's loop (outside any graph): the
        optimizers themselves, or for a compiled step their state tensors and learning rates as plain values
        and device tensors (`engine.step.update_plan`). Made again each call: a resume replaces the state."""
        if not self.compiled:
            return list(optimizers)
        from ..engine.step import create_state, update_plan

        plans = []
        for opt in optimizers:
            create_state(opt)
            plans.append((update_plan(opt), torch.tensor([group["lr"] for group in opt.param_groups], device=self.device)))
        return plans

    def optimizer_step(self, stepper: list) -> None:
        """Step the optimizers of `stepper` and drop their gradients: torch's fused step eagerly, the same
        formulas written out (`engine.step.update`, traceable) in a compiled inner step."""
        from ..engine.step import update

        for item in stepper:
            if isinstance(item, torch.optim.Optimizer):
                item.step()
                item.zero_grad(set_to_none=True)
            else:
                update(*item)

    def record_outputs(self, terms: dict[str, torch.Tensor], loss: torch.Tensor) -> None:
        """`record` for what an inner step returned: a compiled graph's outputs are copied first (a CUDA graph
        replay overwrites them)."""
        if self.compiled:
            terms, loss = {name: value.clone() for name, value in terms.items()}, loss.clone()
        self.record(terms, loss)

    @torch.no_grad()
    def add_to_pool(self, images01: torch.Tensor) -> None:
        """Add [0, 1] images (un-augmented) with the teacher's logits on the stored uint8 images."""
        images = images01.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8)
        with self.autocast():
            teacher_logits = self.teacher(self.teacher_input(images))
        self.pool.add(images, teacher_logits.float(), self.calls)

    def call_random(self, call: int) -> CallRandom:
        return CallRandom(
            device=epoch_generator(self.seed + 7919, call, self.device),
            cpu=epoch_generator(self.seed + 104729, call, "cpu"),
        )

    def step(self) -> dict[str, torch.Tensor]:
        """Run one synthesis call (counted, seeded, teacher and student frozen in eval mode)."""
        if self.teacher is None:
            raise RuntimeError(f"{self.method}: bind(teacher, student, normalize) before synthesizing")
        self.calls += 1
        self.loss_trace, self.term_trace, self._call_sums = [], [], {}
        t0 = time.perf_counter()
        with synthesis_mode(self.teacher, self.student):
            self.synthesize(self.call_random(self.calls))
        steps = max(len(self.loss_trace), 1)
        metrics = {name: value / steps for name, value in self._call_sums.items()}
        for key, value in metrics.items():  # counted per key: a term may be off in some calls (Fast's warm-up)
            self._epoch_sums[key] = self._epoch_sums.get(key, 0) + value.detach().float()
            self._epoch_counts[key] = self._epoch_counts.get(key, 0) + 1
        seconds = time.perf_counter() - t0
        if seconds > 10:  # long calls (DeepInv, CMI) show progress; short ones would flood the log
            log.info("%s: synthesis call %d took %.1f s (pool %d images)", self.method, self.calls, seconds, len(self.pool))
        return metrics

    # -- the distillation loop's source interface ---------------------------------------------------
    def steps_per_epoch(self, batch_size: int) -> int:
        return self.cfg.calls_per_epoch * self.cfg.kd_steps_per_call

    def begin_epoch(self, epoch: int, distiller) -> None:
        if self.calls == 0 and self.pool.total_added == 0 and self.cfg.init_pool is not None:
            self.import_parquet(self.cfg.init_pool)  # here, not in bind(): a resumed run takes its pool from the checkpoint
        if self.calls < self.cfg.warmup_calls:
            log.info("%s: %d warm-up synthesis calls before KD", self.method, self.cfg.warmup_calls - self.calls)
            while self.calls < self.cfg.warmup_calls:
                self.step()
                if self.calls % max(1, self.cfg.warmup_calls // 5) == 0:
                    log.info("%s: warm-up call %d/%d, pool %d images", self.method, self.calls, self.cfg.warmup_calls, len(self.pool))
        self._epoch_sums, self._epoch_counts = {}, {}  # an epoch's metrics cover its own calls, not the warm-up
        self.step()  # the epoch's first call runs before the dictionary (re)build, so it sees fresh data

    def batches(self, epoch: int, batch_size: int) -> Iterator[torch.Tensor]:
        generator = epoch_generator(self.seed + 2, epoch, self.device)
        for call in range(self.cfg.calls_per_epoch):
            if call > 0:
                self.step()
            for _ in range(self.cfg.kd_steps_per_call):
                yield self.sample(batch_size, generator)

    def epoch_metrics(self) -> dict[str, float]:
        """Mean synthesis loss terms over this epoch's calls (one host sync per epoch)."""
        return {f"synth_{key}": float(value) / self._epoch_counts[key] for key, value in self._epoch_sums.items()}

    def state_dict(self, journal: tuple[Path, str] | None = None) -> dict:
        """The synthesizer's checkpoint state. `journal` = (folder, file prefix): the pool's rows go to segment
        files there, only the new ones each time (`ImagePool.journal_state`); `journal_files` then lists the
        files this state needs."""
        if journal is None:
            pool, self.journal_files = self.pool.state_dict(), []
        else:
            pool, self.journal_files = self.pool.journal_state(*journal)
        return {
            "method": self.method, "seed": self.seed, "calls": self.calls, "image_shape": list(self.image_shape),
            "pool": pool, "extra": self.extra_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        mine = (self.method, self.seed, list(self.image_shape))
        saved = (state.get("method"), state.get("seed"), state.get("image_shape"))
        if saved != mine:
            raise ValueError(f"synthesizer state is for (method, seed, image shape) {saved}, this one is {mine}; use another run name")
        self.calls = state["calls"]
        if state["pool"] is not None:  # a method may rebuild its pool from its extra state instead
            self.pool.load_state_dict(state["pool"])
        self.load_extra_state(state["extra"])

    def to_parquet(self, path, metadata: dict | None = None):
        """Export the pool (uint8 images + teacher logits + call) with the method's config as metadata."""
        meta = {"method": self.method, "seed": self.seed, "calls": self.calls, "config": self.cfg.model_dump(mode="json")}
        return self.pool.to_parquet(path, {**meta, **(metadata or {})})


def adam(params, device: torch.device, **options) -> torch.optim.Adam:
    """Adam as every synthesizer uses it: the fused kernel (one launch per step for all parameters, where
    the per-tensor loop launches about ten per parameter) wherever torch has it for the device."""
    params = list(params)
    try:
        return torch.optim.Adam(params, fused=True, **options) if torch.device(device).type in ("cuda", "cpu") else torch.optim.Adam(params, **options)
    except (RuntimeError, TypeError):  # a torch without a fused Adam for this device
        return torch.optim.Adam(params, **options)


def new_generator(nz: int, ngf: int, image_shape: tuple[int, int, int], device, start_mult: int = 2) -> nn.Module:
    """The public DCGAN-style generator for this image shape (sigmoid output in [0, 1])."""
    from ..models import create_model

    c, h, _ = image_shape
    return create_model("generator", nz=nz, ngf=ngf, img_size=h, nc=c, start_mult=start_mult).to(device)


def optimizer_state(optimizer: torch.optim.Optimizer | None) -> dict | None:
    return None if optimizer is None else optimizer.state_dict()
