"""The Ray stages with 1 vs 2 workers: generation throughput on Ray Data (synthesis tasks on an actor pool),
the distributed k-means dictionary build (shard actors) and Ray Train DDP distillation on a Parquet pool
(KDCI on, the generated images tiled to --distill-rows), each timed end to end on a local Ray.

    python benchmarks/ray_pipeline.py                       # this machine (CPU): digits DeepInv, 400k-row pool
    python benchmarks/ray_pipeline.py --rows 20000 --shards 2 --calls 1   # toy size (what the tests run)

Prints a short table; writes JSON to --out (default: $OUT/ray_pipeline.json, else
benchmarks/results/ray_pipeline-<cpu|gpu>.json).
"""

from __future__ import annotations

import faiss  # noqa: F401  (before torch)

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from _report import command_line, device_name, write_result  # noqa: E402
from kdci_ray.config import DistillConfig, load_config  # noqa: E402
from kdci_ray.distributed import build_dictionary_distributed, distill_on_ray, ensure_ray, generate  # noqa: E402
from kdci_ray.synthesis import read_pool_parquet, write_pool_parquet  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", default="1,2", help="worker counts to compare")
    p.add_argument("--config", default=str(REPO / "configs" / "deepinv-digits-digits_cnn-digits_cnn_small.yaml"))
    p.add_argument("--teacher-weights", default=str(REPO / "runs" / "teachers" / "digits_cnn.safetensors"))
    p.add_argument("--shards", type=int, default=4, help="synthesis tasks per generation run")
    p.add_argument("--calls", type=int, default=2, help="synthesis calls per task")
    p.add_argument("--set", action="append", default=["synthesis.batch_size=128", "synthesis.g_steps=100"], metavar="KEY=VALUE")
    p.add_argument("--rows", type=int, default=400_000, help="rows of the synthetic logits pool for k-means")
    p.add_argument("--n", type=int, default=128, help="dictionary size N")
    p.add_argument("--distill-rows", type=int, default=16384, help="rows of the distillation pool (generated images, tiled)")
    p.add_argument("--distill-epochs", type=int, default=4)
    p.add_argument("--out")
    return p.parse_args(argv)


def logits_pool(folder: Path, rows: int, files: int = 8, classes: int = 10, seed: int = 0) -> None:
    """A pool of `rows` teacher-logit-like rows (Gaussian clusters) in `files` Parquet shards."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(64, classes, generator=g) * 4
    per = rows // files
    for i in range(files):
        x = centers[torch.randint(0, 64, (per,), generator=g)] + torch.randn(per, classes, generator=g)
        write_pool_parquet(folder / f"part-{i:05d}.parquet", torch.zeros(per, 1, 1, 1, dtype=torch.uint8), x, torch.zeros(per, dtype=torch.long))


def tiled_pool(generated: Path, folder: Path, rows: int) -> Path:
    """The generated images repeated to `rows` rows (KD throughput needs epochs longer than Ray's start-up)."""
    data = read_pool_parquet(generated)
    reps = -(-rows // len(data.images))
    images, logits = data.images.repeat(reps, 1, 1, 1)[:rows], data.logits.repeat(reps, 1)[:rows]
    write_pool_parquet(folder / "part-00000.parquet", images, logits, torch.zeros(rows, dtype=torch.long), {"teacher_id": data.meta.get("teacher_id")})
    return folder


def main(argv=None) -> int:
    args = parse_args(argv)
    workers = [int(w) for w in args.workers.split(",")]
    ray = ensure_ray()
    cpus = ray.cluster_resources().get("CPU")
    cfg = load_config(args.config, DistillConfig, [f"teacher.weights={args.teacher_weights}", *args.set])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        logits_pool(tmp / "logits", args.rows)
        distill_pool = None
        for w in workers:
            t0 = time.perf_counter()
            manifest = generate(cfg, tmp / f"gen-{w}", shards=args.shards, calls_per_shard=args.calls, actors=w)
            gen_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            d = build_dictionary_distributed(tmp / "logits", args.n, seed=0, nredo=1, niter=20, max_train_points=100_000, shards=w)
            km_s = time.perf_counter() - t0
            if distill_pool is None:
                distill_pool = tiled_pool(tmp / f"gen-{w}", tmp / "distill-pool", args.distill_rows)
            run_cfg = load_config(args.config, DistillConfig, [
                f"teacher.weights={args.teacher_weights}", *args.set, f"pool={distill_pool}", f"name=bench-{w}",
                f"optim.epochs={args.distill_epochs}", "kdci.rebuild_every=0",
            ])
            t0 = time.perf_counter()
            trained = distill_on_ray(run_cfg, num_workers=w, storage_path=tmp / "ray", max_failures=0)
            distill_s = time.perf_counter() - t0
            steady = trained.history[1:] or trained.history  # the first epoch carries start-up (Ray Data, dictionary)
            rows.append({"workers": w, "generation_images": manifest["rows"], "generation_seconds": round(gen_s, 2),
                         "generation_images_per_s": round(manifest["rows"] / gen_s, 1), "kmeans_rows": args.rows,
                         "kmeans_seconds": round(km_s, 2), "kmeans_iterations": d.meta.iterations,
                         "kmeans_phase_seconds": d.meta.extra["seconds"],
                         "distill_rows": args.distill_rows, "distill_epochs": args.distill_epochs, "distill_seconds": round(distill_s, 2),
                         "distill_images_per_s": round(sum(r["images_per_s"] for r in steady) / len(steady), 1),
                         "distill_epoch_seconds": [round(r["epoch_seconds"], 2) for r in trained.history],
                         "distill_train_loss": [round(r["train_loss"], 4) for r in trained.history]})
    base = rows[0]
    for r in rows:
        r["generation_speedup"] = round(r["generation_images_per_s"] / base["generation_images_per_s"], 2)
        r["kmeans_speedup"] = round(base["kmeans_seconds"] / r["kmeans_seconds"], 2)
        r["distill_speedup"] = round(r["distill_images_per_s"] / base["distill_images_per_s"], 2)
    print(f"{'workers':>7} {'gen img/s':>10} {'x':>5} {'k-means s':>10} {'x':>5} {'KD img/s':>9} {'x':>5} {'KD run s':>9}  k-means phases (s)")
    for r in rows:
        print(f"{r['workers']:>7} {r['generation_images_per_s']:>10.1f} {r['generation_speedup']:>5.2f} {r['kmeans_seconds']:>10.2f} "
              f"{r['kmeans_speedup']:>5.2f} {r['distill_images_per_s']:>9.1f} {r['distill_speedup']:>5.2f} {r['distill_seconds']:>9.1f}  "
              f"{r['kmeans_phase_seconds']}")
    device = device_name(f", Ray CPUs {cpus}")
    command = command_line("ray_pipeline.py", argv)
    result = {"benchmark": "ray_pipeline", "device": device, "torch": torch.__version__, "command": command,
              "generation": {"config": Path(args.config).name, "overrides": args.set, "shards": args.shards, "calls_per_shard": args.calls},
              "kmeans": {"rows": args.rows, "n": args.n, "dim": 10, "max_train_points": 100_000},
              "distill": {"rows": args.distill_rows, "epochs": args.distill_epochs, "batch_size": cfg.optim.batch_size, "kdci_n": cfg.kdci.n,
                          "student": cfg.student.arch, "note": "images_per_s: mean over epochs after the first, all workers together"},
              "runs": rows}
    tag = "gpu" if torch.cuda.is_available() else "cpu"
    write_result(result, args.out, "ray_pipeline", f"ray_pipeline-{tag}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
