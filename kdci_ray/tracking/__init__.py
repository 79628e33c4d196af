"""Tracking: MLflow runs, artifacts and figures. The loops see only the small `RunLogger` interface
(`engine.distill`), so they run with tracking off; nothing below this package imports mlflow.

- `store.py`: the tracking URI (config/env, else an embedded sqlite store under runs/mlflow).
- `logger.py`: `MlflowRunLogger`, an MLflow run as the loop's logger (parent/child runs).
- `runs.py`: a distillation run recorded end to end (params, metrics, artifacts, figures, the student model).
- `plots.py`: the figures.
"""

from .logger import MlflowRunLogger
from .runs import DEFAULT_EXPERIMENT, distill_tracked
from .store import flatten, tracking_uri

__all__ = ["DEFAULT_EXPERIMENT", "MlflowRunLogger", "distill_tracked", "flatten", "tracking_uri"]
