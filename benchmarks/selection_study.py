"""How well does the data-free metric pick? A digits grid of method x N x alpha (+ each method's KDCI-off run),
every run through `distill_from_config`, scored at every evaluation on the labelled test split and on held-out
substitution data (val_agreement: top-1 agreement with the teacher on images the run never trained on).

Reports, over the grid's trials (last epoch):
  - Spearman's rho between val_agreement and test_top1, per method and pooled;
  - the regret of selecting on val_agreement: the best trial's test_top1 (a selection that saw the labels)
    minus the test_top1 of the trial val_agreement picks, per method;
  - the same within runs: the epoch val_agreement picks vs the best test epoch (test_top1_val_selected vs _best).

    python benchmarks/selection_study.py --teacher-weights runs/teachers/digits_cnn.safetensors

Prints a short table; writes JSON to --out (default: benchmarks/results/selection_study-digits-<device>.json).
"""

from __future__ import annotations

import faiss  # noqa: F401  (faiss before torch)

import argparse
import itertools
import logging
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from _report import command_line, device_name, write_result
from kdci_ray.config import DistillConfig, load_config
from kdci_ray.distributed.tune import rank_correlation

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", default="dafl,deepinv,fast,cmi,mosaickd,dfnd")
    p.add_argument("--n", default="8,32", help="dictionary sizes")
    p.add_argument("--alpha", default="0.5,1.0", help="fusion weights")
    p.add_argument("--teacher-weights", default=str(REPO / "runs" / "teachers" / "digits_cnn.safetensors"))
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override every run, e.g. optim.epochs=10")
    p.add_argument("--workers", type=int, default=2, help="runs at once (processes)")
    p.add_argument("--out")
    return p.parse_args(argv)


def run_one(job: dict) -> dict:
    import torch

    from kdci_ray.engine.distill import distill_from_config

    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING)
    cfg = load_config(job["config"], DistillConfig, job["overrides"])
    t0 = time.perf_counter()
    final = distill_from_config(cfg).final
    keys = ("val_agreement", "val_kl", "test_top1", "test_top1_best", "test_top1_best_epoch", "test_top1_val_selected",
            "test_top1_val_selected_epoch", "test_top1_compensated")
    return {**{k: job[k] for k in ("method", "kdci", "n", "alpha")}, **{k: final.get(k) for k in keys},
            "seconds": round(time.perf_counter() - t0, 1)}


def main(argv=None) -> int:
    args = parse_args(argv)
    out_dir = Path(tempfile.mkdtemp(prefix="selection-study-"))
    jobs = []
    for method in args.methods.split(","):
        config = REPO / "configs" / f"{method}-digits-digits_cnn-digits_cnn_small.yaml"
        base = [f"teacher.weights={args.teacher_weights}", f"output.dir={out_dir}", *args.set]
        jobs.append({"method": method, "kdci": False, "n": None, "alpha": None, "config": str(config),
                     "overrides": [*base, "kdci.enabled=false", f"name={method}-off"]})
        for n, alpha in itertools.product(args.n.split(","), args.alpha.split(",")):
            jobs.append({"method": method, "kdci": True, "n": int(n), "alpha": float(alpha), "config": str(config),
                         "overrides": [*base, "kdci.enabled=true", f"kdci.n={n}", f"kdci.alpha={alpha}", f"name={method}-n{n}-a{alpha}"]})
    t0 = time.perf_counter()
    with ProcessPoolExecutor(args.workers) as pool:
        trials = []
        for i, trial in enumerate(pool.map(run_one, jobs), 1):
            trials.append(trial)
            print(f"[{i}/{len(jobs)} {time.perf_counter() - t0:.0f}s] {trial['method']} N={trial['n']} alpha={trial['alpha']}: "
                  f"val_agreement {trial['val_agreement']:.2f}, test_top1 {trial['test_top1']:.2f}", file=sys.stderr)
    per_method = {}
    for method in args.methods.split(","):
        rows = [t for t in trials if t["method"] == method]
        picked = max(rows, key=lambda t: t["val_agreement"])
        best = max(rows, key=lambda t: t["test_top1"])
        per_method[method] = {
            "spearman": (rank_correlation(rows, "val_agreement", "test_top1") or {}).get("spearman"),
            "picked": {k: picked[k] for k in ("kdci", "n", "alpha", "test_top1")},
            "best_by_test": {k: best[k] for k in ("kdci", "n", "alpha", "test_top1")},
            "regret": round(best["test_top1"] - picked["test_top1"], 2),
            "epoch_regret_mean": round(sum(t["test_top1_best"] - t["test_top1_val_selected"] for t in rows) / len(rows), 2),
        }
    result = {
        "benchmark": "selection study: val_agreement (held-out substitution data) vs test_top1, digits",
        "command": command_line("selection_study.py", argv), "device": device_name(),
        "pooled_spearman": rank_correlation(trials, "val_agreement", "test_top1"),
        "per_method": per_method, "trials": trials, "seconds": round(time.perf_counter() - t0, 1),
    }
    print(f"{'method':10} {'rho':>6} {'regret':>7} {'epoch regret':>13}  picked (N, alpha) -> test / best by test")
    for method, r in per_method.items():
        rho = "-" if r["spearman"] is None else f"{r['spearman']:+.2f}"
        print(f"{method:10} {rho:>6} {r['regret']:>7.2f} {r['epoch_regret_mean']:>13.2f}  ({r['picked']['n']}, {r['picked']['alpha']}) -> "
              f"{r['picked']['test_top1']:.2f} / {r['best_by_test']['test_top1']:.2f}")
    pooled = result["pooled_spearman"] or {}
    print(f"pooled Spearman over {pooled.get('trials')} trials: {pooled.get('spearman')}")
    write_result(result, args.out, "selection_study", "selection_study-digits-cpu")
    return 0


if __name__ == "__main__":
    sys.exit(main())
