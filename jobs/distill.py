"""Ray job: KDCI distillation on Ray Train (DDP workers; resumes a run of the same name from its checkpoint).

    python jobs/distill.py --config configs/fast-digits-digits_cnn-digits_cnn_small.yaml [--workers 2] [--storage runs/ray]
    python jobs/distill.py --config ... --set pool=runs/pools/deepinv --set kdci.dictionary=runs/dict.safetensors
    ray job submit --working-dir . -- python jobs/distill.py --config ... --storage /mnt/efs/kdci/ray
Substitution data: the config's `pool:` (a jobs/synthesize.py output; each worker holds its equal share of
the rows on its device) when set, else the config's DFKD method on every worker (distinct seeds). Bad input
is refused (one line, exit code 2) before Ray starts. Tracked as one MLflow run (--no-track: none).
"""

from _common import parser, run


def main() -> dict:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, default=2, help="DDP workers (one GPU each when the cluster has GPUs)")
    p.add_argument("--storage", help="Ray Train storage: checkpoints and outputs (default: $KDCI_STORAGE/ray, else runs/ray)")
    p.add_argument("--max-failures", type=int, default=2, help="restarts from the last checkpoint after a worker dies")
    p.add_argument("--cpu", action="store_true", help="CPU workers even when the cluster has GPUs")
    p.add_argument("--tracking-uri", help="MLflow store (default: MLFLOW_TRACKING_URI, else sqlite under $KDCI_STORAGE/mlflow)")
    p.add_argument("--experiment", default="kdci", help="MLflow experiment")
    p.add_argument("--no-track", action="store_true", help="no MLflow run")
    args = p.parse_args()

    from kdci_ray.config import DistillConfig, load_config
    from kdci_ray.distributed import distill_on_ray, distill_on_ray_tracked

    cfg = load_config(args.config, DistillConfig, args.set)
    options = dict(num_workers=args.workers, use_gpu=False if args.cpu else None, storage_path=args.storage,
                   max_failures=args.max_failures, address=args.address)
    run_id = None
    if args.no_track:
        result = distill_on_ray(cfg, **options)
    else:
        result, run_id = distill_on_ray_tracked(cfg, experiment=args.experiment, tracking_uri=args.tracking_uri, **options)
    final = result.final
    return {"run_dir": result.run_dir, "epochs": len(result.history), "resumed_from": result.resumed_from,
            "test_top1": final.get("test_top1"), "test_top1_compensated": final.get("test_top1_compensated"),
            "seconds": round(result.seconds, 1), "checkpoint": result.checkpoint, "mlflow_run_id": run_id}


if __name__ == "__main__":
    run(main)
