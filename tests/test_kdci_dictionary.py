"""The confounder dictionary: planted clusters, priors, streaming = in-memory, save/load, errors."""

import faiss  # noqa: F401  (before torch)
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from kdci_ray.kdci import ConfounderDictionary, DictionaryError, build_dictionary, build_dictionary_from_arrays
from kdci_ray.kdci.kmeans import ClusterStats, cluster_stats, kmeans, kmeans_plusplus, update_centroids

PROPORTIONS = np.array([0.05, 0.10, 0.15, 0.20, 0.22, 0.28])


def blobs(n=12_000, dim=10, seed=0, spread=12.0):
    """Gaussian blobs with known centers and known (unequal) proportions; labels are the truth."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(len(PROPORTIONS), dim)) * spread
    labels = rng.choice(len(PROPORTIONS), size=n, p=PROPORTIONS)
    x = centers[labels] + rng.normal(size=(n, dim))
    return x.astype(np.float32), labels, centers


def purity(assigned, truth, k):
    return sum(np.bincount(truth[assigned == c]).max() for c in range(k) if (assigned == c).any()) / len(truth)


def test_recovers_planted_clusters_and_proportions():
    x, truth, centers = blobs()
    d = build_dictionary_from_arrays(x, len(PROPORTIONS), seed=0, block_rows=1000, max_train_points=4000)
    assigned = d.assign(x)
    assert purity(assigned, truth, d.n) >= 0.99
    index = d._index[1]  # built by the first lookup, kept for the next ones (not one faiss index per call)
    assert np.array_equal(np.concatenate([d.assign(x[:2500]), d.assign(x[2500:])]), assigned) and d._index[1] is index
    # Each prototype is the mean of its cluster's logits, i.e. near a planted center.
    dist = np.linalg.norm(d.prototypes.numpy()[:, None] - centers[None], axis=2)
    match = dist.argmin(axis=1)
    assert sorted(match) == list(range(len(PROPORTIONS)))
    assert dist.min(axis=1).max() < 0.2
    # Priors are proportions over *all* samples (not the 4000-row training sample).
    assert d.priors.sum().item() == pytest.approx(1.0, abs=1e-6)
    observed = np.bincount(truth, minlength=len(PROPORTIONS)) / len(truth)
    np.testing.assert_allclose(d.priors.numpy(), observed[match], atol=0.01)
    np.testing.assert_allclose(d.priors.numpy(), PROPORTIONS[match], atol=0.01)
    assert d.meta.samples == len(x) and d.meta.train_samples == 4000 and d.counts.sum().item() == len(x)


def test_prototypes_are_logits_even_when_assignment_uses_features():
    x, truth, _ = blobs(n=3000)
    logits = np.eye(len(PROPORTIONS), dtype=np.float32)[truth] * 5.0  # C = 6 "logits", one per true cluster
    d = build_dictionary_from_arrays(logits, len(PROPORTIONS), features=x, pca_dim=4, seed=1)
    assert d.meta.feature == "penultimate" and d.meta.pca_dim == 4
    assert d.prototypes.shape == (len(PROPORTIONS), len(PROPORTIONS))
    # Pure clusters in feature space -> each prototype is exactly 5 * one-hot of its class.
    assert torch.allclose(d.prototypes.max(dim=1).values, torch.full((len(PROPORTIONS),), 5.0), atol=0.05)
    assert purity(d.assign(x), truth, d.n) >= 0.99


def test_streaming_build_equals_in_memory_build():
    x, _, _ = blobs(n=5000)
    whole = build_dictionary_from_arrays(x, 6, seed=3, block_rows=10_000)
    chunks = [(None, x[i : i + 700]) for i in range(0, len(x), 700)]
    streamed = build_dictionary(chunks, 6, seed=3)
    # The training sample depends on (seed, row index) only, so block boundaries change nothing.
    assert torch.equal(streamed.centroids, whole.centroids)
    torch.testing.assert_close(streamed.prototypes, whole.prototypes, atol=1e-5, rtol=0)
    assert torch.equal(streamed.counts, whole.counts)
    sampled = build_dictionary(chunks, 6, seed=3, max_train_points=1000)
    resampled = build_dictionary([(None, x[i : i + 1300]) for i in range(0, len(x), 1300)], 6, seed=3, max_train_points=1000)
    assert sampled.meta.train_samples == 1000 and torch.equal(sampled.centroids, resampled.centroids)


def test_same_seed_same_dictionary_and_generators_are_refused():
    x, _, _ = blobs(n=2000)
    a = build_dictionary_from_arrays(x, 6, seed=7)
    b = build_dictionary_from_arrays(x, 6, seed=7)
    assert torch.equal(a.prototypes, b.prototypes) and torch.equal(a.priors, b.priors)
    gen = ((None, x[i : i + 500]) for i in range(0, 2000, 500))
    with pytest.raises(DictionaryError, match="generator"):
        build_dictionary(gen, 6)


def test_sharded_lloyd_step_equals_whole_step():
    """The distributed build sums per-shard statistics; that must equal one step on all the data."""
    x, _, _ = blobs(n=3000)
    init = kmeans_plusplus(x, 6, seed=0)
    whole = cluster_stats(x, init)
    parts = ClusterStats.zeros(6, x.shape[1])
    for shard in np.array_split(x, 3):
        parts = parts + cluster_stats(shard, init)
    assert np.array_equal(parts.counts, whole.counts)
    np.testing.assert_allclose(update_centroids(parts, init), update_centroids(whole, init), atol=1e-5)


def test_empty_cluster_is_split_deterministically():
    x = np.array([[0.0, 0.0], [0.1, 0.0], [10.0, 10.0], [10.1, 10.0]], np.float32)
    init = np.array([[0.0, 0.0], [10.0, 10.0], [100.0, 100.0]], np.float32)  # the third gets nothing
    stats = cluster_stats(x, init)
    assert stats.counts.tolist() == [2, 2, 0]
    new = update_centroids(stats, init)
    assert np.array_equal(new, update_centroids(stats, init))
    # The donor is the lowest-index largest cluster (0); the empty centroid lands next to it.
    assert np.abs(new[2] - new[0]).max() < 0.01 and not np.array_equal(new[2], new[0])
    centroids, _, _ = kmeans(x, 3, niter=10, seed=0, init=init)
    assert len(np.unique(cluster_stats(x, centroids).counts.nonzero()[0])) >= 2


def test_save_load_roundtrip_keeps_metadata(tmp_path):
    x, _, _ = blobs(n=2000)
    d = build_dictionary_from_arrays(x, 6, features=x * 2, pca_dim=3, seed=2, teacher="abc123", dataset="blobs", extra={"epoch": 4})
    path = d.save(tmp_path / "dict.safetensors")
    e = ConfounderDictionary.load(path)
    for name in ("prototypes", "priors", "centroids", "counts", "pca_matrix", "pca_bias"):
        assert torch.equal(getattr(e, name), getattr(d, name)), name
    assert e.meta == d.meta
    assert (e.meta.n_requested, e.meta.teacher, e.meta.dataset, e.meta.samples, e.meta.seed) == (6, "abc123", "blobs", 2000, 2)
    assert e.meta.extra == {"epoch": 4}
    assert np.array_equal(e.assign(x[:50] * 2), d.assign(x[:50] * 2))
    assert not list(tmp_path.glob("*.tmp"))


def test_load_rejects_files_that_are_not_dictionaries(tmp_path):
    with pytest.raises(DictionaryError, match="does not exist"):
        ConfounderDictionary.load(tmp_path / "missing.safetensors")
    other = tmp_path / "weights.safetensors"
    save_file({"w": torch.zeros(2)}, str(other))
    with pytest.raises(DictionaryError, match="not a KDCI dictionary"):
        ConfounderDictionary.load(other)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file at all")
    with pytest.raises(DictionaryError, match="not a safetensors file"):
        ConfounderDictionary.load(junk)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"n": 0}, "N must be an integer >= 1"),
        ({"n": -3}, "N must be an integer >= 1"),
        ({"n": 2.5}, "N must be an integer >= 1"),
        ({"n": 101}, "only 100 substitution samples"),
        ({"n": 4, "feature": "pixels"}, "feature must be one of"),
        ({"n": 4, "pca_dim": 50}, "exceeds the feature dimension"),
        ({"n": 8, "max_train_points": 5}, "k-means needs at least N"),
    ],
)
def test_bad_input_is_refused(kwargs, match):
    x = np.random.default_rng(0).normal(size=(100, 10)).astype(np.float32)
    with pytest.raises(DictionaryError, match=match):
        build_dictionary_from_arrays(x, **kwargs)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_features_are_refused(bad):
    x = np.random.default_rng(0).normal(size=(100, 10)).astype(np.float32)
    x[37, 3] = bad
    with pytest.raises(DictionaryError, match="NaN or inf"):
        build_dictionary_from_arrays(x, 4)
    with pytest.raises(DictionaryError, match="NaN or inf"):
        build_dictionary_from_arrays(np.abs(x[:, :3]) * 0 + 1, 4, features=x)


def test_metadata_accepts_numpy_scalars_and_refuses_objects(tmp_path):
    x, _, _ = blobs(n=500)
    d = build_dictionary_from_arrays(x, np.int64(4), seed=np.int64(1), extra={"epoch": np.int64(3), "loss": np.float32(0.5)})
    e = ConfounderDictionary.load(d.save(tmp_path / "d.safetensors"))
    assert e.meta.n_requested == 4 and e.meta.extra == {"epoch": 3, "loss": 0.5}
    with pytest.raises(DictionaryError, match="not JSON"):
        build_dictionary_from_arrays(x, 4, extra={"when": object()})


def test_feature_kind_must_match_the_blocks():
    x, _, _ = blobs(n=500)
    with pytest.raises(DictionaryError, match="expects penultimate features"):
        build_dictionary([(None, x)], 4, feature="penultimate")
    with pytest.raises(DictionaryError, match="feature='logits' but features were given"):
        build_dictionary_from_arrays(x, 4, features=x, feature="logits")
