"""Does the first KDCI dictionary cover what the student trains on? A digits comparison of when it is built:

  - DeepInv and CMI build it at the first epoch from their first call's images (kdci.min_images_per_prototype 0),
    or wait (plain KD meanwhile) until the pool holds 8 or 16 images per prototype (digits: 2-6 of 20 epochs);
  - MosaicKD builds it once from the OOD set plus an untrained generator's samples (kdci.rebuild_every 0), or
    rebuilds it every 2 epochs from the OOD set and the generator's current samples.

Every variant runs with KDCI on for each seed, through `distill_from_config` on the committed digits configs;
the report gives test top-1 (last epoch) mean +- std and the paired difference to the first variant of the method
with its 95 % interval, and val_agreement (held-out substitution data).

    python benchmarks/dictionary_coverage.py --teacher-weights runs/teachers/digits_cnn.safetensors

Writes JSON to --out (default: benchmarks/results/dictionary_coverage-digits-cpu.json).
"""

from __future__ import annotations

import faiss  # noqa: F401  (faiss before torch)

import argparse
import logging
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from _report import command_line, device_name, write_result
from kdci_ray.config import DistillConfig, load_config
from kdci_ray.distributed.reproduce import mean_std, paired_interval

REPO = Path(__file__).resolve().parents[1]
VARIANTS = {
    "deepinv": {"first build at epoch 1": ["kdci.min_images_per_prototype=0"],
                "wait for 8 x N images": ["kdci.min_images_per_prototype=8"],
                "wait for 16 x N images": ["kdci.min_images_per_prototype=16"]},
    "cmi": {"first build at epoch 1": ["kdci.min_images_per_prototype=0"],
            "wait for 8 x N images": ["kdci.min_images_per_prototype=8"],
            "wait for 16 x N images": ["kdci.min_images_per_prototype=16"]},
    "mosaickd": {"built once": ["kdci.rebuild_every=0"], "rebuilt every 2 epochs": ["kdci.rebuild_every=2"]},
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", default=",".join(VARIANTS), help="CMI is the slowest on a CPU (~4 min a run)")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--teacher-weights", default=str(REPO / "runs" / "teachers" / "digits_cnn.safetensors"))
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override every run")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--out")
    return p.parse_args(argv)


def run_one(job: dict) -> dict:
    import torch

    from kdci_ray.engine.distill import distill_from_config

    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING)
    t0 = time.perf_counter()
    result = distill_from_config(load_config(job["config"], DistillConfig, job["overrides"]))
    final = result.final
    built = [row["epoch"] for row in result.history if "attention_entropy" in row]
    return {**{k: job[k] for k in ("method", "variant", "seed")}, "test_top1": final.get("test_top1"),
            "test_top1_compensated": final.get("test_top1_compensated"), "val_agreement": final.get("val_agreement"),
            "first_kdci_epoch": built[0] if built else None, "seconds": round(time.perf_counter() - t0, 1)}


def main(argv=None) -> int:
    args = parse_args(argv)
    out_dir = Path(tempfile.mkdtemp(prefix="coverage-"))
    jobs = []
    for method in args.methods.split(","):
        config = REPO / "configs" / f"{method}-digits-digits_cnn-digits_cnn_small.yaml"
        for seed in map(int, args.seeds.split(",")):
            for i, (variant, overrides) in enumerate(VARIANTS[method].items()):
                jobs.append({"method": method, "variant": variant, "seed": seed, "config": str(config), "overrides": [
                    f"teacher.weights={args.teacher_weights}", f"output.dir={out_dir}", "kdci.enabled=true", f"seed={seed}",
                    *overrides, *args.set, f"name={method}-v{i}-s{seed}"]})
    t0 = time.perf_counter()
    runs = []
    with ProcessPoolExecutor(args.workers) as pool:
        for i, run in enumerate(pool.map(run_one, jobs), 1):
            runs.append(run)
            print(f"[{i}/{len(jobs)} {time.perf_counter() - t0:.0f}s] {run['method']} / {run['variant']} / seed {run['seed']}: "
                  f"test {run['test_top1']:.2f}", file=sys.stderr)
    summary = []
    for method in args.methods.split(","):
        variants = list(VARIANTS[method])
        by = {(r["variant"], r["seed"]): r for r in runs if r["method"] == method}
        seeds = sorted({s for _, s in by})
        for variant in variants:
            top1 = [by[(variant, s)]["test_top1"] for s in seeds]
            mean, std = mean_std(top1)
            diff = paired_interval([by[(variant, s)]["test_top1"] - by[(variants[0], s)]["test_top1"] for s in seeds])
            summary.append({"method": method, "variant": variant, "test_top1_mean": mean, "test_top1_std": std,
                            "vs_first": diff, "val_agreement_mean": mean_std([by[(variant, s)]["val_agreement"] for s in seeds])[0]})
    print(f"{'method':9} {'variant':26} {'test top-1':>15} {'vs first [95 %]':>24} {'val agree':>9}")
    for r in summary:
        d = r["vs_first"]
        interval = "-" if d["low"] is None else f"{d['mean']:+.2f} [{d['low']:+.2f}, {d['high']:+.2f}]"
        print(f"{r['method']:9} {r['variant']:26} {r['test_top1_mean']:8.2f} ± {r['test_top1_std'] or 0:4.2f} {interval:>24} "
              f"{r['val_agreement_mean']:9.2f}")
    write_result({"benchmark": "KDCI dictionary coverage (digits): when the first dictionary is built / MosaicKD rebuilds",
                  "command": command_line("dictionary_coverage.py", argv), "device": device_name(), "summary": summary, "runs": runs,
                  "seconds": round(time.perf_counter() - t0, 1)}, args.out, "dictionary_coverage", "dictionary_coverage-digits-cpu")
    return 0


if __name__ == "__main__":
    sys.exit(main())
