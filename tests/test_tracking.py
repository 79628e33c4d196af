"""MLflow tracking on a real sqlite store (per-session, see conftest): a tracked distillation run's params,
per-epoch metrics, artifacts and figures read back through MLflow's client; parent/child runs; the UI
serving the runs on 127.0.0.1."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from kdci_ray.config import DistillConfig, load_config

REPO = Path(__file__).resolve().parents[1]


def test_a_tracked_distillation_run_logs_params_metrics_and_artifacts(digits_teacher, tmp_path):
    from kdci_ray.tracking import MlflowRunLogger, distill_tracked, tracking_uri
    from kdci_ray.tracking.store import client

    cfg = load_config(REPO / "configs" / "dfnd-digits-digits_cnn-digits_cnn_small.yaml", DistillConfig, [
        f"teacher.weights={digits_teacher}", f"output.dir={tmp_path}", "optim.epochs=2", "name=tracked",
    ])
    with MlflowRunLogger.start("kdci-test", "parent") as parent:
        result, run = distill_tracked(cfg, experiment="kdci-test", parent=parent)
    assert result.finished and tracking_uri() == os.environ["MLFLOW_TRACKING_URI"]
    mlflow = client()
    record = mlflow.get_run(run.run_id)
    assert record.info.status == "FINISHED" and record.data.tags["mlflow.parentRunId"] == parent.run_id
    assert record.data.params["kdci.n"] == str(cfg.kdci.n) and record.data.params["synthesis.method"] == "dfnd"
    assert record.data.tags["kdci"] == "true"
    history = mlflow.get_metric_history(run.run_id, "train_loss")
    assert [m.step for m in history] == [1, 2]
    assert {"test_top1", "test_top1_compensated", "attention_entropy", "images_per_s", "train_kd"} <= set(record.data.metrics)
    assert record.data.metrics["test_top1"] == pytest.approx(result.final["test_top1"])
    # The metrics that matter again in a section of their own, which MLflow's run page charts first (the rest: by name).
    for name in ("test_top1", "test_top1_compensated", "train_kd", "attention_entropy", "val_agreement"):
        assert [(m.step, m.value) for m in mlflow.get_metric_history(run.run_id, f"headline/{name}")] == [
            (m.step, m.value) for m in mlflow.get_metric_history(run.run_id, name)], name
    assert not [k for k in record.data.metrics if k.startswith("headline/") and k[9:] not in
                ("test_top1", "test_top1_compensated", "train_kd", "attention_entropy", "val_agreement")]

    def listing(path=None):
        return {a.path for a in mlflow.list_artifacts(run.run_id, path)}

    assert {"config.yaml", "metrics.json", "student", "dictionary", "figures"} <= listing()
    assert {"student/student.safetensors", "student/student.json"} <= listing("student")
    assert {"figures/substitution_images.png", "figures/class_proportions.png"} <= listing("figures")
    # The student as an MLflow model (MLflow 3: a logged model linked to the run).
    models = mlflow.search_logged_models(experiment_ids=[record.info.experiment_id])
    assert [m.name for m in models if m.source_run_id == run.run_id] == ["student_model"]
    # Artifacts live beside the sqlite store, not in the working directory.
    store_dir = Path(os.environ["MLFLOW_TRACKING_URI"].removeprefix("sqlite:///")).parent
    assert list(store_dir.glob(f"artifacts/{run.run_id}/artifacts/figures/class_proportions.png"))


def test_plots_write_images(tmp_path):
    from kdci_ray.tracking import plots

    g = np.random.default_rng(0)
    paths = [
        plots.image_grid(torch.randint(0, 256, (20, 3, 8, 8), dtype=torch.uint8), tmp_path / "grid.png"),
        plots.class_proportions([5, 1, 0, 4], [1, 1, 1, 1], tmp_path / "classes.png"),
        plots.metric_vs_n([{"n": n, "alpha": a, "test_top1": 80 + n / 10 + a} for n in (8, 16, 32) for a in (0.5, 1.0)], tmp_path / "n.png"),
        plots.tsne({"raw": g.normal(size=(60, 5)), "kdci": g.normal(size=(60, 5))}, np.arange(60) % 3, tmp_path / "tsne.png"),
    ]
    from PIL import Image

    for path in paths:
        with Image.open(path) as image:
            assert image.size[0] > 50 and image.size[1] > 50


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow(seconds=20)
def test_ui_serves_the_runs_on_localhost(tmp_path):
    from kdci_ray.tracking import MlflowRunLogger

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with MlflowRunLogger.start("kdci-ui", "shown", uri=uri) as run:
        run.log_metrics({"test_top1": 91.5}, step=1)
    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    server = subprocess.Popen([sys.executable, "-m", "kdci_ray.cli", "ui", "--port", str(port)], env=env, cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline, body = time.time() + 120, None
        while time.time() < deadline and body is None:
            try:
                with urllib.request.urlopen(f"{base}/api/2.0/mlflow/experiments/get-by-name?experiment_name=kdci-ui", timeout=5) as r:
                    body = json.loads(r.read())
            except OSError:
                if server.poll() is not None:
                    pytest.fail(server.stdout.read()[-3000:])
                time.sleep(1)
        assert body is not None, "the UI did not answer"
        experiment = body["experiment"]["experiment_id"]
        request = urllib.request.Request(f"{base}/api/2.0/mlflow/runs/search", data=json.dumps({"experiment_ids": [experiment]}).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as r:
            runs = json.loads(r.read())["runs"]
        assert [r["info"]["run_name"] for r in runs] == ["shown"]
        with urllib.request.urlopen(base + "/", timeout=10) as r:  # the UI page itself
            assert r.status == 200 and b"<html" in r.read().lower()
    finally:  # the server and the workers it started
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
    # Links that open the experiment on its training runs (MLflow 3.17's GenAI / Model training switch in the URL).
    assert f"kdci-ui: {base}/#/experiments/{experiment}?workflowType=machine_learning" in server.stdout.read()


def test_logging_a_model_leaves_the_default_store_alone(tmp_path, monkeypatch):
    """mlflow.set_tracking_uri writes MLFLOW_TRACKING_URI: after logging the student model the variable must be
    as it was (unset here), or every later default lookup in the process would go to MLflow's own default."""
    from kdci_ray.models import ModelCard, create_model, save_classifier
    from kdci_ray.tracking import MlflowRunLogger
    from kdci_ray.tracking.runs import log_student_model

    weights = save_classifier(create_model("digits_cnn_small", num_classes=10, in_channels=1), tmp_path / "s.safetensors",
                              ModelCard(arch="digits_cnn_small", num_classes=10, dataset="digits", in_channels=1))
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    with MlflowRunLogger.start("kdci-test", "model", uri=f"sqlite:///{tmp_path / 'mlflow.db'}") as run:
        log_student_model(run, weights, (1, 8, 8))
    assert "MLFLOW_TRACKING_URI" not in os.environ


def test_the_default_store_is_an_embedded_sqlite_database_in_a_predictable_place(tmp_path, monkeypatch):
    """Nothing named: runs/mlflow/mlflow.db under the working directory (artifacts beside it), or under
    $KDCI_STORAGE/mlflow on a cluster; a run written there is read back from the same place."""
    from kdci_ray.tracking import MlflowRunLogger
    from kdci_ray.tracking.store import client, tracking_uri

    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    monkeypatch.delenv("KDCI_STORAGE", raising=False)
    monkeypatch.chdir(tmp_path)
    assert tracking_uri() == f"sqlite:///{tmp_path / 'runs' / 'mlflow' / 'mlflow.db'}"
    with MlflowRunLogger.start("kdci-default", "here") as run:
        run.log_metrics({"test_top1": 50.0}, step=1)
        run.log_artifact(Path(__file__), "files")
    assert (tmp_path / "runs" / "mlflow" / "mlflow.db").is_file()
    assert list((tmp_path / "runs" / "mlflow" / "artifacts").glob(f"{run.run_id}/artifacts/files/test_tracking.py"))
    assert client().get_run(run.run_id).data.metrics == {"test_top1": 50.0, "headline/test_top1": 50.0}
    assert "MLFLOW_TRACKING_URI" not in os.environ

    monkeypatch.setenv("KDCI_STORAGE", str(tmp_path / "shared"))
    assert tracking_uri() == f"sqlite:///{tmp_path / 'shared' / 'mlflow' / 'mlflow.db'}"
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")  # inside `ray job submit`: a relative store is refused
    with pytest.raises(ValueError, match="absolute path"):
        tracking_uri("sqlite:///relative.db")


def test_an_unreachable_tracking_server_or_a_file_store_is_one_line_in_seconds(tmp_path):
    """MLflow's client would retry an unreachable server for minutes; the entry points say so at once (before
    any work or Ray start), and name the fix for MLflow's old file store."""
    import socket
    import subprocess
    import sys
    import time

    from kdci_ray.tracking.store import tracking_uri

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    with pytest.raises(ValueError, match=f"MLflow tracking server {dead} does not answer"):
        tracking_uri(dead)
    with pytest.raises(ValueError, match=r"file store, which MLflow 3 no longer takes: use a sqlite store, e\.g\. --tracking-uri sqlite:///"):
        tracking_uri(f"file://{tmp_path / 'mlruns'}")
    with pytest.raises(ValueError, match="file store"):
        tracking_uri(str(tmp_path / "mlruns"))
    repo = Path(__file__).resolve().parents[1]
    config = repo / "configs" / "dfnd-digits-digits_cnn-digits_cnn_small.yaml"
    for cmd in ([sys.executable, "-m", "kdci_ray.cli", "distill", "--config", str(config), "--set", f"output.dir={tmp_path / 'out'}",
                 "--tracking-uri", dead],
                [sys.executable, "jobs/tune.py", "--config", str(config), "--space", "kdci.n=[4,8]", "--storage", str(tmp_path / "ray"),
                 "--tracking-uri", dead]):
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=repo, capture_output=True, text=True, timeout=60)
        last = proc.stderr.strip().splitlines()[-1]
        assert proc.returncode == 2 and dead in last and "does not answer" in last and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        assert time.perf_counter() - t0 < 15, cmd[1]
    assert not (tmp_path / "out").exists() and not (tmp_path / "ray").exists()  # nothing started, nothing written


def test_experiments_open_on_the_training_runs_and_parent_runs_carry_a_description(tmp_path):
    """MLflow 3's UI opens an untagged experiment on its GenAI overview: ours are tagged as model training (also
    one an earlier version created untagged), and a parent run's description is its note."""
    from kdci_ray.tracking import MlflowRunLogger
    from kdci_ray.tracking.store import client, experiment_id

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with MlflowRunLogger.start("kdci-kind", "parent", uri=uri) as run:
        run.describe("**Sweep**: 2 trials")
    mlflow = client(uri)
    assert mlflow.get_experiment_by_name("kdci-kind").tags["mlflow.experimentKind"] == "custom_model_development"
    assert mlflow.get_run(run.run_id).data.tags["mlflow.note.content"] == "**Sweep**: 2 trials"
    old = mlflow.create_experiment("made-by-an-older-version")
    assert "mlflow.experimentKind" not in mlflow.get_experiment(old).tags
    assert experiment_id(mlflow, "made-by-an-older-version") == old
    assert mlflow.get_experiment(old).tags["mlflow.experimentKind"] == "custom_model_development"
