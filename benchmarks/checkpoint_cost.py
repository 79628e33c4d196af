"""What writing checkpoints costs a run at the default `checkpoint_every` ("auto"): the committed Fast
CIFAR-10 config (resnet34 -> resnet18) with its steps shrunk to fit a CPU, a short run, the share of the
training time spent writing.

    python benchmarks/checkpoint_cost.py                        # 12 epochs on this machine's device
    python benchmarks/checkpoint_cost.py --set optim.epochs=4   # any config override

Prints one JSON line; writes it to --out (default: $OUT/checkpoint_cost.json, else
benchmarks/results/checkpoint_cost-<cpu|gpu>.json).
"""

from __future__ import annotations

import faiss  # noqa: F401  (before torch)

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from _report import command_line, device_name, write_result  # noqa: E402
from kdci_ray.config import DistillConfig, load_config  # noqa: E402
from kdci_ray.engine.distill import distill_from_config  # noqa: E402

SHRUNK = ["data.limit=512", "optim.epochs=12", "optim.batch_size=32", "synthesis.batch_size=32", "synthesis.g_steps=2",
          "synthesis.kd_steps_per_call=4", "synthesis.calls_per_epoch=2", "synthesis.warmup_calls=1", "eval_every=1000", "kdci.n=16"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(REPO / "configs" / "fast-cifar10-resnet34-resnet18.yaml"))
    p.add_argument("--teacher-weights", default=str(REPO.parent / "shared" / "teachers" / "cifar10_resnet34.safetensors"))
    p.add_argument("--data-root", default=str(REPO.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"))
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="more overrides (after the shrunk steps)")
    p.add_argument("--out")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="checkpoint-cost-") as work:
        cfg = load_config(args.config, DistillConfig, [
            f"teacher.weights={args.teacher_weights}", f"data.root={args.data_root}", f"output.dir={work}", "name=checkpoint-cost",
            *SHRUNK, *args.set,
        ])
        run = distill_from_config(cfg)
        size = (Path(work) / cfg.name / "checkpoint.pt").stat().st_size
    policy = run.checkpoints
    training = policy.training_seconds
    result = {
        "device": device_name(), "torch": torch.__version__, "command": command_line("checkpoint_cost.py", argv),
        "checkpoint_every": cfg.checkpoint_every, "epochs": len(run.history), "writes": policy.writes,
        "write_seconds": round(policy.write_seconds, 3), "training_seconds": round(training, 2),
        "write_share": round(policy.write_seconds / training, 4), "checkpoint_mb": round(size / 2**20, 1),
    }
    write_result(result, args.out, "checkpoint_cost", f"checkpoint_cost-{'gpu' if torch.cuda.is_available() else 'cpu'}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
