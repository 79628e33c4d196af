"""A distillation run recorded in MLflow: params (the flattened config), per-epoch metrics from the loop,
and at the end the config YAML, the student (safetensors + card, and as an MLflow model), the dictionary,
metrics.json and figures (substitution images, class proportions against the original balance)."""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from ..config import DistillConfig
from ..data import dataset_info, load_dataset
from ..engine.distill import DistillResult, distill, load_models, make_source
from ..engine.runtime import resolve_runtime
from ..models import load_classifier
from . import plots
from .logger import MlflowRunLogger

log = logging.getLogger(__name__)
DEFAULT_EXPERIMENT = "kdci"


def distill_tracked(
    cfg: DistillConfig, *, experiment: str = DEFAULT_EXPERIMENT, uri: str | None = None, parent: MlflowRunLogger | None = None,
    source=None,
) -> tuple[DistillResult, MlflowRunLogger]:
    """`distill(cfg)` as one MLflow run (a child of `parent` when given); returns the result and the run."""
    source = source if source is not None else make_source(cfg)
    method = cfg.synthesis.method if cfg.synthesis is not None else "pool"
    tags = {"method": method, "kdci": str(cfg.kdci.enabled).lower(), "teacher": cfg.teacher.arch, "student": cfg.student.arch}
    with MlflowRunLogger.start(experiment, cfg.name, uri=uri, parent=parent, tags=tags) as run:
        run.log_config(cfg)
        result = distill(cfg, source, run)
        log_outputs(run, cfg, result, source)
    return result, run


def log_run_files(run: MlflowRunLogger, run_dir: Path) -> None:
    """A finished run directory's config, metrics, dictionary and student (weights + card) as artifacts."""
    for name, folder in (("config.yaml", None), ("metrics.json", None), ("diagnostics.json", None), ("dictionary.safetensors", "dictionary"),
                         ("student.safetensors", "student"), ("student.json", "student")):
        if (run_dir / name).is_file():
            run.log_artifact(run_dir / name, folder)
    if (run_dir / "diagnostics.json").is_file():
        from . import plots

        with tempfile.TemporaryDirectory() as tmp:
            records = json.loads((run_dir / "diagnostics.json").read_text())
            run.log_artifact(plots.shift_over_epochs(records, Path(tmp) / "shift_over_epochs.png"), "figures")


def log_outputs(run: MlflowRunLogger, cfg: DistillConfig, result: DistillResult, source=None) -> None:
    """The finished run's files, the student as an MLflow model, and figures as artifacts of `run`."""
    log_finished_run(run, cfg, result.run_dir, source)


def log_finished_run(run: MlflowRunLogger, cfg: DistillConfig, run_dir: Path, source=None) -> None:
    """A run directory's files, its student as an MLflow model, and (given the substitution `source`)
    figures of the substitution data, as artifacts of `run`."""
    log_run_files(run, run_dir)
    if (run_dir / "student.safetensors").is_file():
        info = dataset_info(cfg.data.dataset)
        log_student_model(run, run_dir / "student.safetensors", (info.channels, info.image_size, info.image_size))
    if source is not None and hasattr(source, "dictionary_images"):
        log_substitution_figures(run, cfg, source)


def log_substitution_figures(run: MlflowRunLogger, cfg: DistillConfig, source) -> None:
    """The substitution data `source` holds, seen: a grid of its images and its class proportions against
    the original balance, as artifacts under figures/."""
    with tempfile.TemporaryDirectory() as tmp:
        for figure in substitution_figures(cfg, source, Path(tmp)):
            run.log_artifact(figure, "figures")


@torch.no_grad()
def student_tsne(students: dict[str, Path], cfg: DistillConfig, path: Path, limit: int = 1000, seed: int = 0) -> Path:
    """t-SNE of the penultimate features of several students (e.g. KD vs KDCI) on the same test images,
    one panel each, coloured by true class: how well each student separates the classes."""
    info = dataset_info(cfg.data.dataset)
    test = load_dataset(cfg.data.dataset, cfg.data.root, cfg.data.test_split or info.eval_split, cfg.data.download, cfg.data.limit)
    generator = torch.Generator().manual_seed(seed)
    picked = torch.randperm(len(test), generator=generator)[: min(limit, len(test))].tolist()
    images, labels = zip(*(test[i] for i in picked))
    batch = torch.stack([torch.as_tensor(x) for x in images])
    features = {}
    for name, weights in students.items():
        model, card = load_classifier(weights)
        model.eval()
        x = batch.float() / 255 if batch.dtype == torch.uint8 else batch.float()
        mean = torch.tensor(card.normalize_mean or info.mean).view(1, -1, 1, 1)
        std = torch.tensor(card.normalize_std or info.std).view(1, -1, 1, 1)
        _, feats = model((x - mean) / std, return_features=True)
        features[name] = feats.flatten(1).numpy()
    return plots.tsne(features, np.asarray(labels), path, seed=seed)


def log_student_model(run: MlflowRunLogger, weights: Path, image_shape: tuple[int, int, int]) -> None:
    """The student as an MLflow (pytorch) model, loadable with mlflow.pytorch.load_model (exported with
    torch.export from an example batch of normalised images, not pickled)."""
    import mlflow

    student, _ = load_classifier(weights)
    previous = mlflow.get_tracking_uri()
    env_before = os.environ.get("MLFLOW_TRACKING_URI")  # set_tracking_uri writes the env var: put it back as it was
    mlflow.set_tracking_uri(run.client.tracking_uri)
    try:
        with mlflow.start_run(run_id=run.run_id):
            # Requirements named, not inferred (inference imports and inspects the whole environment: slow).
            mlflow.pytorch.log_model(
                student.cpu().eval(), name="student_model", input_example=np.zeros((2, *image_shape), dtype=np.float32),  # 2: a batch of 1 would fix the batch size at 1
                serialization_format="pt2", pip_requirements=["torch", "torchvision"],
            )
    finally:
        mlflow.set_tracking_uri(previous)
        if env_before is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = env_before


@torch.no_grad()
def substitution_figures(cfg: DistillConfig, source, folder: Path, max_images: int = 4096) -> list[Path]:
    """A grid of substitution images and their class proportions (teacher argmax) against the original
    data's labelled test split."""
    runtime = resolve_runtime("cpu")
    models = load_models(cfg, runtime)
    images, counts = [], np.zeros(models.num_classes, dtype=np.int64)
    seen = 0
    for batch in source.dictionary_images(1024):
        batch = batch.cpu()
        if batch.dtype != torch.uint8:
            batch = (batch.float().clamp(0, 1) * 255).round().to(torch.uint8)
        if not images:
            images.append(batch[:64])
        logits = models.teacher(models.normalize(batch))
        counts += np.bincount(logits.argmax(1).numpy(), minlength=models.num_classes)
        seen += len(batch)
        if seen >= max_images:
            break
    if not images:
        return []
    info = dataset_info(cfg.data.dataset)
    test = load_dataset(cfg.data.dataset, cfg.data.root, cfg.data.test_split or info.eval_split, cfg.data.download, cfg.data.limit)
    labels = test.labels if getattr(test, "labels", None) is not None else [label for _, label in test.samples]  # array or files
    original = np.bincount(np.asarray(labels, dtype=np.int64), minlength=models.num_classes)
    return [
        plots.image_grid(torch.cat(images), folder / "substitution_images.png"),
        plots.class_proportions(counts, original, folder / "class_proportions.png", getattr(info, "classes", None)),
    ]
