"""Ray Tune over a distillation config: the search space is overrides of the config (dotted keys such as
`kdci.n`, `kdci.alpha`, `kdci.hidden`, `kd.temperature`, `kdci.uniform_attention`), every trial a Ray
Train distillation (a function trainable that calls `TorchTrainer.fit()` and reports each epoch through
Tune's `TuneReportCallback`), ASHA stopping on the per-epoch rank-0 metric, one MLflow parent run per
sweep and a child run per trial.

Spaces: `{"kdci.n": [8, 16], "kdci.alpha": [0.5, 1.0]}` is a grid (search="grid") or the values to draw
from (search="random" / "optuna"); `{"kdci.alpha": {"uniform": [0.1, 2.0]}}` (or loguniform) is continuous.
Every value is validated against the config before any trial starts. Tune restores a killed sweep's
trials and search state, not ASHA's rungs: after a resume, stopping starts comparing afresh. Trials of one sweep share cached
dictionaries only where their data is the same (fixed pools); a sweep killed mid-way resumes from its
storage folder: finished trials are kept, unfinished ones continue from their Train checkpoints.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from .. import console
from ..config import DistillConfig, apply_overrides, validate_config, with_absolute_paths
from ..engine.distill import check_dictionary_size, preflight
from .session import check_gpu_fraction, check_gpu_workers_see_cuda, cluster_gpus, ensure_ray, train_worker_resources
from .train import distill_on_ray, resolve_storage

log = logging.getLogger(__name__)
_TRIAL_CPU = 0.01
CELL = "cell"  # the search-space key that picks a trial's base config when a sweep has several (a results table)


def _override_list(overrides: dict[str, Any]) -> list[str]:
    return [f"{key}={json.dumps(value)}" for key, value in overrides.items()]


def check_space(cfg: DistillConfig, space: dict[str, Any], available: int | None = None) -> None:
    """Every candidate value (or both ends of a range) must make a valid config: errors name the key.
    `available`: the images a trial's first dictionary build has (every candidate's kdci.n is checked against it)."""
    if not space:
        raise ValueError("the search space is empty: give at least one key, e.g. kdci.n=[8,16]")
    base = cfg.model_dump(mode="json")
    for key, spec in space.items():
        if isinstance(spec, dict):
            if len(spec) != 1 or next(iter(spec)) not in ("uniform", "loguniform") or len(next(iter(spec.values()))) != 2:
                raise ValueError(f"search space {key}: a range is {{uniform: [low, high]}} or {{loguniform: [low, high]}}, got {spec}")
            values = next(iter(spec.values()))
            low, high = values
            if not (isinstance(low, (int, float)) and isinstance(high, (int, float)) and low < high):
                raise ValueError(f"search space {key}: a range needs numbers low < high, got {values}")
            if next(iter(spec)) == "loguniform" and low <= 0:
                raise ValueError(f"search space {key}: loguniform needs low > 0, got {low}")
            values = [low, high, low + (high - low) / 3]  # and a value inside: an integer field refuses a float range here
        elif isinstance(spec, list) and spec:
            values = spec
        else:
            raise ValueError(f"search space {key}: give a non-empty list of values or a range, got {spec!r}")
        for value in values:
            trial = validate_config(DistillConfig, apply_overrides(copy.deepcopy(base), _override_list({key: value})), f"search space {key}={value!r}")
            if available is not None:  # kdci.n, or kdci.enabled turning KDCI on, against the data
                try:
                    check_dictionary_size(trial, available)
                except ValueError as exc:
                    raise ValueError(f"search space {key}={value!r}: {exc}") from None


def _domains(space: dict[str, Any], search: str) -> dict[str, Any]:
    from ray import tune

    out = {}
    for key, spec in space.items():
        if isinstance(spec, dict):
            kind, (low, high) = next(iter(spec.items()))
            out[key] = tune.uniform(low, high) if kind == "uniform" else tune.loguniform(low, high)
        else:
            out[key] = tune.grid_search(spec) if search == "grid" else tune.choice(spec)
    return out


def _trial(config: dict, bases: dict, parent: dict, settings: dict) -> None:
    """One trial: its base config (the sweep's, or its cell's in a table) with this trial's overrides,
    distilled on Ray Train; its epochs reach Tune through TuneReportCallback and MLflow through a child run
    of the sweep's parent run."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from ..tracking.logger import MlflowRunLogger
    from ..tracking.runs import log_run_files
    from ..tracking.store import client

    overrides = dict(config)
    cell = overrides.pop(CELL, "")
    raw = apply_overrides(copy.deepcopy(bases[cell]), _override_list(overrides))
    trial_id = tune.get_context().get_trial_id()
    raw["name"] = f"{raw['name']}-{trial_id}"
    prebuilt = settings.get("dictionaries", {}).get(str(raw["kdci"]["n"]))
    if raw["kdci"]["enabled"] and prebuilt is not None:  # this N's dictionary, built once for the sweep on its fixed pool
        raw["kdci"].update(dictionary=prebuilt, rebuild_every=0)
    cfg = validate_config(DistillConfig, raw, f"trial {trial_id}")
    mlflow_client = client(parent["uri"])
    child = MlflowRunLogger.find(mlflow_client, parent["experiment_id"], {"kdci.trial_id": trial_id})
    if child is not None and child.status == "FINISHED":
        # Logged to the end before the sweep was killed (Tune had not recorded the trial): report, log nothing twice.
        result = distill_on_ray(cfg, num_workers=settings["workers"], use_gpu=settings["use_gpu"], cpus_per_worker=settings["cpus_per_worker"],
                                gpus_per_worker=settings["gpus_per_worker"], storage_path=settings["storage"], max_failures=0, probe_cuda=False)
        tune.report({k: float(v) for k, v in result.final.items() if isinstance(v, (int, float))})
        return
    if child is None:
        child = MlflowRunLogger.start(parent["experiment"], cfg.name, uri=parent["uri"], parent=MlflowRunLogger(mlflow_client, parent["run_id"]),
                                      tags={"kdci.trial_id": trial_id, **{f"trial.{k}": str(v) for k, v in config.items()}})
        child.log_config(cfg)
    try:
        result = distill_on_ray(
            cfg, num_workers=settings["workers"], use_gpu=settings["use_gpu"], cpus_per_worker=settings["cpus_per_worker"],
            gpus_per_worker=settings["gpus_per_worker"],
            storage_path=settings["storage"], max_failures=0, callbacks=[TuneReportCallback()],
            mlflow_run={"uri": parent["uri"], "run_id": child.run_id}, probe_cuda=False,  # the sweep probed once
            progress=False,  # the driver prints each trial's epochs (trial_lines); the workers' lines would interleave
        )
    except BaseException:
        child.end("KILLED")  # ASHA stopping a trial, or an error: the run stays, marked as not finished
        raise
    if (result.run_dir / "student.safetensors").is_file():
        from ..data import dataset_info
        from ..tracking.runs import log_student_model

        info = dataset_info(cfg.data.dataset)
        log_student_model(child, result.run_dir / "student.safetensors", (info.channels, info.image_size, info.image_size))
    if result.resumed_from >= cfg.optim.epochs:
        # The Train run had already finished (the sweep was killed after it, before Tune recorded the trial):
        # nothing was trained or reported now, so give Tune the run's final epoch.
        tune.report({k: float(v) for k, v in result.final.items() if isinstance(v, (int, float))})
    log_run_files(child, result.run_dir)
    child.end()


# Keys that change what a dictionary is or how a run uses it (beyond N): a sweep over one of them leaves
# the dictionaries to the trials.
_DICTIONARY_KEYS = {"seed", "pool", "kdci.feature", "kdci.niter", "kdci.nredo", "kdci.pca_dim", "kdci.max_train_points",
                    "kdci.dictionary", "kdci.rebuild_every"}
_DICTIONARY_SECTIONS = ("teacher.", "data.")


def _pool_dictionaries(cfg: DistillConfig, space: dict[str, Any], cache: Path, folder: Path, shards: int) -> dict[str, str]:
    """On a fixed pool, the dictionary of every N the sweep can try, built once (and cached in `cache`
    across sweeps) instead of once per trial; {} where trials must build their own."""
    n_spec = space.get("kdci.n", [cfg.kdci.n])
    kdci_values = space.get("kdci.enabled", [cfg.kdci.enabled])
    if (cfg.pool is None or cfg.kdci.dictionary is not None or not isinstance(n_spec, list)
            or not isinstance(kdci_values, list) or not any(kdci_values) or _DICTIONARY_KEYS & set(space)
            or any(key.startswith(_DICTIONARY_SECTIONS) for key in space)):
        return {}
    from ..engine.distill import load_models
    from ..engine.runtime import resolve_runtime
    from .dictionary import dictionary_for_config

    teacher_id = load_models(cfg, resolve_runtime("cpu")).teacher_id
    paths = {}
    for n in sorted(set(n_spec)):
        dictionary = dictionary_for_config(cfg, cfg.pool, teacher=teacher_id, cache_dir=cache, shards=shards, n=int(n))
        paths[str(n)] = str(dictionary.save(folder / "dictionaries" / f"dictionary-n{n}.safetensors"))
    log.info("tune: dictionaries for N in %s built on the pool (trials load them)", sorted(set(n_spec)))
    return paths


def concurrent_trials(cap: int | None, gpus: float, gpus_per_worker: float | None, workers_per_trial: int) -> int:
    """Trials at once: the user's cap, else as many as the cluster's `gpus` hold (a 0.25 fraction runs 4
    trials per GPU), else 2 (CPU trials share the machine)."""
    if cap:
        return cap
    if gpus > 0:
        return max(1, int(gpus // ((gpus_per_worker or 1.0) * workers_per_trial)))
    return 2


def sweep(
    cfg: DistillConfig,
    space: dict[str, Any],
    *,
    search: str = "grid",
    num_samples: int = 1,
    scheduler: str = "asha",
    metric: str = "val_agreement",
    mode: str | None = None,
    grace_period: int = 1,
    max_concurrent_trials: int | None = None,
    workers_per_trial: int = 1,
    cpus_per_worker: float | None = None,
    use_gpu: bool | None = None,
    gpus_per_worker: float | None = None,
    storage_path: str | Path | None = None,
    name: str | None = None,
    experiment: str = "kdci",
    tracking_uri: str | None = None,
    parent_run_id: str | None = None,
    dictionary_shards: int = 2,
    dictionary_cache: str | Path | None = None,
    cells: dict[str, DistillConfig] | None = None,
    verbose: int | None = None,
    address: str | None = None,
) -> dict:
    """Run the sweep (or resume it from `<storage>/<name>`); returns one row per trial and the best.
    `parent_run_id`: nest the sweep's MLflow run under that run (a quickstart or pipeline run). On a fixed
    pool the dictionaries of the listed N are built once up front (`dictionary_shards` actors, cached in
    `dictionary_cache`, default `<storage>/dictionaries`).
    `cells`: several base configs (e.g. method x teacher/student pairs), each trial one of them (the grid
    key "cell") with the space's overrides; `cfg` is then only the first of them."""
    from ..tracking import plots
    from ..tracking.logger import MlflowRunLogger
    from ..tracking.store import client, experiment_id, tracking_uri as resolve_uri

    if search not in ("grid", "random", "optuna"):
        raise ValueError(f"search = {search!r}: use grid, random or optuna")
    if scheduler not in ("asha", "fifo"):
        raise ValueError(f"scheduler = {scheduler!r}: use asha or fifo")
    mode = mode or ("min" if metric in LOWER_IS_BETTER or metric.startswith("val_kl") else "max")
    configs = {key: with_absolute_paths(c) for key, c in (cells or {"": cfg}).items()}
    if not configs:
        raise ValueError("cells is empty: give at least one base config")
    # ASHA and Optuna compare trials on `metric` at every report: every epoch must be evaluated.
    every_epoch = scheduler == "asha" or search == "optuna"
    for key, c in configs.items():
        where = f"{key}: " if key else ""
        if every_epoch and c.eval_every != 1:
            raise ValueError(f"{where}eval_every = {c.eval_every}: {scheduler}/{search} compares {metric} every epoch; set eval_every: 1 "
                             "(or use --scheduler fifo with grid/random search)")
        if metric.startswith("val_") and c.validation.images == 0:
            raise ValueError(f"{where}metric = {metric}: validation.images = 0 holds out nothing to score; set validation.images "
                             "(default 512) or select on another metric")
        known = reported_metrics(c)
        if metric not in known:
            raise ValueError(f"{where}metric = {metric!r}: the trials report {', '.join(sorted(known))}")
    check_gpu_fraction(gpus_per_worker, workers_per_trial, "--workers-per-trial")
    if search == "optuna":
        try:
            import optuna  # noqa: F401
        except ImportError:
            raise ValueError("search = optuna needs the optuna package: pip install -e \".[optuna]\" (or use --search random)") from None
    if CELL in space:
        raise ValueError(f"search space {CELL}: reserved for the base config of a table's trials; name a config key")
    uri = resolve_uri(tracking_uri)  # an unreachable store: said in seconds, before models load
    for c in configs.values():  # everything a trial would refuse in its first seconds, refused before Ray starts
        check_space(c, space, preflight(c, workers_per_trial, check_n=False))
    cfg = next(iter(configs.values()))
    storage = resolve_storage(storage_path)
    name = name or f"{cfg.name}-sweep"
    ray = ensure_ray(address)
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if not console.is_verbose():
        # Tune's newer console output prints its experiment box and paths even at verbose 0; the older one
        # is silent there, and trial_lines tells the sweep's story instead.
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    console.quiet_console_handlers()  # (handlers Tune's import added)

    # Each trial's workers must fit the cluster (refused here, not left pending by Tune for ever).
    use_gpu, resources = train_worker_resources(ray, workers_per_trial, use_gpu, gpus_per_worker, 1.0, what="--workers-per-trial")
    if use_gpu:
        check_gpu_workers_see_cuda(ray, resources, "trial worker")
    concurrent = concurrent_trials(max_concurrent_trials, cluster_gpus(ray)[0] if use_gpu else 0.0, gpus_per_worker, workers_per_trial)
    if cpus_per_worker is None and not use_gpu:
        # CPU trials share the machine: `concurrent` trials fit at once, with one CPU of slack — a finished
        # trial's Train actors release their resources asynchronously, and a next trial that needs every CPU
        # waits for them (Train retries its worker-group start without end, as for an autoscaling cluster).
        cpus = float(ray.cluster_resources().get("CPU", 1))
        cpus_per_worker = max(0.05, (cpus - 1 - _TRIAL_CPU * concurrent) / (concurrent * workers_per_trial))
    mlflow_client = client(uri)
    exp_id = experiment_id(mlflow_client, experiment)
    domains = _domains(space, search)  # before any run is created: bad ranges fail here
    from ..engine.distill import config_identity

    sweep_tags = {"kdci.space": json.dumps(space), "kdci.configs": json.dumps({k: config_identity(c) for k, c in sorted(configs.items())})}
    parent = MlflowRunLogger.find(mlflow_client, exp_id, {"kdci.sweep": str(storage / name)})
    if parent is not None and any(parent.client.get_run(parent.run_id).data.tags.get(k) != v for k, v in sweep_tags.items()):
        raise ValueError(f"sweep {name} in {storage} was started with another search space or config; give this one another name "
                         "(kdci-ray tune --name, kdci-ray reproduce --table-set name=...) or remove that folder to start over")
    dictionaries = {} if cells else _pool_dictionaries(cfg, space, dictionary_cache or storage / "dictionaries", storage / name,
                                                       shards=dictionary_shards)
    if parent is None:
        outer = None if parent_run_id is None else MlflowRunLogger(mlflow_client, parent_run_id)
        parent = MlflowRunLogger.start(experiment, name, uri=uri, parent=outer,
                                       tags={"kdci.sweep": str(storage / name), **sweep_tags})
        if cells:
            parent.log_params({f"cell.{key}": c.name for key, c in configs.items()})
        else:
            parent.log_config(cfg)
            if cfg.pool is not None:  # every trial reads the same substitution data: shown once, on the sweep
                from ..engine.distill import make_source
                from ..tracking.runs import log_substitution_figures

                log_substitution_figures(parent, cfg, make_source(cfg))
    settings = {"workers": workers_per_trial, "use_gpu": use_gpu, "cpus_per_worker": cpus_per_worker, "gpus_per_worker": gpus_per_worker,
                "storage": str(storage / name / "trials"),
                "dictionaries": dictionaries}
    # What every trial shares goes in as parameters (not in the search space: it is not searched, not shown).
    trainable = tune.with_parameters(
        _trial, bases={key: c.model_dump(mode="json") for key, c in configs.items()}, settings=settings,
        parent={"uri": uri, "run_id": parent.run_id, "experiment": experiment, "experiment_id": exp_id},
    )
    # The trial function only waits on its TorchTrainer: it holds a sliver of a CPU, the Train workers the rest.
    trainable = tune.with_resources(trainable, {"CPU": _TRIAL_CPU})
    param_space = {CELL: tune.grid_search(list(configs)), **domains} if cells else domains
    path = storage / name
    if tune.Tuner.can_restore(str(path)):
        log.info("tune: resuming %s", path)
        tuner = tune.Tuner.restore(str(path), trainable, resume_unfinished=True, resume_errored=True, param_space=param_space)
    else:
        search_alg = None
        if search == "optuna":
            from ray.tune.search.optuna import OptunaSearch

            search_alg = OptunaSearch()
        tuner = tune.Tuner(
            trainable, param_space=param_space,
            tune_config=tune.TuneConfig(
                metric=metric if every_epoch else None, mode=mode if every_epoch else None, num_samples=num_samples, search_alg=search_alg, max_concurrent_trials=concurrent,
                # max_t one past the last epoch: a trial that trains every epoch ends by itself (writing its
                # student and final artifacts) instead of being stopped at its last report.
                scheduler=ASHAScheduler(time_attr="epoch", max_t=max(c.optim.epochs for c in configs.values()) + 1, grace_period=grace_period, reduction_factor=2)
                if scheduler == "asha" else FIFOScheduler(),
            ),
            run_config=tune.RunConfig(name=name, storage_path=str(storage), verbose=(2 if console.is_verbose() else 0) if verbose is None else verbose,
                                      callbacks=[trial_lines(metric, trial_count(space, search, num_samples, len(configs) if cells else 1),
                                                             max(c.optim.epochs for c in configs.values()))]),
        )
    t0 = time.perf_counter()
    try:
        grid = tuner.fit()
    except BaseException:
        parent.end("FAILED")
        raise
    # A trial ASHA stopped was killed inside its Train run: its MLflow run could not end itself.
    for run in mlflow_client.search_runs([exp_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent.run_id}' and attributes.status = 'RUNNING'"):
        mlflow_client.set_tag(run.info.run_id, "kdci.stopped_early", "true")
        mlflow_client.set_terminated(run.info.run_id, "KILLED")
    rows = []
    for result in grid:
        overrides = dict(result.config or {})
        metrics = result.metrics or {}
        shown = (metric, "val_agreement", "test_top1", "test_top1_compensated", "test_top1_best", "test_top1_best_epoch",
                 "test_top1_compensated_best", "test_top1_val_selected")
        rows.append({**overrides, "trial_id": metrics.get("trial_id"), "epochs": metrics.get("epoch"), **{k: metrics.get(k) for k in shown},
                     "error": None if result.error is None else str(result.error)})
    finished = [r for r in rows if r.get(metric) is not None]
    best = (max if mode == "max" else min)(finished, key=lambda r: r[metric]) if finished else None
    saw_test = metric.startswith("test_")
    summary = {"name": name, "storage": str(path), "mlflow_parent_run_id": parent.run_id, "trials": rows, "best": best,
               "selected_on": metric, "mode": mode, "selection_saw_test_labels": saw_test,
               "note": (f"selected on {metric}: the selection saw the test labels (test-set tuning; not a data-free result)" if saw_test
                        else f"selected on {metric} (held-out substitution data, no labels); test_top1 is reported, never used"),
               "rank_correlation": rank_correlation(finished, "val_agreement", "test_top1"),
               "seconds": round(time.perf_counter() - t0, 1)}
    if saw_test:
        log.warning("tune %s: %s", name, summary["note"])
    parent.set_tags({"kdci.selection_metric": metric, "kdci.selection_saw_test_labels": str(saw_test).lower()})
    report = path / "sweep.json"
    report.write_text(json.dumps(summary, indent=1, default=str))
    parent.log_artifact(report)
    if "kdci.n" in space and finished:
        group = "kdci.alpha" if "kdci.alpha" in space else None
        plot_rows = [{"n": r["kdci.n"], "group": r.get(group) if group else "all", metric: r[metric]} for r in finished]
        label = "alpha" if group else "trials"
        parent.log_artifact(plots.metric_vs_n(plot_rows, path / "top1_vs_n.png", metric=metric, group="group", group_label=label), "figures")
    if best is not None:
        parent.log_metrics({f"best_{metric}": float(best[metric])}, step=0)
    parent.describe(sweep_description(summary, space))
    parent.end()
    return summary


def trial_count(space: dict[str, Any], search: str, num_samples: int, cells: int = 1) -> int:
    """Trials a sweep starts: every grid point (x cells) num_samples times, or num_samples draws."""
    if search != "grid":
        return num_samples
    points = 1
    for spec in space.values():
        points *= len(spec) if isinstance(spec, list) else 1
    return points * cells * num_samples


_SHORT = {"kdci.n": "N", "kdci.alpha": "alpha", CELL: "cell"}


def trial_lines(metric: str, n_trials: int, epochs: int, lines: int = 24):
    """A Tune callback (on the driver) that tells a sweep's story: about `lines` lines of trial results in all (a
    trial's every epoch with --verbose), each with the trial's values and the sweep's elapsed time and what is
    left at most (ASHA stops some trials early), and one line per finished, stopped or failed trial."""
    from ray import tune

    from ..console import Progress, duration

    class TrialLines(tune.Callback):
        def __init__(self):
            self.progress = Progress(n_trials * epochs)
            self.every = 1 if console.is_verbose() else max(1, round(epochs / max(1, lines // n_trials)))
            self.epochs_done, self.last = 0, {}

        def _label(self, trials_now, trial) -> str:
            values = ", ".join(f"{_SHORT.get(key, key)} = {value}" for key, value in (trial.config or {}).items())
            number = trials_now.index(trial) + 1 if trial in trials_now else "?"
            return f"trial {number}/{max(n_trials, len(trials_now))} ({values})"

        def _scores(self, result: dict) -> str:
            keys = [metric] + (["test_top1"] if metric != "test_top1" else [])
            return ", ".join(f"{key} {result[key]:.2f}{' %' if 'top1' in key or 'agreement' in key else ''}"
                             for key in keys if isinstance(result.get(key), (int, float)))

        def on_trial_result(self, iteration, trials, trial, result, **info):
            epoch = int(result.get("epoch", 0) or 0)
            self.epochs_done += 1
            self.last[trial.trial_id] = result
            if epoch % self.every == 0 and epoch < epochs:  # (the last epoch: on_trial_complete says it)
                log.info("%s epoch %d/%d: %s  [%d/%d trial epochs, %s at most]", self._label(trials, trial), epoch, epochs,
                         self._scores(result), self.epochs_done, n_trials * epochs, self.progress.eta(self.epochs_done))

        def on_trial_complete(self, iteration, trials, trial, **info):
            result = self.last.get(trial.trial_id, {})
            epoch = int(result.get("epoch", 0) or 0)
            how = "finished" if epoch >= epochs else f"stopped by {'ASHA' if epoch else 'Tune'} after epoch {epoch}"
            log.info("%s %s: %s  [%s]", self._label(trials, trial), how, self._scores(result),
                     duration(time.perf_counter() - self.progress.t0))

        def on_trial_error(self, iteration, trials, trial, **info):
            log.warning("%s failed (its error is in the sweep summary and in %s)", self._label(trials, trial), trial.local_path)

    return TrialLines()


def sweep_description(summary: dict, space: dict) -> str:
    """The sweep's parent run description (Markdown): what ran, what it selected on, every trial."""
    keys = [k for k in space if k != CELL]
    lines = [f"**Sweep {summary['name']}**: {len(summary['trials'])} trials over {', '.join(keys) or 'cells'}. {summary['note']}.", "",
             "| " + " | ".join([*([CELL] if any(CELL in t for t in summary["trials"]) else []), *keys, "epochs", summary["selected_on"],
                                 "test_top1", "error"]) + " |"]
    lines.append("|" + "---|" * (lines[-1].count("|") - 1))
    for t in summary["trials"]:
        cells = [*([str(t.get(CELL))] if CELL in t else []), *(str(t.get(k)) for k in keys), str(t.get("epochs")),
                 *(f"{t[k]:.2f}" if isinstance(t.get(k), float) else "-" for k in (summary["selected_on"], "test_top1")),
                 "failed" if t.get("error") else ""]
        lines.append("| " + " | ".join(cells) + " |")
    rho = (summary.get("rank_correlation") or {}).get("spearman")
    if rho is not None:
        lines += ["", f"Spearman rank correlation of val_agreement and test_top1 over the trials: {rho:+.2f}"]
    return "\n".join(lines)


LOWER_IS_BETTER = {"train_loss"}


def reported_metrics(cfg: DistillConfig) -> set[str]:
    """What every evaluated epoch of a trial of `cfg` reports (what a sweep may select and stop on)."""
    heads = ["test_top1"] + (["test_top1_compensated"] if cfg.kdci.enabled else [])
    known = {"train_loss", "test_top5", *heads, *(f"{h}_{p}" for h in heads for p in ("last", "best"))}
    if cfg.kdci.enabled:
        known.add("test_top5_compensated")
    if cfg.validation.images > 0:
        known |= {"val_agreement", "val_kl"} | ({"val_agreement_compensated", "val_kl_compensated"} if cfg.kdci.enabled else set())
    return known


def rank_correlation(rows: list[dict], a: str, b: str) -> dict | None:
    """Spearman's rho between two columns over the rows that have both (ties share their mean rank)."""
    pairs = [(r[a], r[b]) for r in rows if r.get(a) is not None and r.get(b) is not None]
    if len(pairs) < 3:
        return None

    def ranks(values):
        order = sorted(range(len(values)), key=values.__getitem__)
        out = [0.0] * len(values)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
                j += 1
            for k in range(i, j + 1):
                out[order[k]] = (i + j) / 2
            i = j + 1
        return out

    ra, rb = ranks([p[0] for p in pairs]), ranks([p[1] for p in pairs])
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    var = (sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb)) ** 0.5
    return {"between": [a, b], "spearman": None if var == 0 else round(cov / var, 4), "trials": len(pairs)}


def parse_space_args(items: list[str]) -> dict[str, Any]:
    """["kdci.n=[16, 64]", "kdci.alpha={uniform: [0.1, 2]}"] -> a search space (values parsed as YAML)."""
    import yaml

    space = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--space {item!r}: write key=[values] or key={{uniform: [low, high]}}")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise ValueError(f"--space {item!r}: the values are not valid YAML ({exc.problem})") from None
        space[key.strip()] = value if isinstance(value, (list, dict)) else [value]
    return space


def sweep_from_args(cfg: DistillConfig, args) -> dict:
    """`sweep()` from the shared command-line options (kdci-ray tune, jobs/tune.py)."""
    gpus = args.gpus_per_worker
    return sweep(
        cfg, parse_space_args(args.space), search=args.search, num_samples=args.samples, scheduler=args.scheduler, metric=args.metric,
        mode=args.mode, grace_period=args.grace_period, max_concurrent_trials=args.max_concurrent, workers_per_trial=args.workers_per_trial,
        use_gpu=None if gpus is None else gpus > 0, gpus_per_worker=gpus, storage_path=args.storage, name=args.name,
        experiment=args.experiment, tracking_uri=args.tracking_uri, address=getattr(args, "address", None),
    )
