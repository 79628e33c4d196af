"""KDCI distillation on Ray Train: the core loop (`engine.distill.distill`) on every worker of a
`TorchTrainer` (DDP: gloo on CPU, nccl on GPU). This file holds no training math, only the wiring:

- substitution data: a fixed Parquet pool (`pool:` in the config, e.g. a `jobs/synthesize.py` output) is
  read by Ray Data and split across workers (`get_dataset_shard`); otherwise every worker runs the
  config's DFKD method with its own seed (seed + 1000 x rank) and the dictionary is built from every
  worker's data (the core does that collectively);
- checkpoints: after each epoch rank 0's core checkpoint is registered with `ray.train.report` (all
  workers report, as Train requires); Ray keeps the newest `keep_checkpoints` under
  `<storage_path>/<name>/checkpoint_*`;
- resumption: a worker that finds a Ray checkpoint (a restart after a failure under `FailureConfig`, or
  the same `RunConfig(storage_path, name)` submitted again) continues from it; a finished run returns
  at once instead of starting over;
- outputs: rank 0 writes the run's files (student weights + card, dictionary, metrics.json, config.yaml)
  into `<storage_path>/<name>/outputs/` (shared storage on a cluster).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow.parquet as pq
import torch

from ..config import DistillConfig, validate_config, with_absolute_paths
from ..data import dataset_info
from ..engine.distill import check_pool_run, distill, finished_history, make_source
from ..engine.parallel import rank_seed
from ..models import ModelCard
from .dictionary import pool_files
from .session import check_gpu_fraction, check_gpu_workers_see_cuda, ensure_ray, limit_threads_to_cpu_share, train_worker_resources

log = logging.getLogger(__name__)
OUTPUTS = "outputs"  # the core's run directory inside Ray's run folder
READ_TASK_CPUS = 0.25  # per Parquet read task of a pool run
ATTEMPTS = "attempts.jsonl"  # in OUTPUTS: a "started" line per attempt, a "finished" line when one reaches the end


class ShardSource:
    """A worker's share of a fixed Parquet pool, streamed by Ray Data, as the core loop's substitution
    source. Every worker gets the same number of rows (Train splits datasets with `equal=True`), so all
    ranks take the same number of steps. Order within an epoch comes from Ray Data's local shuffle
    (seeded by seed and epoch, but block arrival order is not reproducible): a resumed run continues at the
    epoch, not bit for bit."""

    def __init__(self, shard, rows: int, image_shape: tuple[int, int, int], seed: int, name: str):
        self.shard, self.rows, self.image_shape, self.seed, self.name = shard, rows, tuple(image_shape), seed, name
        self.device = torch.device("cpu")

    def __len__(self) -> int:
        return self.rows

    def to(self, device) -> "ShardSource":
        self.device = torch.device(device)
        return self

    def steps_per_epoch(self, batch_size: int) -> int:
        steps = self.rows // batch_size
        if steps < 1:
            raise ValueError(f"{self.name}: each worker holds {self.rows} rows, fewer than optim.batch_size = {batch_size}; lower it or use fewer workers")
        return steps

    def begin_epoch(self, epoch: int, distiller) -> None:
        """Nothing to synthesize: the pool is fixed."""

    def _decode(self, column) -> torch.Tensor:
        images = np.frombuffer(b"".join(column), dtype=np.uint8).reshape(len(column), *self.image_shape)
        return torch.from_numpy(images.copy()).to(self.device, non_blocking=True)

    def batches(self, epoch: int, batch_size: int) -> Iterator[torch.Tensor]:
        steps = self.steps_per_epoch(batch_size)
        stream = self.shard.iter_batches(
            batch_size=batch_size, batch_format="numpy", drop_last=True,
            local_shuffle_buffer_size=min(self.rows, max(4 * batch_size, 1024)), local_shuffle_seed=self.seed * 1_000_003 + epoch,
        )
        done = 0
        for batch in stream:  # read to the end even past `steps`: a split's epoch ends for all workers together
            if done < steps:
                yield self._decode(batch["image"])
            done += 1
        if done < steps:
            raise RuntimeError(f"{self.name}: the worker's shard gave {done} batches, expected {steps}")

    def dictionary_images(self, batch_size: int = 1024) -> Iterator[torch.Tensor]:
        for batch in self.shard.iter_batches(batch_size=batch_size, batch_format="numpy"):
            yield self._decode(batch["image"])

    def state_dict(self) -> dict:
        return {"name": self.name, "rows": self.rows, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state != self.state_dict():
            raise ValueError(f"the pool shard differs from the one this run started with ({state} vs {self.state_dict()}); use another run name")


class _TrainReporter:
    """The core loop's `RunLogger` inside a Ray Train worker: each epoch every worker reports, rank 0 with
    its checkpoint file (hard-linked into a temporary folder Ray copies into storage); rank 0's metrics also
    go to an MLflow run when one is given."""

    def __init__(self, mlflow_run: dict | None = None):
        self.mlflow_run, self.mlflow = mlflow_run, None

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if self.mlflow_run is None:  # the loop calls this on rank 0 only: only rank 0 opens the store
            return
        try:
            if self.mlflow is None:
                from ..tracking.logger import MlflowRunLogger
                from ..tracking.store import client

                self.mlflow = MlflowRunLogger(client(self.mlflow_run["uri"]), self.mlflow_run["run_id"])
            self.mlflow.log_metrics(metrics, step)
        except Exception as exc:  # tracking is best-effort: a busy store must not kill training
            log.warning("mlflow: epoch %d metrics not logged (%s)", step, exc)

    def log_artifact(self, path: Path) -> None:
        pass

    def on_checkpoint(self, epoch: int, row: dict, path: Path | None) -> None:
        import ray.train

        metrics = {k: float(v) for k, v in row.items() if isinstance(v, (int, float))}
        if path is None:
            ray.train.report(metrics, checkpoint=None)
            return
        with tempfile.TemporaryDirectory(dir=path.parent, prefix=".report-") as folder:
            target = Path(folder) / path.name
            try:
                os.link(path, target)
            except OSError:  # another filesystem: copy
                shutil.copy2(path, target)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))


def _train_worker(config: dict) -> None:
    """`train_loop_per_worker`: build this rank's source and run the core loop, resuming from Ray's checkpoint."""
    import ray.train
    import ray.train.torch

    limit_threads_to_cpu_share()
    cfg = validate_config(DistillConfig, config["cfg"], "the run's config")
    context = ray.train.get_context()
    rank = context.get_world_rank()
    # The device Ray Train gave this worker (cuda:<local rank>); CPU workers stay on the CPU even on a GPU node.
    cfg = cfg.model_copy(update={"device": str(ray.train.torch.get_device()) if config["use_gpu"] else "cpu"})
    if cfg.pool is not None:
        source = ShardSource(ray.train.get_dataset_shard("train"), config["rows_per_worker"], tuple(config["image_shape"]),
                             seed=rank_seed(cfg.seed), name=f"pool {Path(cfg.pool).name} (shard {rank})")
    else:
        source = make_source(cfg, seed=rank_seed(cfg.seed))
    run_dir = Path(config["run_dir"])
    if rank == 0:  # report folders an attempt killed mid-report left behind
        for leftover in run_dir.glob(".report-*"):
            shutil.rmtree(leftover, ignore_errors=True)
    checkpoint = ray.train.get_checkpoint()
    reporter = _TrainReporter(config.get("mlflow_run"))
    t0 = time.time()
    if rank == 0:  # before any work: an attempt killed mid-run is on record too
        _record_attempt(run_dir, {"status": "started", "started": t0, "checkpoint": None if checkpoint is None else checkpoint.path})
    if checkpoint is None:
        result = distill(cfg, source, reporter, run_dir=run_dir, resume_from=None, managed=True)
    else:
        with checkpoint.as_directory() as folder:
            log.info("rank %d: resuming from %s", rank, checkpoint.path)
            result = distill(cfg, source, reporter, run_dir=run_dir, resume_from=Path(folder) / "checkpoint.pt", managed=True)
    if rank == 0:  # and its end: where it continued from, so restarts are visible afterwards
        _record_attempt(run_dir, {"status": "finished", "started": t0, "ended": time.time(), "resumed_from": result.resumed_from,
                                  "epoch": result.epoch})


def _record_attempt(run_dir: Path, line: dict) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / ATTEMPTS, "a") as f:
        f.write(json.dumps(line) + "\n")


def read_attempts(run_dir: Path) -> list[dict]:
    """Every attempt of a run, in order: {"status": "started" | "finished", ...} (see _train_worker)."""
    path = run_dir / ATTEMPTS
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def _prune_checkpoints(run_folder: Path, kept: list[str]) -> list[Path]:
    """Remove checkpoint folders Ray does not keep: one a killed attempt was writing (never registered)
    outlives the run otherwise. Returns what was removed."""
    keep = {Path(k).resolve() for k in kept}
    removed = [p for p in run_folder.glob("checkpoint_*") if p.is_dir() and p.resolve() not in keep]
    for folder in removed:
        shutil.rmtree(folder, ignore_errors=True)
    return removed


@dataclass
class RayDistillResult:
    run_dir: Path  # the outputs (student, dictionary, metrics.json, config.yaml)
    storage: Path  # Ray's run folder (checkpoints)
    history: list[dict] = field(default_factory=list)
    checkpoint: str | None = None
    resumed_from: int = 0  # epoch the finishing attempt continued from (0: it ran from the start)
    seconds: float = 0.0
    workers: int = 1
    use_gpu: bool = False

    @property
    def final(self) -> dict:
        return self.history[-1] if self.history else {}


def resolve_storage(storage_path: str | Path | None = None) -> Path:
    """Where runs go: `storage_path`, else $KDCI_STORAGE/ray (shared storage on a cluster, see cluster.yaml),
    else runs/ray here. Inside `ray job submit` the working directory is a temporary copy of the upload,
    so storage there must be an absolute path (else a re-submission could not find the run to resume)."""
    in_submitted_job = "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ
    if storage_path is None and "KDCI_STORAGE" in os.environ:
        storage_path = Path(os.environ["KDCI_STORAGE"]) / "ray"
    if in_submitted_job and (storage_path is None or not Path(storage_path).is_absolute()):
        raise ValueError(
            f"storage = {storage_path or 'runs/ray (default)'}: inside `ray job submit` the working directory is a temporary copy; "
            "pass --storage /absolute/shared/path or set KDCI_STORAGE on the cluster"
        )
    return Path(storage_path if storage_path is not None else "runs/ray").resolve()


def _check_inputs(cfg: DistillConfig) -> None:
    """Files a run needs, checked on the driver before any worker starts."""
    needed = {"teacher.weights": cfg.teacher.weights, "pool": cfg.pool, "kdci.dictionary": cfg.kdci.dictionary}
    for name, path in needed.items():
        if path is not None and not Path(path).exists():
            raise FileNotFoundError(f"{name} = {path}: no such file; fix the path (relative paths are read from {Path.cwd()})")
    if cfg.pool is None and cfg.synthesis is None:
        raise ValueError("the config has no `synthesis:` section and no `pool:`: name a DFKD method or a Parquet pool")
    check_pool_run(cfg)


def _train_logging():
    """Ray Train's own INFO lines (each epoch's "Checkpoint successfully created", worker-group starts) off the
    console, kept in Ray Train's log files; the loop's per-epoch line says the same. (The workers' "Reporting
    training result" lines bypass this filter in Ray 2.60 and still show.)"""
    import ray.train

    return ray.train.LoggingConfig(log_level="WARNING")


def _read_pool(ray, files: list[Path]):
    """The pool's image column as a Ray Dataset whose read tasks take a fraction of a CPU: next to other
    trials' Train workers (a Tune sweep on a small machine) less than one CPU may be free, and a 1-CPU read
    task would never be scheduled (the run hangs). Ray Data's newer read path adds a file-listing task that
    always asks for a whole CPU, so this read uses the single-operator path while it is available."""
    context = ray.data.DataContext.get_current()
    previous = getattr(context, "use_datasource_v2", None)
    if previous is not None:
        context.use_datasource_v2 = False  # the dataset keeps a copy of the context it was made under
    try:
        dataset = ray.data.read_parquet([str(f) for f in files], columns=["image"], num_cpus=READ_TASK_CPUS)
        # Read again every epoch on every worker: Ray Data's start/plan/finish lines for each pass are noise
        # on the console (the loop prints each epoch); they stay in Ray Data's log file.
        dataset.context.print_on_execution_start = False
        dataset.context.enable_progress_bars = False
        return dataset
    finally:
        if previous is not None:
            context.use_datasource_v2 = previous


def _newest_checkpoint(run_folder: Path) -> str | None:
    folders = sorted(run_folder.glob("checkpoint_*"), key=lambda p: p.stat().st_mtime)
    return str(folders[-1]) if folders else None


def distill_on_ray(
    cfg: DistillConfig,
    *,
    num_workers: int = 2,
    use_gpu: bool | None = None,
    cpus_per_worker: float | None = None,
    gpus_per_worker: float | None = None,
    storage_path: str | Path | None = None,
    max_failures: int = 2,
    keep_checkpoints: int = 2,
    address: str | None = None,
    callbacks: list | None = None,
    mlflow_run: dict | None = None,
    probe_cuda: bool = True,
) -> RayDistillResult:
    """Run `cfg` as a Ray Train job of `num_workers` DDP workers; submitting the same (storage_path, name)
    again resumes it (a finished run returns its results without training).

    `use_gpu` None: GPUs when the cluster has any. `cpus_per_worker` None: one GPU worker takes 1 CPU; CPU
    workers share the CPUs leaving one free for Ray Data's reading. `callbacks`: Ray Train user callbacks
    (Tune's TuneReportCallback in a sweep); `mlflow_run`: {"uri", "run_id"} that rank 0 logs its epochs to.
    `probe_cuda`: check that torch sees CUDA where GPU workers run before starting them (a sweep checks once).
    """
    check_gpu_fraction(gpus_per_worker, num_workers)
    cfg = with_absolute_paths(cfg)
    _check_inputs(cfg)
    storage = resolve_storage(storage_path)
    run_dir = storage / cfg.name / OUTPUTS
    history = finished_history(cfg, run_dir)
    if history is not None:  # finished before (maybe its last checkpoint never got registered): no workers needed
        log.info("ray train: %s already finished (%d epochs) in %s", cfg.name, cfg.optim.epochs, run_dir)
        return RayDistillResult(run_dir, storage / cfg.name, history, checkpoint=_newest_checkpoint(storage / cfg.name),
                                resumed_from=cfg.optim.epochs, workers=num_workers, use_gpu=bool(use_gpu))
    ray = ensure_ray(address)
    import ray.train
    from ray.train.torch import TorchTrainer

    # CPU workers share the CPUs, one left free for Ray Data's reading (and the Train controller); a GPU
    # fraction lets several one-worker runs (Tune trials) share a GPU.
    use_gpu, resources = train_worker_resources(ray, num_workers, use_gpu, gpus_per_worker, cpus_per_worker, cpu_reserve=1.0)
    if use_gpu and probe_cuda:
        check_gpu_workers_see_cuda(ray, resources, "Ray Train worker")
    info = dataset_info(cfg.data.dataset)
    image_shape = [info.channels, info.image_size, info.image_size]
    datasets, rows_per_worker = {}, None
    if cfg.pool is not None:
        files = pool_files(cfg.pool)
        rows = sum(pq.read_metadata(f).num_rows for f in files)
        rows_per_worker = rows // num_workers
        if rows_per_worker < cfg.optim.batch_size:
            raise ValueError(
                f"pool = {cfg.pool}: {rows} rows over {num_workers} workers is {rows_per_worker} each, fewer than "
                f"optim.batch_size = {cfg.optim.batch_size}; lower the batch size or the workers"
            )
        datasets["train"] = _read_pool(ray, files)
    trainer = TorchTrainer(
        _train_worker,
        train_loop_config={
            "cfg": cfg.model_dump(mode="json"), "run_dir": str(run_dir), "use_gpu": use_gpu,
            "rows_per_worker": rows_per_worker, "image_shape": image_shape, "mlflow_run": mlflow_run,
        },
        scaling_config=ray.train.ScalingConfig(num_workers=num_workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=cfg.name, storage_path=str(storage),
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=keep_checkpoints),
            callbacks=callbacks,
            logging_config=_train_logging(),
        ),
        datasets=datasets or None,
    )
    log.info("ray train: %s on %d %s worker(s) %s, storage %s", cfg.name, num_workers, "GPU" if use_gpu else "CPU", resources, storage)
    t0 = time.perf_counter()
    result = trainer.fit()
    seconds = time.perf_counter() - t0
    if result.error is not None:
        raise result.error
    metrics_file = run_dir / "metrics.json"
    if not metrics_file.is_file():
        raise RuntimeError(f"the run finished but {metrics_file} is missing: is {storage} storage every node shares?")
    kept = [c.path for c, _ in (result.best_checkpoints or [])]
    if result.checkpoint is not None and kept:
        for folder in _prune_checkpoints(storage / cfg.name, kept):
            log.info("ray train: removed %s (written by a stopped attempt, not among Ray's kept checkpoints)", folder.name)
    finished = [a for a in read_attempts(run_dir) if a.get("status", "finished") == "finished"]
    return RayDistillResult(
        run_dir, storage / cfg.name, json.loads(metrics_file.read_text()),
        checkpoint=None if result.checkpoint is None else result.checkpoint.path,
        resumed_from=finished[-1]["resumed_from"] if finished else 0, seconds=seconds,
        workers=num_workers, use_gpu=use_gpu,
    )


def distill_on_ray_tracked(
    cfg: DistillConfig, *, experiment: str = "kdci", tracking_uri: str | None = None, parent_run_id: str | None = None,
    tags: dict[str, str] | None = None, **ray_options,
) -> tuple[RayDistillResult, str]:
    """`distill_on_ray` as one MLflow run (nested under `parent_run_id` when given): rank 0 logs every epoch,
    and at the end the run's files, the student as an MLflow model and figures of the substitution data
    (for a pool) are logged. Submitting it again continues the same MLflow run (found by its storage
    folder); a run already logged to the end is not logged twice. Returns the result and the run id."""
    from ..tracking.logger import MlflowRunLogger
    from ..tracking.runs import log_finished_run
    from ..tracking.store import client, experiment_id, tracking_uri as resolve_uri

    cfg = with_absolute_paths(cfg)
    _check_inputs(cfg)  # before any MLflow run exists
    folder = resolve_storage(ray_options.get("storage_path")) / cfg.name
    uri = resolve_uri(tracking_uri)
    mlflow_client = client(uri)
    key = {"kdci.ray_run": str(folder)}
    run = MlflowRunLogger.find(mlflow_client, experiment_id(mlflow_client, experiment), key)
    if run is not None and run.status == "FINISHED" and finished_history(cfg, folder / OUTPUTS) is not None:
        return distill_on_ray(cfg, **ray_options), run.run_id  # logged to the end before: returns without training
    if run is not None:  # continue the same MLflow run (its earlier epochs are there)
        mlflow_client.update_run(run.run_id, status="RUNNING")
    else:
        method = cfg.synthesis.method if cfg.synthesis is not None else "pool"
        run = MlflowRunLogger.start(
            experiment, cfg.name, uri=uri, parent=None if parent_run_id is None else MlflowRunLogger(mlflow_client, parent_run_id),
            tags={**key, "method": method, "kdci": str(cfg.kdci.enabled).lower(), "teacher": cfg.teacher.arch,
                  "student": cfg.student.arch, **(tags or {})},
        )
        run.log_config(cfg)
    try:
        result = distill_on_ray(cfg, mlflow_run={"uri": uri, "run_id": run.run_id}, **ray_options)
        log_finished_run(run, cfg, result.run_dir, make_source(cfg) if cfg.pool is not None else None)
    except BaseException:
        run.end("FAILED")
        raise
    run.end()
    return result, run.run_id


def _teacher_worker(config: dict) -> None:
    import ray.train
    import ray.train.torch

    from ..config import TeacherTrainConfig
    from ..engine.teacher import train_teacher

    limit_threads_to_cpu_share()
    cfg = validate_config(TeacherTrainConfig, config["cfg"], "the teacher config")
    cfg = cfg.model_copy(update={"device": str(ray.train.torch.get_device()) if config["use_gpu"] else "cpu"})
    train_teacher(cfg)  # rank 0 writes the weights and the card the driver reads


def train_teacher_on_ray(
    cfg, *, num_workers: int = 2, use_gpu: bool | None = None, cpus_per_worker: float | None = None,
    storage_path: str | Path | None = None, address: str | None = None,
) -> dict:
    """`train-teacher` as a Ray Train job of `num_workers` DDP workers (each a share of every epoch's
    batches); rank 0 writes `<output.dir>/<name>.safetensors` + card (output.dir: storage every node shares).
    Returns the card's numbers."""
    from ..config import TeacherTrainConfig

    if not isinstance(cfg, TeacherTrainConfig):
        raise TypeError("train_teacher_on_ray takes a TeacherTrainConfig")
    cfg = with_absolute_paths(cfg)
    weights = Path(cfg.output.dir) / f"{cfg.name}.safetensors"
    if weights.exists() and not cfg.output.overwrite:  # before any worker starts
        raise FileExistsError(f"{weights} exists: choose another name, or set output.overwrite=true to replace it")
    storage = resolve_storage(storage_path)
    ray = ensure_ray(address)
    import ray.train
    from ray.train.torch import TorchTrainer

    use_gpu, resources = train_worker_resources(ray, num_workers, use_gpu, None, cpus_per_worker, cpu_reserve=0.0)
    if use_gpu:
        check_gpu_workers_see_cuda(ray, resources, "Ray Train worker")
    trainer = TorchTrainer(
        _teacher_worker,
        train_loop_config={"cfg": cfg.model_dump(mode="json"), "use_gpu": use_gpu},
        scaling_config=ray.train.ScalingConfig(num_workers=num_workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=ray.train.RunConfig(name=f"teacher-{cfg.name}-{int(time.time())}", storage_path=str(storage),
                                       logging_config=_train_logging()),
    )
    t0 = time.perf_counter()
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    card_file = weights.with_suffix(".json")
    if not card_file.is_file():
        raise RuntimeError(f"training finished but {card_file} is missing: is output.dir = {cfg.output.dir} storage every node shares?")
    card = ModelCard.read(card_file)
    return {"weights": str(weights), "top1": card.accuracy, "top5": card.extra.get("top5"),
            "seconds": time.perf_counter() - t0, "workers": num_workers, "card": card}
