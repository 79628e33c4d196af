"""Kernel launches, counted on the CPU: a KD step and a synthesis inner step are bound by how many kernels
they launch (and the Python between them), not by the chip. The proxy here is the number of eager non-view
aten ops one step dispatches (forward, backward and optimizer), and the graph breaks dynamo finds in it.

    python benchmarks/launches.py                      # resnet34 -> resnet18, batch 8, the CIFAR-10 configs
    python benchmarks/launches.py --methods deepinv    # one method's inner step only

Prints one JSON line {"kd_step_ops": {kdci_off, kdci_on}, "inner_step_ops": {method: ops},
"graph_breaks": {kd_step, method...}, ...}; writes it to --out (default: $OUT/launches.json, else
benchmarks/results/launches-cpu.json). Inner-step ops are the difference of two synthesis calls of 4 and
2 inner steps, divided by 2 (what a call does once, e.g. adding its images to the pool, cancels out).
"""

from __future__ import annotations

import faiss  # noqa: F401  (before torch)

import argparse
import os
import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from _report import command_line, write_result  # noqa: E402
from kdci_ray.config import DistillConfig, load_config  # noqa: E402

METHODS = ("deepinv", "cmi", "fast", "dafl", "mosaickd")


class OpCounter(TorchDispatchMode):
    """Counts the aten ops dispatched while active, views (free: no kernel) left out."""

    def __init__(self):
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view:
            self.ops += 1
        return func(*args, **(kwargs or {}))


def config(method: str, batch: int, *extra: str) -> DistillConfig:
    overrides = [f"synthesis.batch_size={batch}", "device=cpu", *extra]
    if method == "mosaickd":  # its out-of-domain pool: any image dataset serves for counting ops
        overrides += ["synthesis.wild.dataset=digits", "synthesis.wild.root=null"]
    return load_config(REPO / "configs" / f"{method}-cifar10-resnet34-resnet18.yaml", DistillConfig, overrides)


def models(cfg: DistillConfig, runtime):
    """The config's teacher and student, randomly initialised (op counts do not depend on the weights)."""
    from kdci_ray.data import Normalize, dataset_info
    from kdci_ray.models import create_model

    info = dataset_info(cfg.data.dataset)
    torch.manual_seed(0)
    teacher = runtime.prepare(create_model(cfg.teacher.arch, num_classes=info.num_classes, in_channels=info.channels)).eval()
    student = runtime.prepare(create_model(cfg.student.arch, num_classes=info.num_classes, in_channels=info.channels))
    return teacher, student, Normalize(list(info.mean), list(info.std)).to(runtime.device), info


def kd_step_counts(batch: int, kdci: bool) -> tuple[int, int]:
    """(eager ops, graph breaks) of one KD step as the loop runs it (bf16 autocast)."""
    from kdci_ray.data import draw_crop_flip
    from kdci_ray.engine.step import KDStep, kd_step
    from kdci_ray.engine.runtime import resolve_runtime
    from kdci_ray.engine.teacher import make_optimizer
    from kdci_ray.kdci import CausalIntervention, Distiller
    from kdci_ray.losses import KLDivergenceKD

    cfg = config("fast", batch)
    runtime = resolve_runtime("cpu", "bf16", "off")
    teacher, student, normalize, info = models(cfg, runtime)
    intervention = None
    if kdci:
        k = cfg.kdci
        intervention = CausalIntervention(info.num_classes, k.hidden, k.attention, k.alpha, k.uniform_attention, k.use_prior,
                                          k.random_prototypes, seed=0)
        intervention.set_dictionary(torch.randn(k.n, info.num_classes), torch.full((k.n,), 1.0 / k.n))
    distiller = Distiller(student, teacher, KLDivergenceKD(cfg.kd.temperature), intervention).train()
    optimizer = make_optimizer(distiller, cfg.optim, runtime.device)
    pixels = (torch.rand(batch, info.channels, info.image_size, info.image_size) * 255).to(torch.uint8)
    x = normalize(pixels)
    kd_step(distiller, optimizer, x, runtime)  # first step: optimizer state created
    with OpCounter() as counter:
        kd_step(distiller, optimizer, x, runtime)
    # Graph breaks of the step as `compile: on` runs it: the whole step (crop/flip to the update) in one graph.
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: 1.0)
    step = KDStep(distiller, distiller, optimizer, scheduler, normalize, runtime, num_classes=info.num_classes, total_steps=10,
                  padding=cfg.augment.crop_padding, hflip=cfg.augment.hflip, compiled=True)
    step.start_epoch()
    explained = torch._dynamo.explain(step._step)(pixels, *draw_crop_flip(batch, cfg.augment.crop_padding, cfg.augment.hflip, None, "cpu"))
    torch._dynamo.reset()
    return counter.ops, explained.graph_break_count


def inner_step_counts(method: str, batch: int) -> tuple[int, int]:
    """(eager ops per inner step, graph breaks of a one-step synthesis call) of `method`."""
    from kdci_ray.engine.runtime import resolve_runtime
    from kdci_ray.synthesis import create_synthesizer

    counts = {}
    for steps in (2, 4):
        cfg = config(method, batch, f"synthesis.g_steps={steps}")
        runtime = resolve_runtime("cpu", "fp32", "off")
        teacher, student, normalize, info = models(cfg, runtime)
        synth = create_synthesizer(cfg.synthesis, (info.channels, info.image_size, info.image_size), info.num_classes, seed=0)
        synth.bind(teacher=teacher, student=student, normalize=normalize, runtime=runtime, epochs=1)
        synth.step()  # the first call sets things up
        with OpCounter() as counter:
            synth.step()
        counts[steps] = counter.ops
    cfg = config(method, batch, "synthesis.g_steps=2")
    synth = create_synthesizer(cfg.synthesis, (info.channels, info.image_size, info.image_size), info.num_classes, seed=0)
    if hasattr(synth, "inner_step"):
        # The inner step as `compile: on` runs it: fullgraph (dynamo raises on a break), traced without
        # inductor's code generation (graph breaks do not depend on the backend).
        synth.bind(teacher=teacher, student=student, normalize=normalize, runtime=runtime, epochs=1, compiled=True)
        synth.compile_backend = "eager"
        synth.step()
        breaks = 0
    else:  # a method still on its eager loop: the breaks of a whole call
        synth.bind(teacher=teacher, student=student, normalize=normalize, runtime=runtime, epochs=1)
        synth.step()
        breaks = torch._dynamo.explain(synth.step)().graph_break_count
    torch._dynamo.reset()
    return (counts[4] - counts[2]) // 2, breaks


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--out")
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    result = {"kd_step_ops": {}, "inner_step_ops": {}, "graph_breaks": {}, "batch": args.batch,
              "torch": torch.__version__, "command": command_line("launches.py", argv)}
    for label, kdci in (("kdci_off", False), ("kdci_on", True)):
        ops, breaks = kd_step_counts(args.batch, kdci)
        result["kd_step_ops"][label] = ops
        result["graph_breaks"]["kd_step" if not kdci else "kd_step_kdci"] = breaks
    result["kdci_overhead_ops"] = round(result["kd_step_ops"]["kdci_on"] / result["kd_step_ops"]["kdci_off"] - 1, 4)
    for method in [m for m in args.methods.split(",") if m]:
        if method not in METHODS:
            p.error(f"--methods: no such method {method!r}; choose from {', '.join(METHODS)}")
        ops, breaks = inner_step_counts(method, args.batch)
        result["inner_step_ops"][method] = ops
        result["graph_breaks"][method] = breaks
    write_result(result, args.out, "launches", "launches-cpu")
    print(json_line(result))
    return 0


def json_line(result: dict) -> str:
    import json

    return json.dumps(result)


if __name__ == "__main__":
    sys.exit(main())
