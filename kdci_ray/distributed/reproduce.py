"""A results table as one Ray Tune grid (`kdci-ray reproduce --config configs/table-cifar10.yaml`):
methods x KDCI off/on x teacher/student pairs x seeds, each cell the unchanged config
`configs/<method>-<dataset>-<pair>.yaml` distilled on Ray Train (fractional GPUs let several cells share a
GPU). Writes `table.md`, `table.csv` and `results.json` under `<storage>/<name>/` and logs them to the
sweep's MLflow parent run (every cell is a child run). Running it again resumes the grid.

Both reporting protocols, labelled: `last` (the last epoch's test top-1: ours) and `best` (the best epoch by
test labels: the public code's, a test-set selection, compared with the public numbers). With several seeds:
mean +- std over seeds, and KDCI's effect as the paired difference (same seed, KDCI on - off) with its mean and
a 95 % t interval. `gap` = teacher top-1 - student top-1: comparable across teachers of different strength
(ours are trained on a lossy JPEG CIFAR-10 and score lower than the public ones).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import statistics
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
    space = {"kdci.enabled": list(table.kdci), "seed": list(table.seeds)}
    validated = all(c.validation.images > 0 for c in cells.values())
    summary = sweep(
        next(iter(cells.values())), space, cells=cells, search="grid", scheduler="fifo", metric="val_agreement" if validated else "train_loss",
        max_concurrent_trials=table.max_concurrent, workers_per_trial=table.workers_per_trial,
        gpus_per_worker=table.gpus_per_trial, use_gpu=table.gpus_per_trial is not None,
        storage_path=storage_path, name=table.name, experiment=experiment, tracking_uri=tracking_uri, address=address,
    )
    rows = table_rows(table, summary["trials"], teacher_accuracies(cells))
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


def teacher_accuracies(cells: dict[str, DistillConfig]) -> dict[str, float]:
    """{pair: our teacher's test top-1} from the teachers' cards (where a card records it)."""
    from ..models.io import ModelCard, card_path

    out = {}
    for key, cfg in cells.items():
        pair = key.split("/", 1)[1]
        card = card_path(cfg.teacher.weights) if cfg.teacher.weights is not None else None
        if pair not in out and card is not None and card.is_file():
            accuracy = ModelCard.read(card).accuracy
            if accuracy is not None:
                out[pair] = float(accuracy)
    return out


# Two-sided 95 % quantiles of Student's t for 1..30 degrees of freedom (then the normal's 1.96).
_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def paired_interval(differences: list[float]) -> dict:
    """Mean of the per-seed differences and its 95 % t interval (None with fewer than 2 pairs)."""
    mean, std = mean_std(differences)
    if std is None:
        return {"mean": mean, "low": None, "high": None, "pairs": len(differences)}
    t = _T975[len(differences) - 2] if len(differences) - 1 <= len(_T975) else 1.96
    half = t * std / math.sqrt(len(differences))
    return {"mean": mean, "low": mean - half, "high": mean + half, "pairs": len(differences)}


PROTOCOLS = {"last": "test_top1", "best": "test_top1_best"}


def table_rows(table: TableConfig, trials: list[dict], teacher_top1: dict[str, float] | None = None) -> list[dict]:
    """One row per (pair, method): for each protocol, KD and KD + KDCI mean/std over seeds, the paired difference
    with its 95 % interval, the compensated top-1, the gap to the teacher; the public reference and its gap."""
    by_cell: dict[str, dict[bool, dict[int, dict]]] = {}
    for trial in trials:
        seed = int(trial.get("seed", 0) or 0)
        by_cell.setdefault(trial[CELL], {}).setdefault(bool(trial["kdci.enabled"]), {})[seed] = trial
    teacher_top1 = teacher_top1 or {}
    rows = []
    for pair in table.pairs:
        for method in table.methods:
            runs = by_cell.get(f"{method}/{pair}", {})
            off, on = runs.get(False, {}), runs.get(True, {})
            teacher = teacher_top1.get(pair)
            reference, reference_teacher = table.reference.get(method, {}).get(pair), table.reference_teacher.get(method, {}).get(pair)
            row = {"pair": pair, "method": method, "seeds": sorted(set(off) | set(on)), "teacher_top1": teacher,
                   "reference_top1": reference, "reference_teacher_top1": reference_teacher,
                   "reference_gap": None if reference is None or reference_teacher is None else reference_teacher - reference,
                   "errors": "; ".join(str(t["error"])[:200] for t in [*off.values(), *on.values()] if t.get("error")) or None}
            for protocol, key in PROTOCOLS.items():
                # A failed trial's last report is a partial run: named in `errors`, left out of the statistics.
                kd = {s: t[key] for s, t in off.items() if t.get(key) is not None and not t.get("error")}
                kdci = {s: t[key] for s, t in on.items() if t.get(key) is not None and not t.get("error")}
                comp_key = key.replace("test_top1", "test_top1_compensated")
                comp = [t[comp_key] for t in on.values() if t.get(comp_key) is not None and not t.get("error")]
                (row[f"kd_{protocol}"], row[f"kd_{protocol}_std"]) = mean_std(list(kd.values()))
                (row[f"kdci_{protocol}"], row[f"kdci_{protocol}_std"]) = mean_std(list(kdci.values()))
                row[f"kdci_compensated_{protocol}"] = mean_std(comp)[0]
                diff = paired_interval([kdci[s] - kd[s] for s in sorted(set(kd) & set(kdci))])
                row[f"diff_{protocol}"], row[f"diff_{protocol}_low"], row[f"diff_{protocol}_high"] = diff["mean"], diff["low"], diff["high"]
                row["pairs"] = diff["pairs"]
                for name in ("kd", "kdci"):
                    value = row[f"{name}_{protocol}"]
                    row[f"{name}_{protocol}_gap"] = None if value is None or teacher is None else teacher - value
            rows.append(row)
    return rows


def _num(value, signed: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:+.2f}" if signed else f"{value:.2f}"


def _pm(mean, std) -> str:
    return "-" if mean is None else _num(mean) + ("" if std is None else f" ± {std:.2f}")


def _diff(row: dict, protocol: str) -> str:
    mean, low, high = row[f"diff_{protocol}"], row[f"diff_{protocol}_low"], row[f"diff_{protocol}_high"]
    return "-" if mean is None else _num(mean, signed=True) + ("" if low is None else f" [{low:+.2f}, {high:+.2f}]")


def markdown(table: TableConfig, rows: list[dict]) -> str:
    seeds = ", ".join(map(str, table.seeds))
    lines = [
        f"## {table.name}: top-1 (%) on {table.dataset}, seeds {seeds}",
        "",
        "Mean ± std over seeds. KDCI - KD: the mean paired difference (same seed) [95 % t interval]. Gap: teacher - student.",
        "last = the last epoch (ours); best = the best epoch by test labels (the public code's protocol: a test-set selection).",
        "",
        "| teacher -> student | method | protocol | KD | + KDCI | KDCI - KD | KDCI compensated | gap KD / KDCI | public (gap) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        for protocol in PROTOCOLS:
            public = "-" if r["reference_top1"] is None or protocol != "best" else _num(r["reference_top1"]) + (
                "" if r["reference_gap"] is None else f" ({r['reference_gap']:.2f})")
            lines.append(
                f"| {r['pair'].replace('-', ' -> ')} | {r['method']} | {protocol} | {_pm(r[f'kd_{protocol}'], r[f'kd_{protocol}_std'])} | "
                f"{_pm(r[f'kdci_{protocol}'], r[f'kdci_{protocol}_std'])} | {_diff(r, protocol)} | {_num(r[f'kdci_compensated_{protocol}'])} | "
                f"{_num(r[f'kd_{protocol}_gap'])} / {_num(r[f'kdci_{protocol}_gap'])} | {public} |")
    teachers = {r["pair"]: r["teacher_top1"] for r in rows if r["teacher_top1"] is not None}
    if teachers:
        lines += ["", "Our teachers: " + "; ".join(f"{p.replace('-', ' -> ')}: {t:.2f}" for p, t in teachers.items())
                  + ". Public numbers: their own (stronger) teachers; compare the gaps."]
    failed = [r for r in rows if r["errors"]]
    if failed:
        lines += ["", "Failed cells: " + "; ".join(f"{r['method']}/{r['pair']}: {r['errors']}" for r in failed)]
    return "\n".join(lines) + "\n"


CSV_FIELDS = ["pair", "method", "pairs", "teacher_top1"] + [
    f"{field}_{protocol}{suffix}" for protocol in PROTOCOLS for field, suffix in (
        ("kd", ""), ("kd", "_std"), ("kdci", ""), ("kdci", "_std"), ("diff", ""), ("diff", "_low"), ("diff", "_high"),
        ("kdci_compensated", ""), ("kd", "_gap"), ("kdci", "_gap"))
] + ["reference_top1", "reference_teacher_top1", "reference_gap", "errors"]


def to_csv(rows: list[dict]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=CSV_FIELDS)
    writer.writeheader()
    for r in rows:
        writer.writerow({k: r.get(k) for k in CSV_FIELDS})
    return out.getvalue()
