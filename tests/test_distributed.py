"""The Ray layer on a real local Ray (2 CPUs): the distributed dictionary build."""

import faiss  # noqa: F401  (before torch)
import os

import pytest
import torch

from kdci_ray.kdci.dictionary import DictionaryError, build_dictionary_from_arrays
from kdci_ray.synthesis import write_pool_parquet



@pytest.fixture(scope="module")
def clustered_pool(tmp_path_factory):
    """Four Parquet shards of unequal size holding 12 clusters of 10-d "teacher logits"."""
    g = torch.Generator().manual_seed(0)
    folder = tmp_path_factory.mktemp("pool")
    centers = torch.randn(12, 10, generator=g) * 4
    blocks = []
    for i, rows in enumerate([700, 500, 900, 400]):
        x = centers[torch.randint(0, 12, (rows,), generator=g)] + torch.randn(rows, 10, generator=g)
        blocks.append(x)
        write_pool_parquet(folder / f"part-{i}.parquet", torch.zeros(rows, 1, 2, 2, dtype=torch.uint8), x,
                           torch.zeros(rows, dtype=torch.long), {"teacher_id": "teacher-a"})
    return folder, torch.cat(blocks).numpy()


@pytest.mark.parametrize("settings", [
    {"max_train_points": 100_000, "nredo": 2},
    {"max_train_points": 900, "nredo": 1},  # k-means trains on a sample drawn across the shards
    {"max_train_points": 2000, "nredo": 2, "pca_dim": 4},
], ids=["all-rows", "sampled", "pca"])
def test_shard_actors_build_the_single_process_dictionary(settings, ray_cluster, clustered_pool, tmp_path):
    from kdci_ray.distributed import build_dictionary_distributed

    folder, logits = clustered_pool
    single = build_dictionary_from_arrays(logits, 12, seed=3, block_rows=333, **settings)
    distributed = build_dictionary_distributed(folder, 12, seed=3, shards=2, teacher="teacher-a", **settings)
    assert distributed.meta.extra["shards"] == 2 and distributed.meta.samples == len(logits)
    assert distributed.meta.train_samples == single.meta.train_samples
    assert torch.allclose(distributed.prototypes, single.prototypes, atol=1e-4)
    assert torch.allclose(distributed.priors, single.priors, atol=1e-4)
    assert torch.allclose(distributed.centroids, single.centroids, atol=1e-4)


def test_both_actors_hold_rows_and_do_work(ray_cluster, clustered_pool):
    from kdci_ray.distributed.dictionary import DictionaryShard, _split, pool_files

    folder, _ = clustered_pool
    files = pool_files(folder)
    groups = _split([700, 500, 900, 400], 2)
    assert groups == [[0, 1], [2, 3]]
    actors = [ray_cluster.remote(num_cpus=0.5)(DictionaryShard).remote([str(files[i]) for i in g], off) for g, off in zip(groups, [0, 1200])]
    sizes = ray_cluster.get([a.size.remote() for a in actors])
    assert sizes == [1200, 1300]
    import numpy as np

    held = ray_cluster.get([a.prepare.remote(np.arange(0, 2500, 5), None, None) for a in actors])
    assert held == [240, 260]  # each trains on its own share of the sample
    stats = ray_cluster.get([a.train_stats.remote(np.zeros((3, 10), np.float32)) for a in actors])
    assert [int(s.counts.sum()) for s in stats] == [240, 260]
    for a in actors:
        ray_cluster.kill(a)


def test_dictionaries_are_cached_by_data_teacher_n_and_seed(ray_cluster, clustered_pool, tmp_path):
    from kdci_ray.distributed import build_dictionary_distributed

    folder, _ = clustered_pool
    cache = tmp_path / "cache"
    first = build_dictionary_distributed(folder, 8, seed=1, cache_dir=cache, nredo=1)
    assert len(list(cache.glob("dictionary-*.safetensors"))) == 1
    (cached,) = cache.glob("dictionary-*.safetensors")
    written = cached.stat().st_mtime_ns
    again = build_dictionary_distributed(folder, 8, seed=1, cache_dir=cache, nredo=1)
    assert torch.equal(first.prototypes, again.prototypes) and len(list(cache.glob("*"))) == 1
    assert cached.stat().st_mtime_ns == written  # read back, not rebuilt
    build_dictionary_distributed(folder, 8, seed=2, cache_dir=cache, nredo=1)
    build_dictionary_distributed(folder, 6, seed=1, cache_dir=cache, nredo=1)
    assert len(list(cache.glob("*"))) == 3


def test_bad_requests_fail_before_any_actor_starts(ray_cluster, clustered_pool, tmp_path):
    from kdci_ray.distributed import build_dictionary_distributed

    folder, _ = clustered_pool
    with pytest.raises(DictionaryError, match="from teacher teacher-a, not teacher-b"):
        build_dictionary_distributed(folder, 8, teacher="teacher-b")
    with pytest.raises(DictionaryError, match="only 2500 substitution samples"):
        build_dictionary_distributed(folder, 3000, max_train_points=5000)
    with pytest.raises(DictionaryError, match="pass teacher_config"):
        build_dictionary_distributed(folder, 8, feature="penultimate")
    with pytest.raises(FileNotFoundError, match="no Parquet pool"):
        build_dictionary_distributed(tmp_path / "nothing", 8)


# -- generation on Ray Data ---------------------------------------------------------------------------
REPO = __import__("pathlib").Path(__file__).resolve().parents[1]


def digits_cfg(method, teacher, *overrides):
    from kdci_ray.config import DistillConfig, load_config

    return load_config(REPO / "configs" / f"{method}-digits-digits_cnn-digits_cnn_small.yaml", DistillConfig,
                       [f"teacher.weights={teacher}", *overrides])


@pytest.mark.slow(seconds=22)
def test_generation_writes_shards_from_two_actors_and_a_manifest(ray_cluster, digits_teacher, tmp_path):
    from kdci_ray.distributed import generate
    from kdci_ray.synthesis import read_pool_parquet

    cfg = digits_cfg("deepinv", digits_teacher, "synthesis.batch_size=16", "synthesis.g_steps=3")
    out = tmp_path / "gen"
    manifest = generate(cfg, out, shards=4, calls_per_shard=2, actors=2)
    assert manifest["rows"] == 4 * 2 * 16 and manifest["files"] == [f"part-0000{i}.parquet" for i in range(4)]
    assert set(manifest["schema"]) == {"image", "logits", "call", "method", "seed", "shard", "config_hash"}
    assert len({t["worker"] for t in manifest["tasks"]}) == 2  # both actors did work
    pool = read_pool_parquet(out)
    assert pool.images.shape == (128, 1, 8, 8) and pool.logits.shape == (128, 10)
    import pyarrow.parquet as pq

    table = pq.read_table(out / "part-00003.parquet")
    assert set(table.column("seed").to_pylist()) == {3} and set(table.column("method").to_pylist()) == {"deepinv"}
    assert set(table.column("config_hash").to_pylist()) == {manifest["config_hash"]}
    # Shards differ (distinct seeds); a re-run into the folder is refused, resume redoes only what is missing.
    assert not pool.images[:32].equal(pool.images[32:64])
    with pytest.raises(FileExistsError, match="already holds files"):
        generate(cfg, out, shards=4, calls_per_shard=2)
    # Resume refuses shards of another config or a different shard count, before any work.
    other = digits_cfg("deepinv", digits_teacher, "synthesis.batch_size=16", "synthesis.g_steps=4")
    with pytest.raises(ValueError, match="generated by another config"):
        generate(other, out, shards=4, calls_per_shard=2, mode="resume")
    with pytest.raises(ValueError, match="this run has 2 shards"):
        generate(cfg, out, shards=2, calls_per_shard=2, mode="resume")
    (out / "part-00002.parquet").unlink()
    again = generate(cfg, out, shards=4, calls_per_shard=2, mode="resume")
    assert [t["shard"] for t in again["tasks"]] == [2] and again["rows"] == 128
    assert read_pool_parquet(out).images.equal(pool.images)  # same seed, same shard: the same images
    # Overwrite removes what generation wrote, and nothing else.
    (out / "part-notes.parquet").write_bytes(b"not ours")
    (out / "README.txt").write_text("keep me")
    generate(cfg, out, shards=1, calls_per_shard=1, mode="overwrite")
    assert sorted(p.name for p in out.iterdir()) == ["README.txt", "manifest.json", "part-00000.parquet", "part-notes.parquet"]


def test_dfnd_selection_on_ray_data_equals_the_single_process_selection(ray_cluster, digits_teacher, tmp_path):
    from kdci_ray.distributed import select_wild
    from kdci_ray.synthesis import read_pool_parquet
    import numpy as np

    cfg = digits_cfg("dfnd", digits_teacher, "synthesis.num_select=500", "synthesis.score_batch_size=100")
    manifest = select_wild(cfg, tmp_path / "sel", shards=3, actors=2)
    # A pool of 2 actors scored 3 shards. Which actor takes which shard is Ray's call: under load one actor
    # can finish a shard before the other is handed one, so the processes seen are 1 or 2.
    assert manifest["selected"] == manifest["rows"] == 500 and manifest["shards"] == 3 and manifest["actors"] == 2
    assert 1 <= len(manifest["workers"]) <= 2 and os.getpid() not in manifest["workers"]  # not the driver
    source = __import__("kdci_ray.engine.distill", fromlist=["make_source"]).make_source(cfg)
    from kdci_ray.engine.distill import load_models
    from kdci_ray.engine.runtime import resolve_runtime

    models = load_models(cfg, resolve_runtime("cpu"))
    source.bind(teacher=models.teacher, student=models.student, normalize=models.normalize)
    source.begin_epoch(1, None)
    assert np.array_equal(np.load(tmp_path / "sel" / "selected_rows.npy"), source.selection.indices.numpy())
    assert read_pool_parquet(tmp_path / "sel").images.equal(source.pool.filled()[0])


def test_penultimate_features_on_ray_data_give_the_single_process_dictionary(ray_cluster, digits_teacher, tmp_path):
    """kdci.feature = penultimate: a Ray Data pass runs the teacher over the pool files (one features file per
    pool file), shard actors hold the features; equal to the single-process build on the same images."""
    from pathlib import Path

    import numpy as np

    from kdci_ray.config import DistillConfig, load_config
    from kdci_ray.data import load_dataset
    from kdci_ray.distributed import build_dictionary_distributed
    from kdci_ray.engine.distill import load_models
    from kdci_ray.engine.runtime import resolve_runtime
    from kdci_ray.kdci import build_dictionary, teacher_blocks

    config = Path(__file__).resolve().parents[1] / "configs" / "fast-digits-digits_cnn-digits_cnn_small.yaml"
    cfg = load_config(config, DistillConfig, [f"teacher.weights={digits_teacher}", "kdci.feature=penultimate", "device=cpu"])
    models = load_models(cfg, resolve_runtime("cpu"))
    images = torch.from_numpy(np.ascontiguousarray(load_dataset("digits", None, "train").images[:750])).permute(0, 3, 1, 2).contiguous()
    folder = tmp_path / "pool"
    for i, (lo, hi) in enumerate([(0, 300), (300, 500), (500, 750)]):
        write_pool_parquet(folder / f"part-{i:05d}.parquet", images[lo:hi], torch.zeros(hi - lo, 10), torch.zeros(hi - lo, dtype=torch.long),
                           {"teacher_id": models.teacher_id})
    settings = {"seed": 3, "nredo": 2, "niter": 20, "max_train_points": 500, "feature": "penultimate"}
    blocks = list(teacher_blocks(models.teacher, images.split(128), models.normalize, "penultimate"))
    single = build_dictionary(blocks, 8, teacher=models.teacher_id, **settings)
    distributed = build_dictionary_distributed(folder, 8, shards=2, teacher=models.teacher_id, teacher_config=cfg,
                                               cache_dir=tmp_path / "cache", **settings)
    assert distributed.meta.feature == "penultimate" and distributed.meta.samples == 750
    assert "teacher_features" in distributed.meta.extra["seconds"]
    assert distributed.centroids.shape[1] == blocks[0][0].shape[1]  # the assignment space is the features'
    for name in ("prototypes", "priors", "centroids"):
        assert torch.allclose(getattr(distributed, name), getattr(single, name), atol=1e-4), name
    assert len(list((tmp_path / "cache").glob("features-*/features-*.parquet"))) == 3


def test_a_refused_resume_leaves_the_pool_exactly_as_it_was(digits_teacher, tmp_path):
    """`--mode resume` over a pool of another config, or with fewer shards, is refused before Ray starts (this
    is not a Ray test: the suite's guard fails it if Ray starts) and changes nothing, its manifest included."""
    import hashlib
    import json

    from kdci_ray.distributed import generate
    from kdci_ray.distributed.generate import config_hash

    other = digits_cfg("deepinv", digits_teacher, "synthesis.g_steps=7")
    out = tmp_path / "pool"
    out.mkdir()
    for shard in range(3):
        write_pool_parquet(out / f"part-{shard:05d}.parquet", torch.zeros(4, 1, 8, 8, dtype=torch.uint8), torch.zeros(4, 10),
                           torch.zeros(4, dtype=torch.int64), {"method": "deepinv", "config_hash": config_hash(other)},
                           columns={"method": "deepinv", "seed": shard, "shard": shard, "config_hash": config_hash(other)})
    (out / "manifest.json").write_text(json.dumps({"rows": 12}))

    def listing():
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.iterdir())}

    before = listing()
    with pytest.raises(ValueError, match="generated by another config .* use another folder or --mode overwrite"):
        generate(digits_cfg("deepinv", digits_teacher), out, shards=3, calls_per_shard=1, mode="resume")
    with pytest.raises(ValueError, match="shard 2 but this run has 2 shards; use the same --shards"):
        generate(other, out, shards=2, calls_per_shard=1, mode="resume")
    with pytest.raises(FileExistsError, match="--mode resume .* or --mode overwrite"):
        generate(other, out, shards=3, calls_per_shard=1)
    assert listing() == before
