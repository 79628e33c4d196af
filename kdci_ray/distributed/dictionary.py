"""The confounder dictionary built by Ray actors that hold the data in shards (KDCI stage a, distributed).

Same algorithm as `kdci_ray.kdci.build_dictionary`, split the way faiss's distributed k-means example
splits it: each shard actor loads its Parquet files once and keeps its rows' features; per Lloyd
iteration it assigns its rows with faiss and returns per-centroid sums and counts (`ClusterStats`), and
the driver adds them (in shard order) and updates the centroids. The training sample is the same as the
single-process build's (row keys depend only on (seed, global row index), `kmeans.row_keys`), k-means++
seeds from it on the driver, and a last pass sums every row's teacher logits per cluster. Same seed and
data -> the same dictionary as the single-process build, up to float64 summation order (tested < 1e-4).

Features: the teacher logits stored in the Parquet rows (what `kdci.feature: logits`, the default,
uses; the teacher that wrote them is checked against `teacher` when given), or for `penultimate` the
teacher's penultimate features, computed first by a Ray Data pass over the pool files
(`generate.teacher_features`, cached beside the dictionaries). Dictionaries are cached
under `cache_dir` by (data files, teacher, N, seed and every k-means setting), so later runs and Tune
trials reuse them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import operator
import tempfile
import time
from functools import reduce
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from ..kdci.dictionary import (
    FORMAT_VERSION, ConfounderDictionary, DictionaryError, DictionaryMeta, check_build_args, finish_dictionary, fit_pca, project,
)
from ..kdci.kmeans import ClusterStats, cluster_stats, kmeans_plusplus, lloyd, row_keys  # noqa: F401
from ..config import DistillConfig
from .generate import teacher_features
from .session import actor_cpus, ensure_ray, limit_threads_to_cpu_share

log = logging.getLogger(__name__)


def _read_matrix(files: list[str], column: str) -> np.ndarray:
    blocks = []
    for f in files:
        values = pq.read_table(f, columns=[column]).column(column).combine_chunks()
        blocks.append(values.flatten().to_numpy().astype(np.float32).reshape(-1, values.type.list_size))
    matrix = np.concatenate(blocks) if blocks else np.zeros((0, 0), np.float32)
    if not np.isfinite(matrix).all():
        raise DictionaryError(f"non-finite teacher {column} in {files}: the pool is corrupt or the teacher overflowed")
    return matrix


class DictionaryShard:
    """One actor's rows of a contiguous run of Parquet files starting at global row `offset`: the teacher
    logits and the assignment features (the logits themselves, or a `features` column)."""

    def __init__(self, files: list[str], offset: int, feature_column: str = "logits"):
        limit_threads_to_cpu_share()
        self.logits = _read_matrix(files, "logits")
        self.features = self.logits if feature_column == "logits" else _read_matrix(files, feature_column)
        self.offset = offset
        self.train = self.assigned = None

    def size(self) -> int:
        return len(self.logits)

    def candidates(self, seed: int, limit: int):
        """This shard's `limit` rows with the largest sample keys: (keys, global rows, features)."""
        keys = row_keys(seed, self.offset, len(self.features))
        top = np.argpartition(-keys, limit - 1)[:limit] if len(keys) > limit else np.arange(len(keys))
        return keys[top], top + self.offset, self.features[top]

    def prepare(self, sample_rows: np.ndarray, matrix, bias) -> int:
        """Keep the (projected) features of this shard's rows in the global training sample."""
        mine = sample_rows[(sample_rows >= self.offset) & (sample_rows < self.offset + len(self.features))] - self.offset
        self.assigned = project(self.features, matrix, bias)
        self.train = self.assigned[mine]
        return len(mine)

    def train_stats(self, centroids: np.ndarray) -> ClusterStats:
        return cluster_stats(self.train, centroids)

    def final_stats(self, centroids: np.ndarray) -> ClusterStats:
        return cluster_stats(self.assigned, centroids, values=self.logits)


def pool_files(path: str | Path) -> list[Path]:
    path = Path(path)
    files = sorted(path.glob("*.parquet")) if path.is_dir() else [path]
    if not files or not all(f.is_file() for f in files):
        raise FileNotFoundError(f"{path}: no Parquet pool there (a .parquet file or a folder of shards)")
    return files


def dictionary_cache_key(files: list[Path], teacher: str, n: int, seed: int, **settings) -> str:
    """Identity of a build: the data files (name, size, mtime), the teacher, N, the seed and the settings."""
    ident = {
        "files": [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files],
        "teacher": teacher, "n": n, "seed": seed, **settings,
    }
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:20]


def _split(rows: list[int], parts: int) -> list[list[int]]:
    """Contiguous groups of file indices with about equal row counts (order kept: offsets stay global)."""
    parts = max(1, min(parts, len(rows)))
    cum = np.cumsum(rows)
    cuts, last = [], 0
    for j in range(1, parts):
        # The file boundary closest to the j-th equal share, leaving at least one file per later group.
        lo, hi = last + 1, len(rows) - (parts - j)
        best = min(range(lo, hi + 1), key=lambda c: abs(cum[c - 1] - cum[-1] * j / parts))
        cuts.append(best)
        last = best
    bounds = [0, *cuts, len(rows)]
    return [list(range(a, b)) for a, b in zip(bounds, bounds[1:])]


def build_dictionary_distributed(
    pool: str | Path,
    n: int,
    *,
    seed: int = 0,
    niter: int = 20,
    nredo: int = 3,
    feature: str = "logits",
    pca_dim: int | None = None,
    max_train_points: int = 100_000,
    shards: int = 2,
    teacher: str = "",
    dataset: str = "",
    extra: dict | None = None,
    cache_dir: str | Path | None = None,
    teacher_config: DistillConfig | None = None,
) -> ConfounderDictionary:
    """Build (or reuse from `cache_dir`) the dictionary of a Parquet pool with `shards` actors.
    `feature="penultimate"` needs `teacher_config` (the run's config: its teacher computes the features)."""
    check_build_args(n, feature, max_train_points, niter, nredo, pca_dim, seed)
    n, seed, niter, nredo, max_train_points = int(n), int(seed), int(niter), int(nredo), int(max_train_points)
    if feature == "penultimate" and teacher_config is None:
        raise DictionaryError("feature = penultimate: the teacher computes the features; pass teacher_config (the run's config)")
    if shards < 1:
        raise DictionaryError(f"shards must be >= 1, got {shards}")
    files = pool_files(pool)
    metas = [json.loads((pq.read_schema(f).metadata or {}).get(b"kdci_ray", b"{}")) for f in files]
    if teacher and any(m.get("teacher_id") not in (None, teacher) for m in metas):
        wrong = next(f for f, m in zip(files, metas) if m.get("teacher_id") not in (None, teacher))
        raise DictionaryError(f"{wrong}: its logits come from teacher {metas[files.index(wrong)]['teacher_id']}, not {teacher}")
    widths = {pq.read_schema(f).field("logits").type.list_size for f in files}
    if len(widths) != 1:
        raise DictionaryError(f"{pool}: the shards hold logits of different widths {sorted(widths)} (several teachers?)")
    settings = {"niter": niter, "nredo": nredo, "feature": feature, "pca_dim": pca_dim, "max_train_points": max_train_points,
                "dataset": dataset, "format": FORMAT_VERSION}
    key = dictionary_cache_key(files, teacher, n, seed, **settings)
    cached = Path(cache_dir) / f"dictionary-{key}.safetensors" if cache_dir else None
    if cached is not None and cached.is_file():
        log.info("dictionary: reusing %s", cached)
        return ConfounderDictionary.load(cached)

    rows = [pq.read_metadata(f).num_rows for f in files]
    total = sum(rows)
    if n > total:
        raise DictionaryError(f"N = {n} prototypes but only {total} substitution samples; lower N (kdci.n) or add data")
    groups = _split(rows, min(shards, len(files)))
    offsets = [sum(rows[: g[0]]) for g in groups]
    ray = ensure_ray()
    t0 = time.perf_counter()
    phases: dict[str, float] = {}
    shard_files, column = files, "logits"
    with tempfile.TemporaryDirectory() as scratch:
        if feature == "penultimate":  # one features file per pool file (same rows, same order), cached with the dictionaries
            where = Path(cache_dir) / f"features-{dictionary_cache_key(files, teacher, 0, 0, kind='penultimate')}" if cache_dir else Path(scratch)
            shard_files, column = teacher_features(teacher_config, files, where, actors=len(groups)), "features"
            phases["teacher_features"] = round(time.perf_counter() - t0, 3)
        dictionary = _build_on_shards(ray, shard_files, groups, offsets, column, total, n, seed, niter, nredo, max_train_points,
                                      pca_dim, phases, DictionaryMeta(
                                          n_requested=n, feature=feature, teacher=teacher, dataset=dataset, samples=total, seed=seed,
                                          niter=int(niter), nredo=int(nredo), pca_dim=pca_dim, extra={**(extra or {}), "shards": len(groups)},
                                      ))
    log.info("dictionary: N=%d from %d rows on %d shard actors in %.1f s %s", dictionary.n, total, len(groups), time.perf_counter() - t0, phases)
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        dictionary.save(cached)
    return dictionary


def _build_on_shards(ray, files, groups, offsets, column, total, n, seed, niter, nredo, max_train_points, pca_dim, phases, meta):
    """Sample, k-means++ on the driver, Lloyd with the shards' statistics, final assignment."""
    remote = ray.remote(num_cpus=actor_cpus(len(groups)))(DictionaryShard)
    actors = [remote.remote([str(files[i]) for i in g], off, column) for g, off in zip(groups, offsets)]
    mark = time.perf_counter()

    def lap(name):  # wall time per phase, for the benchmark and the log
        nonlocal mark
        phases[name] = round(time.perf_counter() - mark, 3)
        mark = time.perf_counter()

    try:
        # The training sample: the global `max_train_points` largest keys, in row order (as the single build).
        parts = ray.get([a.candidates.remote(seed, max_train_points) for a in actors])
        keys, sample_rows, feats = (np.concatenate(x) for x in zip(*parts))
        if len(keys) > max_train_points:
            top = np.argpartition(-keys, max_train_points - 1)[:max_train_points]
            sample_rows, feats = sample_rows[top], feats[top]
        order = np.argsort(sample_rows)
        sample_rows, sample = sample_rows[order], np.ascontiguousarray(feats[order])
        matrix, bias = fit_pca(sample, pca_dim)
        train = project(sample, matrix, bias)
        ray.get([a.prepare.remote(sample_rows, matrix, bias) for a in actors])
        lap("load_and_sample")

        def stats_of(centroids):
            return reduce(operator.add, ray.get([a.train_stats.remote(centroids) for a in actors]))  # in shard order

        best, phases["kmeans_plusplus"], phases["lloyd"] = None, 0.0, 0.0
        for redo in range(nredo):
            init = kmeans_plusplus(train, n, seed + redo)  # on the driver, from the sample (as the single build)
            phases["kmeans_plusplus"] += round(time.perf_counter() - mark, 3)
            mark = time.perf_counter()
            run = lloyd(stats_of, init, niter, len(train))
            phases["lloyd"] += round(time.perf_counter() - mark, 3)
            mark = time.perf_counter()
            if best is None or run[2] < best[2]:
                best = run
        centroids, iterations, inertia = best
        final = reduce(operator.add, ray.get([a.final_stats.remote(centroids) for a in actors]))
        lap("final_assignment")
    finally:
        for a in actors:
            ray.kill(a)
    return finish_dictionary(final, centroids, total, n, matrix, bias, dataclasses.replace(
        meta, train_samples=len(train), iterations=iterations, inertia=float(inertia), extra={**meta.extra, "seconds": phases},
    ))



def dictionary_for_config(cfg: DistillConfig, pool: str | Path, *, teacher: str, cache_dir: str | Path, shards: int = 2,
                          n: int | None = None) -> ConfounderDictionary:
    """The dictionary a run of `cfg` on `pool` uses (kdci.n unless `n`), with the run's k-means settings;
    cached in `cache_dir`, so trials and re-submissions with the same N reuse it."""
    k = cfg.kdci
    return build_dictionary_distributed(
        pool, k.n if n is None else n, seed=cfg.seed, niter=k.niter, nredo=k.nredo, feature=k.feature, pca_dim=k.pca_dim,
        max_train_points=k.max_train_points, shards=shards, teacher=teacher, dataset=cfg.data.dataset,
        cache_dir=cache_dir, teacher_config=cfg,
    )
