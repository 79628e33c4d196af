"""Ray job: generation (Ray Data) -> dictionary (distributed k-means) -> distillation (Ray Train), one config.

    python jobs/pipeline.py --config configs/fast-digits-digits_cnn-digits_cnn_small.yaml [--storage runs/ray]
    ray job submit --working-dir . -- python jobs/pipeline.py --config ... --storage /mnt/efs/kdci/ray
Everything lands under <storage>/<name>/ (pool/, dictionary.safetensors, outputs/, Ray checkpoints); submitting
again continues where it stopped. One MLflow parent run per pipeline, the distillation its child (--no-track: none).
"""

from _common import parser, run


def main() -> dict:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--storage", help="shared storage for Parquet, dictionaries and checkpoints (default: $KDCI_STORAGE/ray, else runs/ray)")
    p.add_argument("--shards", type=int, default=4, help="generation tasks (Parquet files)")
    p.add_argument("--calls-per-shard", type=int, default=1, help="synthesis calls per generation task")
    p.add_argument("--actors", type=int, default=2, help="generation actors (one GPU each when the cluster has GPUs)")
    p.add_argument("--dictionary-shards", type=int, default=2, help="shard actors of the distributed k-means")
    p.add_argument("--workers", type=int, default=2, help="Ray Train DDP workers")
    p.add_argument("--mode", default="resume", choices=["fail", "resume", "overwrite"], help="when the pool folder already holds shards")
    p.add_argument("--max-failures", type=int, default=2, help="distillation restarts after a worker dies")
    p.add_argument("--cpu", action="store_true", help="CPU distillation workers even when the cluster has GPUs")
    p.add_argument("--tracking-uri", help="MLflow store (default: MLFLOW_TRACKING_URI, else sqlite under $KDCI_STORAGE/mlflow)")
    p.add_argument("--experiment", default="kdci", help="MLflow experiment")
    p.add_argument("--no-track", action="store_true", help="no MLflow runs")
    args = p.parse_args()

    from kdci_ray.config import DistillConfig, load_config
    from kdci_ray.distributed import run_pipeline

    cfg = load_config(args.config, DistillConfig, args.set)
    return run_pipeline(
        cfg, storage_path=args.storage, shards=args.shards, calls_per_shard=args.calls_per_shard, actors=args.actors,
        dictionary_shards=args.dictionary_shards, workers=args.workers, mode=args.mode, use_gpu=False if args.cpu else None,
        max_failures=args.max_failures, address=args.address, track=not args.no_track, experiment=args.experiment,
        tracking_uri=args.tracking_uri,
    )


if __name__ == "__main__":
    run(main)
