"""Substitution-data generation on Ray Data: a dataset of synthesis tasks (method, seed, shard) mapped by
an actor pool; each actor loads the teacher (and a student for the adversarial terms) once and writes
one Parquet shard per task. DFND's selection runs the same way over row ranges of the wild pool, merged
exactly (`kdci_ray.synthesis.selection`).

Output folder: `part-<shard>.parquet` files (uint8 image bytes, teacher logits, call, and the columns
method, seed, shard, config_hash) and `manifest.json` (rows, files, schema, the source config). A folder
that already holds files is refused unless `mode` is "resume" (finished shards are kept, the rest run)
or "overwrite".

Offline generation has no student being distilled: a method's adversarial terms read a freshly
initialised student (seeded by the config), as at the first call of an online run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from ..config import DistillConfig, validate_config
from ..data import dataset_info
from ..engine.distill import load_models
from ..engine.runtime import resolve_runtime
from ..synthesis import create_synthesizer, merge_selections, select_top_k
from ..synthesis.pool import write_pool_parquet
from ..synthesis.selection import Selection
from ..synthesis.wild import WildImages
from .session import actor_cpus, ensure_ray, limit_threads_to_cpu_share

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"


def config_hash(cfg: DistillConfig) -> str:
    """What determines the generated data: teacher, data, synthesis settings and seed (not output paths)."""
    ident = {k: v for k, v in cfg.model_dump(mode="json").items() if k in ("seed", "data", "teacher", "student", "synthesis")}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


def prepare_output(out: Path, mode: str) -> None:
    if mode not in ("fail", "resume", "overwrite"):
        raise ValueError(f"mode must be fail, resume or overwrite, got {mode!r}")
    if out.exists() and any(out.iterdir()):
        if mode == "fail":
            raise FileExistsError(f"{out} already holds files: choose another folder, or resume / overwrite")
        if mode == "overwrite":
            for f in list(out.glob("part-*.parquet")) + [out / MANIFEST]:
                f.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)


class _Worker:
    """One actor: the config's models loaded once, then any number of tasks."""

    def __init__(self, cfg_json: dict):
        limit_threads_to_cpu_share()
        self.cfg = validate_config(DistillConfig, cfg_json, "generation config")
        self.runtime = resolve_runtime(self.cfg.device, self.cfg.precision, self.cfg.channels_last)
        torch.manual_seed(self.cfg.seed)  # the offline student's initialisation
        self.models = load_models(self.cfg, self.runtime)
        info = dataset_info(self.cfg.data.dataset)
        self.image_shape = (info.channels, info.image_size, info.image_size)
        self.hash = config_hash(self.cfg)


class SynthesisWorker(_Worker):
    def __call__(self, batch: dict) -> dict:
        out_rows = {"shard": [], "rows": [], "file": [], "seconds": [], "worker": []}
        m = self.models
        for shard, seed, calls, folder in zip(batch["shard"], batch["seed"], batch["calls"], batch["folder"]):
            t0 = time.perf_counter()
            synth = create_synthesizer(self.cfg.synthesis, self.image_shape, m.num_classes, seed=int(seed))
            synth.bind(teacher=m.teacher, student=m.student, normalize=m.normalize, runtime=self.runtime, epochs=1)
            synth.begin_epoch(1, None)  # warm-up calls and the first call
            for _ in range(int(calls) - 1):
                synth.step()
            images, logits, call = synth.pool.filled()
            path = Path(folder) / f"part-{int(shard):05d}.parquet"
            write_pool_parquet(
                path, images, logits, call,
                {"method": synth.method, "seed": int(seed), "shard": int(shard), "teacher_id": m.teacher_id, "config_hash": self.hash},
                columns={"method": synth.method, "seed": int(seed), "shard": int(shard), "config_hash": self.hash},
            )
            for key, value in (("shard", int(shard)), ("rows", len(images)), ("file", str(path)),
                               ("seconds", time.perf_counter() - t0), ("worker", os.getpid())):
                out_rows[key].append(value)
        return {k: np.asarray(v) for k, v in out_rows.items()}


def _pool(ray, size: int):
    """A fixed actor pool that starts every actor before handing out tasks, one task per actor at a time:
    tasks are long (a whole shard), so spreading them beats queueing them on the first actor up."""
    ray.data.DataContext.get_current().wait_for_min_actors_s = 600
    return ray.data.ActorPoolStrategy(size=size, max_tasks_in_flight_per_actor=1)


def _resources(actors: int) -> dict:
    if torch.cuda.is_available():
        return {"num_gpus": 1}
    return {"num_cpus": actor_cpus(actors)}


def write_manifest(out: Path, cfg: DistillConfig, extra: dict) -> dict:
    files = sorted(out.glob("part-*.parquet"))
    schema = pq.read_schema(files[0]) if files else None
    manifest = {
        "rows": sum(pq.read_metadata(f).num_rows for f in files),
        "files": [f.name for f in files],
        "schema": {name: str(schema.field(name).type) for name in schema.names} if schema else {},
        "config_hash": config_hash(cfg),
        "source_config": cfg.model_dump(mode="json"),
        **extra,
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest


def generate(cfg: DistillConfig, out: str | Path, shards: int, calls_per_shard: int, actors: int = 2, mode: str = "fail") -> dict:
    """Run `shards` synthesis tasks of `calls_per_shard` calls each (seeds cfg.seed + shard) on an actor pool."""
    if cfg.synthesis is None:
        raise ValueError("the config has no `synthesis:` section: name a DFKD method to generate with")
    if cfg.synthesis.method == "dfnd":
        raise ValueError("dfnd selects wild images, it does not synthesize: use select_wild()")
    if shards < 1 or calls_per_shard < 1 or actors < 1:
        raise ValueError(f"shards, calls_per_shard and actors must be >= 1, got {shards}, {calls_per_shard}, {actors}")
    out = Path(out)
    prepare_output(out, mode)
    done = {int(f.stem.split("-")[1]) for f in out.glob("part-*.parquet")}
    tasks = [{"shard": s, "seed": cfg.seed + s, "calls": calls_per_shard, "folder": str(out)} for s in range(shards) if s not in done]
    ray = ensure_ray()
    t0 = time.perf_counter()
    results = []
    if tasks:
        ds = ray.data.from_items(tasks, override_num_blocks=len(tasks))
        ds = ds.map_batches(SynthesisWorker, fn_constructor_args=(cfg.model_dump(mode="json"),), batch_size=1,
                            compute=_pool(ray, min(actors, len(tasks))), **_resources(actors))
        results = ds.take_all()
    seconds = time.perf_counter() - t0
    log.info("generate: %d shards (%d new) in %.1f s", shards, len(tasks), seconds)
    return write_manifest(out, cfg, {
        "method": cfg.synthesis.method, "shards": shards, "calls_per_shard": calls_per_shard, "seconds": round(seconds, 2),
        "tasks": [{k: (v.item() if hasattr(v, "item") else v) for k, v in r.items()} for r in results],
    })


class SelectionWorker(_Worker):
    """Scores row ranges of the wild pool with the teacher (DFND): one Selection per task."""

    def __init__(self, cfg_json: dict):
        super().__init__(cfg_json)
        self.wild = WildImages(self.cfg.synthesis.wild, self.image_shape).to(self.runtime.device, hold=False)

    def __call__(self, batch: dict) -> dict:
        scores, indices, workers = [], [], []
        prepare = lambda x: self.models.normalize(x)  # noqa: E731
        for lo, hi, k in zip(batch["start"], batch["stop"], batch["k"]):
            selection = select_top_k(self.models.teacher, self.wild.batches(self.cfg.synthesis.score_batch_size, int(lo), int(hi)),
                                     prepare, int(k))
            scores.append(selection.scores.numpy())
            indices.append(selection.indices.numpy())
            workers.append(os.getpid())
        return {"scores": np.array(scores, dtype=object), "indices": np.array(indices, dtype=object), "worker": np.asarray(workers)}


def select_wild(cfg: DistillConfig, out: str | Path, shards: int, actors: int = 2, mode: str = "fail") -> dict:
    """DFND's selection over `shards` row ranges of the wild pool on an actor pool, merged exactly; the kept
    images (and this teacher's logits on them) are written as Parquet."""
    if cfg.synthesis is None or cfg.synthesis.method != "dfnd":
        raise ValueError("select_wild needs a dfnd config (synthesis.method: dfnd)")
    out = Path(out)
    prepare_output(out, mode if mode != "resume" else "overwrite")  # a selection is one merge: it reruns whole
    info = dataset_info(cfg.data.dataset)
    wild = WildImages(cfg.synthesis.wild, (info.channels, info.image_size, info.image_size))
    k = min(cfg.synthesis.num_select, len(wild))
    bounds = np.linspace(0, len(wild), shards + 1).round().astype(int)
    tasks = [{"start": int(a), "stop": int(b), "k": k} for a, b in zip(bounds, bounds[1:]) if b > a]
    ray = ensure_ray()
    t0 = time.perf_counter()
    ds = ray.data.from_items(tasks, override_num_blocks=len(tasks))
    ds = ds.map_batches(SelectionWorker, fn_constructor_args=(cfg.model_dump(mode="json"),), batch_size=1,
                        compute=_pool(ray, min(actors, len(tasks))), **_resources(actors))
    rows = ds.take_all()
    selection = merge_selections([Selection(torch.tensor(r["scores"]), torch.tensor(r["indices"])) for r in rows], k)
    # The kept images with the teacher's logits, written by the driver (k images: small next to the pool).
    worker = _Worker(cfg.model_dump(mode="json"))
    images = wild.gather(selection.indices)
    with torch.no_grad():
        logits = torch.cat([worker.models.teacher(worker.models.normalize(images[i : i + 1024].to(worker.runtime.device))).float().cpu()
                            for i in range(0, len(images), 1024)])
    write_pool_parquet(out / "part-00000.parquet", images, logits, torch.zeros(len(images), dtype=torch.int64),
                       {"method": "dfnd", "teacher_id": worker.models.teacher_id, "config_hash": config_hash(cfg)},
                       columns={"method": "dfnd", "seed": cfg.seed, "shard": 0, "config_hash": config_hash(cfg)})
    np.save(out / "selected_rows.npy", selection.indices.numpy())
    return write_manifest(out, cfg, {
        "method": "dfnd", "selected": len(selection), "wild_rows": len(wild), "shards": len(tasks), "seconds": round(time.perf_counter() - t0, 2),
        "workers": sorted({int(r["worker"]) for r in rows}),
    })
