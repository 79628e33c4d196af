"""GPU decisions of the Ray layer on a CPU box: a local Ray with one logical GPU (`gpu_ray`) stands in for a
1-GPU machine. Worker counts it cannot place, GPU fractions shared by DDP ranks, and GPU workers whose torch
sees no CUDA are refused before any worker starts, in seconds, with one line naming the fix."""

import faiss  # noqa: F401  (before torch)
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kdci_ray.config import DistillConfig, TableConfig, load_config

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "fast-digits-digits_cnn-digits_cnn_small.yaml"


def fast_config(teacher, name="gpu"):
    return load_config(CONFIG, DistillConfig, [f"name={name}", f"teacher.weights={teacher}", "optim.epochs=1"])


def refusal(call, *args, seconds=30, **kwargs) -> Exception:
    """What `call` raises, within `seconds`: a refusal that regressed into a wait (Ray pending on resources
    for ever) fails the test instead of hanging the suite."""
    import threading

    outcome = {}

    def run():
        try:
            call(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 (the test looks at it)
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"{call.__name__} still running after {seconds} s: it waits instead of refusing"
    assert "error" in outcome, f"{call.__name__} was not refused"
    return outcome["error"]


def run_job(script, *args, env, timeout=60):
    """A job script as a subprocess; returns (exit code, last stderr line, whole stderr, seconds)."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, script, *map(str, args)], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    lines = proc.stderr.strip().splitlines()
    return proc.returncode, lines[-1] if lines else "", proc.stderr, time.perf_counter() - t0


def test_gpu_workers_the_cluster_cannot_place_are_refused(gpu_ray, digits_teacher, tmp_path, monkeypatch):
    from kdci_ray.distributed import distill_on_ray, generate
    from kdci_ray.distributed.session import train_worker_resources

    cfg = fast_config(digits_teacher)
    # The default 2 workers on a 1-GPU machine would wait for a second GPU for ever.
    error = refusal(distill_on_ray, cfg, num_workers=2, storage_path=tmp_path)
    assert isinstance(error, ValueError) and "--workers = 2 GPU workers x 1 GPU need 2 GPUs but the cluster has 1: use --workers 1" in str(error)
    error = refusal(distill_on_ray, cfg, num_workers=1, gpus_per_worker=2, storage_path=tmp_path)
    assert isinstance(error, ValueError) and "largest node has 1 GPU" in str(error)
    error = refusal(generate, cfg, tmp_path / "pool", shards=1, calls_per_shard=1, gpus_per_actor=2)
    assert isinstance(error, ValueError) and "gpus per actor = 2 but the cluster's largest node has 1 GPU" in str(error)
    assert not (tmp_path / "gpu").exists() and not (tmp_path / "pool").exists()  # refused before anything was written
    # CPU workers stay possible on the GPU machine; an autoscaling cluster gets its GPU request as asked.
    assert train_worker_resources(gpu_ray, 2, False, None, None) == (False, {"CPU": 0.5})
    monkeypatch.setenv("KDCI_EXPECT_AUTOSCALED_GPUS", "1")
    assert train_worker_resources(gpu_ray, 4, None, None, None) == (True, {"CPU": 1.0, "GPU": 1.0})


def test_gpu_fractions_shared_by_ddp_ranks_are_refused_before_ray_starts(digits_teacher, tmp_path):
    """NCCL refuses two ranks of one run on one GPU: every entry point says so before Ray starts (this test
    is not a Ray test: the suite's guard fails it if anything here starts Ray)."""
    from kdci_ray.config import ConfigError
    from kdci_ray.distributed import distill_on_ray
    from kdci_ray.distributed.tune import concurrent_trials, sweep

    cfg = fast_config(digits_teacher)
    with pytest.raises(ValueError, match=r"gpus per worker = 0.5 with --workers = 2 .*NCCL"):
        distill_on_ray(cfg, num_workers=2, gpus_per_worker=0.5, storage_path=tmp_path)
    with pytest.raises(ValueError, match=r"gpus per worker = 0.25 with --workers-per-trial = 2 .*NCCL"):
        sweep(cfg, {"kdci.n": [4, 8]}, gpus_per_worker=0.25, workers_per_trial=2, storage_path=tmp_path)
    with pytest.raises(ConfigError, match=r"gpus_per_trial = 0.25 with workers_per_trial = 2 .*NCCL"):
        load_config(REPO / "configs" / "table-cifar10.yaml", TableConfig, ["workers_per_trial=2"])
    with pytest.raises(ValueError, match="a fraction below 1 or a whole number"):
        distill_on_ray(cfg, num_workers=1, gpus_per_worker=1.5, storage_path=tmp_path)
    assert not (tmp_path / "gpu").exists()
    # Tune runs as many trials as the GPUs hold unless capped: 0.25 -> 4 per GPU.
    assert [concurrent_trials(None, 1, 0.25, 1), concurrent_trials(None, 2, 0.25, 1), concurrent_trials(None, 2, 1.0, 2)] == [4, 8, 1]
    assert concurrent_trials(3, 1, 0.25, 1) == 3 and concurrent_trials(None, 0, None, 1) == 2
    assert load_config(REPO / "configs" / "table-cifar10.yaml", TableConfig).max_concurrent is None  # the committed table: 4 per GPU


def test_gpu_workers_whose_torch_sees_no_cuda_fail_at_once(gpu_ray, digits_teacher, tmp_path):
    """Ray gives the worker its (logical) GPU, but this box's torch sees no CUDA: the one-task probe says so
    with torch's build and the driver, before the Train run starts; through a job script: exit 2, one line."""
    from kdci_ray.distributed import distill_on_ray

    import re

    error = refusal(distill_on_ray, fast_config(digits_teacher), num_workers=1, storage_path=tmp_path)
    assert isinstance(error, ValueError), error
    assert re.search(r"Ray gives each Ray Train worker 1 GPU but torch \S+ \((CPU-only, no CUDA|CUDA \S+) build\) on node \S+ sees no "
                     r"CUDA device \(NVIDIA driver: ", str(error)), str(error)
    assert not (tmp_path / "gpu").exists()
    env = {**os.environ, "RAY_ADDRESS": gpu_ray.get_runtime_context().gcs_address}
    rc, last, err, seconds = run_job("jobs/distill.py", "--config", CONFIG, "--set", f"teacher.weights={digits_teacher}", "--set", "name=job",
                                     "--workers", 1, "--storage", tmp_path / "job", "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}", env=env)
    assert rc == 2 and "sees no CUDA device" in last and "Traceback" not in err and seconds < 30, err[-2000:]
    from kdci_ray.tracking.store import client

    store = client(f"sqlite:///{tmp_path / 'm.db'}")
    experiments = [e.experiment_id for e in store.search_experiments()]
    assert not store.search_runs(experiments)  # refused before its MLflow run was opened: no failed run left
    assert not (tmp_path / "job" / "job").exists()


def test_the_dfnd_selection_driver_takes_no_gpu(gpu_ray, digits_teacher, tmp_path):
    """DFND's selection on a 1-GPU node with `device: cuda`: the driver (which only writes the kept images
    with their teacher logits) runs on the CPU, so the first CUDA check is the probe of the scoring actors'
    GPU. Without a CUDA device here that probe refuses; the driver itself never asked for CUDA."""
    from kdci_ray.distributed import select_wild

    cfg = load_config(REPO / "configs" / "dfnd-digits-digits_cnn-digits_cnn_small.yaml", DistillConfig,
                      [f"teacher.weights={digits_teacher}", "device=cuda", "synthesis.num_select=100"])
    error = refusal(select_wild, cfg, tmp_path / "sel", shards=2, actors=1)
    assert isinstance(error, ValueError) and "Ray gives each Ray Data actor 1 GPU but torch" in str(error), error
    assert not (tmp_path / "sel").exists()  # refused before the output folder was made
