"""Issue 16's GPU check in one run: KD step times (eager / compiled / CUDA-graph replayed), one synthesis call
of each method, peak memory, and the whole-run times they project for the committed CIFAR-10 configs next to
the public code's figures (../shared/KDCI.md's performance bar).

    python benchmarks/gpu_speed.py --teachers ../shared/teachers      # one H100/H200: <= 8 minutes
    python benchmarks/gpu_speed.py --toy --teachers none              # CPU smoke test (random weights, tiny sizes)

KD step: resnet34 -> resnet18 and wrn40_2 -> wrn16_1 at batch 256 (32 px, bf16 autocast, channels-last),
KDCI off and on (N = 32, additive attention), the loop's own `KDStep` on a uint8 device batch: crop/flip,
normalisation, both forwards, loss, backward, SGD update. "compiled" is torch.compile(fullgraph) in inductor's
default mode, "graph" the same graph replayed as a CUDA graph (mode reduce-overhead, what `compile: on` runs on
CUDA). Each time is the median of `--repeats` means over `--steps` steps after warm-up (compilation excluded,
its seconds reported apart). Synthesis: one call of each method's committed resnet34 config after a short
warm-up call, eager; DeepInv's 2k-iteration figure is its committed 1k call timed and doubled, CMI-500 is its
per-step time times 500. A part that fails is reported as its error and the rest still runs; a part that would
overrun `--budget` seconds is skipped and said so. Prints a table last; writes JSON to --out (default:
$OUT/gpu_speed.json, else benchmarks/results/gpu_speed-<device>.json).
"""

from __future__ import annotations

import faiss  # noqa: F401  (faiss before torch: their OpenMP runtimes otherwise clash)

import argparse
import statistics
import time
import traceback
from pathlib import Path

import torch

from _report import command_line, device_name, write_result
from kdci_ray.config import DistillConfig, load_config
from kdci_ray.data import Normalize, dataset_info
from kdci_ray.engine.runtime import resolve_runtime
from kdci_ray.engine.step import KDStep, kd_teacher
from kdci_ray.engine.teacher import lr_lambda, make_optimizer
from kdci_ray.kdci import CausalIntervention, Distiller
from kdci_ray.losses import KLDivergenceKD
from kdci_ray.models import create_model, load_classifier

REPO = Path(__file__).resolve().parents[1]
PAIRS = {"resnet34-resnet18": ("resnet34", "resnet18", "cifar10_resnet34"), "wrn40_2-wrn16_1": ("wrn40_2", "wrn16_1", "cifar10_wrn40_2")}
METHODS = ("deepinv", "cmi", "fast", "dafl", "mosaickd")
# The public code's figures (../shared/KDCI.md): KD step ms, whole runs in minutes.
PUBLIC = {"kd_step_ms": 34.5, "fast_kdci_min": 72, "cmi500_min": 10.4 * 60, "deepinv2k_min": 9.4 * 60}
TARGETS = {"kd_step_ms": 5.0, "fast_kdci_min": 10, "cmi500_min": 60, "deepinv2k_min": 60}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teachers", default=str(REPO.parent / "shared" / "teachers"), help="folder of cifar10_<arch>.safetensors, or none")
    p.add_argument("--pairs", default=",".join(PAIRS), help="teacher-student pairs (teacher-student, comma separated)")
    p.add_argument("--modes", default="eager,compiled,graph")
    p.add_argument("--kdci", default="off,on")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--budget", type=float, default=450, help="seconds: parts that would start after this are skipped")
    p.add_argument("--toy", action="store_true", help="CPU smoke test: tiny batch, steps and synthesis calls")
    p.add_argument("--out")
    args = p.parse_args(argv)
    if args.toy:
        args.batch, args.steps, args.warmup, args.repeats = 4, 2, 1, 1
    return args


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_mb(device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def teacher_for(args, arch, stem, runtime):
    path = Path(args.teachers) / f"{stem}.safetensors"
    if args.teachers != "none" and path.is_file():
        teacher, _ = load_classifier(path, arch, 10)
    else:
        torch.manual_seed(0)
        teacher = create_model(arch, num_classes=10)
    return runtime.prepare(teacher.eval())


def time_kd_step(args, pair: str, kdci: bool, mode: str, runtime) -> dict:
    """One KD configuration: build, warm up (compiling), then time; returns ms per step and compile seconds."""
    teacher_arch, student_arch, stem = PAIRS[pair]
    device = runtime.device
    teacher = teacher_for(args, teacher_arch, stem, runtime)
    torch.manual_seed(1)
    student = runtime.prepare(create_model(student_arch, num_classes=10))
    intervention = None
    if kdci:
        intervention = CausalIntervention(10, hidden=256).to(device)
        gen = torch.Generator().manual_seed(0)
        intervention.set_dictionary(torch.randn(32, 10, generator=gen) * 3, torch.full((32,), 1 / 32))
    distiller = Distiller(student, kd_teacher(teacher, runtime), KLDivergenceKD(4.0), intervention).train()
    cfg = load_config(REPO / "configs" / f"fast-cifar10-{pair}.yaml", DistillConfig)
    optimizer = make_optimizer(distiller, cfg.optim, device)
    total = (args.warmup + args.steps) * args.repeats + args.warmup + 10
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(total, 0, "cosine"))
    info = dataset_info("cifar10")
    normalize = Normalize(list(info.mean), list(info.std)).to(device)
    step = KDStep(distiller, distiller, optimizer, scheduler, normalize, runtime, num_classes=10, total_steps=total,
                  padding=4, hflip=True, compiled=mode != "eager", mode={"compiled": None, "graph": "reduce-overhead"}.get(mode))
    gen = torch.Generator(device=device).manual_seed(0)
    pixels = torch.randint(0, 256, (args.batch, 3, 32, 32), dtype=torch.uint8, device=device, generator=gen)
    step.start_epoch()
    reset_peak(device)
    t0 = time.perf_counter()
    step.step(pixels, gen)  # the first call compiles
    sync(device)
    first = time.perf_counter() - t0
    for _ in range(args.warmup):
        step.step(pixels, gen)
    sync(device)
    means = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step.step(pixels, gen)
        sync(device)
        means.append((time.perf_counter() - t0) / args.steps * 1000)
    loss = float(step.totals()[0]) / max(1, step.images // args.batch)
    return {"ms": round(statistics.median(means), 3), "first_call_s": round(first, 1), "peak_mb": peak_memory_mb(device),
            "mean_loss": round(loss, 4)}


def time_synthesis(args, method: str, runtime) -> dict:
    """One call of `method`'s committed resnet34 -> resnet18 config (eager), after a 2-step warm-up call."""
    from kdci_ray.synthesis import create_synthesizer

    device = runtime.device
    overrides = ["synthesis.warmup_calls=0"]
    if args.toy:
        overrides += ["synthesis.batch_size=4", "synthesis.g_steps=2", "synthesis.pool_size=64"]
    path = REPO / "configs" / f"{method}-cifar10-resnet34-resnet18.yaml"
    warmup_calls = load_config(path, DistillConfig).synthesis.warmup_calls  # the committed run's, for the projection
    cfg = load_config(path, DistillConfig, overrides)
    teacher = teacher_for(args, "resnet34", "cifar10_resnet34", runtime)
    torch.manual_seed(1)
    student = runtime.prepare(create_model("resnet18", num_classes=10))
    info = dataset_info("cifar10")
    normalize = Normalize(list(info.mean), list(info.std)).to(device)
    g_steps = getattr(cfg.synthesis, "g_steps", 1)

    def make(steps):
        synth_cfg = cfg.synthesis.model_copy(update={"g_steps": steps}) if hasattr(cfg.synthesis, "g_steps") else cfg.synthesis
        synth = create_synthesizer(synth_cfg, (3, 32, 32), 10, seed=0)
        synth.bind(teacher=teacher, student=student, normalize=normalize, runtime=runtime, epochs=cfg.optim.epochs)
        return synth

    make(min(2, g_steps)).step()  # cuDNN's algorithm search and allocations, not timed
    synth = make(g_steps)
    reset_peak(device)
    sync(device)
    t0 = time.perf_counter()
    synth.step()
    sync(device)
    seconds = time.perf_counter() - t0
    s = cfg.synthesis
    return {"call_s": round(seconds, 3), "g_steps": g_steps, "ms_per_inner_step": round(seconds / g_steps * 1000, 3),
            "batch": s.batch_size, "peak_mb": peak_memory_mb(device),
            "config": {"epochs": cfg.optim.epochs, "calls_per_epoch": s.calls_per_epoch, "kd_steps_per_call": s.kd_steps_per_call,
                       "warmup_calls": warmup_calls}}


def projections(kd: dict, synthesis: dict) -> dict:
    """Whole-run minutes of the committed resnet34 -> resnet18 CIFAR-10 configs: every synthesis call (warm-up
    included) plus every KD step at the fastest measured KDCI-on step time; evaluation left out."""
    steps = [v["ms"] for k, v in kd.items() if k.startswith("resnet34-resnet18/kdci_on/")]
    steps = steps or [v["ms"] for k, v in kd.items() if "/kdci_on/" in k]  # a smoke test's other pair
    if not steps:
        return {}
    kd_ms = min(steps)
    out = {"kd_step_ms_used": kd_ms}
    for method, r in synthesis.items():
        if "call_s" not in r:
            continue
        c = r["config"]
        calls = c["warmup_calls"] + c["epochs"] * c["calls_per_epoch"]
        kd_minutes = c["epochs"] * c["calls_per_epoch"] * c["kd_steps_per_call"] * kd_ms / 60000
        out[method] = round((calls * r["call_s"]) / 60 + kd_minutes, 1)
        if method == "deepinv":  # the public DeepInv-2k: 2000 iterations per call
            out["deepinv2k"] = round(calls * r["ms_per_inner_step"] * 2000 / 60000 + kd_minutes, 1)
        if method == "cmi":  # the public CMI-500: 500 iterations per call
            out["cmi500"] = round(calls * r["ms_per_inner_step"] * 500 / 60000 + kd_minutes, 1)
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    runtime = resolve_runtime("cpu" if args.toy else "auto", "bf16" if not args.toy else "fp32", "auto")
    started = time.perf_counter()
    result = {"device": device_name(), "torch": torch.__version__, "command": command_line("gpu_speed.py", argv), "batch": args.batch,
              "kd_step": {}, "synthesis": {}, "skipped": [], "errors": {}}

    def run(key, section, fn):
        if time.perf_counter() - started > args.budget:
            result["skipped"].append(key)
            print(f"{key}: skipped (past the {args.budget:.0f} s budget)", flush=True)
            return
        try:
            section[key] = fn()
            print(f"{key}: {section[key]}", flush=True)
        except Exception as exc:  # one failing part (e.g. a CUDA-graph capture) must not cost the rest
            result["errors"][key] = f"{type(exc).__name__}: {exc}"[:2000]
            traceback.print_exc()
            torch._dynamo.reset()

    for pair in args.pairs.split(","):
        for kdci in [part == "on" for part in args.kdci.split(",")]:
            for mode in args.modes.split(","):
                key = f"{pair}/kdci_{'on' if kdci else 'off'}/{mode}"
                run(key, result["kd_step"], lambda: time_kd_step(args, pair, kdci, mode, runtime))
    for method in args.methods.split(","):
        run(method, result["synthesis"], lambda: time_synthesis(args, method, runtime))
    result["projected_minutes"] = projections(result["kd_step"], result["synthesis"])
    result["public"], result["targets"] = PUBLIC, TARGETS
    result["seconds"] = round(time.perf_counter() - started, 1)
    write_result(result, args.out, "gpu_speed", f"gpu_speed-{'toy-cpu' if args.toy else 'gpu'}")

    print(f"\n{'KD step (batch %d)' % args.batch:<40} {'ms':>9} {'first call s':>13}   target {TARGETS['kd_step_ms']} ms, public {PUBLIC['kd_step_ms']} ms")
    for key, r in result["kd_step"].items():
        print(f"{key:<40} {r['ms']:>9.2f} {r['first_call_s']:>13.1f}")
    print(f"\n{'synthesis call':<16} {'s':>9} {'ms/step':>9} {'whole run, min':>15}")
    projected = result["projected_minutes"]
    for method, r in result["synthesis"].items():
        print(f"{method:<16} {r['call_s']:>9.2f} {r['ms_per_inner_step']:>9.2f} {projected.get(method, float('nan')):>15.1f}")
    for name, ours in (("fast", "fast_kdci_min"), ("cmi500", "cmi500_min"), ("deepinv2k", "deepinv2k_min")):
        if name in projected:
            print(f"projected {name:<10} {projected[name]:>8.1f} min   target {TARGETS[ours]} min, public {PUBLIC[ours]:.0f} min")
    for key, error in result["errors"].items():
        print(f"ERROR {key}: {error.splitlines()[0][:200]}")
    if result["skipped"]:
        print(f"skipped (budget): {', '.join(result['skipped'])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
