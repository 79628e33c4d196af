"""Lloyd k-means whose every step is "assign a block with faiss, return per-centroid sums and counts".

The single-process dictionary build and the distributed one (Ray actors holding shards, the driver
updating centroids, as in faiss's distributed k-means example) call the same three functions, so the
two give the same centroids for the same init. k-means++ seeding comes from scikit-learn.

Empty clusters are handled deterministically (faiss splits a randomly chosen big cluster; we take no
randomness here, so shards and drivers agree): an empty centroid takes a copy of the most populated
cluster's centroid (lowest index on ties), and the two are nudged apart by 1/1024 of each coordinate's
magnitude in alternating directions per dimension; the donor's count is halved for the next empty one.

The training sample is chosen by per-row random keys that depend only on (seed, global row index), so a
sharded job that knows each shard's row offset draws exactly the same sample.
"""

from __future__ import annotations

from dataclasses import dataclass

import faiss
import numpy as np
import torch

_SPLIT_EPS = 1.0 / 1024.0
_gpu_resources = None


def faiss_has_gpu() -> bool:
    return hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0


def _flat_index(dim: int, use_gpu: bool) -> faiss.Index:
    global _gpu_resources
    if use_gpu:
        if _gpu_resources is None:  # one allocation per process; creating it per call costs ~100 ms
            _gpu_resources = faiss.StandardGpuResources()
        config = faiss.GpuIndexFlatConfig()
        # The GPU this process computes on (a Ray worker sees only its own), not always GPU 0.
        config.device = torch.cuda.current_device() if torch.cuda.is_available() else 0
        return faiss.GpuIndexFlatL2(_gpu_resources, dim, config)
    return faiss.IndexFlatL2(dim)


def resolve_use_gpu(use_gpu: bool | str) -> bool:
    if use_gpu == "auto":
        return faiss_has_gpu()
    if use_gpu and not faiss_has_gpu():
        raise ValueError("use_gpu=True but this faiss has no GPUs (install a CUDA build of faiss (e.g. faiss-gpu-cu12) on a CUDA machine, or use 'auto')")
    return bool(use_gpu)


def as_float32(x) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor
        x = x.detach().float().cpu().numpy()
    return np.ascontiguousarray(x, dtype=np.float32)


class CentroidIndex:
    """Nearest-centroid search over one set of centroids: the faiss index is built once and serves every
    block assigned to them (a dictionary's final pass, a trained dictionary's lookups)."""

    def __init__(self, centroids, use_gpu: bool = False):
        self.centroids = as_float32(centroids)
        self.index = _flat_index(self.centroids.shape[1], use_gpu)
        self.index.add(self.centroids)

    @property
    def k(self) -> int:
        return self.centroids.shape[0]

    def assign(self, x) -> tuple[np.ndarray, np.ndarray]:
        dist, labels = self.index.search(as_float32(x), 1)
        return labels[:, 0].astype(np.int64), dist[:, 0]


def assign(x: np.ndarray, centroids: "np.ndarray | CentroidIndex", use_gpu: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid (L2) of each row: (labels int64, squared distances float32). Pass a `CentroidIndex`
    to assign many blocks to the same centroids (one index, not one per block)."""
    index = centroids if isinstance(centroids, CentroidIndex) else CentroidIndex(centroids, use_gpu)
    return index.assign(x)


def row_keys(seed: int, start: int, count: int) -> np.ndarray:
    """Uniform [0, 1) keys for global rows start..start+count-1, a pure function of (seed, row index).

    A splitmix64 hash of the row counter: any shard can compute its rows' keys without the others.
    """
    with np.errstate(over="ignore"):
        z = (np.arange(start, start + count, dtype=np.uint64) + np.uint64(seed & 0xFFFFFFFF) * np.uint64(0x9E3779B97F4A7C15))
        z = z * np.uint64(0xBF58476D1CE4E5B9) + np.uint64(0x94D049BB133111EB)
        z ^= z >> np.uint64(30)
        z *= np.uint64(0xBF58476D1CE4E5B9)
        z ^= z >> np.uint64(27)
        z *= np.uint64(0x94D049BB133111EB)
        z ^= z >> np.uint64(31)
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53)


@dataclass
class ClusterStats:
    """What one block of data contributes to a Lloyd step.

    Blocks add up (sums are float64, so different groupings agree to float64 rounding; reduce shards in
    a fixed order for bit-equal results).
    """

    sums: np.ndarray  # (k, d) float64
    counts: np.ndarray  # (k,) int64
    inertia: float  # sum of squared distances to the assigned centroid

    def __add__(self, other: "ClusterStats") -> "ClusterStats":
        return ClusterStats(self.sums + other.sums, self.counts + other.counts, self.inertia + other.inertia)

    @classmethod
    def zeros(cls, k: int, d: int) -> "ClusterStats":
        return cls(np.zeros((k, d), np.float64), np.zeros(k, np.int64), 0.0)


def cluster_stats(x: np.ndarray, centroids: "np.ndarray | CentroidIndex", use_gpu: bool = False, values: np.ndarray | None = None) -> ClusterStats:
    """Assign `x` to `centroids` (an array, or a `CentroidIndex` reused across blocks) and sum `values`
    (default: `x` itself) per cluster."""
    index = centroids if isinstance(centroids, CentroidIndex) else CentroidIndex(centroids, use_gpu)
    labels, dist = index.assign(x)
    values = as_float32(x if values is None else values).astype(np.float64)
    k = index.k
    # index_add_ is a fast scatter-sum; np.add.at is ~50x slower on large blocks.
    sums = torch.zeros((k, values.shape[1]), dtype=torch.float64).index_add_(0, torch.from_numpy(labels), torch.from_numpy(values)).numpy()
    return ClusterStats(sums, np.bincount(labels, minlength=k).astype(np.int64), float(dist.astype(np.float64).sum()))


def update_centroids(stats: ClusterStats, previous: np.ndarray) -> np.ndarray:
    """Means of the assigned points; empty clusters split the largest one (see the module docstring)."""
    counts = stats.counts.astype(np.float64)
    centroids = previous.astype(np.float32, copy=True)
    filled = counts > 0
    centroids[filled] = (stats.sums[filled] / counts[filled, None]).astype(np.float32)
    sizes = counts.copy()
    sign = np.where(np.arange(centroids.shape[1]) % 2 == 0, 1.0, -1.0).astype(np.float32)
    for empty in np.flatnonzero(~filled):
        donor = int(np.argmax(sizes))  # argmax returns the lowest index on ties
        base = centroids[donor].copy()
        nudge = _SPLIT_EPS * sign * np.maximum(np.abs(base), 1e-6)
        centroids[empty] = base + nudge
        centroids[donor] = base - nudge
        sizes[empty] = sizes[donor] / 2
        sizes[donor] -= sizes[empty]
    return centroids


def kmeans_plusplus(x: np.ndarray, k: int, seed: int) -> np.ndarray:
    from sklearn.cluster import kmeans_plusplus as _sk_kmeans_plusplus

    centers, _ = _sk_kmeans_plusplus(as_float32(x), n_clusters=k, random_state=seed)
    return as_float32(centers)


def lloyd(stats_of, init: np.ndarray, niter: int, n_points: int) -> tuple[np.ndarray, int, float]:
    """Lloyd iterations from `init`, where `stats_of(centroids)` returns the training data's ClusterStats
    (one block in memory, or the sum of shard actors' blocks): (centroids, iterations, mean sq. distance).
    Stops early once the centroids no longer change (the assignment is then a fixed point)."""
    centroids = as_float32(init)
    iterations = 0
    for iterations in range(1, niter + 1):
        updated = update_centroids(stats_of(centroids), centroids)
        converged = np.array_equal(updated, centroids)
        centroids = updated
        if converged:
            break
    return centroids, iterations, stats_of(centroids).inertia / n_points


def kmeans(
    x: np.ndarray,
    k: int,
    niter: int = 20,
    seed: int = 0,
    use_gpu: bool = False,
    init: np.ndarray | None = None,
    nredo: int = 1,
) -> tuple[np.ndarray, int, float]:
    """Lloyd k-means on an in-memory block: (centroids, iterations run, mean squared distance).

    With `nredo` > 1, runs from that many k-means++ seedings (seed, seed+1, ...) and keeps the lowest
    inertia (faiss's `nredo`): one unlucky seeding can merge two clusters and split another.
    """
    x = as_float32(x)
    if k > len(x):
        raise ValueError(f"k-means: {k} clusters but only {len(x)} points")
    best = None
    for redo in range(1 if init is not None else nredo):
        start = kmeans_plusplus(x, k, seed + redo) if init is None else as_float32(init)
        run = lloyd(lambda c: cluster_stats(x, c, use_gpu), start, niter, len(x))
        if best is None or run[2] < best[2]:
            best = run
    return best
