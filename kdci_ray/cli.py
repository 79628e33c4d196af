"""`kdci-ray` command line: thin wrappers that parse arguments and call one library function each."""

from __future__ import annotations

import argparse
import json
import sys

from .config import ConfigError
from .console import VERBOSE_HELP, setup_logging
from .data import DatasetError
from .models import WeightsError
from .registry import UnknownNameError

# Errors whose message already tells the user what to fix: print it, no traceback (unless --debug).
USER_ERRORS = (ConfigError, DatasetError, WeightsError, UnknownNameError, FileExistsError, FileNotFoundError, ValueError,
               FloatingPointError)  # a diverged loss: its message names the fix (lower optim.lr)


def print_result(result: dict) -> None:
    """The command's result as one JSON line, the last line of stdout (scripts read it with `tail -1`). Ray is
    released first: it forwards log lines to the driver's stdout at any time, also after the work is done."""
    if "ray" in sys.modules:  # (a command that never used Ray imports nothing more)
        from .distributed.session import release_ray

        release_ray()
    print(json.dumps(result, default=str), flush=True)


def cmd_evaluate(args: argparse.Namespace) -> int:
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit {args.limit}: limit must be >= 1 (the number of images to evaluate; leave it out for all)")
    from .data import dataset_info, load_dataset
    from .engine import evaluate_classifier, resolve_runtime
    from .models import load_classifier

    info = dataset_info(args.dataset)  # unknown dataset: fail before loading weights
    model, card = load_classifier(args.weights, arch=args.arch, num_classes=args.num_classes)
    if card.num_classes != info.num_classes and args.num_classes is None:
        raise WeightsError(
            f"{args.weights} has {card.num_classes} classes but {args.dataset} has {info.num_classes}; "
            "pass --num-classes to evaluate anyway"
        )
    split = args.split or info.eval_split
    dataset = load_dataset(args.dataset, args.data_root, split, args.download, args.limit)
    runtime = resolve_runtime(args.device, args.precision, "auto")
    # The card's normalisation wins: it is what the weights were trained with.
    metrics = evaluate_classifier(model, dataset, args.batch_size, runtime, card.normalize_mean, card.normalize_std)
    print_result({"top1": round(metrics["top1"], 4), "top5": round(metrics["top5"], 4), "n": metrics["n"],
                  "arch": card.arch, "dataset": args.dataset, "split": split})
    return 0


def cmd_train_teacher(args: argparse.Namespace) -> int:
    from .config import TeacherTrainConfig, load_config
    from .engine import train_teacher

    cfg = load_config(args.config, TeacherTrainConfig, args.set)
    if args.workers:
        from .distributed.train import train_teacher_on_ray

        result = train_teacher_on_ray(cfg, num_workers=args.workers, address=args.address)
    else:
        result = train_teacher(cfg)
    print_result({"weights": result["weights"], "top1": round(result["top1"], 4), "top5": round(result["top5"], 4),
                  "seconds": round(result["seconds"], 1)})
    return 0


def cmd_distill(args: argparse.Namespace) -> int:
    from .config import DistillConfig, load_config
    from .engine.distill import distill_from_config

    cfg = load_config(args.config, DistillConfig, args.set)
    if cfg.synthesis is None and cfg.pool is None:
        raise ValueError(f"{args.config} has no `synthesis:` section and no `pool:`; name a DFKD method (see configs/<method>-*.yaml) or a Parquet pool")
    run_id = None
    if args.no_track:
        result = distill_from_config(cfg)
    else:
        from .tracking import distill_tracked, tracking_uri

        uri = tracking_uri(args.tracking_uri)  # an unreachable server is refused before any work
        result, run = distill_tracked(cfg, experiment=args.experiment, uri=uri)
        run_id = run.run_id
    final = result.final
    summary = {
        "run_dir": str(result.run_dir), "method": cfg.synthesis.method if cfg.pool is None else f"pool:{cfg.pool}", "kdci": cfg.kdci.enabled, "epochs": result.epoch,
        "finished": result.finished, "resumed_from": result.resumed_from, "test_top1": final.get("test_top1"),
        # labelled: the last epoch (ours), the best test epoch (the public protocol), data-free agreement on held-out data
        "test_top1_best": final.get("test_top1_best"), "test_top1_best_epoch": final.get("test_top1_best_epoch"),
        "val_agreement": final.get("val_agreement"),
    }
    if cfg.kdci.enabled:
        summary["test_top1_compensated"] = final.get("test_top1_compensated")
    if run_id is not None:
        summary["mlflow_run_id"] = run_id
    print_result(summary)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .models.export import export_student

    if args.check_images < 1:
        raise ValueError(f"--check-images {args.check_images}: must be >= 1")
    print_result(export_student(args.run, args.format, args.out, args.check_images, args.data_root))
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    """The MLflow UI on this machine's loopback, on the same store the runs were written to."""
    import os

    from .tracking.store import UI_VIEW, artifact_location, tracking_uri, ui_links

    uri = tracking_uri(args.tracking_uri)
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri, "--host", args.host, "--port", str(args.port)]
    artifacts = artifact_location(uri)
    if artifacts:
        cmd += ["--default-artifact-root", artifacts]
    base = f"http://{args.host}:{args.port}"
    print(f"MLflow UI: {base}/#/experiments?{UI_VIEW}  (store {uri}; Ctrl-C stops it)", file=sys.stderr)
    for name, link in ui_links(uri, base):  # straight to each experiment's training runs
        print(f"  {name}: {link}", file=sys.stderr)
    sys.stderr.flush()
    # Become the server (no wrapper process): signals to this process reach MLflow itself.
    os.execve(sys.executable, cmd, {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"})


def add_sweep_arguments(p: argparse.ArgumentParser) -> None:
    """The sweep options shared by `kdci-ray tune` and jobs/tune.py."""
    p.add_argument("--space", action="append", default=[], metavar="KEY=VALUES",
                   help="a searched config key: kdci.n=[16,64] (values) or kdci.alpha={uniform: [0.1, 2]} (range); repeatable")
    p.add_argument("--search", default="grid", choices=["grid", "random", "optuna"])
    p.add_argument("--samples", type=int, default=1, help="trials per grid point (grid) or in all (random/optuna)")
    p.add_argument("--scheduler", default="asha", choices=["asha", "fifo"], help="asha: stop poor trials early on the per-epoch metric")
    p.add_argument("--metric", default="val_agreement",
                   help="what trials are ranked and stopped on: val_agreement (default: agreement with the teacher on held-out "
                   "substitution data, data-free) or e.g. test_top1 (the test labels: the summary then says the selection saw them)")
    p.add_argument("--mode", default=None, choices=["max", "min"], help="default: min for val_kl and train_loss, else max")
    p.add_argument("--grace-period", type=int, default=1, help="epochs before ASHA may stop a trial")
    p.add_argument("--max-concurrent", type=int, help="trials at once (default: as many as the GPUs hold, e.g. 4 per GPU at "
                   "--gpus-per-worker 0.25; 2 on CPUs)")
    p.add_argument("--workers-per-trial", type=int, default=1, help="Ray Train DDP workers per trial")
    p.add_argument("--gpus-per-worker", type=float, help="fractional GPUs let several small trials share one GPU (e.g. 0.25)")
    p.add_argument("--storage", help="sweep storage (default: $KDCI_STORAGE/ray, else runs/ray)")
    p.add_argument("--name", help="sweep name (default: <config name>-sweep); the same name resumes")
    p.add_argument("--experiment", default="kdci", help="MLflow experiment")
    p.add_argument("--tracking-uri", help="MLflow store (default: MLFLOW_TRACKING_URI, else sqlite under runs/mlflow)")


def cmd_tune(args: argparse.Namespace) -> int:
    from .config import DistillConfig, load_config
    from .distributed.tune import sweep_from_args

    cfg = load_config(args.config, DistillConfig, args.set)
    summary = sweep_from_args(cfg, args)
    print_result(summary)
    return 0


def ui_command(uri: str) -> str:
    """The command that opens the UI on `uri` (short when it is what `kdci-ray ui` opens by default here)."""
    import os
    from pathlib import Path

    from .tracking.store import DEFAULT_DIR, default_uri

    default = os.environ.get("MLFLOW_TRACKING_URI") or (default_uri(Path(os.environ["KDCI_STORAGE"]) / "mlflow")
                                                        if os.environ.get("KDCI_STORAGE") else default_uri(DEFAULT_DIR))
    return "kdci-ray ui" if uri == default else f"kdci-ray ui --tracking-uri {uri}"


def cmd_quickstart(args: argparse.Namespace) -> int:
    from .distributed.quickstart import failed_trials, quickstart, summary_table

    summary = quickstart(size=args.size, config=args.config, storage_path=args.storage, tracking_uri=args.tracking_uri,
                         experiment=args.experiment, workers=args.workers, address=args.address)
    print(summary_table(summary), file=sys.stderr)
    from .tracking.store import UI_VIEW

    print(f"Everything is in MLflow (experiment {summary['experiment']}, run {summary['mlflow_run_id']}); open it with:\n\n"
          f"    {ui_command(summary['tracking_uri'])}\n\nthen http://127.0.0.1:5000/#/experiments/{summary['experiment_id']}/runs/"
          f"{summary['mlflow_run_id']}?{UI_VIEW} (this quickstart's run: its description, child runs and figures)\n", file=sys.stderr)
    print_result(summary)
    failed = failed_trials(summary)
    if failed:  # the table shows them; the exit code tells scripts
        print(f"kdci-ray quickstart: {len(failed)} sweep trial(s) failed (first: {failed[0]['error'][:500]}); run it again to retry them",
              file=sys.stderr)
        return 1
    return 0


def cmd_reproduce(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .config import TableConfig, load_config
    from .distributed.reproduce import reproduce

    table = load_config(args.config, TableConfig, args.table_set)
    out = reproduce(table, config_dir=Path(args.config).parent, overrides=args.set, storage_path=args.storage,
                    experiment=args.experiment, tracking_uri=args.tracking_uri, address=args.address)
    print(Path(out["files"]["markdown"]).read_text(), file=sys.stderr)
    print_result(out)
    return 1 if out["failed"] else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kdci-ray", description=__doc__)
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and the result line")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for input errors too")
    parser.add_argument("-v", "--verbose", action="store_true", help=VERBOSE_HELP)
    sub = parser.add_subparsers(dest="command", required=True)

    ev = sub.add_parser("evaluate", help="top-1/top-5 of a classifier on a labelled split; prints one JSON line")
    ev.add_argument("--arch", help="architecture (default: from the card beside the weights)")
    ev.add_argument("--weights", required=True, help=".safetensors, or a torch checkpoint (loaded weights_only)")
    ev.add_argument("--dataset", required=True)
    ev.add_argument("--data-root", help="dataset folder or .tar.gz (not needed for digits)")
    ev.add_argument("--split", help="labelled split (default: the dataset's evaluation split, e.g. test)")
    ev.add_argument("--limit", type=int, help="evaluate only the first N images")
    ev.add_argument("--num-classes", type=int)
    ev.add_argument("--batch-size", type=int, default=256)
    ev.add_argument("--device", default="auto")
    ev.add_argument("--precision", default="fp32", choices=["auto", "fp32", "bf16", "fp16"])
    ev.add_argument("--download", action="store_true", help="download the dataset if missing (where possible)")
    ev.set_defaults(func=cmd_evaluate)

    tt = sub.add_parser("train-teacher", help="train a classifier on labelled data; writes weights + card")
    tt.add_argument("--config", required=True, help="YAML config (see configs/teacher-*.yaml)")
    tt.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value, e.g. optim.epochs=5")
    tt.add_argument("--workers", type=int, help="train on Ray Train with this many DDP workers (local Ray, or --address / RAY_ADDRESS)")
    tt.add_argument("--address", help="Ray cluster address for --workers (default: RAY_ADDRESS, else a local Ray)")
    tt.set_defaults(func=cmd_train_teacher)

    di = sub.add_parser(
        "distill", help="data-free KD of a student with a DFKD method, with or without KDCI; resumes a run of the same name"
    )
    di.add_argument("--config", required=True, help="YAML config (see configs/<method>-<dataset>-<teacher>-<student>.yaml)")
    di.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value, e.g. kdci.enabled=false")
    di.add_argument("--no-track", action="store_true", help="no MLflow run (default: one run in the embedded store or --tracking-uri)")
    di.add_argument("--tracking-uri", help="MLflow store (default: MLFLOW_TRACKING_URI, else sqlite under runs/mlflow)")
    di.add_argument("--experiment", default="kdci", help="MLflow experiment name")
    di.set_defaults(func=cmd_distill)

    tu = sub.add_parser("tune", help="Ray Tune sweep of Ray Train distillations over config keys (N, alpha, ...), tracked in MLflow")
    tu.add_argument("--config", required=True, help="YAML config of the distillation (see configs/)")
    tu.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    tu.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    add_sweep_arguments(tu)
    tu.set_defaults(func=cmd_tune)

    qs = sub.add_parser("quickstart", help="the whole workflow on digits, nothing downloaded: teacher, generation, dictionary, "
                        "distillation with KDCI off and on, a 4-trial sweep; local Ray, embedded MLflow")
    qs.add_argument("--size", default="default", choices=["default", "ci"], help="ci: every stage at the smallest size (tests)")
    qs.add_argument("--config", default="configs/deepinv-digits-digits_cnn-digits_cnn_small.yaml",
                    help="the digits distill config whose DFKD method generates the data")
    qs.add_argument("--storage", help="where it all goes (default: $KDCI_STORAGE/ray, else runs/ray; under <storage>/quickstart)")
    qs.add_argument("--workers", type=int, default=2, help="generation actors, dictionary shards and DDP workers")
    qs.add_argument("--experiment", default="kdci-quickstart", help="MLflow experiment")
    qs.add_argument("--tracking-uri", help="MLflow store (default: MLFLOW_TRACKING_URI, else sqlite under runs/mlflow)")
    qs.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    qs.set_defaults(func=cmd_quickstart)

    rp = sub.add_parser("reproduce", help="a results table (methods x KDCI off/on x teacher/student pairs) as one Ray Tune grid; "
                        "writes table.md / table.csv / results.json")
    rp.add_argument("--config", required=True, help="table config (configs/table-*.yaml); cells are the distill configs beside it")
    rp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a value in every cell's config, e.g. optim.epochs=20")
    rp.add_argument("--table-set", action="append", default=[], metavar="KEY=VALUE", help="override a table setting, e.g. methods=[fast,cmi]")
    rp.add_argument("--storage", help="grid storage (default: $KDCI_STORAGE/ray, else runs/ray); the same storage resumes")
    rp.add_argument("--experiment", default="kdci-tables", help="MLflow experiment")
    rp.add_argument("--tracking-uri", help="MLflow store (default: MLFLOW_TRACKING_URI, else sqlite under runs/mlflow)")
    rp.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    rp.set_defaults(func=cmd_reproduce)

    ex = sub.add_parser("export", help="a distilled student alone for deployment (ONNX, TorchScript or safetensors) with its card, "
                        "checked against torch on test images; prints one JSON line")
    ex.add_argument("--run", required=True, help="a finished distillation run's folder (<output.dir>/<name>)")
    ex.add_argument("--format", required=True, choices=["onnx", "torchscript", "safetensors"])
    ex.add_argument("--out", help="the file to write (default: student.<onnx|pt|safetensors> in the run folder)")
    ex.add_argument("--check-images", type=int, default=512, help="test images the export is checked on")
    ex.add_argument("--data-root", help="the student's dataset (default: the run's data.root)")
    ex.set_defaults(func=cmd_export)

    ui = sub.add_parser("ui", help="serve the MLflow UI on 127.0.0.1 against the runs' store")
    ui.add_argument("--tracking-uri", help="MLflow store (default: MLFLOW_TRACKING_URI, else sqlite under runs/mlflow)")
    ui.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    ui.add_argument("--port", type=int, default=5000)
    ui.set_defaults(func=cmd_ui)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(verbose=args.verbose, quiet=args.quiet)
    try:
        return args.func(args)
    except USER_ERRORS as exc:
        if args.debug:
            raise
        print(f"kdci-ray {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
