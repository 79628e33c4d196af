"""The plain-PyTorch distillation loop: substitution data -> (KDCI) KD -> evaluation -> checkpoint.

Single process, CPU or GPU; the same function runs inside a Ray Train worker. Per epoch:
`source.begin_epoch` (synthesis, for methods that synthesize), dictionary (re)build when due, KD steps,
evaluation of the raw and the compensated student (one forward), and when due an atomic checkpoint
carrying the config (`checkpoint.py`: every `checkpoint_every` epochs, or as often as keeps writing at
<= 1 % of the training time; always after the last epoch and on SIGTERM, which then stops the run).

Outputs under `<output.dir>/<name>/`: checkpoint.pt (student, intervention, optimizer, scheduler,
dictionary, source state, history, config), and at the end student.safetensors + card,
dictionary.safetensors, config.yaml, metrics.json.

Exact resume: every epoch's shuffling and augmentation come from generators seeded by (seed, epoch), and
the checkpoint carries the global RNG states (torch CPU/CUDA, numpy, Python) for anything that draws from
them (a synthesizer's noise, dropout), so continuing from a checkpoint reproduces the uninterrupted run
on the same hardware.

Data parallel (`parallel.py`: a process group set up by a launcher such as Ray Train): the distiller is
wrapped in DDP, every rank trains on its own substitution data (its own synthesizer seed, or its shard of
a fixed pool), the dictionary is built by rank 0 from every rank's teacher outputs and broadcast, the
epoch's loss terms are averaged over ranks, rank 0 evaluates and writes files, and each rank writes its own
part of every checkpoint (its source and RNG state: no rank's pool is gathered). The launcher owns
resumption then (`distill(..., managed=True)`).
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Protocol

import torch

from ..config import DistillConfig, dump_config
from ..console import Progress
from ..data import DeviceBatches, Normalize, SubstitutionSet, dataset_info, epoch_generator, load_dataset
from ..kdci import (
    CausalIntervention,
    ConfounderDictionary,
    Distiller,
    build_dictionary,
    teacher_blocks,
    teacher_fingerprint,
)
from ..losses import KLDivergenceKD
from ..models import ModelCard, create_model, load_classifier, save_classifier
from . import parallel
from .checkpoint import (
    CHECKPOINT_FORMAT, RANK_PART, RESUME_FREE, CheckpointPolicy, check_resume, config_diff, load_checkpoint, load_rank_part, rng_state,
    save_atomic, set_rng_state, stop_on_sigterm,
)
from .evaluate import check_labeled, evaluate
from .runtime import Runtime, device_memory_bytes, resolve_runtime, seed_everything
from .step import KDStep, create_state, kd_teacher, resolve_compile
from .diagnostics import SAMPLE, prototype_usage, shift_metrics, take, teacher_outputs
from .validation import Validation, held_out_count, with_protocols
from .teacher import card_options, lr_lambda, make_optimizer

log = logging.getLogger(__name__)

# What the loop writes into a run directory (removed by output.overwrite=true, and nothing else).
_RUN_FILES = (
    "checkpoint.pt", "checkpoint.pt.tmp", "student.safetensors", "student.json", "dictionary.safetensors", "metrics.json",
    "config.yaml", "pool.parquet", "pool.parquet.tmp", "metrics.json.tmp", "diagnostics.json",
)


class SubstitutionSource(Protocol):
    """What the loop needs from a DFKD method (`kdci_ray.synthesis.Synthesizer`) or a fixed set
    (`kdci_ray.data.SubstitutionSet`).

    For exact resume a source draws its randomness from (seed, epoch) generators or the global RNGs
    (saved in checkpoints), and puts anything else it needs to continue into `state_dict()`;
    `load_state_dict` should refuse a state that is not its own (another data set or seed).
    Optional: `bind(teacher=, student=, normalize=, runtime=)` (called once the models exist; a
    synthesizer gets the raw student being distilled), `epoch_metrics()` (merged into the epoch's row),
    `min_dictionary_images()` (checked against kdci.n up front), `to_parquet(path)` (pool export).
    """

    def steps_per_epoch(self, batch_size: int) -> int: ...
    def begin_epoch(self, epoch: int, distiller: Distiller) -> None: ...
    def batches(self, epoch: int, batch_size: int) -> Iterator[torch.Tensor]: ...
    def dictionary_images(self, batch_size: int = 1024) -> Iterator[torch.Tensor]: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


class RunLogger(Protocol):
    """The loop's only view of tracking and orchestration (MLflow and Ray live in higher layers).

    `log_metrics` is called on rank 0 only; `on_checkpoint(epoch, row, paths)` on every rank after each
    epoch's checkpoint, with the files that rank wrote (rank 0: checkpoint.pt, and with several ranks each
    rank its own part, checkpoint-rank<r>.pt), so a launcher can register the checkpoint.
    """

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def log_artifact(self, path: Path) -> None: ...
    def on_checkpoint(self, epoch: int, row: dict, paths: list[Path]) -> None: ...


class NullLogger:
    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_artifact(self, path: Path) -> None:
        pass

    def on_checkpoint(self, epoch: int, row: dict, paths: list[Path]) -> None:
        pass


@dataclass
class DistillResult:
    run_dir: Path
    epoch: int  # last finished epoch
    finished: bool
    history: list[dict] = field(default_factory=list)
    student_weights: Path | None = None
    dictionary_path: Path | None = None
    resumed_from: int = 0  # epoch the run continued from (0: started fresh)
    checkpoints: CheckpointPolicy | None = None  # which epochs wrote one, and what writing cost

    @property
    def final(self) -> dict:
        return self.history[-1] if self.history else {}


def config_identity(cfg: DistillConfig) -> str:
    """A short hash of what a config trains (the fields a resumption may not change): equal for two configs
    exactly when one run could continue the other."""
    import hashlib

    def strip(raw: dict, prefix: str = "") -> dict:
        return {k: strip(v, f"{prefix}{k}.") if isinstance(v, dict) else v for k, v in sorted(raw.items()) if f"{prefix}{k}" not in RESUME_FREE}

    return hashlib.sha256(json.dumps(strip(cfg.model_dump(mode="json")), default=str).encode()).hexdigest()[:16]


@dataclass
class Models:
    """The teacher (frozen, on the device), a fresh student and the teacher's input normalisation."""

    teacher: torch.nn.Module
    student: torch.nn.Module
    normalize: torch.nn.Module
    num_classes: int
    mean: list[float]
    std: list[float]
    teacher_id: str


def load_models(cfg: DistillConfig, runtime: Runtime) -> Models:
    """What a run (or a generation worker) starts from: the config's teacher, student and normalisation."""
    info = dataset_info(cfg.data.dataset)
    teacher, card = load_teacher(cfg)
    check_geometry(card, cfg)
    teacher = runtime.prepare(teacher)
    if cfg.student.num_classes not in (None, card.num_classes):
        raise ValueError(f"student.num_classes = {cfg.student.num_classes} but the teacher has {card.num_classes} classes; leave it unset")
    mean, std = list(card.normalize_mean or info.mean), list(card.normalize_std or info.std)
    student = runtime.prepare(create_model(cfg.student.arch, num_classes=card.num_classes, in_channels=info.channels,
                                           **cfg.student.model_options()))
    return Models(teacher, student, Normalize(mean, std).to(runtime.device), card.num_classes, mean, std, teacher_fingerprint(teacher))


def load_teacher(cfg: DistillConfig) -> tuple[torch.nn.Module, ModelCard]:
    """The config's teacher (eval mode, CPU) and its card: from `teacher.weights`, or for a torchvision:/timm:
    teacher with `pretrained: true` and no file, the library's own weights (its card made here)."""
    info = dataset_info(cfg.data.dataset)
    num_classes = cfg.teacher.num_classes or info.num_classes
    if cfg.teacher.weights is not None:
        return load_classifier(cfg.teacher.weights, cfg.teacher.arch, num_classes, info.channels, map_location="cpu",
                               options=cfg.teacher.model_options(pretrained=False))
    teacher = create_model(cfg.teacher.arch, num_classes=num_classes, in_channels=info.channels, **cfg.teacher.model_options())
    # The library's weights come with the normalisation they were trained with (timm says it; torchvision's is ImageNet's).
    pretrained_cfg = getattr(teacher.net, "pretrained_cfg", None) or {}
    mean, std = pretrained_cfg.get("mean"), pretrained_cfg.get("std")
    return teacher.eval(), ModelCard(arch=cfg.teacher.arch, num_classes=num_classes, dataset=cfg.data.dataset, in_channels=info.channels,
                                     normalize_mean=list(mean) if mean else None, normalize_std=list(std) if std else None,
                                     extra={"pretrained": True})


def check_geometry(card: ModelCard, cfg: DistillConfig) -> None:
    """The teacher's input geometry (its card) against the dataset's: channels, and the image size when the card
    records one."""
    info = dataset_info(cfg.data.dataset)
    size = card.extra.get("image_size")
    if card.in_channels != info.channels or (size is not None and int(size) != info.image_size):
        raise ValueError(f"teacher {cfg.teacher.weights or cfg.teacher.arch} takes {card.in_channels}-channel images"
                         f"{f' of {size} px' if size is not None else ''}; data.dataset = {cfg.data.dataset} has {info.channels}-channel "
                         f"{info.image_size} px images: use the teacher's dataset")


class _Run:
    """Everything one distillation run holds; `distill()` below is the readable entry point."""

    def __init__(self, cfg: DistillConfig, source: SubstitutionSource, runtime: Runtime):
        self.cfg, self.source, self.runtime = cfg, source, runtime
        self.rank, self.world = parallel.rank(), parallel.world_size()
        self.primary = self.rank == 0
        self.run_dir = Path(cfg.output.dir) / cfg.name  # distill() sets the one it was given
        info = dataset_info(cfg.data.dataset)
        models = load_models(cfg, runtime)
        self.teacher, self.student, self.normalize = models.teacher, models.student, models.normalize
        self.num_classes, self.mean, self.std, self.teacher_id = models.num_classes, models.mean, models.std, models.teacher_id
        self.test_set = None
        if self.primary:  # only rank 0 evaluates
            test_split = cfg.data.test_split or info.eval_split
            self.test_set = load_dataset(cfg.data.dataset, cfg.data.root, test_split, cfg.data.download, cfg.data.limit)
            check_labeled(self.test_set)
        self.info = info

        k = cfg.kdci
        self.intervention = None
        if k.enabled:
            self.intervention = CausalIntervention(
                self.num_classes, k.hidden, k.attention, k.alpha, k.uniform_attention, k.use_prior, k.random_prototypes, seed=cfg.seed
            ).to(runtime.device)
        self.compiled = resolve_compile(cfg.compile, runtime, self.world)
        if hasattr(source, "bind"):  # a synthesizer: its adversarial terms read the raw student, never s'
            source.bind(teacher=self.teacher, student=self.student, normalize=self.normalize, runtime=runtime, epochs=cfg.optim.epochs,
                        compiled=self.compiled)
        kd_loss = KLDivergenceKD(cfg.kd.temperature)
        if hasattr(source, "kd_loss"):  # a method's own student terms (DFND's noise adaptation) join the KD loss
            kd_loss = source.kd_loss(kd_loss)
        self.distiller = Distiller(self.student, kd_teacher(self.teacher, runtime), kd_loss, self.intervention)
        # What training calls: the distiller, DDP-wrapped when ranks share the work (DDP broadcasts rank 0's
        # weights here, so every rank starts from the same student and intervention). Buffers (BatchNorm
        # statistics) are broadcast before every step only for a synthesizer: its adversarial terms read the
        # student in eval mode on every rank. On fixed data only rank 0's statistics are ever used (it
        # evaluates and saves), and rank 0 never receives any: the same student without a collective per step.
        self.train_module: torch.nn.Module = self.distiller
        if self.world > 1:
            self.train_module = parallel.wrap_ddp(self.distiller, runtime.device, sync_buffers=hasattr(source, "bind"))
        self.optimizer = make_optimizer(self.distiller, cfg.optim, runtime.device)
        self.extra_optimizers = source.kd_optimizers() if hasattr(source, "kd_optimizers") else []
        self.scaler = runtime.grad_scaler()
        self.kd: KDStep | None = None  # made at the first epoch
        # Held out on every rank (equal step counts); only rank 0, which evaluates, scores on its share.
        self.held_out = held_out_count(cfg, source)
        if hasattr(source, "hold_out"):
            source.hold_out(self.held_out)
        self.validation: Validation | None = None
        self.diagnostics: list[dict] = []  # shift measurements (rank 0): first epoch, each dictionary build, the end
        self._test_reference: tuple[torch.Tensor, torch.Tensor] | None = None
        if self.compiled and hasattr(source, "full_batches"):
            source.full_batches = True  # one batch shape: a small set's ragged last batch wraps around instead
        self.steps_per_epoch = source.steps_per_epoch(cfg.optim.batch_size)
        if self.steps_per_epoch < 1:
            raise ValueError("the substitution source yields no batches: give it data or lower optim.batch_size")
        available = source.min_dictionary_images() if hasattr(source, "min_dictionary_images") else (
            len(source) if hasattr(source, "__len__") else None
        )
        if available is not None:  # the dictionary is built from every rank's data
            check_dictionary_size(cfg, parallel.sum_over_ranks(available))
        total = self.steps_per_epoch * cfg.optim.epochs
        warmup = round(cfg.optim.warmup_epochs * self.steps_per_epoch)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(total, warmup, cfg.optim.schedule))
        self.test_batches = DeviceBatches(self.test_set, 512, runtime.device) if self.primary else None
        self.dictionary: ConfounderDictionary | None = None
        self.dictionary_epoch = 0
        if self.intervention is not None and k.dictionary is not None:
            self.use_dictionary(load_prebuilt_dictionary(k.dictionary, k.n, self.teacher_id, self.num_classes), 0)

    def use_dictionary(self, dictionary: ConfounderDictionary, epoch: int) -> None:
        if self.dictionary is None and self.optimizer.state:  # (also after a resume from a plain-KD epoch)
            # The first dictionary after plain-KD epochs (kdci.min_images_per_prototype): the intervention's
            # parameters get gradients from now on. Their optimizer state is created as torch would at a first
            # step (zeros) so that fused SGD does not meet momentum buffers for some parameters and not others.
            create_state(self.optimizer)
        self.dictionary, self.dictionary_epoch = dictionary, epoch
        self.intervention.set_dictionary(dictionary.prototypes, dictionary.priors)

    # -- pieces of an epoch -------------------------------------------------------------------
    def prepare_input(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.normalize(pixels)
        return x.contiguous(memory_format=torch.channels_last) if self.runtime.channels_last else x

    def build_dictionary(self, epoch: int) -> None:
        k = self.cfg.kdci
        t0 = time.perf_counter()
        # Teacher outputs are small (N x C, or N x feature_dim), so one pass is kept and read twice. A pool that
        # stored the teacher's logits with its images gives them without running the teacher again.
        stored = self.source.dictionary_logits() if k.feature == "logits" and hasattr(self.source, "dictionary_logits") else None
        if stored is not None:
            blocks = [(None, block.float().cpu().numpy()) for block in stored]
        else:
            blocks = list(teacher_blocks(self.teacher, self.source.dictionary_images(), self.prepare_input, k.feature, self.runtime.autocast))
        # Data parallel: the dictionary covers every rank's substitution data; rank 0 builds it (k-means is
        # cheap next to a training epoch) and the others receive it, so all ranks intervene identically.
        every_rank = parallel.gather_to_primary(blocks)
        dictionary = None
        if self.primary:
            dictionary = build_dictionary(
                [block for rank_blocks in every_rank for block in rank_blocks], k.n, seed=self.cfg.seed, niter=k.niter,
                nredo=k.nredo, feature=k.feature, pca_dim=k.pca_dim, max_train_points=k.max_train_points,
                teacher=self.teacher_id, dataset=getattr(self.source, "name", ""), extra={"epoch": epoch, "ranks": self.world},
            )
        if self.world > 1:
            tensors, meta = parallel.broadcast_object((dictionary.tensors(), dictionary.meta_json()) if self.primary else None)
            dictionary = ConfounderDictionary.from_tensors(tensors, meta, "rank 0's dictionary")
        self.use_dictionary(dictionary, epoch)
        log.info("dictionary: N=%d from %d samples (%d k-means iterations) in %.1f s",
                 self.dictionary.n, self.dictionary.meta.samples, self.dictionary.meta.iterations, time.perf_counter() - t0)

    def dictionary_due(self, epoch: int) -> bool:
        if self.intervention is None:
            return False
        if self.dictionary is None:
            return not self.waiting_for_images(epoch)
        every = self.cfg.kdci.rebuild_every
        return every > 0 and epoch - self.dictionary_epoch >= every

    def waiting_for_images(self, epoch: int) -> bool:
        """True while a growing pool holds fewer than kdci.min_images_per_prototype x N images (single process)."""
        k, source = self.cfg.kdci, self.source
        if self.world > 1 or k.min_images_per_prototype == 0 or not getattr(source, "growing", False):
            return False
        have, need = source.dictionary_size(), k.min_images_per_prototype * k.n
        if have >= need:
            return False
        if epoch > self.cfg.optim.epochs // 2:  # never more than half the run without KDCI (a short run builds at once)
            log.warning("dictionary: the pool holds %d images, fewer than the %d (%d x N) asked for, at epoch %d of %d: built from "
                        "them now", have, need, k.min_images_per_prototype, epoch, self.cfg.optim.epochs)
            return False
        log.info("dictionary: waiting for %d images (%d x N) before the first build, the pool holds %d; epoch %d is plain KD",
                 need, k.min_images_per_prototype, have, epoch)
        return True

    def train_epoch(self, epoch: int) -> dict[str, float]:
        cfg, device = self.cfg, self.runtime.device
        self.distiller.train()
        if self.kd is None:  # made after any restore: a compiled step holds the optimizers' state tensors
            self.kd = KDStep(
                self.distiller, self.train_module, self.optimizer, self.scheduler, self.normalize, self.runtime,
                num_classes=self.num_classes, total_steps=self.steps_per_epoch * cfg.optim.epochs, padding=cfg.augment.crop_padding,
                hflip=cfg.augment.hflip, compiled=self.compiled, extra_optimizers=self.extra_optimizers, scaler=self.scaler,
            )
        aug = epoch_generator(parallel.rank_seed(cfg.seed) + 1, epoch, device)
        self.kd.start_epoch()
        steps = 0
        t0 = time.perf_counter()
        for pixels in self.source.batches(epoch, cfg.optim.batch_size):
            self.kd.step(pixels, aug)  # loss sums stay on the device: one host sync per epoch, not per step
            steps += 1
        if steps == 0:
            raise RuntimeError(f"epoch {epoch}: the substitution source yielded no batches")
        # One vector, one collective: sums over all ranks (every rank takes the same steps with the same loss
        # names), divided on the host as the single-process run always did.
        names = self.kd.names
        totals = torch.cat([self.kd.totals(), torch.tensor([float(self.kd.images)], device=device)])
        totals = parallel.all_reduce_sum(totals).tolist()  # syncs: time the epoch after it
        per_step = self.world * steps
        row = {f"train_{name}": value / per_step for name, value in zip(names, totals[2:-1])}
        row["train_loss"] = totals[0] / per_step
        if hasattr(self.source, "epoch_metrics"):
            row.update(parallel.mean_over_ranks(self.source.epoch_metrics()))
        if self.intervention is not None and self.intervention.has_dictionary:
            row["attention_entropy"] = totals[1] / per_step
        seconds = time.perf_counter() - t0
        images = totals[-1]  # all ranks' images: the run's throughput
        row.update(lr=self.scheduler.get_last_lr()[0], images_per_s=images / seconds, epoch_seconds=seconds)
        if not math.isfinite(row["train_loss"]):
            raise FloatingPointError(f"distill {cfg.name}: loss became {row['train_loss']} in epoch {epoch}; lower optim.lr")
        return row

    def make_validation(self) -> None:
        """The held-out images and the teacher's logits on them, once (after the source's first data exists)."""
        if self.held_out and self.validation is None and self.primary:
            images = self.source.validation_images()
            if len(images):
                self.validation = Validation.make(images, self.teacher, self.prepare_input, self.runtime.autocast)
                log.info("validation: %d held-out substitution images (never trained on)", len(images))

    def measure_shift(self, epoch: int) -> dict[str, float]:
        """Shift diagnostics of the current substitution data (engine/diagnostics.py); returns the scalars."""
        images = take(self.source.dictionary_images(1024)) if self.primary else None
        if images is None:
            return {}
        t0 = time.perf_counter()
        logits, features = teacher_outputs(self.teacher, images, self.prepare_input, self.runtime.autocast)
        if self._test_reference is None:  # the real test images' labels and teacher features, once
            xs, ys = [], []
            for x, y in self.test_batches:
                xs.append(x)
                ys.append(y)
                if sum(map(len, ys)) >= SAMPLE:
                    break
            test_features = teacher_outputs(self.teacher, torch.cat(xs)[:SAMPLE], self.prepare_input, self.runtime.autocast)[1]
            self._test_reference = (torch.cat(ys)[:SAMPLE], test_features)
        record = {"epoch": epoch, **shift_metrics(logits, features, self.num_classes, *self._test_reference)}
        if self.intervention is not None and self.intervention.has_dictionary:
            record.update(prototype_usage(self.intervention, logits))
        self.diagnostics.append(record)
        log.info("shift at epoch %d: KL(classes || uniform) %.3f, Frechet distance to test features %.2f (%.1f s)", epoch,
                 record["shift_kl_uniform"], record.get("shift_frechet_test", float("nan")), time.perf_counter() - t0)
        return {k: v for k, v in record.items() if isinstance(v, float)}

    def evaluate(self) -> dict[str, float]:
        # The compensated logits s' come from the same student forward as the raw ones.
        heads = None if self.intervention is None or not self.intervention.has_dictionary else {
            "compensated": lambda s: self.intervention(s).logits}
        scores = evaluate(self.student, self.test_batches, self.normalize, self.runtime, heads)
        row = {"test_top1": scores["top1"], "test_top5": scores["top5"]}
        if heads is not None:
            row.update(test_top1_compensated=scores["compensated_top1"], test_top5_compensated=scores["compensated_top5"])
        if self.validation is not None:
            row.update({k: float(v) for k, v in self.validation.score(self.student, self.prepare_input, self.runtime.autocast, heads).items()})
        return row

    # -- checkpoints ----------------------------------------------------------------------------
    def checkpoint_state(self, epoch: int, history: list[dict]) -> tuple[dict | None, dict | None]:
        """(the checkpoint: on rank 0, else None; this rank's part: with several ranks, else None). Each
        rank's part holds its own source (its synthesizer's pool and generator) and RNGs, written by that
        rank, so no rank's pool travels to rank 0; a single process keeps them in the checkpoint."""
        part = None
        if self.world > 1:
            part = {"format": CHECKPOINT_FORMAT, "rank": self.rank, "world_size": self.world, "epoch": epoch,
                    "source": self.source_state(), "rng": rng_state()}
        if not self.primary:
            return None, part
        d = self.dictionary
        return {
            "format": CHECKPOINT_FORMAT,
            "config": self.cfg.model_dump(mode="json"),
            "epoch": epoch,
            "student": self.student.state_dict(),
            "intervention": None if self.intervention is None else self.intervention.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "dictionary": None if d is None else {"tensors": d.tensors(), "meta": d.meta_json(), "epoch": self.dictionary_epoch},
            "source": self.source_state() if self.world == 1 else None,  # data parallel: in each rank's part
            "teacher_id": self.teacher_id,
            "scaler": self.scaler.state_dict(),
            "rng": rng_state() if self.world == 1 else None,
            "history": history,
            "world_size": self.world,
            "validation": None if self.validation is None else self.validation.state_dict(),
            "diagnostics": self.diagnostics,
        }, part

    def source_state(self) -> dict:
        """The source's checkpoint state; a synthesizer's image pool goes to segment files beside the checkpoint,
        only the rows added since the last checkpoint each time (not the whole pool every time)."""
        if "journal" in inspect.signature(self.source.state_dict).parameters:
            prefix = "pool-" if self.world == 1 else f"pool-rank{self.rank}-"
            self.run_dir.mkdir(parents=True, exist_ok=True)
            return self.source.state_dict(journal=(self.run_dir, prefix))
        return self.source.state_dict()

    def write_checkpoint(self, epoch: int, history: list[dict], path: Path) -> list[Path]:
        """Write this rank's checkpoint files of `epoch` (rank 0: `path`; with several ranks each its own part
        beside it); returns them. Timed into the run's checkpoint policy."""
        t0 = time.perf_counter()
        checkpoint, part = self.checkpoint_state(epoch, history)
        written = []
        if checkpoint is not None:
            save_atomic(checkpoint, path)
            written.append(path)
        if part is not None:
            written.append(path.with_name(RANK_PART.format(self.rank)))
            save_atomic(part, written[-1])
        written += getattr(self.source, "journal_files", [])  # a launcher's checkpoint copy needs them too
        self.checkpoints.wrote(time.perf_counter() - t0)
        return written

    def restore(self, state: dict, part: dict | None = None) -> None:
        """Continue from `state` (and, with several ranks, this rank's `part` of it)."""
        check_resume(state, self.cfg, self.teacher_id, self.world)
        self.student.load_state_dict(state["student"])
        if self.intervention is not None:
            self.intervention.load_state_dict(state["intervention"])
        mine = part if self.world > 1 else {"source": state["source"], "rng": state["rng"]}
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.source.load_state_dict(mine["source"])
        if state["dictionary"] is not None and self.intervention is not None:
            saved = state["dictionary"]
            dictionary = ConfounderDictionary.from_tensors(saved["tensors"], saved["meta"], "checkpoint dictionary")
            self.use_dictionary(dictionary, saved["epoch"])
        self.diagnostics = list(state.get("diagnostics", []))
        if state.get("validation") is not None:
            self.validation = Validation.from_state(state["validation"], self.runtime.device)
        if state["scaler"] and self.scaler.is_enabled():  # empty when the run was not fp16
            self.scaler.load_state_dict(state["scaler"])
        set_rng_state(mine["rng"])  # last: nothing after it may draw random numbers before training


def check_dictionary_size(cfg: DistillConfig, available: int) -> None:
    """kdci.n against the images the first dictionary build will have (all ranks' together): caught before
    any expensive work (a synthesis may come first)."""
    k = cfg.kdci
    if k.enabled and k.dictionary is None and available < k.n:
        more = ("select more: synthesis.num_select" if hasattr(cfg.synthesis, "num_select")  # selecting methods (DFND)
                else "a larger pool" if cfg.pool is not None else "synthesize more before KD: synthesis.warmup_calls / batch_size")
        raise ValueError(
            f"kdci.n = {k.n} prototypes but the substitution source has only {available} images when the dictionary is "
            f"first built; lower kdci.n (or {more})"
        )


POOL_MEMORY_SHARE = 0.5  # the rest is for the models, activations and the dictionary


def check_pool_memory(cfg: DistillConfig, source: SubstitutionSource, device: torch.device) -> None:
    """The substitution images live on the training device as uint8 (no per-step host copies): refuse, before any
    synthesis, a pool bound that would take more than half of that device's memory (224 px images are 147 KiB
    each: 65,536 of them are 9.2 GiB)."""
    total = device_memory_bytes(device)
    pool = getattr(source, "pool", None)
    rows = pool.capacity if pool is not None else len(source) if hasattr(source, "__len__") else 0
    shape = pool.image_shape if pool is not None else tuple(getattr(source, "images").shape[1:]) if hasattr(source, "images") else None
    if not total or not rows or shape is None:
        return
    per_image = math.prod(shape) + 4 * (pool.num_classes if pool is not None else 0) + 8
    if rows * per_image > POOL_MEMORY_SHARE * total:
        fits = int(POOL_MEMORY_SHARE * total // per_image)
        field = "synthesis.pool_size" if pool is not None else f"pool ({cfg.pool})"
        fix = f"lower synthesis.pool_size to <= {fits}" if pool is not None else f"use a pool of <= {fits} rows (or more data-parallel workers)"
        raise ValueError(f"{field}: {rows} images of {'x'.join(map(str, shape))} take {rows * per_image / 2**30:.1f} GiB on {device}, "
                         f"more than half of its {total / 2**30:.0f} GiB; {fix}")


def preflight(cfg: DistillConfig, world: int = 1, checkpoint: Path | None = None, check_n: bool = True) -> int:
    """What a launcher of `world` data-parallel ranks checks before it starts any of them: what `distill()`
    would refuse in its first seconds, on the CPU, without training. The teacher's file, card and classes,
    the student, a pool's schema and image shape (footers only), kdci.n against the data (unless `check_n`
    is False: a sweep checks its own values of it), a prebuilt dictionary, and the `checkpoint` the run
    would resume from (its config, teacher and rank count). Returns the images the first dictionary build has."""
    check_pool_run(cfg)
    models = load_models(cfg, resolve_runtime("cpu", "fp32", "off"))
    if cfg.pool is not None:
        available = (pool_schema(cfg).total_rows // world) * world  # each rank holds an equal share
    else:
        source = make_source(cfg)  # no `synthesis:` either: refused here, naming both
        available = world * (source.min_dictionary_images() if hasattr(source, "min_dictionary_images") else len(source))
    if check_n:
        check_dictionary_size(cfg, available)
    if cfg.kdci.enabled and cfg.kdci.dictionary is not None:
        load_prebuilt_dictionary(cfg.kdci.dictionary, cfg.kdci.n, models.teacher_id, models.num_classes)
    if checkpoint is not None:
        check_resume(load_checkpoint(checkpoint, cfg), cfg, models.teacher_id, world)
    return available


def distill(
    cfg: DistillConfig,
    source: SubstitutionSource,
    logger: RunLogger | None = None,
    stop_after_epoch: int | None = None,
    *,
    run_dir: Path | None = None,
    resume_from: Path | None = None,
    managed: bool = False,
) -> DistillResult:
    """Train `cfg.student` from `cfg.teacher` on `source`; resumes from the run's checkpoint if there is one.

    `stop_after_epoch` ends the call early after that epoch (its checkpoint written), as a preemption would.
    `run_dir`: where the run's files go (default `<output.dir>/<name>`). `managed=True`: a launcher owns
    checkpoints (the Ray layer, and any data-parallel run): it resumes from `resume_from` exactly, and
    with None starts fresh, replacing what an earlier attempt wrote in `run_dir`.
    """
    logger = logger or NullLogger()
    primary, world = parallel.is_primary(), parallel.world_size()
    if world > 1 and not managed:
        raise ValueError("data-parallel distillation needs a launcher that owns its checkpoints: run it through kdci_ray.distributed (Ray Train)")
    run_dir = Path(run_dir) if run_dir is not None else Path(cfg.output.dir) / cfg.name
    ckpt_path = run_dir / "checkpoint.pt"
    state = part = None
    if managed:
        if resume_from is not None:
            state = load_checkpoint(Path(resume_from), cfg)
            if world > 1:
                part = load_rank_part(Path(resume_from), parallel.rank(), world, state["epoch"])
        elif primary:
            _clear_run_files(run_dir)
    else:
        if run_dir.exists() and any(run_dir.iterdir()) and not cfg.output.overwrite and not (cfg.resume and ckpt_path.is_file()):
            raise FileExistsError(
                f"{run_dir} already holds a run{' (resume=false)' if ckpt_path.is_file() else ''}: "
                "choose another name, or set output.overwrite=true to start over"
            )
        if cfg.output.overwrite:
            _clear_run_files(run_dir)  # asked to start over: remove what an earlier run wrote, nothing else
        elif ckpt_path.is_file() and cfg.resume:
            state = load_checkpoint(ckpt_path, cfg)  # before any expensive work

    seed_everything(cfg.seed)
    runtime = resolve_runtime(cfg.device, cfg.precision, cfg.channels_last)
    check_pool_memory(cfg, source, runtime.device)
    if hasattr(source, "to"):
        source.to(runtime.device)
    run = _Run(cfg, source, runtime)
    run.run_dir = run_dir
    if world > 1:  # the models are built (identically): from here on ranks draw different random numbers
        seed_everything(parallel.rank_seed(cfg.seed))
    history: list[dict] = []
    start = 1
    if state is not None:
        run.restore(state, part)
        history = list(state["history"])
        start = state["epoch"] + 1
        log.info("distill %s: resuming after epoch %d", cfg.name, state["epoch"])
    result = DistillResult(run_dir, start - 1, False, history, resumed_from=start - 1)
    if start > cfg.optim.epochs:
        log.info("distill %s: already finished (%d epochs); nothing to do", cfg.name, cfg.optim.epochs)
        return _finished(run, result)

    if primary:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(dump_config(cfg))
    log.info(
        "distill %s: %s -> %s, KDCI %s, substitution data %s (%d images now), %d epochs x %d steps, %s%s",
        cfg.name, cfg.teacher.arch, cfg.student.arch, f"on (N={cfg.kdci.n}, alpha={cfg.kdci.alpha})" if cfg.kdci.enabled else "off",
        getattr(source, "name", type(source).__name__), len(source) if hasattr(source, "__len__") else -1,
        cfg.optim.epochs, run.steps_per_epoch, runtime.describe(), f", rank {run.rank} of {world}" if world > 1 else "",
    )
    policy = run.checkpoints = result.checkpoints = CheckpointPolicy(cfg.checkpoint_every)
    progress = Progress(cfg.optim.epochs, start=start - 1)
    with stop_on_sigterm(world == 1) as sigterm:
        for epoch in range(start, cfg.optim.epochs + 1):
            t0 = time.perf_counter()
            source.begin_epoch(epoch, run.distiller)
            run.make_validation()
            rebuilt = run.dictionary_due(epoch)
            if rebuilt:
                run.build_dictionary(epoch)
            shift = run.measure_shift(epoch) if primary and (epoch == 1 or rebuilt or epoch == cfg.optim.epochs) else {}
            row = {"epoch": epoch, **run.train_epoch(epoch), **shift}
            if primary and (epoch % cfg.eval_every == 0 or epoch == cfg.optim.epochs):
                row = with_protocols({**row, **run.evaluate()}, history)
            history.append(row)
            policy.trained_for(time.perf_counter() - t0)
            if primary:
                logger.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=epoch)
            stop = (stop_after_epoch is not None and epoch >= stop_after_epoch) or sigterm.is_set()
            due = policy.due(epoch, forced=stop or epoch == cfg.optim.epochs)
            if world > 1 and cfg.checkpoint_every == "auto":  # rank 0's timing decides for every rank
                due = parallel.broadcast_object(due)
            written = run.write_checkpoint(epoch, history, ckpt_path) if due else []
            if hasattr(logger, "on_checkpoint"):  # optional: loggers written before the hook existed still work
                logger.on_checkpoint(epoch, row, written)
            result.epoch = epoch
            (log.info if progress.due(epoch) else log.debug)(  # about ten lines a run (every epoch with --verbose)
                "epoch %d/%d loss %.4f%s%s%s%s  %.0f img/s%s  [%s]", epoch, cfg.optim.epochs, row["train_loss"],
                f" synthesis loss {row['synth_loss']:.4f}" if "synth_loss" in row else "",
                f" test {row['test_top1']:.2f}%" if "test_top1" in row else "",
                f" (compensated {row['test_top1_compensated']:.2f}%)" if "test_top1_compensated" in row else "",
                f", agreement with the teacher on held-out data {row['val_agreement']:.2f}%" if "val_agreement" in row else "",
                row["images_per_s"], f", checkpoint {policy.last_write:.2f} s" if due and policy.last_write is not None else "",
                progress.eta(epoch),
            )
            if sigterm.is_set() and epoch < cfg.optim.epochs:
                if not due:  # the signal came while this epoch was being wrapped up
                    run.write_checkpoint(epoch, history, ckpt_path)
                log.warning("distill %s: SIGTERM: stopped after epoch %d, its checkpoint written; run the same command to resume",
                            cfg.name, epoch)
                raise SystemExit(128 + signal.SIGTERM)
            if stop_after_epoch is not None and epoch >= stop_after_epoch and epoch < cfg.optim.epochs:
                log.info("distill %s: stopping after epoch %d as asked; run again to resume", cfg.name, epoch)
                return result
    return _finished(run, result)


def _clear_run_files(run_dir: Path) -> None:
    for name in _RUN_FILES:
        (run_dir / name).unlink(missing_ok=True)
    for part in run_dir.glob(RANK_PART.format("*") + "*"):  # data-parallel ranks' parts (and their .tmp)
        part.unlink(missing_ok=True)
    for segment in run_dir.glob("pool-*.safetensors*"):  # checkpointed pool rows (pool.parquet is the export)
        segment.unlink(missing_ok=True)


def _finished(run: _Run, result: DistillResult) -> DistillResult:
    """Write the final student (+ card), dictionary and metrics; idempotent for a finished run."""
    cfg = run.cfg
    run_dir = result.run_dir
    result.finished = True
    result.epoch = cfg.optim.epochs
    if cfg.synthesis is not None and cfg.synthesis.export_pool and hasattr(run.source, "to_parquet"):
        name = "pool.parquet" if run.world == 1 else f"pool-rank{run.rank}.parquet"  # every rank made its own pool
        run.source.to_parquet(run_dir / name, {"run": cfg.name, "teacher_id": run.teacher_id, "rank": run.rank})
    if not run.primary:
        return result
    final = result.final
    card = ModelCard(
        arch=cfg.student.arch, num_classes=run.num_classes, dataset=cfg.data.dataset,
        normalize_mean=run.mean, normalize_std=run.std, accuracy=round(final.get("test_top1", float("nan")), 2),
        in_channels=run.info.channels,
        extra={"teacher": cfg.teacher.arch, "teacher_id": run.teacher_id, "kdci": cfg.kdci.enabled, "epochs": cfg.optim.epochs, "seed": cfg.seed,
               **card_options(cfg.student)},
    )
    result.student_weights = save_classifier(
        run.student.to(memory_format=torch.contiguous_format), run_dir / "student.safetensors", card, overwrite=True
    )
    if run.dictionary is not None:
        result.dictionary_path = run.dictionary.save(run_dir / "dictionary.safetensors")
    if run.diagnostics:
        (run_dir / "diagnostics.json").write_text(json.dumps(run.diagnostics, indent=1))
    metrics = run_dir / "metrics.json"  # last, and atomically: its presence marks the run finished
    metrics.with_name("metrics.json.tmp").write_text(json.dumps(result.history, indent=1))
    metrics.with_name("metrics.json.tmp").replace(metrics)
    return result


def finished_history(cfg: DistillConfig, run_dir: Path) -> list[dict] | None:
    """The history of a run of `cfg` that already finished in `run_dir`, else None: its final files written,
    the same config up to where/how fields, the same teacher (content hash on the student's card), and
    no input (pool, prebuilt dictionary) changed since it finished. Lets a launcher return a finished run
    without starting workers, even when it was killed before it recorded the end itself; anything else
    goes through the full resume path, which checks and explains."""
    from ..config import load_config

    run_dir = Path(run_dir)
    metrics, card_file, config_file = run_dir / "metrics.json", run_dir / "student.json", run_dir / "config.yaml"
    if not all(f.is_file() for f in (metrics, card_file, config_file, run_dir / "student.safetensors")):
        return None
    try:
        history = json.loads(metrics.read_text())
        card = json.loads(card_file.read_text())
        saved = load_config(config_file, DistillConfig)
    except (ValueError, OSError):  # a file cut short by a crash: not finished
        return None
    if not history or history[-1].get("epoch") != cfg.optim.epochs:
        return None
    if config_diff(saved.model_dump(mode="json"), cfg.model_dump(mode="json")):
        return None
    finished_at = metrics.stat().st_mtime
    inputs = [Path(p) for p in (cfg.pool, cfg.kdci.dictionary) if p is not None]
    inputs = [f for p in inputs for f in ([p] if p.is_file() else p.glob("*.parquet"))]
    if any(f.stat().st_mtime > finished_at for f in inputs):
        return None
    teacher, _ = load_teacher(cfg)
    if card.get("teacher_id") != teacher_fingerprint(teacher):  # the card keeps its extras at the top level
        return None
    return history


def make_source(cfg: DistillConfig, seed: int | None = None) -> SubstitutionSource:
    """The substitution source a config names: the fixed Parquet pool `pool` when set, else its `synthesis`
    method (bound to the run's models later). `seed` defaults to the run's (data-parallel ranks pass their own)."""
    from ..synthesis import create_synthesizer, read_pool_parquet

    seed = cfg.seed if seed is None else seed
    info = dataset_info(cfg.data.dataset)
    image_shape = (info.channels, info.image_size, info.image_size)
    if cfg.pool is not None:
        check_pool_run(cfg)
        pool_schema(cfg)  # before reading any image
        return SubstitutionSet(read_pool_parquet(cfg.pool).images, seed=seed, name=f"pool {Path(cfg.pool).name}")
    if cfg.synthesis is None:
        raise ValueError(
            "the config has no `synthesis:` section and no `pool:`: name a DFKD method "
            "(synthesis.method: dafl | deepinv | fast | cmi | mosaickd | dfnd) or a Parquet pool (pool: path)"
        )
    return create_synthesizer(cfg.synthesis, image_shape, cfg.teacher.num_classes or info.num_classes, seed=seed)


def pool_schema(cfg: DistillConfig):
    """The config's Parquet pool from its footers, refused unless its images are the dataset's shape."""
    from ..synthesis import read_pool_schema

    schema = read_pool_schema(cfg.pool)
    info = dataset_info(cfg.data.dataset)
    needed = (info.channels, info.image_size, info.image_size)
    if schema.image_shape != needed:
        raise ValueError(f"pool = {cfg.pool}: images are {schema.image_shape}, data.dataset = {cfg.data.dataset} needs {needed}; "
                         "use a pool made for this dataset")
    return schema


def check_pool_run(cfg: DistillConfig) -> None:
    """A fixed pool trains with the KD loss (+ KDCI) only: refuse a method whose own student terms would be lost."""
    if cfg.pool is not None and cfg.synthesis is not None and getattr(cfg.synthesis, "noise_adaptation", 0) > 0:
        raise ValueError(
            f"pool = {cfg.pool} trains on fixed data with the KD loss only, but synthesis.method = {cfg.synthesis.method} adds its "
            "own student term (noise_adaptation); unset pool to distill with the method, or set synthesis.noise_adaptation=0"
        )


def load_prebuilt_dictionary(path: Path, n: int, teacher_id: str, num_classes: int) -> ConfounderDictionary:
    """A dictionary built by an earlier stage (`jobs/build_dictionary.py`), checked against this run."""
    dictionary = ConfounderDictionary.load(path)
    meta = dictionary.meta
    problems = []
    if meta.n_requested != n:
        problems.append(f"it was built with N = {meta.n_requested}, kdci.n is {n}")
    if meta.teacher and meta.teacher != teacher_id:
        problems.append(f"it was built from another teacher's outputs (content hash {meta.teacher}, this teacher's is {teacher_id})")
    if dictionary.num_classes != num_classes:
        problems.append(f"its prototypes have {dictionary.num_classes} classes, the teacher {num_classes}")
    if problems:
        raise ValueError(f"kdci.dictionary = {path}: {'; '.join(problems)}; rebuild it for this config or unset kdci.dictionary")
    return dictionary


def distill_from_config(cfg: DistillConfig, logger: RunLogger | None = None, stop_after_epoch: int | None = None) -> DistillResult:
    """`distill()` with the substitution data the config names (its Parquet pool or its DFKD method)."""
    return distill(cfg, make_source(cfg), logger, stop_after_epoch)
