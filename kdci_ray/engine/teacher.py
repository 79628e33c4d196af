"""Supervised training of a classifier (a teacher, or a from-data baseline student), single process.

SGD with Nesterov momentum, no weight decay on BN / biases, linear warm-up then cosine, pad-crop + flip
on the device, bf16 autocast + channels-last on CUDA. Writes `<name>.safetensors` + card + config.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ..config import TeacherTrainConfig, dump_config
from ..console import Progress
from ..data import DeviceBatches, Normalize, dataset_info, load_dataset, random_crop_flip
from ..models import ModelCard, create_model, save_classifier
from . import parallel
from .evaluate import check_labeled, evaluate
from .runtime import resolve_runtime, seed_everything

log = logging.getLogger(__name__)


def card_options(model_cfg) -> dict:
    """An external model's constructor options on its card, so the weights load back without the config."""
    options = {k: v for k, v in model_cfg.model_options().items() if k != "pretrained" and v is not None}
    return {"model_options": options} if options else {}


def param_groups(model: torch.nn.Module, weight_decay: float, decay_norm_and_bias: bool = False) -> list[dict]:
    """Weight decay on weight matrices and kernels; BatchNorm weights and biases (the 1-d tensors) without it,
    unless `decay_norm_and_bias` (the public DFKD code decays every parameter)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 and not decay_norm_and_bias else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    return groups + ([{"params": no_decay, "weight_decay": 0.0}] if no_decay else [])


def make_optimizer(model: torch.nn.Module, optim, device: torch.device) -> torch.optim.Optimizer:
    """SGD or AdamW over `model`'s parameter groups, fused (one kernel per step for every parameter, where
    the per-tensor loop launches three or more per parameter) on CUDA and the CPU."""
    groups = param_groups(model, optim.weight_decay, optim.decay_norm_and_bias)
    if optim.optimizer == "sgd":
        make, options = torch.optim.SGD, {"lr": optim.lr, "momentum": optim.momentum, "nesterov": optim.nesterov and optim.momentum > 0}
    else:
        make, options = torch.optim.AdamW, {"lr": optim.lr}
    if torch.device(device).type in ("cuda", "cpu"):
        try:
            return make(groups, fused=True, **options)
        except (RuntimeError, TypeError):  # a torch without the fused kernel for this device
            groups = param_groups(model, optim.weight_decay, optim.decay_norm_and_bias)
    return make(groups, **options)


def lr_lambda(total_steps: int, warmup_steps: int, schedule: str):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        if schedule == "step":  # x0.1 at 40 % and at 80 % of the run (DFND's public schedule)
            progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
            return 0.1 ** ((progress >= 0.4) + (progress >= 0.8))
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor




def train_teacher(cfg: TeacherTrainConfig) -> dict:
    """Train, evaluate and save; returns {'weights', 'card', 'top1', 'top5', 'seconds', 'history'}."""
    out_dir = Path(cfg.output.dir)
    weights_path = out_dir / f"{cfg.name}.safetensors"
    rank, world = parallel.rank(), parallel.world_size()
    primary = rank == 0  # under data parallelism (a Ray Train worker) rank 0 evaluates and writes
    # Fail before any work rather than after hours of training.
    if primary and weights_path.exists() and not cfg.output.overwrite:
        raise FileExistsError(f"{weights_path} exists: choose another name, or set output.overwrite=true to replace it")
    if primary:
        out_dir.mkdir(parents=True, exist_ok=True)

    seed_everything(cfg.seed)
    runtime = resolve_runtime(cfg.device, cfg.precision, cfg.channels_last)
    info = dataset_info(cfg.data.dataset)
    num_classes = cfg.model.num_classes or info.num_classes
    if num_classes < info.num_classes:
        raise ValueError(f"model.num_classes = {num_classes} but {info.name} has {info.num_classes} classes; raise it or leave it unset")
    train_set = load_dataset(cfg.data.dataset, cfg.data.root, cfg.data.train_split, cfg.data.download, cfg.data.limit)
    test_set = load_dataset(cfg.data.dataset, cfg.data.root, cfg.data.test_split or info.eval_split, cfg.data.download, cfg.data.limit)
    for split_set in (train_set, test_set):
        check_labeled(split_set)
        if len(split_set) == 0:
            raise ValueError(f"{info.name}/{split_set.split} is empty")
    model = runtime.prepare(create_model(cfg.model.arch, num_classes=num_classes, in_channels=info.channels, **cfg.model.model_options()))
    trained = model  # what the optimiser steps: the model, DDP-wrapped (rank 0's initial weights) across ranks
    if world > 1:
        trained = parallel.wrap_ddp(model, runtime.device)

    train_batches = DeviceBatches(
        train_set, cfg.optim.batch_size, runtime.device, shuffle=True, drop_last=len(train_set) // world >= 2 * cfg.optim.batch_size,
        seed=cfg.seed, rank=rank, world_size=world,
    )
    test_batches = DeviceBatches(test_set, 512, runtime.device)
    normalize = Normalize(info.mean, info.std).to(runtime.device)
    optimizer = make_optimizer(model, cfg.optim, runtime.device)
    steps_per_epoch = len(train_batches)
    total = steps_per_epoch * cfg.optim.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(total, round(cfg.optim.warmup_epochs * steps_per_epoch), cfg.optim.schedule)
    )
    aug_gen = torch.Generator(device=runtime.device).manual_seed(parallel.rank_seed(cfg.seed) + 1)
    scaler = runtime.grad_scaler()  # a no-op unless precision is fp16
    log.info(
        "train-teacher %s: %s on %s (%d train / %d test), %d epochs x %d steps, %s%s",
        cfg.name, cfg.model.arch, cfg.data.dataset, len(train_set), len(test_set), cfg.optim.epochs, steps_per_epoch, runtime.describe(),
        f", rank {rank} of {world}" if world > 1 else "",
    )

    history, metrics = [], {"top1": float("nan"), "top5": float("nan")}
    start = time.perf_counter()
    progress = Progress(cfg.optim.epochs)
    for epoch in range(1, cfg.optim.epochs + 1):
        trained.train()
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), device=runtime.device)
        correct = torch.zeros((), dtype=torch.int64, device=runtime.device)
        seen = 0
        for images, labels in train_batches:
            images = random_crop_flip(images, cfg.augment.crop_padding, cfg.augment.hflip, aug_gen)
            x = normalize(images)
            if runtime.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with runtime.autocast():
                logits = trained(x)
                loss = F.cross_entropy(logits.float(), labels)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            # Accumulate on the device: no host sync inside the epoch.
            loss_sum += loss.detach() * labels.shape[0]
            correct += (logits.detach().argmax(1) == labels).sum()
            seen += labels.shape[0]
        # Over all ranks (one collective per epoch): summed loss, correct and seen.
        totals = parallel.all_reduce_sum(torch.stack([loss_sum.float(), correct.float(), torch.tensor(float(seen), device=runtime.device)]))
        loss_total, correct_total, seen_total = totals.tolist()
        row = {"epoch": epoch, "train_loss": loss_total / seen_total, "train_top1": 100.0 * correct_total / seen_total}
        if primary and (epoch % cfg.eval_every == 0 or epoch == cfg.optim.epochs):
            metrics = evaluate(model, test_batches, normalize, runtime)
            row.update(test_top1=metrics["top1"], test_top5=metrics["top5"])
        elapsed = time.perf_counter() - t0
        row["images_per_s"] = seen * world / elapsed
        history.append(row)
        if not math.isfinite(row["train_loss"]):
            raise FloatingPointError(f"train-teacher {cfg.name}: loss became {row['train_loss']} at epoch {epoch}; lower optim.lr")
        (log.info if progress.due(epoch) else log.debug)(  # about ten lines a run (every epoch with --verbose)
            "epoch %d/%d loss %.4f train %.2f%%%s  %.0f img/s  [%s]",
            epoch, cfg.optim.epochs, row["train_loss"], row["train_top1"],
            f" test {row['test_top1']:.2f}%" if "test_top1" in row else "", row["images_per_s"], progress.eta(epoch),
        )
    seconds = time.perf_counter() - start
    if not primary:
        return {"weights": str(weights_path), "card": None, "top1": float("nan"), "top5": float("nan"), "seconds": seconds, "history": history}

    card = ModelCard(
        arch=cfg.model.arch,
        num_classes=num_classes,
        dataset=cfg.data.dataset,
        normalize_mean=list(info.mean),
        normalize_std=list(info.std),
        accuracy=round(metrics["top1"], 2),
        in_channels=info.channels,
        extra={"top5": round(metrics["top5"], 2), "epochs": cfg.optim.epochs, "seed": cfg.seed,
               "train_seconds": round(seconds, 1), "device": str(runtime.device), "torch": torch.__version__, "image_size": info.image_size,
               **card_options(cfg.model)},
    )
    save_classifier(model.to(memory_format=torch.contiguous_format), weights_path, card, overwrite=cfg.output.overwrite)
    (out_dir / f"{cfg.name}.yaml").write_text(dump_config(cfg))
    log.info("wrote %s (test top-1 %.2f%%) in %.1f s", weights_path, metrics["top1"], seconds)
    return {"weights": str(weights_path), "card": card, "top1": metrics["top1"], "top5": metrics["top5"], "seconds": seconds, "history": history}
