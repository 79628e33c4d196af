"""An MLflow run as the distillation loop's `RunLogger`: per-epoch metrics, artifacts, params; parent and
child runs (a pipeline or sweep, and its trials) through MLflow's `mlflow.parentRunId` tag."""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

from . import store

log = logging.getLogger(__name__)
_PARAMS_PER_CALL = 100  # MLflow's log_batch limit for params
# The per-epoch metrics that matter, copied into a section of their own: MLflow's run page charts the metrics
# by name (attention_entropy, epoch_seconds, images_per_s, lr, ... test_top1 after twenty others) and has no
# setting for their order, but it shows the sections of prefixed names ("headline/...") before the rest.
HEADLINE = ("test_top1", "test_top1_compensated", "train_kd", "attention_entropy", "val_agreement")
HEADLINE_SECTION = "headline"


class MlflowRunLogger:
    """One MLflow run. Use as a context manager (the run ends FINISHED, or FAILED on an exception)."""

    def __init__(self, client, run_id: str):
        self.client, self.run_id = client, run_id

    @classmethod
    def start(cls, experiment: str, run_name: str, *, uri: str | None = None, parent: "MlflowRunLogger | None" = None,
              tags: dict[str, str] | None = None) -> "MlflowRunLogger":
        client = parent.client if parent is not None else store.client(uri)
        run_tags = dict(tags or {})
        if parent is not None:
            run_tags["mlflow.parentRunId"] = parent.run_id
        run = client.create_run(store.experiment_id(client, experiment), run_name=run_name, tags=run_tags)
        log.info("mlflow: run %s (%s) in experiment %s at %s", run_name, run.info.run_id, experiment, client.tracking_uri)
        return cls(client, run.info.run_id)

    @classmethod
    def find(cls, client, experiment_id: str, tags: dict[str, str]) -> "MlflowRunLogger | None":
        """The run carrying these tag values (how a resumed sweep or pipeline finds its runs again)."""
        query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
        runs = client.search_runs([experiment_id], filter_string=query, max_results=1)
        return cls(client, runs[0].info.run_id) if runs else None

    @property
    def status(self) -> str:
        return self.client.get_run(self.run_id).info.status

    # -- the loop's RunLogger interface ----------------------------------------------------------
    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = {**metrics, **{f"{HEADLINE_SECTION}/{k}": metrics[k] for k in HEADLINE if k in metrics}}
        batch = [Metric(name, float(value), now, step) for name, value in metrics.items()
                 if isinstance(value, (int, float)) and math.isfinite(float(value))]
        if batch:
            self.client.log_batch(self.run_id, metrics=batch)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def on_checkpoint(self, epoch: int, row: dict, paths: list[Path]) -> None:
        pass  # checkpoints stay with the run (or Ray's storage); MLflow gets the final artifacts

    # -- run-level records -------------------------------------------------------------------------
    def log_params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v[:6000]) for k, v in params.items()]  # MLflow caps a value's length
        for lo in range(0, len(items), _PARAMS_PER_CALL):
            self.client.log_batch(self.run_id, params=items[lo : lo + _PARAMS_PER_CALL])

    def log_config(self, config) -> None:
        """A pydantic config: flattened as params."""
        self.log_params(store.flatten(config.model_dump(mode="json")))

    def set_tags(self, tags: dict[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, value)

    def describe(self, markdown: str) -> None:
        """The run's description in the UI (its note: Markdown, shown on the run's overview)."""
        self.client.set_tag(self.run_id, "mlflow.note.content", markdown)

    def end(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status)

    def __enter__(self) -> "MlflowRunLogger":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.end("FAILED" if exc_type is not None else "FINISHED")
