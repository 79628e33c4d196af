"""The DFKD baselines (generation: DAFL, DeepInv, Fast, CMI; sampling on wild data: MosaicKD, DFND), each
with KDCI off and on, through `kdci-ray distill`'s own code path (`distill_from_config` on the committed
configs).

A short schedule (the same for both arms of a method; `SHORT` below, or --set for all runs) replaces
the public 200-epoch runs, which take hours each. Per run: final raw and compensated test top-1, wall
time, and the time inside the epochs' KD loops (KD steps plus the synthesis calls interleaved with them;
for DAFL that is nearly all its synthesis).

    # GPU (CIFAR-10, wrn40_2 -> wrn16_1, the shared teacher and data beside the repo):
    python benchmarks/dfkd_baselines.py
    python benchmarks/dfkd_baselines.py --methods dfnd,mosaickd   # the wild-data pair only
    # this CPU, toy size (what the tests run):
    python benchmarks/dfkd_baselines.py --dataset digits --pair digits_cnn-digits_cnn_small --no-short \
        --set optim.epochs=1 --teacher-weights runs/teachers/digits_cnn.safetensors

Prints a short table; writes JSON to --out (default: $OUT/dfkd_baselines.json, else
benchmarks/results/dfkd_baselines-<dataset>-<device>.json).
"""

from __future__ import annotations

import faiss  # noqa: F401  (faiss before torch: their OpenMP runtimes otherwise clash)

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch

from _report import command_line, device_name, results_path
from kdci_ray.config import DistillConfig, load_config
from kdci_ray.engine.distill import distill_from_config
from kdci_ray.synthesis import SYNTHESIZERS

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
# Short schedules, identical for KDCI off and on: ~1/10 of the public epochs, synthesis shortened where
# one call would otherwise dominate (DeepInv 1000 -> 200 steps, CMI 200 -> 50), KDCI rebuilt every 5 epochs.
SHORT = {
    "dafl": ["optim.epochs=20", "kdci.rebuild_every=5"],
    "deepinv": ["optim.epochs=20", "synthesis.g_steps=200", "kdci.rebuild_every=5"],
    "fast": ["optim.epochs=20", "synthesis.warmup_calls=5", "synthesis.adv_after_calls=5", "synthesis.reset_l0_at_call=null",
             "kdci.rebuild_every=5"],
    "cmi": ["optim.epochs=20", "synthesis.g_steps=50", "kdci.rebuild_every=5"],
    # Sampling methods: the dictionary is built once (their configs); shorter runs only.
    "dfnd": ["optim.epochs=100", "eval_every=20"],  # 5.8k of the public ~77k steps, same step schedule shape
    "mosaickd": ["optim.epochs=10", "eval_every=5"],  # 1,180 G/D steps x 5 KD steps (public: 200 epochs)
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", default=",".join(SYNTHESIZERS.names()), help="comma-separated registered methods")
    p.add_argument("--dataset", default="cifar10")
    p.add_argument("--pair", default="wrn40_2-wrn16_1", help="<teacher>-<student> of the committed configs")
    p.add_argument("--teacher-weights", help="default: the config's")
    p.add_argument("--data-root", help="default: the config's")
    p.add_argument("--wild-root", help="wild/OOD data root for dfnd and mosaickd (default: the config's)")
    p.add_argument("--no-short", action="store_true", help="do not apply the SHORT schedules (use --set instead)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every run")
    p.add_argument("--work-dir", help="run folders (default: a temporary folder)")
    p.add_argument("--out", help="JSON results path")
    return p.parse_args(argv)


def run_one(method: str, kdci: bool, args, work: Path) -> dict:
    config = REPO / "configs" / f"{method}-{args.dataset}-{args.pair}.yaml"
    schedule = ([] if args.no_short else list(SHORT.get(method, []))) + list(args.set)
    if args.teacher_weights:
        schedule.append(f"teacher.weights={args.teacher_weights}")
    if args.data_root:
        schedule.append(f"data.root={args.data_root}")
    if args.wild_root and method in ("dfnd", "mosaickd"):
        schedule.append(f"synthesis.wild.root={args.wild_root}")
    run = [f"kdci.enabled={str(kdci).lower()}", f"output.dir={work}", "output.overwrite=true", f"name={method}-{'kdci' if kdci else 'baseline'}"]
    cfg = load_config(config, DistillConfig, schedule + run)
    t0 = time.perf_counter()
    result = distill_from_config(cfg)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    final = result.final
    kd_seconds = sum(row["epoch_seconds"] for row in result.history)
    return {
        "method": method, "kdci": kdci, "epochs": cfg.optim.epochs, "n": cfg.kdci.n if kdci else None,
        "test_top1": round(final["test_top1"], 2),
        "test_top1_compensated": round(final["test_top1_compensated"], 2) if kdci else None,
        "wall_seconds": round(seconds, 2),
        # epoch_seconds covers the KD steps and the synthesis calls interleaved with them; the rest of the
        # wall time is each epoch's first synthesis call, dictionary builds, evaluation and checkpoints.
        "kd_and_interleaved_seconds": round(kd_seconds, 2),
        "kd_loop_images_per_s": round(sum(row["images_per_s"] for row in result.history) / len(result.history), 1),
        "overrides": schedule,
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods:
        SYNTHESIZERS.get(m)  # unknown names fail before any run
    device = device_name()
    command = command_line("dfkd_baselines.py", argv)
    tag = "gpu" if torch.cuda.is_available() else "cpu"
    out = results_path(args.out, "dfkd_baselines", f"dfkd_baselines-{args.dataset}-{tag}")
    header = f"{'method':8} {'KDCI':5} {'top-1':>7} {'comp.':>7} {'wall s':>8} {'KD img/s':>9}"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work_dir or tmp)
        for m in methods:
            for kdci in (False, True):
                rows.append(run_one(m, kdci, args, work))
                r = rows[-1]
                print(f"{r['method']:8} {'on' if r['kdci'] else 'off':5} {r['test_top1']:7.2f} "
                      f"{r['test_top1_compensated'] if r['kdci'] else '-':>7} {r['wall_seconds']:8.1f} {r['kd_loop_images_per_s']:9.0f}", flush=True)
                result = {  # rewritten after every run: a cut benchmark keeps what finished
                    "benchmark": "dfkd_baselines", "dataset": args.dataset, "pair": args.pair, "device": device,
                    "torch": torch.__version__, "command": command,
                    "short_schedules": None if args.no_short else {m: SHORT.get(m, []) for m in methods}, "runs": rows,
                }
                out.write_text(json.dumps(result, indent=1))
    print(header)
    for r in rows:
        comp = f"{r['test_top1_compensated']:7.2f}" if r["kdci"] else "      -"
        print(f"{r['method']:8} {'on' if r['kdci'] else 'off':5} {r['test_top1']:7.2f} {comp} {r['wall_seconds']:8.1f} {r['kd_loop_images_per_s']:9.0f}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
