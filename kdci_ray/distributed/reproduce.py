"""A results table as one Ray Tune grid (`kdci-ray reproduce --config configs/table-cifar10.yaml`):
methods x KDCI off/on x teacher/student pairs, each cell the unchanged config
`configs/<method>-<dataset>-<pair>.yaml` distilled on Ray Train (fractional GPUs let several cells share a
GPU). Writes `table.md`, `table.csv` and `results.json` under `<storage>/<name>/` and logs them to the
sweep's MLflow parent run (every cell is a child run). Running it again resumes the grid.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from pathlib import Path

from ..config import DistillConfig, TableConfig, load_config
from .tune import CELL, sweep

log = logging.getLogger(__name__)


def cell_configs(table: TableConfig, config_dir: Path, overrides: list[str] | None = None) -> dict[str, DistillConfig]:
    """{"<method>/<pair>": config} for every cell; all are read (and validated) before anything runs."""
    cells, missing = {}, []
    for pair in table.pairs:
        for method in table.methods:
            path = config_dir / f"{method}-{table.dataset}-{pair}.yaml"
            if not path.is_file():
                missing.append(path.name)
                continue
            cells[f"{method}/{pair}"] = load_config(path, DistillConfig, [*table.set, *(overrides or [])])
    if missing:
        raise FileNotFoundError(f"no config for these cells in {config_dir}: {', '.join(missing)} (a cell is "
                                "<method>-<dataset>-<pair>.yaml; fix methods/pairs in the table config or add the file)")
    return cells


def reproduce(
    table: TableConfig,
    *,
    config_dir: str | Path = "configs",
    overrides: list[str] | None = None,
    storage_path: str | Path | None = None,
    experiment: str = "kdci-tables",
    tracking_uri: str | None = None,
    address: str | None = None,
) -> dict:
    """Run (or resume) the table's grid; returns {"rows", "files", "mlflow_parent_run_id", ...}."""
    from ..tracking.logger import MlflowRunLogger
    from ..tracking.store import client

    cells = cell_configs(table, Path(config_dir), overrides)
    space = {"kdci.enabled": list(table.kdci)}
    summary = sweep(
        next(iter(cells.values())), space, cells=cells, search="grid", scheduler="fifo", metric="test_top1",
        max_concurrent_trials=table.max_concurrent, workers_per_trial=table.workers_per_trial,
        gpus_per_worker=table.gpus_per_trial, use_gpu=table.gpus_per_trial is not None,
        storage_path=storage_path, name=table.name, experiment=experiment, tracking_uri=tracking_uri, verbose=1, address=address,
    )
    rows = table_rows(table, summary["trials"])
    folder = Path(summary["storage"])
    files = {
        "markdown": folder / "table.md", "csv": folder / "table.csv", "json": folder / "results.json",
    }
    files["markdown"].write_text(markdown(table, rows))
    files["csv"].write_text(to_csv(rows))
    files["json"].write_text(json.dumps({"table": table.model_dump(mode="json"), "rows": rows, "trials": summary["trials"]},
                                        indent=1, default=str))
    mlflow_client = client(tracking_uri)
    parent = MlflowRunLogger(mlflow_client, summary["mlflow_parent_run_id"])
    for path in files.values():
        parent.log_artifact(path, "table")
    return {"name": table.name, "rows": rows, "files": {k: str(v) for k, v in files.items()},
            "mlflow_parent_run_id": summary["mlflow_parent_run_id"], "failed": [t for t in summary["trials"] if t.get("error")]}


def table_rows(table: TableConfig, trials: list[dict]) -> list[dict]:
    """One row per (pair, method): top-1 with KDCI off and on, the gain, KDCI's compensated top-1, the
    public reference number."""
    by_cell = {}
    for trial in trials:
        by_cell.setdefault(trial[CELL], {})[bool(trial["kdci.enabled"])] = trial
    rows = []
    for pair in table.pairs:
        for method in table.methods:
            runs = by_cell.get(f"{method}/{pair}", {})
            off, on = runs.get(False, {}), runs.get(True, {})
            row = {
                "pair": pair, "method": method, "kd_top1": off.get("test_top1"), "kdci_top1": on.get("test_top1"),
                "kdci_compensated_top1": on.get("test_top1_compensated"),
                "reference_top1": table.reference.get(method, {}).get(pair),
                "errors": "; ".join(str(t["error"])[:200] for t in (off, on) if t.get("error")) or None,
            }
            row["gain"] = None if row["kd_top1"] is None or row["kdci_top1"] is None else row["kdci_top1"] - row["kd_top1"]
            rows.append(row)
    return rows


def _cell(value, signed: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:+.2f}" if signed else f"{value:.2f}"


def markdown(table: TableConfig, rows: list[dict]) -> str:
    lines = [
        f"## {table.name}: top-1 (%) on {table.dataset}",
        "",
        "| teacher -> student | method | KD | + KDCI | gain | KDCI compensated | public baseline |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['pair'].replace('-', ' -> ')} | {r['method']} | {_cell(r['kd_top1'])} | {_cell(r['kdci_top1'])} | "
                     f"{_cell(r['gain'], signed=True)} | {_cell(r['kdci_compensated_top1'])} | {_cell(r['reference_top1'])} |")
    failed = [r for r in rows if r["errors"]]
    if failed:
        lines += ["", "Failed cells: " + "; ".join(f"{r['method']}/{r['pair']}: {r['errors']}" for r in failed)]
    return "\n".join(lines) + "\n"


def to_csv(rows: list[dict]) -> str:
    out = io.StringIO()
    fields = ["pair", "method", "kd_top1", "kdci_top1", "gain", "kdci_compensated_top1", "reference_top1", "errors"]
    writer = csv.DictWriter(out, fieldnames=fields)
    writer.writeheader()
    for r in rows:
        writer.writerow({k: r.get(k) for k in fields})
    return out.getvalue()
