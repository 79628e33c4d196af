"""Ray job: the KDCI confounder dictionary of a Parquet pool, built by shard actors (distributed k-means).

    python jobs/build_dictionary.py --config configs/deepinv-digits-digits_cnn-digits_cnn_small.yaml \
        --pool runs/pools/deepinv [--shards 2] [--cache-dir runs/dictionaries] [--out dictionary.safetensors]
N, seed and the k-means settings come from the config's `kdci:` section (and `seed`).
"""

from _common import parser, run


def main() -> dict:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--pool", required=True, help="Parquet pool folder (jobs/synthesize.py output) or file")
    p.add_argument("--shards", type=int, default=2, help="shard actors holding the features")
    p.add_argument("--cache-dir", default="runs/dictionaries", help="dictionaries cached by (data, teacher, N, seed, settings)")
    p.add_argument("--out", help="also write the dictionary here (.safetensors)")
    args = p.parse_args()

    from pathlib import Path

    from kdci_ray.config import DistillConfig, load_config
    from kdci_ray.distributed import build_dictionary_distributed, ensure_ray
    from kdci_ray.engine.distill import load_models
    from kdci_ray.engine.runtime import resolve_runtime

    cfg = load_config(args.config, DistillConfig, args.set)
    k = cfg.kdci
    # The config's teacher: every shard's logits must come from it (a pool from another teacher is refused).
    teacher_id = load_models(cfg, resolve_runtime("cpu")).teacher_id
    ensure_ray(args.address)
    dictionary = build_dictionary_distributed(
        args.pool, k.n, seed=cfg.seed, niter=k.niter, nredo=k.nredo, feature=k.feature, pca_dim=k.pca_dim,
        max_train_points=k.max_train_points, shards=args.shards, teacher=teacher_id, dataset=cfg.data.dataset,
        cache_dir=args.cache_dir, teacher_config=cfg,
    )
    out = dictionary.save(Path(args.out)) if args.out else None
    return {"n": dictionary.n, "samples": dictionary.meta.samples, "iterations": dictionary.meta.iterations,
            "inertia": dictionary.meta.inertia, "out": out, "cache_dir": args.cache_dir}


if __name__ == "__main__":
    run(main)
