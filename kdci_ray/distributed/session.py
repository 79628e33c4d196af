"""Connecting to Ray: a cluster when one is given (`address`, or RAY_ADDRESS as `ray job submit` sets it),
else a local Ray started for this process. Usage statistics stay off unless the user turned them on."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)


def ensure_ray(address: str | None = None, num_cpus: int | None = None):
    """Initialise Ray once per process and return the `ray` module."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    from .. import console

    if ray.is_initialized():
        return ray
    console.quiet_console_handlers()  # Ray's handler exists from `import ray` on: its lines while starting are filtered too
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        what = f"connected to {address}"
    else:
        end_helpers_of_killed_drivers()
        # A local Ray for this process only: no dashboard, nothing listening beyond this machine. "local": a
        # new one even where `ray start` left a cluster behind (ray.init would otherwise join that one).
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=True)
        _record_driver(ray)
        what = f"started a local Ray with {ray.cluster_resources().get('CPU'):g} CPUs"
    import ray.data  # noqa: F401  (it adds its console handler on import: filtered below with the rest)

    console.quiet_console_handlers()
    if console.filter_forwarded_lines(ray):
        log.info("ray: %s; its own log lines are in %s (--verbose shows them here)", what, console.ray_log_folder(ray) or "Ray's session logs")
    else:
        log.info("ray: %s", what)
    return ray


# Ray 2.60's per-node agents (ray::DashboardAgent, ray::RuntimeEnvAgent) of a local Ray outlive a driver
# that was killed (SIGKILL, OOM): the rest of the session ends with it, they stay, re-parented to init.
# Each local Ray this module starts records its driver in its session folder; the next start ends the
# helpers of sessions whose driver is gone (found by the files they hold open in that session's folder:
# nothing of another session, user or live driver is touched).
_DRIVER_RECORD = "kdci_ray_driver.json"


def _process_start(pid: int) -> int | None:
    """The start time (clock ticks since boot) of `pid`, None if there is no such process: with the pid it
    tells a driver from a later process that reuses its number."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _record_driver(ray) -> None:
    try:  # the session folder of the local Ray just started (Ray has no public accessor for it)
        session = Path(ray._private.worker._global_node.get_session_dir_path())
        (session / _DRIVER_RECORD).write_text(json.dumps({"pid": os.getpid(), "start": _process_start(os.getpid())}))
    except Exception as exc:  # a record is a convenience for the next start, never a reason to fail this one
        log.debug("ray: driver not recorded (%s)", exc)


def end_helpers_of_killed_drivers(temp_dir: str | Path | None = None) -> list[int]:
    """End Ray's processes still holding files open in the session folder of a local Ray whose recorded
    driver is gone (the agents of a killed run); returns their pids. Linux only (/proc); elsewhere nothing."""
    import signal
    import tempfile

    root = Path(temp_dir) if temp_dir is not None else Path(tempfile.gettempdir()) / "ray"
    if not Path("/proc").is_dir():
        return []
    dead = []
    for record in root.glob(f"session_*/{_DRIVER_RECORD}"):
        try:
            driver = json.loads(record.read_text())
        except (OSError, ValueError):
            continue
        if _process_start(int(driver["pid"])) != driver["start"]:  # the driver is gone (or its pid reused)
            dead.append(record)
    if not dead:
        return []
    sessions = tuple(str(record.parent) + os.sep for record in dead)
    ended = []
    for entry in Path("/proc").iterdir():  # one pass over this user's processes for every dead session
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if entry.stat().st_uid != os.getuid():
                continue
            argv0 = (entry / "cmdline").read_bytes().split(b"\0")[0]
            if not (argv0.startswith(b"ray::") or b"/ray/" in argv0):  # Ray's processes only (not a `tail -f` of its logs)
                continue
            holds = any(os.readlink(fd).startswith(sessions) for fd in (entry / "fd").iterdir())
        except OSError:  # ended while we looked, or not ours to read
            continue
        if holds:
            try:
                os.kill(int(entry.name), signal.SIGKILL)  # SIGTERM leaves them running (measured); `ray stop --force` kills too
                ended.append(int(entry.name))
            except OSError:
                pass
    for record in dead:
        record.unlink(missing_ok=True)
    if ended:
        log.info("ray: ended %d helper process(es) %s left by the local Ray of a killed run", len(ended), ended)
    return ended


def release_ray() -> None:
    """Disconnect this process from Ray (a local Ray it started ends with it). Called before a command prints
    its JSON result line: Ray forwards its workers' and raylet's log lines to the driver's stdout at any
    time, and one arriving after the result would make it no longer the last line."""
    import sys

    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()


def actor_cpus(actors: int, reserve: float = 1.0, cap: float | None = 1.0) -> float:
    """CPUs per actor so that `actors` actors leave `reserve` CPUs free for Ray Data's read and other
    stages: an actor pool that takes every CPU starves the stage feeding it and hangs. `cap`: at most this
    many per actor (None: no cap, e.g. for training workers that use every thread they get)."""
    import ray

    total = float(ray.cluster_resources().get("CPU", 1.0))
    share = (total - reserve) / max(1, actors)
    return max(0.05, share if cap is None else min(cap, share))


AUTOSCALED_GPUS_ENV = "KDCI_EXPECT_AUTOSCALED_GPUS"  # set on clusters whose autoscaler adds GPU nodes (cluster.yaml)


def cluster_gpus(ray) -> tuple[float, float]:
    """(GPUs in the cluster now, GPUs of its largest node): a worker's GPUs must all be on one node."""
    largest = max((float(n.get("Resources", {}).get("GPU", 0)) for n in ray.nodes() if n.get("Alive")), default=0.0)
    return float(ray.cluster_resources().get("GPU", 0)), largest


def check_gpu_fraction(gpus_per_worker: float | None, num_workers: int, what: str = "--workers") -> None:
    """What can be refused before Ray starts: a worker count below 1, and a GPU fraction for several DDP
    workers of one run (two ranks on one GPU: NCCL refuses that)."""
    if num_workers < 1:
        raise ValueError(f"{what} = {num_workers}: need at least 1 worker")
    if gpus_per_worker is None or gpus_per_worker == 0:
        return
    if gpus_per_worker < 0 or (gpus_per_worker > 1 and gpus_per_worker != int(gpus_per_worker)):
        raise ValueError(f"gpus per worker = {gpus_per_worker:g}: use a fraction below 1 or a whole number")
    if gpus_per_worker < 1 and num_workers > 1:
        raise ValueError(
            f"gpus per worker = {gpus_per_worker:g} with {what} = {num_workers} would put DDP ranks of one run on one GPU "
            "(NCCL refuses that): use a GPU fraction with 1 worker per run, or whole GPUs per worker"
        )


def train_worker_resources(
    ray, num_workers: int, use_gpu: bool | None, gpus_per_worker: float | None, cpus_per_worker: float | None,
    cpu_reserve: float = 1.0, what: str = "--workers",
) -> tuple[bool, dict]:
    """(use_gpu, resources per worker) of a Ray Train run, decided from the cluster before any worker starts.

    GPU workers the cluster can never place are refused with what it has and what to change: Train would
    otherwise wait for them for ever. A cluster whose autoscaler adds GPU nodes (KDCI_EXPECT_AUTOSCALED_GPUS=1,
    set by cluster.yaml) gets its request as asked. A GPU fraction with more than one DDP worker would put
    two ranks on one GPU, which NCCL refuses: refused too."""
    check_gpu_fraction(gpus_per_worker, num_workers, what)
    total, largest = cluster_gpus(ray)
    autoscaled = bool(os.environ.get(AUTOSCALED_GPUS_ENV))
    if use_gpu is None:  # GPUs when the cluster has (or its autoscaler adds) any
        use_gpu = (total > 0 or autoscaled) if gpus_per_worker is None else gpus_per_worker > 0
    if not use_gpu:
        cpus = cpus_per_worker or actor_cpus(num_workers, reserve=cpu_reserve, cap=None)
        return False, {"CPU": cpus}
    per = 1.0 if not gpus_per_worker else float(gpus_per_worker)
    if not autoscaled:
        fix = (f"on an autoscaling cluster that adds GPU nodes set {AUTOSCALED_GPUS_ENV}=1 (cluster.yaml does), "
               "or run on CPU workers (--cpu)")
        if total == 0:
            raise ValueError(f"GPU workers asked for but the cluster has no GPU now; {fix}")
        if per > largest:
            raise ValueError(f"gpus per worker = {per:g} but the largest node has {largest:g} GPU(s); ask for at most {largest:g}, or {fix}")
        if per * num_workers > total:
            fits = int(total // per)
            raise ValueError(
                f"{what} = {num_workers} GPU workers x {per:g} GPU need {per * num_workers:g} GPUs but the cluster has "
                f"{total:g}: use {what} {fits}, or {fix}"
            )
    return True, {"CPU": cpus_per_worker or 1.0, "GPU": per}


def cuda_report() -> dict:
    """What this process's torch sees of CUDA, and the node's NVIDIA driver (run where a GPU worker runs)."""
    import re
    import socket
    import subprocess

    import torch

    driver = None
    try:  # the kernel module's version, without nvidia-smi
        with open("/proc/driver/nvidia/version") as f:
            found = re.search(r"Kernel Module\s+([0-9.]+)", f.read())
            driver = found.group(1) if found else None
    except OSError:
        try:
            driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                                    text=True, timeout=20).stdout.split("\n")[0].strip() or None
        except (OSError, subprocess.SubprocessError):
            pass
    available = torch.cuda.is_available()
    return {"available": available, "devices": torch.cuda.device_count() if available else 0, "torch": torch.__version__,
            "free_bytes": torch.cuda.mem_get_info()[0] if available else 0,
            "cuda_build": torch.version.cuda, "driver": driver, "node": socket.gethostname(),
            "visible": os.environ.get("CUDA_VISIBLE_DEVICES")}


def check_gpu_workers_see_cuda(ray, resources: dict, what: str = "worker") -> dict:
    """Before GPU work starts: one task with a worker's resources, placed as a worker would be, checks that
    torch there sees CUDA. A CPU-only torch wheel, or a CUDA build newer than the node's driver, would
    otherwise fail (or fall back to the CPU) only inside the workers, after every one of them started.
    Returns the probe's `cuda_report` (free GPU memory included)."""
    gpus = resources.get("GPU", resources.get("num_gpus", 0))
    cpus = resources.get("CPU", resources.get("num_cpus", 1))
    report = ray.get(ray.remote(num_gpus=gpus, num_cpus=cpus)(cuda_report).remote())
    if not report["available"]:
        build = f"CUDA {report['cuda_build']}" if report["cuda_build"] else "CPU-only, no CUDA"
        raise ValueError(
            f"Ray gives each {what} {gpus:g} GPU but torch {report['torch']} ({build} build) on node {report['node']} sees no "
            f"CUDA device (NVIDIA driver: {report['driver'] or 'not found'}; CUDA_VISIBLE_DEVICES={report['visible']}): "
            "install the torch build for the node's CUDA (README, \"GPU clusters\"), or run on CPU workers (--cpu)"
        )
    return report


def limit_threads_to_cpu_share() -> None:
    """Inside an actor: torch and faiss threads = its CPU share (at least 1), so actors sharing a node do not
    oversubscribe it. Outside Ray workers (the driver) nothing changes."""
    import faiss
    import ray
    import torch

    try:
        share = ray.get_runtime_context().get_assigned_resources().get("CPU")
    except AssertionError:  # not a worker process
        return
    if share:
        torch.set_num_threads(max(1, int(share)))
        faiss.omp_set_num_threads(max(1, int(share)))
