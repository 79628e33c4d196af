"""The three stages in order, data flowing one way through shared storage:

    generation (Ray Data, Parquet)  ->  dictionary (shard actors, distributed k-means)  ->  distillation (Ray Train)

Layout under `<storage>/<name>/`: `pool/` (Parquet shards + manifest.json), `dictionary.safetensors`,
`outputs/` (the student, metrics, config) and Ray Train's `checkpoint_*`. Dictionaries are also cached
under `<storage>/dictionaries/` by (data, teacher, N, seed, settings). Submitting the same config again
continues: finished generation shards are kept, the dictionary comes from the cache, distillation resumes
from its last checkpoint (a finished run returns at once).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from ..config import DistillConfig, with_absolute_paths
from ..engine.distill import check_pool_run, load_models
from ..engine.runtime import resolve_runtime
from .dictionary import dictionary_for_config
from .generate import generate, select_wild
from .session import ensure_ray
from .train import distill_on_ray, resolve_storage

log = logging.getLogger(__name__)


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
) -> dict:
    """Generate the substitution data of `cfg.synthesis`, build its dictionary (when KDCI is on) and distill
    on it; returns the stage outputs and wall times."""
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
    seconds: dict[str, float] = {}

    t0 = time.perf_counter()
    if cfg.synthesis.method == "dfnd":
        manifest = select_wild(cfg, pool, shards=shards, actors=actors, mode=mode)
    else:
        manifest = generate(cfg, pool, shards=shards, calls_per_shard=calls_per_shard, actors=actors, mode=mode)
    seconds["generate"] = round(time.perf_counter() - t0, 2)
    log.info("pipeline %s: %d substitution images in %s (%.1f s)", cfg.name, manifest["rows"], pool, seconds["generate"])

    overrides: dict = {"pool": pool}
    dictionary_path = None
    if cfg.kdci.enabled:
        t0 = time.perf_counter()
        dictionary = dictionary_for_config(cfg, pool, teacher=teacher_id, cache_dir=storage / "dictionaries", shards=dictionary_shards)
        dictionary_path = dictionary.save(folder / "dictionary.safetensors")
        seconds["dictionary"] = round(time.perf_counter() - t0, 2)
        overrides["kdci"] = cfg.kdci.model_copy(update={"dictionary": dictionary_path, "rebuild_every": 0})

    t0 = time.perf_counter()
    result = distill_on_ray(
        cfg.model_copy(update=overrides), num_workers=workers, use_gpu=use_gpu, storage_path=storage,
        max_failures=max_failures, address=address,
    )
    seconds["distill"] = round(time.perf_counter() - t0, 2)
    final = result.final
    return {
        "name": cfg.name, "method": cfg.synthesis.method, "kdci": cfg.kdci.enabled, "pool": str(pool), "pool_rows": manifest["rows"],
        "dictionary": None if dictionary_path is None else str(dictionary_path), "run_dir": str(result.run_dir),
        "epochs": len(result.history), "resumed_from": result.resumed_from, "test_top1": final.get("test_top1"),
        "test_top1_compensated": final.get("test_top1_compensated"), "seconds": seconds,
    }
