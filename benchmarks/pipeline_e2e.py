"""The whole Ray pipeline end to end on one config, through `run_pipeline` (what `jobs/pipeline.py` runs):
generation on Ray Data actors -> the dictionary by distributed k-means -> Ray Train DDP distillation on the
Parquet pool, tracked in MLflow. Reports each stage's wall time, generation and KD throughput, and the
student's top-1 (raw and compensated).

    # GPU (CIFAR-10, wrn40_2 -> wrn16_1; the shared teacher and data copied next to the checkout):
    python benchmarks/pipeline_e2e.py --teacher-weights <wrn40_2.safetensors> --data-root <cifar10-jpeg.tar.gz>
    # this CPU, toy size (what the tests run):
    python benchmarks/pipeline_e2e.py --config configs/fast-digits-digits_cnn-digits_cnn_small.yaml \
        --teacher-weights runs/teachers/digits_cnn.safetensors --shards 2 --calls-per-shard 1 --set optim.epochs=1

Defaults (GPU scale): Fast on CIFAR-10, 16 generation tasks x 4 calls x 256 images = 16,384 images, KDCI N
from the config, 20 KD epochs over the pool; one generation actor and one DDP worker per GPU (2 of each on
a CPU machine). Prints a short table; writes JSON to --out (default: $OUT/pipeline_e2e.json, else
benchmarks/results/pipeline_e2e-<dataset>-<cpu|gpu>.json).
"""

from __future__ import annotations

import faiss  # noqa: F401  (before torch)

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from _report import command_line, device_name, write_result  # noqa: E402
from kdci_ray.config import DistillConfig, load_config  # noqa: E402
from kdci_ray.distributed import ensure_ray, run_pipeline  # noqa: E402

DEFAULT_SET = ["optim.epochs=20", "eval_every=5"]  # a short schedule: the public 200 epochs take hours


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(REPO / "configs" / "fast-cifar10-wrn40_2-wrn16_1.yaml"))
    p.add_argument("--teacher-weights", help="default: the config's")
    p.add_argument("--data-root", help="default: the config's")
    p.add_argument("--set", action="append", default=None, metavar="KEY=VALUE",
                   help=f"config override (repeatable; default {' '.join(DEFAULT_SET)})")
    p.add_argument("--shards", type=int, default=16, help="generation tasks (Parquet files)")
    p.add_argument("--calls-per-shard", type=int, default=4, help="synthesis calls per task")
    p.add_argument("--actors", type=int, help="generation actors (default: the cluster's GPUs, else 2)")
    p.add_argument("--workers", type=int, help="Ray Train DDP workers (default: the cluster's GPUs, else 2)")
    p.add_argument("--dictionary-shards", type=int, default=2, help="shard actors of the distributed k-means")
    p.add_argument("--no-track", action="store_true", help="no MLflow runs (default: a sqlite store in the work folder)")
    p.add_argument("--work-dir", help="storage for the pool, dictionary and runs (default: a temporary folder)")
    p.add_argument("--out", help="JSON results path")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    overrides = list(DEFAULT_SET if args.set is None else args.set)
    if args.teacher_weights:
        overrides.append(f"teacher.weights={args.teacher_weights}")
    if args.data_root:
        overrides.append(f"data.root={args.data_root}")
    cfg = load_config(args.config, DistillConfig, [*overrides, "name=pipeline-e2e"])  # bad input fails before Ray starts
    ray = ensure_ray()
    gpus = int(ray.cluster_resources().get("GPU", 0))
    actors = args.actors or (gpus or 2)
    workers = args.workers or (gpus or 2)
    command = command_line("pipeline_e2e.py", argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work_dir or tmp)
        t0 = time.perf_counter()
        out = run_pipeline(cfg, storage_path=work / "ray", shards=args.shards, calls_per_shard=args.calls_per_shard, actors=actors,
                           dictionary_shards=args.dictionary_shards, workers=workers, mode="overwrite", max_failures=0,
                           track=not args.no_track, experiment="pipeline-e2e", tracking_uri=f"sqlite:///{work / 'mlflow.db'}")
        total = time.perf_counter() - t0
        history = json.loads((Path(out["run_dir"]) / "metrics.json").read_text())
    steady = history[1:] or history  # the first epoch carries start-up (Ray Data, compilation of kernels)
    seconds = out["seconds"]
    run = {
        "pool_rows": out["pool_rows"], "stage_seconds": seconds, "total_seconds": round(total, 2),
        "other_seconds": round(total - sum(seconds.values()), 2),  # teacher check, MLflow run, figures of the pool
        "generation_images_per_s": round(out["pool_rows"] / seconds["generate"], 1),
        "distill_epochs": out["epochs"], "distill_images_per_s": round(sum(r["images_per_s"] for r in steady) / len(steady), 1),
        "distill_epoch_seconds": [round(r["epoch_seconds"], 2) for r in history],
        "train_loss": [round(r["train_loss"], 4) for r in history],
        "test_top1": out["test_top1"], "test_top1_compensated": out["test_top1_compensated"],
        "resumed_from": out["resumed_from"],
        # where to find the run in the MLflow UI (None untracked)
        "mlflow_run_id": out.get("mlflow_run_id"), "mlflow_distill_run_id": out.get("mlflow_distill_run_id"),
    }
    result = {
        "benchmark": "pipeline_e2e", "device": device_name(), "torch": torch.__version__, "command": command,
        "config": Path(args.config).name, "overrides": overrides, "method": cfg.synthesis.method, "kdci": cfg.kdci.enabled,
        "kdci_n": cfg.kdci.n, "teacher": cfg.teacher.arch, "student": cfg.student.arch, "shards": args.shards,
        "calls_per_shard": args.calls_per_shard, "generation_actors": actors, "train_workers": workers, "gpus": gpus,
        "tracked": not args.no_track, "run": run,
    }
    print(f"{'stage':12} {'seconds':>8}  detail")
    print(f"{'generate':12} {seconds['generate']:8.1f}  {out['pool_rows']} {cfg.synthesis.method} images, {run['generation_images_per_s']:.1f} img/s, "
          f"{actors} actors")
    if "dictionary" in seconds:
        print(f"{'dictionary':12} {seconds['dictionary']:8.1f}  N = {cfg.kdci.n}, {args.dictionary_shards} shard actors")
    comp = "" if out["test_top1_compensated"] is None else f" (compensated {out['test_top1_compensated']:.2f} %)"
    print(f"{'distill':12} {seconds['distill']:8.1f}  {out['epochs']} epochs, {run['distill_images_per_s']:.0f} img/s, {workers} workers, "
          f"top-1 {out['test_top1']:.2f} %{comp}")
    print(f"{'total':12} {total:8.1f}")
    tag = "gpu" if torch.cuda.is_available() else "cpu"
    write_result(result, args.out, "pipeline_e2e", f"pipeline_e2e-{cfg.data.dataset}-{tag}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
