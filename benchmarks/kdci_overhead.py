"""KDCI's step-time and peak-memory overhead over the plain KD step (the paper claims < 3.3 %).

Both arms run the loop's own `kd_step` (teacher forward, student forward + backward, optimizer step) on
the same random uint8 batch; the KDCI arm adds the intervention (additive attention over an N-prototype
dictionary built with the real builder from the teacher's logits). Arms alternate in ABBA order so
warm-up and drift hit both; the reported time is the median over repeats of the mean step time.

Memory: on CUDA, peak `max_memory_allocated` during the arm's steps; on the CPU, the peak RSS of a
separate process per arm (PyTorch's CPU allocator has no peak counter).

    python benchmarks/kdci_overhead.py                                  # GPU: R34 -> R18 at batch 256
    python benchmarks/kdci_overhead.py --batch 32 --steps 5 --repeats 3 # this 2-core CPU

Prints a short table; writes JSON to --out (default: $OUT/kdci_overhead.json, else
benchmarks/results/kdci_overhead-<device>.json).
"""

from __future__ import annotations

import faiss  # noqa: F401  (faiss before torch: their OpenMP runtimes otherwise clash)

import argparse
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from _report import results_path
from kdci_ray.engine.step import kd_step
from kdci_ray.engine.runtime import resolve_runtime
from kdci_ray.kdci import CausalIntervention, Distiller, build_dictionary_from_arrays
from kdci_ray.losses import KLDivergenceKD
from kdci_ray.models import create_model, load_classifier

REPO = Path(__file__).resolve().parents[1]
DEFAULT_TEACHER = REPO.parent / "shared" / "teachers" / "cifar10_resnet34.safetensors"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", default="resnet34")
    p.add_argument("--teacher-weights", default=str(DEFAULT_TEACHER), help="used when it exists (timing does not depend on weights)")
    p.add_argument("--student", default="resnet18")
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--n", type=int, default=32, help="dictionary size N")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--steps", type=int, default=20, help="timed steps per repeat")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto")
    p.add_argument("--channels-last", default="auto")
    p.add_argument("--out", default=None)
    p.add_argument("--memory-arm", choices=["baseline", "kdci"], help=argparse.SUPPRESS)  # child-process mode
    return p.parse_args(argv)


def build(args, runtime):
    torch.manual_seed(0)
    weights = Path(args.teacher_weights)
    if weights.is_file():
        teacher, _ = load_classifier(weights, args.teacher, args.num_classes)
    else:
        teacher = create_model(args.teacher, num_classes=args.num_classes)
    teacher = runtime.prepare(teacher.eval())
    gen = torch.Generator(device="cpu").manual_seed(0)

    def random_batch():
        images = torch.randint(0, 256, (args.batch, 3, args.image_size, args.image_size), dtype=torch.uint8, generator=gen)
        x = (images.to(runtime.device).float() / 255 - 0.5) / 0.25
        return x.contiguous(memory_format=torch.channels_last) if runtime.channels_last else x

    # The dictionary comes from the real builder over the teacher's logits (>= 4 rows per prototype).
    with torch.no_grad(), runtime.autocast():
        logits = torch.cat([teacher(random_batch()) for _ in range(max(1, -(-args.n * 4 // args.batch)))])
    dictionary = build_dictionary_from_arrays(logits.float(), args.n, seed=0)
    return teacher, random_batch(), dictionary


def make_arm(kind, args, runtime, teacher, dictionary):
    torch.manual_seed(1)
    student = runtime.prepare(create_model(args.student, num_classes=args.num_classes))
    intervention = None
    if kind == "kdci":
        intervention = CausalIntervention(args.num_classes, hidden=args.hidden).to(runtime.device)
        intervention.set_dictionary(dictionary.prototypes, dictionary.priors)
    distiller = Distiller(student, teacher, KLDivergenceKD(4.0), intervention).train()
    fused = runtime.device.type == "cuda"
    optimizer = torch.optim.SGD(distiller.trainable_parameters(), lr=0.01, momentum=0.9, fused=fused)
    return distiller, optimizer


def shown_path(path: str) -> str:
    """Paths relative to the repository's parent (where ../shared lives), so results read the same anywhere."""
    try:
        return os.path.relpath(Path(path).resolve(), REPO)
    except ValueError:
        return path


def sync(runtime):
    if runtime.device.type == "cuda":
        torch.cuda.synchronize(runtime.device)


def run_steps(arm, x, runtime, steps):
    distiller, optimizer = arm
    for _ in range(steps):
        kd_step(distiller, optimizer, x, runtime)


def child_memory(args) -> None:
    runtime = resolve_runtime(args.device, args.precision, args.channels_last)
    teacher, x, dictionary = build(args, runtime)
    arm = make_arm(args.memory_arm, args, runtime, teacher, dictionary)
    before = current_rss_mb()
    run_steps(arm, x, runtime, 3)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"peak_rss_mb": peak, "step_rss_mb": peak - before}))


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def cpu_peak_rss(argv: list[str], arm: str) -> dict:
    cmd = [sys.executable, __file__, *argv, "--memory-arm", arm]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.memory_arm:
        child_memory(args)
        return {}
    runtime = resolve_runtime(args.device, args.precision, args.channels_last)
    teacher, x, dictionary = build(args, runtime)
    arms = {kind: make_arm(kind, args, runtime, teacher, dictionary) for kind in ("baseline", "kdci")}
    for arm in arms.values():
        run_steps(arm, x, runtime, args.warmup)
    sync(runtime)

    # FLOPs of one step (matmuls and convolutions, forward + backward): hardware-independent, and it
    # tells timing noise apart from real cost on a busy CPU.
    flops = {}
    for kind, arm in arms.items():
        with FlopCounterMode(display=False) as counter:
            run_steps(arm, x, runtime, 1)
        flops[kind] = counter.get_total_flops()

    times = {kind: [] for kind in arms}
    for repeat in range(args.repeats):
        # ABBA order: whichever arm runs first in a repeat pays for caches and clocks settling.
        order = list(arms.items()) if repeat % 2 == 0 else list(arms.items())[::-1]
        for kind, arm in order:
            sync(runtime)
            t0 = time.perf_counter()
            run_steps(arm, x, runtime, args.steps)
            sync(runtime)
            times[kind].append((time.perf_counter() - t0) / args.steps * 1000)

    memory, step_memory = {}, {}
    if runtime.device.type == "cuda":
        memory_kind = "cuda max_memory_allocated during 3 steps"
        for kind, arm in arms.items():
            torch.cuda.reset_peak_memory_stats(runtime.device)
            run_steps(arm, x, runtime, 3)
            sync(runtime)
            memory[kind] = torch.cuda.max_memory_allocated(runtime.device) / 2**20
    else:
        memory_kind = "peak RSS of a separate process per arm (3 steps); step_mb: peak minus RSS before the first step"
        for kind in arms:
            child = cpu_peak_rss(argv, kind)
            memory[kind], step_memory[kind] = child["peak_rss_mb"], child["step_rss_mb"]

    base_ms, kdci_ms = statistics.median(times["baseline"]), statistics.median(times["kdci"])
    result = {
        "benchmark": "kdci_overhead",
        "device": torch.cuda.get_device_name(runtime.device) if runtime.device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads)",
        "runtime": runtime.describe(),
        "torch": torch.__version__,
        "teacher": args.teacher,
        "teacher_weights": shown_path(args.teacher_weights) if Path(args.teacher_weights).is_file() else None,
        "student": args.student,
        "batch": args.batch,
        "image_size": args.image_size,
        "n": dictionary.n,
        "hidden": args.hidden,
        "steps": args.steps,
        "repeats": args.repeats,
        "baseline_step_ms": round(base_ms, 3),
        "kdci_step_ms": round(kdci_ms, 3),
        "time_overhead_pct": round(100 * (kdci_ms - base_ms) / base_ms, 2),
        "baseline_gflop_per_step": round(flops["baseline"] / 1e9, 3),
        "kdci_gflop_per_step": round(flops["kdci"] / 1e9, 3),
        "flop_overhead_pct": round(100 * (flops["kdci"] - flops["baseline"]) / flops["baseline"], 4),
        "baseline_step_ms_all": [round(t, 3) for t in times["baseline"]],
        "kdci_step_ms_all": [round(t, 3) for t in times["kdci"]],
        "memory_kind": memory_kind,
        "baseline_peak_mb": round(memory["baseline"], 1),
        "kdci_peak_mb": round(memory["kdci"], 1),
        "memory_overhead_pct": round(100 * (memory["kdci"] - memory["baseline"]) / memory["baseline"], 2),
        "baseline_step_mb": round(step_memory["baseline"], 1) if step_memory else None,
        "kdci_step_mb": round(step_memory["kdci"], 1) if step_memory else None,
        "paper_claim_pct": 3.3,
        "command": "python benchmarks/kdci_overhead.py " + shlex.join(argv),
    }
    print(f"{'arm':<10}{'step ms':>10}{'peak MB':>10}")
    print(f"{'baseline':<10}{base_ms:>10.2f}{memory['baseline']:>10.1f}")
    print(f"{'kdci':<10}{kdci_ms:>10.2f}{memory['kdci']:>10.1f}")
    print(f"{'flops':<10}{flops['baseline'] / 1e9:>10.2f}{flops['kdci'] / 1e9:>10.2f}  GFLOP/step (baseline, kdci)")
    print(f"overhead: time {result['time_overhead_pct']:+.2f} %, memory {result['memory_overhead_pct']:+.2f} %, "
          f"FLOPs {result['flop_overhead_pct']:+.4f} % "
          f"({result['runtime']}, batch {args.batch}, N {dictionary.n}; paper: < 3.3 %)")
    out = results_path(args.out, "kdci_overhead", f"kdci_overhead-{runtime.device.type}")
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
