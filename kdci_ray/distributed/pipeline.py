"""The three stages in order, data flowing one way through shared storage:

    generation (Ray Data, Parquet)  ->  dictionary (shard actors, distributed k-means)  ->  distillation (Ray Train)

Layout under `<storage>/<name>/`: `pool/` (Parquet shards + manifest.json), `dictionary.safetensors`,
`outputs/` (the student, metrics, config) and Ray Train's `checkpoint_*`. Dictionaries are also cached
under `<storage>/dictionaries/` by (data, teacher, N, seed, settings). Submitting the same config again
continues: finished generation shards are kept, the dictionary comes from the cache, distillation resumes
from its last checkpoint (a finished run returns at once).
"""

from __future__ import annotations

import time
from pathlib import Path

from ..config import DistillConfig, with_absolute_paths
from ..console import Stages
from ..engine.distill import check_pool_run, load_models
from ..engine.runtime import resolve_runtime
from .dictionary import dictionary_for_config
from .generate import generate, select_wild
from .session import ensure_ray
from .train import distill_on_ray, distill_on_ray_tracked, resolve_storage


def run_pipeline(
    cfg: DistillConfig,
    *,
    storage_path: str | Path | None = None,
    shards: int = 4,
    calls_per_shard: int = 1,
    actors: int = 2,
    dictionary_shards: int = 2,
    workers: int = 2,
    mode: str = "resume",
    use_gpu: bool | None = None,
    max_failures: int = 2,
    address: str | None = None,
    track: bool = True,
    experiment: str = "kdci",
    tracking_uri: str | None = None,
    parent_run_id: str | None = None,
) -> dict:
    """Generate the substitution data of `cfg.synthesis`, build its dictionary (when KDCI is on) and distill
    on it; returns the stage outputs and wall times (and the MLflow run ids when tracked)."""
    if cfg.synthesis is None:
        raise ValueError("the pipeline generates with the config's DFKD method: add a `synthesis:` section")
    if cfg.pool is not None:
        raise ValueError(f"pool = {cfg.pool}: the pipeline makes its own pool; unset pool (or run jobs/distill.py on that pool)")
    cfg = with_absolute_paths(cfg)
    storage = resolve_storage(storage_path)
    folder = storage / cfg.name
    pool = folder / "pool"
    check_pool_run(cfg.model_copy(update={"pool": pool}))  # e.g. DFND's noise adaptation: refused before any stage
    teacher_id = load_models(cfg, resolve_runtime("cpu")).teacher_id  # fails on bad teacher weights before any stage
    ensure_ray(address)
    parent = _pipeline_run(cfg, folder, experiment, tracking_uri, parent_run_id) if track else None
    try:
        out = _stages(cfg, storage, folder, pool, teacher_id, parent, shards=shards, calls_per_shard=calls_per_shard, actors=actors,
                      dictionary_shards=dictionary_shards, workers=workers, mode=mode, use_gpu=use_gpu, max_failures=max_failures,
                      address=address, experiment=experiment)
    except BaseException:
        if parent is not None:
            parent.end("FAILED")
        raise
    if parent is not None:
        parent.log_metrics({f"seconds_{k}": v for k, v in out["seconds"].items()} | {"pool_rows": out["pool_rows"]}, step=0)
        parent.log_metrics({k: out[k] for k in ("test_top1", "test_top1_compensated") if out.get(k) is not None}, step=out["epochs"])
        scores = ", ".join(f"{k} {out[k]:.2f} %" for k in ("test_top1", "test_top1_compensated") if out.get(k) is not None)
        parent.describe(
            f"**Pipeline {cfg.name}**: {cfg.synthesis.method} generation ({out['pool_rows']} images, Ray Data) -> "
            f"{'KDCI dictionary (distributed k-means, N = ' + str(cfg.kdci.n) + ') -> ' if cfg.kdci.enabled else ''}"
            f"Ray Train distillation {cfg.teacher.arch} -> {cfg.student.arch}, {out['epochs']} epochs: {scores or 'no score'}.\n\n"
            "Stage times: " + ", ".join(f"{k} {v:.0f} s" for k, v in out["seconds"].items()) + ". The distillation is the child run.")
        parent.end()
        out["mlflow_run_id"] = parent.run_id
    return out


def _pipeline_run(cfg: DistillConfig, folder: Path, experiment: str, tracking_uri: str | None, parent_run_id: str | None):
    """The pipeline's MLflow run: found again by its storage folder when the pipeline is re-submitted."""
    from ..tracking.logger import MlflowRunLogger
    from ..tracking.store import client, experiment_id, tracking_uri as resolve_uri

    uri = resolve_uri(tracking_uri)
    mlflow_client = client(uri)
    tags = {"kdci.pipeline": str(folder)}
    run = MlflowRunLogger.find(mlflow_client, experiment_id(mlflow_client, experiment), tags)
    if run is None:
        outer = None if parent_run_id is None else MlflowRunLogger(mlflow_client, parent_run_id)
        run = MlflowRunLogger.start(experiment, f"{cfg.name} (pipeline)", uri=uri, parent=outer,
                                    tags={**tags, "method": cfg.synthesis.method, "kdci": str(cfg.kdci.enabled).lower()})
        run.log_config(cfg)
    else:
        mlflow_client.update_run(run.run_id, status="RUNNING")
    return run


def _stages(cfg, storage, folder, pool, teacher_id, parent, *, shards, calls_per_shard, actors, dictionary_shards, workers, mode,
            use_gpu, max_failures, address, experiment) -> dict:
    seconds: dict[str, float] = {}
    stages = Stages(3 if cfg.kdci.enabled else 2)
    t0 = time.perf_counter()
    if cfg.synthesis.method == "dfnd":
        stages(f"selection: dfnd's top-k of the wild pool on Ray Data, {shards} shards -> {pool}")
        manifest = select_wild(cfg, pool, shards=shards, actors=actors, mode=mode)
    else:
        stages(f"generation: {cfg.synthesis.method} on Ray Data, {shards} shards x {calls_per_shard} synthesis call(s) -> {pool}")
        manifest = generate(cfg, pool, shards=shards, calls_per_shard=calls_per_shard, actors=actors, mode=mode)
    seconds["generate"] = round(time.perf_counter() - t0, 2)
    stages.done(f"{manifest['rows']} substitution images in {seconds['generate']:.0f} s")
    if parent is not None:
        _log_pool(parent, cfg.model_copy(update={"pool": pool}), pool)

    overrides: dict = {"pool": pool}
    dictionary_path = None
    if cfg.kdci.enabled:
        t0 = time.perf_counter()
        stages(f"dictionary: distributed k-means, N = {cfg.kdci.n}, {dictionary_shards} shard actors")
        dictionary = dictionary_for_config(cfg, pool, teacher=teacher_id, cache_dir=storage / "dictionaries", shards=dictionary_shards)
        dictionary_path = dictionary.save(folder / "dictionary.safetensors")
        seconds["dictionary"] = round(time.perf_counter() - t0, 2)
        stages.done(f"{dictionary.n} prototypes in {seconds['dictionary']:.0f} s")
        overrides["kdci"] = cfg.kdci.model_copy(update={"dictionary": dictionary_path, "rebuild_every": 0})

    t0 = time.perf_counter()
    stages(f"distillation: Ray Train, {workers} DDP worker(s), {cfg.optim.epochs} epochs, KDCI {'on' if cfg.kdci.enabled else 'off'}")
    run_cfg = cfg.model_copy(update=overrides)
    options = dict(num_workers=workers, use_gpu=use_gpu, storage_path=storage, max_failures=max_failures, address=address)
    child_id = None
    if parent is not None:
        result, child_id = distill_on_ray_tracked(run_cfg, experiment=experiment, tracking_uri=parent.client.tracking_uri,
                                                  parent_run_id=parent.run_id, **options)
    else:
        result = distill_on_ray(run_cfg, **options)
    seconds["distill"] = round(time.perf_counter() - t0, 2)
    final = result.final
    stages.done(f"student top-1 {final.get('test_top1', float('nan')):.2f} % in {seconds['distill']:.0f} s")
    return {
        "name": cfg.name, "method": cfg.synthesis.method, "kdci": cfg.kdci.enabled, "pool": str(pool), "pool_rows": manifest["rows"],
        "dictionary": None if dictionary_path is None else str(dictionary_path), "run_dir": str(result.run_dir),
        "epochs": len(result.history), "resumed_from": result.resumed_from, "test_top1": final.get("test_top1"),
        "test_top1_compensated": final.get("test_top1_compensated"), "seconds": seconds, "mlflow_distill_run_id": child_id,
    }


def _log_pool(run, cfg: DistillConfig, pool: Path) -> None:
    """The generated data, seen: a grid of images and its class proportions, plus the manifest."""
    from ..engine.distill import make_source
    from ..tracking.runs import log_substitution_figures

    run.log_artifact(pool / "manifest.json", "pool")
    log_substitution_figures(run, cfg, make_source(cfg))
