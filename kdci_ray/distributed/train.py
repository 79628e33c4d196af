"""KDCI distillation on Ray Train: the core loop (`engine.distill.distill`) on every worker of a
`TorchTrainer` (DDP: gloo on CPU, nccl on GPU). This file holds no training math, only the wiring:

- checks first: everything a worker would refuse in its first seconds (`engine.distill.preflight`: models,
  pool schema, kdci.n, a prebuilt dictionary, the checkpoint a resubmission continues from) is refused on
  the driver before Ray starts;
- substitution data: a fixed Parquet pool (`pool:` in the config, e.g. a `jobs/synthesize.py` output) is
  split into equal row ranges; each worker reads its range once and holds it on its device (uint8);
  otherwise every worker runs the config's DFKD method with its own seed (seed + 1000 x rank) and the
  dictionary is built from every worker's data (the core does that collectively);
- checkpoints: after each epoch every worker reports to `ray.train.report` with the files it wrote (rank
  0's checkpoint, each rank's own part: its source and RNG) into one checkpoint folder; Ray keeps the newest
  `keep_checkpoints` under `<storage_path>/<name>/checkpoint_*`;
- faults: a worker that dies is restarted from the newest registered checkpoint (at most `max_failures`
  times); a deterministic error (bad input, a diverged loss) ends the run at once, as itself;
- resumption: a worker that finds a Ray checkpoint (a restart, or the same `RunConfig(storage_path, name)`
  submitted again) continues from it; a finished run returns at once instead of starting over;
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
import numpy as np
import torch

from .. import console
from ..config import DistillConfig, validate_config, with_absolute_paths
from ..data import SubstitutionSet
from ..engine.distill import distill, finished_history, make_source, pool_schema, preflight
from ..engine.parallel import rank_seed
from ..models import ModelCard
from ..synthesis import read_pool_rows
from .session import check_gpu_fraction, check_gpu_workers_see_cuda, ensure_ray, limit_threads_to_cpu_share, train_worker_resources

log = logging.getLogger(__name__)
OUTPUTS = "outputs"  # the core's run directory inside Ray's run folder
ATTEMPTS = "attempts.jsonl"  # in OUTPUTS: a "started" line per attempt, a "finished" line when one reaches the end


def pool_share(cfg: DistillConfig, rank: int, world: int, device: torch.device) -> SubstitutionSet:
    """This rank's equal share of the config's fixed Parquet pool (rows [rank x n, (rank + 1) x n), n = rows //
    world), read and decoded once and held on `device` as uint8: every epoch shuffles and indexes it there
    (no re-read, no host decoding, no host->device copy per step). A share larger than the device's free
    memory is refused before it is read."""
    schema = pool_schema(cfg)
    per = schema.total_rows // world
    check_memory(per * int(np.prod(schema.image_shape)), device, f"pool = {cfg.pool}: this worker's share ({per} images)")
    images = read_pool_rows(cfg.pool, rank * per, (rank + 1) * per, schema)
    return SubstitutionSet(images.to(device), seed=rank_seed(cfg.seed), name=f"pool {Path(cfg.pool).name} (rows {rank * per}..{(rank + 1) * per})")


def check_memory(nbytes: int, device: torch.device, what: str, free: int | None = None) -> None:
    """Refuse to hold `nbytes` on `device` when that is more than 80 % of its free memory (GPU; `free` when
    a probe measured it elsewhere) or of the node's available memory (CPU): the models and their activations
    need the rest."""
    if free is None:
        free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if nbytes > 0.8 * free:
        where = f"a GPU has {free / 2**30:.1f} GiB free" if device.type == "cuda" else f"the node has {free / 2**30:.1f} GiB available"
        raise ValueError(f"{what} needs {nbytes / 2**30:.2f} GiB on {device.type} but {where}: use more workers (each holds "
                         "rows / workers), or a smaller pool")


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

    def on_checkpoint(self, epoch: int, row: dict, paths: list[Path]) -> None:
        """Every rank reports; its files (rank 0's checkpoint, each rank's part) go into one Ray checkpoint
        folder (Ray Train gives all ranks' reports of a step the same folder)."""
        import ray.train

        metrics = {k: float(v) for k, v in row.items() if isinstance(v, (int, float))}
        if not paths:
            ray.train.report(metrics, checkpoint=None)
            return
        with tempfile.TemporaryDirectory(dir=paths[0].parent, prefix=".report-") as folder:
            for path in paths:
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
    console_of_worker(config, rank)
    # The device Ray Train gave this worker (cuda:<local rank>); CPU workers stay on the CPU even on a GPU node.
    cfg = cfg.model_copy(update={"device": str(ray.train.torch.get_device()) if config["use_gpu"] else "cpu"})
    if cfg.pool is not None:
        source = pool_share(cfg, rank, context.get_world_size(), torch.device(cfg.device))
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


def console_settings(progress: bool = True) -> dict:
    """What a worker needs to know of the driver's console: --verbose, and whether its progress lines are wanted
    (a sweep's trials are not: the driver prints one line per trial result)."""
    return {"verbose": console.is_verbose(), "progress": progress}


def console_of_worker(config: dict, rank: int) -> None:
    """Rank 0 tells the run's story; the other ranks (the same epochs) and a sweep's trials say only warnings, unless verbose."""
    settings = config.get("console", {})
    if settings.get("verbose"):
        console.set_verbose(True)
    elif rank > 0 or not settings.get("progress", True):
        logging.getLogger("kdci_ray").setLevel(logging.WARNING)


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
    """Files a run needs, checked on the driver before anything else (no model is loaded yet)."""
    needed = {"teacher.weights": cfg.teacher.weights, "pool": cfg.pool, "kdci.dictionary": cfg.kdci.dictionary}
    for name, path in needed.items():
        if path is not None and not Path(path).exists():
            raise FileNotFoundError(f"{name} = {path}: no such file; fix the path (relative paths are read from {Path.cwd()})")
    if cfg.pool is None and cfg.synthesis is None:
        raise ValueError("the config has no `synthesis:` section and no `pool:`: name a DFKD method or a Parquet pool")


def resume_checkpoint(run_folder: Path) -> Path | None:
    """The checkpoint file a (re)submitted run would continue from: the newest one Ray registered (its
    snapshot names it; a folder a killed attempt was still writing is not one)."""
    try:
        snapshot = json.loads((run_folder / "checkpoint_manager_snapshot.json").read_text())
        name = (snapshot.get("latest_checkpoint_result") or {}).get("checkpoint_dir_name")
    except (OSError, ValueError):
        return None
    path = run_folder / name / "checkpoint.pt" if name else None
    return path if path is not None and path.is_file() else None


# Errors a restart would raise again (bad input, a diverged loss): the run ends with them at once.
DETERMINISTIC_ERRORS = (ValueError, TypeError, KeyError, IndexError, FileNotFoundError, FileExistsError, FloatingPointError)


def _failure(error: Exception) -> tuple[str, BaseException | None]:
    """What a failed `fit()` was: ("deterministic", the first such error any rank raised: ended with at once,
    as itself, so the entry points print it as one line), ("died", None): a worker process died (restart),
    or ("other", None) (Ray's error, with every worker's traceback, is raised)."""
    import ray.exceptions

    failures = getattr(error, "worker_failures", None) or {}
    raised = [getattr(failures[r], "_base_exc", failures[r]) for r in sorted(failures)]  # Ray Train wraps a worker's exception
    for exc in raised:
        if isinstance(exc, DETERMINISTIC_ERRORS):
            return "deterministic", exc
    # A dead worker reaches here as a failed health check wrapping the actor's death (or a hung one's timeout).
    if any(isinstance(getattr(e, "health_check_failure", e), ray.exceptions.RayActorError)
           or type(e).__name__ == "WorkerHealthCheckTimeoutError" for e in failures.values()):
        return "died", None
    return "other", None


def _train_logging():
    """Ray Train's own INFO lines (each epoch's "Checkpoint successfully created", worker-group starts) off the
    console, kept in Ray Train's log files; the loop's per-epoch line says the same. (The workers' "Reporting
    training result" lines bypass this filter in Ray 2.60 and still show.)"""
    import ray.train

    return ray.train.LoggingConfig(log_level="WARNING")


def _newest_checkpoint(run_folder: Path) -> str | None:
    folders = sorted(run_folder.glob("checkpoint_*"), key=lambda p: p.stat().st_mtime)
    return str(folders[-1]) if folders else None


def check_run(cfg: DistillConfig, storage: Path, num_workers: int) -> int | None:
    """Everything a worker would refuse in its first seconds, refused on the driver before Ray starts (models,
    pool, kdci.n, a prebuilt dictionary, the checkpoint a resubmission continues from). Returns the bytes of
    a worker's share of a fixed pool (None: no pool)."""
    preflight(cfg, num_workers, resume_checkpoint(storage / cfg.name))
    if cfg.pool is None:
        return None
    schema = pool_schema(cfg)
    if schema.total_rows < num_workers:
        raise ValueError(f"pool = {cfg.pool}: {schema.total_rows} rows cannot give each of --workers = {num_workers} any; use fewer workers")
    return (schema.total_rows // num_workers) * int(np.prod(schema.image_shape))


def place_workers(cfg: DistillConfig, share: int | None, num_workers: int, use_gpu: bool | None, gpus_per_worker: float | None,
                  cpus_per_worker: float | None, address: str | None, probe_cuda: bool = True):
    """(ray, use_gpu, resources per worker), decided from the cluster: workers it cannot place, a torch that
    sees no CUDA where GPU workers would run, and a pool share beyond the GPU's memory are refused here."""
    ray = ensure_ray(address)
    # CPU workers share the CPUs, one left free (the Train controller, other stages); a GPU fraction lets
    # several one-worker runs (Tune trials) share a GPU.
    use_gpu, resources = train_worker_resources(ray, num_workers, use_gpu, gpus_per_worker, cpus_per_worker, cpu_reserve=1.0)
    if use_gpu and probe_cuda:
        report = check_gpu_workers_see_cuda(ray, resources, "Ray Train worker")
        if share is not None:
            check_memory(share, torch.device("cuda"), f"pool = {cfg.pool}: a worker's share", free=report["free_bytes"])
    return ray, use_gpu, resources


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
    progress: bool = True,
) -> RayDistillResult:
    """Run `cfg` as a Ray Train job of `num_workers` DDP workers; submitting the same (storage_path, name)
    again resumes it (a finished run returns its results without training).

    `use_gpu` None: GPUs when the cluster has any. `cpus_per_worker` None: one GPU worker takes 1 CPU; CPU
    workers share the CPUs leaving one free. `max_failures`: restarts after a worker died. `callbacks`: Ray Train user callbacks
    (Tune's TuneReportCallback in a sweep); `mlflow_run`: {"uri", "run_id"} that rank 0 logs its epochs to.
    `probe_cuda`: check that torch sees CUDA where GPU workers run before starting them (a sweep checks once).
    `progress`: rank 0's per-epoch lines on the console (a sweep prints its own, one per trial result).
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
    share = check_run(cfg, storage, num_workers)
    ray, use_gpu, resources = place_workers(cfg, share, num_workers, use_gpu, gpus_per_worker, cpus_per_worker, address, probe_cuda)
    import ray.train
    from ray.train.torch import TorchTrainer

    log.info("ray train: %s on %d %s worker(s) %s, storage %s", cfg.name, num_workers, "GPU" if use_gpu else "CPU", resources, storage)
    t0 = time.perf_counter()
    # Ray Train's FailureConfig would restart a worker group after any error, a deterministic one (a bad
    # input a worker found, a diverged loss) too; its FailurePolicy has no public hook. So Train never
    # restarts by itself, and this loop restarts (from the newest registered checkpoint, as a resubmission
    # would) only after a worker died.
    for attempt in range(max_failures + 1):
        trainer = TorchTrainer(
            _train_worker,
            train_loop_config={"cfg": cfg.model_dump(mode="json"), "run_dir": str(run_dir), "use_gpu": use_gpu, "mlflow_run": mlflow_run,
                               "console": console_settings(progress)},
            scaling_config=ray.train.ScalingConfig(num_workers=num_workers, use_gpu=use_gpu, resources_per_worker=resources),
            run_config=ray.train.RunConfig(
                name=cfg.name, storage_path=str(storage),
                failure_config=ray.train.FailureConfig(max_failures=0),
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=keep_checkpoints),
                callbacks=callbacks,
                logging_config=_train_logging(),
            ),
        )
        try:
            result = trainer.fit()
            break
        except ray.train.TrainingFailedError as exc:
            kind, error = _failure(exc)
            if kind == "deterministic":
                raise error from None
            if kind == "other" or attempt == max_failures:
                raise
            log.warning("ray train: %s: a worker died; restarting from the newest checkpoint (restart %d of at most %d)",
                        cfg.name, attempt + 1, max_failures)
    seconds = time.perf_counter() - t0
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
    if finished_history(cfg, folder / OUTPUTS) is None:  # refusals leave no failed MLflow run behind: checked first
        share = check_run(cfg, folder.parent, ray_options.get("num_workers", 2))
        o = ray_options
        place_workers(cfg, share, o.get("num_workers", 2), o.get("use_gpu"), o.get("gpus_per_worker"), o.get("cpus_per_worker"),
                      o.get("address"), o.get("probe_cuda", True))
        ray_options = {**ray_options, "probe_cuda": False}  # probed just now
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
    console_of_worker(config, ray.train.get_context().get_world_rank())
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
        train_loop_config={"cfg": cfg.model_dump(mode="json"), "use_gpu": use_gpu, "console": console_settings()},
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
