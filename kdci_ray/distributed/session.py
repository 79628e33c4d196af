"""Connecting to Ray: a cluster when one is given (`address`, or RAY_ADDRESS as `ray job submit` sets it),
else a local Ray started for this process. Usage statistics stay off unless the user turned them on."""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


def ensure_ray(address: str | None = None, num_cpus: int | None = None):
    """Initialise Ray once per process and return the `ray` module."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    if ray.is_initialized():
        return ray
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        log.info("ray: connected to %s", address)
    else:
        # A local Ray for this process only: no dashboard, nothing listening beyond this machine. "local": a
        # new one even where `ray start` left a cluster behind (ray.init would otherwise join that one).
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=True)
        log.info("ray: started a local Ray with %s CPUs", ray.cluster_resources().get("CPU"))
    return ray


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
