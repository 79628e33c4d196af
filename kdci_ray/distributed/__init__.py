"""The Ray layer: orchestration of the plain-PyTorch core on a Ray cluster (or a local Ray).

Nothing here holds training math: stages call the core (`kdci_ray.kdci`, `kdci_ray.synthesis`,
`kdci_ray.engine`) inside Ray tasks and actors. This is the only package that imports `ray`.

- `session.py`: connect to a cluster or start a local Ray; CPU shares for actor pools.
- `generate.py`: substitution data on Ray Data (synthesis tasks on an actor pool -> Parquet shards +
  manifest; DFND's selection over shards of the wild pool).
- `dictionary.py`: the confounder dictionary built by shard actors (distributed Lloyd k-means).
- `train.py`: distillation on Ray Train (the core loop on DDP workers, Ray checkpoints, resume by name).
- `pipeline.py`: the three stages in order through shared storage.
- `tune.py`, `reproduce.py`, `quickstart.py`: Ray Tune sweeps, the results-table grid, the one-command tour.
"""

from .dictionary import build_dictionary_distributed, dictionary_cache_key
from .generate import generate, select_wild
from .pipeline import run_pipeline
from .session import actor_cpus, ensure_ray
from .train import RayDistillResult, distill_on_ray, distill_on_ray_tracked, train_teacher_on_ray

__all__ = [
    "RayDistillResult", "actor_cpus", "build_dictionary_distributed", "dictionary_cache_key", "distill_on_ray",
    "distill_on_ray_tracked", "ensure_ray",
    "generate", "run_pipeline", "select_wild", "train_teacher_on_ray",
]
