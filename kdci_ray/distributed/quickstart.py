"""The whole workflow once, on this machine, with nothing downloaded (`kdci-ray quickstart`):

    1. a digits teacher (scikit-learn's bundled 8x8 digits)
    2. generation: Ray Data actors synthesize substitution data with one DFKD baseline into Parquet
    3. dictionary: the distributed k-means (faiss) builds the confounder dictionary of that pool
    4. distillation on Ray Train (2 DDP workers): the baseline with KDCI off, then on
    5. a Tune sweep over the dictionary size N and the fusion weight alpha (ASHA)

all on a local Ray, tracked in the embedded MLflow store as one parent run (teacher accuracy, the t-SNE of
both students, the summary) with the two distillations and the sweep as child runs;
ends with a summary table and the command that opens the MLflow UI. Running it again continues where it
stopped (finished stages return at once).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ..config import DistillConfig, TeacherTrainConfig, load_config, with_absolute_paths
from ..console import Stages

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class QuickstartSize:
    teacher_epochs: int
    shards: int  # generation tasks; each makes (warm-up + calls) x synthesis.batch_size images
    calls_per_shard: int
    distill_epochs: int
    sweep_epochs: int
    n_values: tuple[int, ...]
    alpha_values: tuple[float, ...]


SIZES = {
    "default": QuickstartSize(teacher_epochs=30, shards=8, calls_per_shard=2, distill_epochs=20, sweep_epochs=10,
                              n_values=(8, 32), alpha_values=(0.5, 1.0)),
    # CI: every stage through the same code, at the smallest size that still trains (a 2-trial sweep)
    "ci": QuickstartSize(teacher_epochs=4, shards=2, calls_per_shard=1, distill_epochs=2, sweep_epochs=2,
                         n_values=(4, 8), alpha_values=(1.0,)),
}
DEFAULT_CONFIG = "configs/deepinv-digits-digits_cnn-digits_cnn_small.yaml"
TEACHER_CONFIG = "configs/teacher-digits.yaml"


def _find_config(path: str) -> Path:
    """A config named relative to the working directory, else to the repository this package lives in."""
    for candidate in (Path(path), Path(__file__).resolve().parents[2] / path):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{path}: no such config here or in the kdci_ray checkout; run from the repository root or pass --config")


def quickstart(
    *,
    size: str = "default",
    config: str = DEFAULT_CONFIG,
    storage_path: str | Path | None = None,
    tracking_uri: str | None = None,
    experiment: str = "kdci-quickstart",
    workers: int = 2,
    address: str | None = None,
) -> dict:
    """Run the five steps (module docstring); returns the summary (also written to <storage>/quickstart/summary.json)."""
    from ..engine.distill import load_models
    from ..engine.runtime import resolve_runtime
    from ..tracking.logger import MlflowRunLogger
    from ..tracking.runs import student_tsne
    from ..tracking.store import client, experiment_id, tracking_uri as resolve_uri
    from .dictionary import dictionary_for_config
    from .generate import generate
    from .session import ensure_ray
    from .train import distill_on_ray_tracked, resolve_storage
    from .tune import sweep

    if size not in SIZES:
        raise ValueError(f"size = {size!r}: use one of {', '.join(SIZES)}")
    plan = SIZES[size]
    storage = resolve_storage(storage_path)
    uri = resolve_uri(tracking_uri)
    progress = Stages(7)

    # Both configs parsed before any work: a bad file fails here.
    base = load_config(_find_config(config), DistillConfig)
    if base.synthesis is None or base.synthesis.method == "dfnd":
        raise ValueError(f"{config}: the quickstart generates with a synthesizing DFKD method (dafl, deepinv, fast, cmi, mosaickd)")
    method = base.synthesis.method
    folder = storage / "quickstart" / f"{base.name}-{size}"  # another config or size: another folder, nothing mixed
    teacher_cfg = load_config(_find_config(TEACHER_CONFIG), TeacherTrainConfig, [
        "name=digits_cnn", f"output.dir={folder / 'teacher'}", f"optim.epochs={plan.teacher_epochs}"])
    base = load_config(_find_config(config), DistillConfig, [
        f"teacher.weights={folder / 'teacher' / 'digits_cnn.safetensors'}", f"optim.epochs={plan.distill_epochs}"])

    mlflow_client = client(uri)
    tags = {"kdci.quickstart": str(folder)}
    parent = MlflowRunLogger.find(mlflow_client, experiment_id(mlflow_client, experiment), tags)
    if parent is None:
        parent = MlflowRunLogger.start(experiment, f"quickstart ({method}, {size})", uri=uri, tags={**tags, "size": size})
        parent.log_params({"size": size, "method": method, **{f"plan.{k}": str(v) for k, v in asdict(plan).items()}})
    else:
        mlflow_client.update_run(parent.run_id, status="RUNNING")
    seconds: dict[str, float] = {}
    try:
        # 1. teacher
        t0 = time.perf_counter()
        weights = Path(teacher_cfg.output.dir) / "digits_cnn.safetensors"
        progress(f"teacher: digits_cnn on the bundled digits, {plan.teacher_epochs} epochs")
        if weights.is_file():
            from ..models import load_classifier

            teacher_top1 = load_classifier(weights)[1].accuracy
            progress.done(f"kept {weights} (top-1 {_fmt(teacher_top1)} %)")
        else:
            from ..engine.teacher import train_teacher

            teacher_top1 = train_teacher(teacher_cfg)["top1"]
            progress.done(f"top-1 {teacher_top1:.1f} % -> {weights}")
        seconds["teacher"] = round(time.perf_counter() - t0, 1)
        if teacher_top1 is not None:
            parent.log_metrics({"teacher_top1": float(teacher_top1)}, step=0)

        ensure_ray(address)
        base = with_absolute_paths(base.model_copy(update={"name": f"quickstart-{method}"}))
        teacher_id = load_models(base, resolve_runtime("cpu")).teacher_id

        # 2. generation
        t0 = time.perf_counter()
        pool = folder / "pool"
        images = plan.shards * (base.synthesis.warmup_calls + plan.calls_per_shard) * base.synthesis.batch_size
        progress(f"generation: {method} on Ray Data, {plan.shards} shards (~{images} images) -> {pool}")
        manifest = generate(base, pool, shards=plan.shards, calls_per_shard=plan.calls_per_shard, actors=workers, mode="resume")
        seconds["generate"] = round(time.perf_counter() - t0, 1)
        progress.done(f"{manifest['rows']} images in {seconds['generate']:.0f} s")

        # 3. dictionary
        t0 = time.perf_counter()
        progress(f"dictionary: distributed k-means, N = {base.kdci.n}, {workers} shard actors")
        dictionary = dictionary_for_config(base, pool, teacher=teacher_id, cache_dir=folder / "dictionaries", shards=workers)
        dictionary_path = dictionary.save(folder / f"dictionary-n{base.kdci.n}.safetensors")
        seconds["dictionary"] = round(time.perf_counter() - t0, 1)
        progress.done(f"{dictionary.n} prototypes in {seconds['dictionary']:.0f} s")

        # 4. distillation, KDCI off and on, on the same pool
        runs = {}
        on_pool = base.model_copy(update={"pool": pool})
        variants = {
            "off": on_pool.model_copy(update={"name": f"{base.name}-kd", "kdci": base.kdci.model_copy(update={"enabled": False})}),
            "on": on_pool.model_copy(update={"name": f"{base.name}-kdci", "kdci": base.kdci.model_copy(
                update={"dictionary": dictionary_path, "rebuild_every": 0})}),
        }
        for key, cfg in variants.items():
            t0 = time.perf_counter()
            progress(f"distillation, KDCI {key}: Ray Train, {workers} DDP workers, {plan.distill_epochs} epochs")
            result, _ = distill_on_ray_tracked(cfg, experiment=experiment, tracking_uri=uri, parent_run_id=parent.run_id,
                                               num_workers=workers, use_gpu=False, storage_path=folder / "runs")
            seconds[f"distill_kdci_{key}"] = round(time.perf_counter() - t0, 1)
            runs[key] = result
            final = result.final
            progress.done(f"student top-1 {final.get('test_top1'):.2f} %" + (
                f" (compensated {final['test_top1_compensated']:.2f} %)" if "test_top1_compensated" in final else "")
                + f" in {seconds[f'distill_kdci_{key}']:.0f} s")
        figure = student_tsne({"KD (KDCI off)": runs["off"].run_dir / "student.safetensors",
                               "KDCI": runs["on"].run_dir / "student.safetensors"}, base, folder / "student_tsne.png", limit=600)
        parent.log_artifact(figure, "figures")

        # 5. sweep over N and alpha on the same pool (each N's dictionary built once, cached)
        t0 = time.perf_counter()
        space = {"kdci.n": list(plan.n_values), "kdci.alpha": list(plan.alpha_values)}
        progress(f"Tune sweep: {len(plan.n_values) * len(plan.alpha_values)} trials over N {list(plan.n_values)} x alpha "
                 f"{list(plan.alpha_values)}, {plan.sweep_epochs} epochs each, ASHA")
        swept = sweep(
            on_pool.model_copy(update={"optim": base.optim.model_copy(update={"epochs": plan.sweep_epochs})}), space,
            scheduler="asha", grace_period=max(1, plan.sweep_epochs // 2), max_concurrent_trials=2, workers_per_trial=1,
            storage_path=folder / "tune", name="sweep", experiment=experiment, tracking_uri=uri, parent_run_id=parent.run_id,
            dictionary_shards=workers, dictionary_cache=folder / "dictionaries",
        )
        seconds["sweep"] = round(time.perf_counter() - t0, 1)
        progress.done(f"{len(swept['trials'])} trials in {seconds['sweep']:.0f} s")

        progress("summary")
        summary = _summarize(parent, folder, size, method, teacher_top1, manifest, runs, swept, seconds, uri, experiment)
    except BaseException:
        parent.end("FAILED")
        raise
    parent.end()
    return summary


def _summarize(parent, folder: Path, size, method, teacher_top1, manifest, runs, swept, seconds, uri, experiment) -> dict:
    summary = {
        "size": size, "method": method, "teacher_top1": teacher_top1, "pool_rows": manifest["rows"],
        "kd": _scores(runs["off"].final), "kdci": _scores(runs["on"].final),
        "sweep": [{k: r.get(k) for k in ("kdci.n", "kdci.alpha", "epochs", "val_agreement", "test_top1", "test_top1_compensated", "error")}
                  for r in swept["trials"]],
        "best": swept["best"], "selected_on": swept["selected_on"], "rank_correlation": swept["rank_correlation"], "seconds": seconds, "total_seconds": round(sum(seconds.values()), 1),
        "storage": str(folder), "tracking_uri": uri, "mlflow_run_id": parent.run_id, "experiment": experiment,
        "experiment_id": parent.client.get_run(parent.run_id).info.experiment_id,
    }
    (folder / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    table = summary_table(summary)
    (folder / "summary.md").write_text(table)
    parent.log_artifact(folder / "summary.json")
    parent.log_artifact(folder / "summary.md")
    parent.describe("**kdci-ray quickstart**: teacher training, Ray Data generation, the distributed dictionary, KD and KD + KDCI "
                    "on Ray Train, and a Ray Tune sweep (child runs).\n\n" + table)
    parent.log_metrics({"kd_test_top1": summary["kd"]["test_top1"], "kdci_test_top1": summary["kdci"]["test_top1"],
                        "total_seconds": summary["total_seconds"]}, step=0)
    return summary


def _scores(final: dict) -> dict:
    return {"test_top1": final.get("test_top1"), "test_top1_compensated": final.get("test_top1_compensated"), "epochs": final.get("epoch")}


def failed_trials(summary: dict) -> list[dict]:
    return [r for r in summary["sweep"] if r.get("error")]


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.2f}" if isinstance(value, float) else str(value)


def summary_table(summary: dict) -> str:
    """The summary as Markdown: the KD / KDCI comparison, the sweep's trials, stage times, and where to look."""
    lines = [
        f"teacher digits_cnn: top-1 {_fmt(summary['teacher_top1'])} %; substitution data: {summary['pool_rows']} {summary['method']} images",
        "",
        "| student (digits_cnn_small) | top-1 % | compensated top-1 % |",
        "|---|---|---|",
        f"| {summary['method']} (KD, KDCI off) | {_fmt(summary['kd']['test_top1'])} | - |",
        f"| {summary['method']} + KDCI | {_fmt(summary['kdci']['test_top1'])} | {_fmt(summary['kdci']['test_top1_compensated'])} |",
        "",
        f"| sweep (selected on {summary.get('selected_on', 'val_agreement')}): N | alpha | epochs | agreement with teacher, held-out % "
        "| top-1 % | compensated % |",
        "|---|---|---|---|---|---|",
    ]
    best = summary.get("best") or {}
    for r in summary["sweep"]:
        epochs = "-" if r["epochs"] is None else int(r["epochs"])
        chosen = " (chosen)" if best and (r["kdci.n"], r["kdci.alpha"]) == (best.get("kdci.n"), best.get("kdci.alpha")) else ""
        lines.append(f"| {r['kdci.n']}{chosen} | {r['kdci.alpha']} | {epochs} | {_fmt(r.get('val_agreement'))} | {_fmt(r['test_top1'])} | "
                     f"{_fmt(r['test_top1_compensated'])} |")
    rho = (summary.get("rank_correlation") or {}).get("spearman")
    if rho is not None:
        lines.append(f"\nSpearman rank correlation of held-out agreement and test top-1 over the trials: {rho:+.2f}")
    lines += ["", "seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in summary["seconds"].items()) + f" (total {summary['total_seconds']:.0f})"]
    return "\n".join(lines) + "\n"
