"""The confounder dictionary (KDCI stage a): N prototypes in logit space and their priors P(z).

Build: k-means (k-means++ init, faiss assignment) over the teacher's features of the substitution data,
trained on a seeded sample of at most `max_train_points` rows, then one streaming pass assigns *every*
sample. Prototype z_i = mean teacher logits of cluster i (dim C, the space of the student's logits);
prior P(z_i) = n_i / n over all samples. The assignment may use other features (penultimate
activations, optionally PCA-reduced); prototypes are always logits.

Empty clusters after the final assignment (possible only when the sample missed a region) are
dropped, deterministically and with a warning: a prototype nothing was assigned to has no logits to
average and would only dilute the attention. `meta.n_requested` keeps the asked-for N.

Saved as one safetensors file (tensors + JSON metadata): no pickle, safe to load from anywhere.
"""

from __future__ import annotations

import filecmp
import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import faiss
import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .kmeans import CentroidIndex, ClusterStats, as_float32, cluster_stats, kmeans, resolve_use_gpu, row_keys

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
FEATURE_KINDS = ("logits", "penultimate")
_META_KEY = "kdci_dictionary"


class DictionaryError(ValueError):
    """Bad input to a dictionary build, or a dictionary file that is not one."""


@dataclass(frozen=True)
class DictionaryMeta:
    n_requested: int
    feature: str = "logits"
    teacher: str = ""
    dataset: str = ""
    samples: int = 0  # rows assigned (all the substitution data)
    train_samples: int = 0  # rows k-means was trained on
    seed: int = 0
    niter: int = 20
    nredo: int = 1  # k-means++ restarts (the best inertia kept)
    iterations: int = 0  # Lloyd iterations of the kept run
    inertia: float | None = None  # mean squared distance on the training sample
    pca_dim: int | None = None
    empty_dropped: int = 0
    extra: dict = field(default_factory=dict)
    format: int = FORMAT_VERSION


@dataclass
class ConfounderDictionary:
    prototypes: torch.Tensor  # (N, C) float32: mean teacher logits per cluster
    priors: torch.Tensor  # (N,) float32, sums to 1
    centroids: torch.Tensor  # (N, D) float32, in the assignment space
    counts: torch.Tensor  # (N,) int64
    meta: DictionaryMeta
    pca_matrix: torch.Tensor | None = None  # (D, D_in): assignment features are x @ A.T + b
    pca_bias: torch.Tensor | None = None  # (D,)

    @property
    def n(self) -> int:
        return int(self.prototypes.shape[0])

    @property
    def num_classes(self) -> int:
        return int(self.prototypes.shape[1])

    def project(self, features) -> np.ndarray:
        return project(as_float32(features), self.pca_matrix, self.pca_bias)

    def assign(self, features, use_gpu: bool | str = "auto") -> np.ndarray:
        """Cluster index of each feature row (same feature kind the dictionary was built from); the search
        index is built on the first call and kept."""
        gpu = resolve_use_gpu(use_gpu)
        cached = getattr(self, "_index", None)
        if cached is None or cached[0] != gpu:
            cached = self._index = (gpu, CentroidIndex(self.centroids.numpy(), gpu))
        return cached[1].assign(self.project(features))[0]

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"prototypes": self.prototypes, "priors": self.priors, "centroids": self.centroids, "counts": self.counts}
        if self.pca_matrix is not None:
            out.update(pca_matrix=self.pca_matrix, pca_bias=self.pca_bias)
        return {k: v.detach().cpu().contiguous() for k, v in out.items()}

    def meta_json(self) -> str:
        return json.dumps(asdict(self.meta), sort_keys=True)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # per process: concurrent builds of one cache key
        save_file(self.tensors(), str(tmp), metadata={_META_KEY: self.meta_json()})
        if path.is_file() and filecmp.cmp(tmp, path, shallow=False):
            tmp.unlink()  # the same dictionary: the file (and its mtime, which runs compare) stays as it was
            return path
        tmp.replace(path)  # atomic: a crash never leaves a half-written dictionary under the real name
        return path

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], meta_json: str, source: str = "dictionary") -> "ConfounderDictionary":
        try:
            raw = json.loads(meta_json)
        except ValueError as exc:
            raise DictionaryError(f"{source}: metadata is not JSON ({exc})") from None
        if not isinstance(raw, dict):
            raise DictionaryError(f"{source}: metadata is not a KDCI dictionary's")
        if isinstance(raw.get("format"), int) and raw["format"] > FORMAT_VERSION:
            raise DictionaryError(f"{source}: format {raw['format']} is newer than this kdci_ray reads ({FORMAT_VERSION}); upgrade kdci_ray")
        try:
            meta = DictionaryMeta(**raw)
        except TypeError as exc:
            raise DictionaryError(f"{source}: metadata is not a KDCI dictionary's ({exc})") from None
        if meta.feature not in FEATURE_KINDS:
            raise DictionaryError(f"{source}: unknown feature kind {meta.feature!r}")
        missing = {"prototypes", "priors", "centroids", "counts"} - set(tensors)
        if missing:
            raise DictionaryError(f"{source}: missing tensors {sorted(missing)}")
        d = cls(
            prototypes=tensors["prototypes"].float(),
            priors=tensors["priors"].float(),
            centroids=tensors["centroids"].float(),
            counts=tensors["counts"].long(),
            meta=meta,
            pca_matrix=tensors.get("pca_matrix"),
            pca_bias=tensors.get("pca_bias"),
        )
        n = d.prototypes.shape[0]
        if d.prototypes.ndim != 2 or d.priors.shape != (n,) or d.counts.shape != (n,) or d.centroids.shape[0] != n:
            raise DictionaryError(f"{source}: inconsistent shapes prototypes {tuple(d.prototypes.shape)}, priors {tuple(d.priors.shape)}")
        if (d.pca_matrix is None) != (d.pca_bias is None) or (
            d.pca_matrix is not None
            and (d.pca_matrix.ndim != 2 or d.pca_bias.shape != (d.pca_matrix.shape[0],) or d.centroids.shape[1] != d.pca_matrix.shape[0])
        ):
            raise DictionaryError(f"{source}: inconsistent PCA tensors")
        return d

    @classmethod
    def load(cls, path: str | Path) -> "ConfounderDictionary":
        path = Path(path)
        if not path.is_file():
            raise DictionaryError(f"dictionary file {path} does not exist")
        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as exc:  # safetensors raises its own error types for a corrupt header
            raise DictionaryError(f"{path} is not a safetensors file ({exc})") from None
        if _META_KEY not in metadata:
            raise DictionaryError(f"{path} has no {_META_KEY!r} metadata: not a KDCI dictionary")
        return cls.from_tensors(tensors, metadata[_META_KEY], str(path))


def project(x: np.ndarray, matrix: torch.Tensor | None, bias: torch.Tensor | None) -> np.ndarray:
    """The optional PCA used for the assignment only (identity when there is none)."""
    if matrix is None:
        return x
    return np.ascontiguousarray(x @ matrix.numpy().T + bias.numpy(), dtype=np.float32)


# A source of (features or None, logits) blocks that can be iterated more than once.
Blocks = Iterable[tuple[object, object]] | Callable[[], Iterable[tuple[object, object]]]


def _open_blocks(blocks: Blocks):
    it = blocks() if callable(blocks) else iter(blocks)
    if it is blocks:
        raise DictionaryError("build_dictionary reads the data twice: pass a list, a re-iterable object or a function returning a fresh iterator, not a generator")
    return it


def _checked_block(i: int, features, logits, feature: str) -> tuple[np.ndarray, np.ndarray]:
    if (features is None) != (feature == "logits"):
        want = "no features (None): the logits are the features" if feature == "logits" else "penultimate features with the logits"
        raise DictionaryError(f"block {i}: feature={feature!r} expects {want}")
    logits = as_float32(logits)
    feats = logits if features is None else as_float32(features)
    if logits.ndim != 2 or feats.ndim != 2 or len(feats) != len(logits):
        raise DictionaryError(f"block {i}: expected 2-D features and logits with the same rows, got {feats.shape} and {logits.shape}")
    checks = (("logits", logits),) if features is None else (("features", feats), ("logits", logits))
    for name, arr in checks:
        if not np.isfinite(arr).all():
            raise DictionaryError(f"block {i}: teacher {name} contain NaN or inf; check the teacher weights and the substitution images")
    return feats, logits


def build_dictionary(
    blocks: Blocks,
    n: int,
    *,
    seed: int = 0,
    niter: int = 20,
    nredo: int = 3,
    feature: str = "logits",
    pca_dim: int | None = None,
    max_train_points: int = 100_000,
    teacher: str = "",
    dataset: str = "",
    use_gpu: bool | str = "auto",
    extra: dict | None = None,
) -> ConfounderDictionary:
    """Build a dictionary from blocks of `(features or None, teacher logits)`; see the module docstring.

    `blocks` is read twice (sample, then assign), so it can stream data larger than memory.
    """
    check_build_args(n, feature, max_train_points, niter, nredo, pca_dim, seed)
    n, seed = int(n), int(seed)
    extra = _jsonable(extra or {})  # checked now, not after the k-means work
    gpu = resolve_use_gpu(use_gpu)

    # Pass 1: a uniform sample without replacement: the rows with the largest keys, where a row's key
    # depends only on (seed, its global index) (see kmeans.row_keys: shards can reproduce it).
    kept_keys, kept_rows, kept_feats = [], [], []
    held = total = 0

    def trim(limit: int):
        keys, rows, feats = np.concatenate(kept_keys), np.concatenate(kept_rows), np.concatenate(kept_feats)
        if len(keys) > limit:
            top = np.argpartition(-keys, limit - 1)[:limit]
            top = top[np.argsort(rows[top])]  # arrival order, independent of argpartition internals
            keys, rows, feats = keys[top], rows[top], feats[top]
        return [keys], [rows], [feats]

    for i, (features, logits) in enumerate(_open_blocks(blocks)):
        feats, _ = _checked_block(i, features, logits, feature)
        kept_keys.append(row_keys(seed, total, len(feats)))
        kept_rows.append(np.arange(total, total + len(feats)))
        kept_feats.append(feats)
        total += len(feats)
        held += len(feats)
        if held > 2 * max_train_points:  # trim now and then, not per block: linear, not quadratic
            kept_keys, kept_rows, kept_feats = trim(max_train_points)
            held = max_train_points
    if total == 0:
        raise DictionaryError("no substitution data: the blocks were empty")
    if n > total:
        raise DictionaryError(f"N = {n} prototypes but only {total} substitution samples; lower N (kdci.n) or add data")
    sample = trim(max_train_points)[2][0]

    pca_matrix, pca_bias = fit_pca(sample, pca_dim)
    train = project(sample, pca_matrix, pca_bias)

    centroids, iterations, inertia = kmeans(train, n, niter=niter, seed=seed, use_gpu=gpu, nredo=nredo)

    # Pass 2: assign every sample; sum teacher logits per cluster (one index for every block).
    stats, index = None, CentroidIndex(centroids, gpu)
    for i, (features, logits) in enumerate(_open_blocks(blocks)):
        feats, logits = _checked_block(i, features, logits, feature)
        feats = project(feats, pca_matrix, pca_bias)
        block = cluster_stats(feats, index, values=logits)
        stats = block if stats is None else stats + block
    assert stats is not None
    if int(stats.counts.sum()) != total:
        raise DictionaryError(f"the blocks changed between passes ({total} rows, then {int(stats.counts.sum())}); pass a deterministic source")
    return finish_dictionary(stats, centroids, total, n, pca_matrix, pca_bias, DictionaryMeta(
        n_requested=n, feature=feature, teacher=teacher, dataset=dataset, samples=total, train_samples=len(train),
        seed=seed, niter=int(niter), nredo=int(nredo), iterations=iterations, inertia=float(inertia), pca_dim=None if pca_dim is None else int(pca_dim),
        extra=extra,
    ))


def check_build_args(n, feature: str, max_train_points: int, niter: int, nredo: int, pca_dim: int | None, seed) -> None:
    """Every argument of a dictionary build checked before any work (shared with the distributed build)."""
    if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1:
        raise DictionaryError(f"dictionary size N must be an integer >= 1, got {n!r}")
    if feature not in FEATURE_KINDS:
        raise DictionaryError(f"feature must be one of {', '.join(FEATURE_KINDS)}, got {feature!r}")
    if max_train_points < n:
        raise DictionaryError(f"max_train_points = {max_train_points} < N = {n}: k-means needs at least N training points")
    if niter < 1 or nredo < 1:
        raise DictionaryError(f"niter and nredo must be >= 1, got {niter} and {nredo}")
    if pca_dim is not None and pca_dim < 1:
        raise DictionaryError(f"pca_dim must be >= 1 or unset, got {pca_dim}")
    if not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**32:
        raise DictionaryError(f"seed must be an integer in [0, 2**32), got {seed!r}")


def fit_pca(sample: np.ndarray, pca_dim: int | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """faiss PCA on the training sample: (A, b) with y = A x + b, or (None, None) without PCA."""
    if pca_dim is None:
        return None, None
    d_in = sample.shape[1]
    if pca_dim > d_in:
        raise DictionaryError(f"pca_dim = {pca_dim} exceeds the feature dimension {d_in}")
    pca = faiss.PCAMatrix(d_in, pca_dim)
    pca.train(sample)
    matrix = torch.from_numpy(faiss.vector_to_array(pca.A).astype(np.float32).reshape(pca_dim, d_in).copy())
    bias = torch.from_numpy(faiss.vector_to_array(pca.b).astype(np.float32).copy())
    return matrix, bias


def _jsonable(extra: dict) -> dict:
    """Metadata must survive JSON: numpy scalars become Python numbers; anything else is refused."""

    def convert(value):
        if isinstance(value, np.generic):
            return value.item()
        raise DictionaryError(f"dictionary metadata 'extra' holds a {type(value).__name__}, which is not JSON; pass numbers and strings")

    return json.loads(json.dumps(extra, default=convert))


def finish_dictionary(stats: ClusterStats, centroids: np.ndarray, total: int, n: int, pca_matrix, pca_bias, meta: DictionaryMeta) -> ConfounderDictionary:
    filled = stats.counts > 0
    dropped = int((~filled).sum())
    if dropped:
        log.warning("dictionary: %d of %d clusters received no samples and were dropped", dropped, n)
    counts = stats.counts[filled]
    prototypes = stats.sums[filled] / counts[:, None]
    return ConfounderDictionary(
        prototypes=torch.from_numpy(prototypes.astype(np.float32)),
        priors=torch.from_numpy((counts / total).astype(np.float32)),
        centroids=torch.from_numpy(centroids[filled].copy()),
        counts=torch.from_numpy(counts.astype(np.int64)),
        meta=DictionaryMeta(**{**asdict(meta), "empty_dropped": dropped}),
        pca_matrix=pca_matrix,
        pca_bias=pca_bias,
    )


def build_dictionary_from_arrays(
    logits, n: int, features=None, block_rows: int = 65_536, **kwargs
) -> ConfounderDictionary:
    """In-memory convenience: same algorithm as `build_dictionary`, fed in blocks of `block_rows`."""
    logits = as_float32(logits)
    feats = None if features is None else as_float32(features)
    if feats is not None and len(feats) != len(logits):
        raise DictionaryError(f"{len(feats)} feature rows but {len(logits)} logit rows")
    kind = "logits" if feats is None else "penultimate"
    if kwargs.setdefault("feature", kind) in FEATURE_KINDS and kwargs["feature"] != kind:
        raise DictionaryError(f"feature={kwargs['feature']!r} but features were {'not ' if feats is None else ''}given")

    def blocks():
        for start in range(0, len(logits), block_rows):
            yield (None if feats is None else feats[start : start + block_rows]), logits[start : start + block_rows]

    return build_dictionary(blocks, n, **kwargs)
