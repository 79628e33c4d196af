"""Ray job: substitution data on Ray Data -> Parquet shards + manifest (or DFND's selection from the wild pool).

    python jobs/synthesize.py --config configs/deepinv-digits-digits_cnn-digits_cnn_small.yaml --out runs/pools/deepinv \
        --shards 4 --calls-per-shard 2 [--actors 2] [--mode fail|resume|overwrite]
    ray job submit --working-dir . -- python jobs/synthesize.py --config ... --out /shared/pools/deepinv ...
"""

from _common import parser, run


def main() -> dict:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="output folder (shared storage on a cluster)")
    p.add_argument("--shards", type=int, default=4, help="synthesis tasks, one Parquet file each (dfnd: row ranges of the wild pool)")
    p.add_argument("--calls-per-shard", type=int, default=1, help="synthesis calls per task")
    p.add_argument("--actors", type=int, default=2, help="actor pool size (one GPU each when GPUs exist)")
    p.add_argument("--mode", default="fail", choices=["fail", "resume", "overwrite"], help="when --out already holds files")
    p.add_argument("--gpus-per-actor", type=float, help="default: 1 when the cluster has GPUs, else 0")
    p.add_argument("--cpus-per-actor", type=float, help="default: a share that leaves one CPU for Ray Data's other stages")
    args = p.parse_args()

    from kdci_ray.config import DistillConfig, load_config
    from kdci_ray.distributed import ensure_ray, generate, select_wild

    cfg = load_config(args.config, DistillConfig, args.set)
    ensure_ray(args.address)
    if cfg.synthesis is not None and cfg.synthesis.method == "dfnd":
        manifest = select_wild(cfg, args.out, shards=args.shards, actors=args.actors, mode=args.mode,
                               gpus_per_actor=args.gpus_per_actor, cpus_per_actor=args.cpus_per_actor)
    else:
        manifest = generate(cfg, args.out, shards=args.shards, calls_per_shard=args.calls_per_shard, actors=args.actors, mode=args.mode,
                            gpus_per_actor=args.gpus_per_actor, cpus_per_actor=args.cpus_per_actor)
    return {"out": args.out, "rows": manifest["rows"], "files": len(manifest["files"]), "method": manifest["method"],
            "config_hash": manifest["config_hash"], "seconds": manifest["seconds"]}


if __name__ == "__main__":
    run(main)
