"""`kdci-ray quickstart` at CI size, through the installed command: a digits teacher, Ray Data generation,
the distributed dictionary, Ray Train distillation with KDCI off and on, a 4-trial Tune sweep, all on a
local Ray and a real sqlite MLflow store, read back through MLflow's client."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from test_console import internal_lines

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow(seconds=160)
def test_quickstart_runs_every_stage_and_records_them_in_mlflow(ray_env, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    command = Path(sys.executable).parent / "kdci-ray"
    env = {**ray_env, "RAY_USAGE_STATS_ENABLED": "0", "MLFLOW_DISABLE_TELEMETRY": "true"}  # joins the suite's local Ray
    proc = subprocess.run([str(command), "quickstart", "--size", "ci", "--storage", str(tmp_path / "ray"), "--tracking-uri", uri],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)  # configs found from another directory
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    # Progress, the summary table and the command that opens the UI on this store.
    for step in range(1, 8):
        assert f"[{step}/7" in proc.stderr
    assert "| deepinv + KDCI |" in proc.stderr and f"kdci-ray ui --tracking-uri {uri}" in proc.stderr
    # The loop's epoch lines (with the time left) and the sweep's trial lines; Ray's and faiss's internal lines
    # (Train's reports and checkpoints, its placement-group cleaner, Ray Data's progress, faiss's loader) stay in Ray's logs.
    assert "epoch 2/2 loss" in proc.stderr and "epoch 1/2 loss" in proc.stderr and "left]" in proc.stderr
    assert "trial 1/2 (N = 4, alpha = 1.0)" in proc.stderr and "finished: val_agreement" in proc.stderr
    console = (proc.stderr + proc.stdout).splitlines()
    assert not internal_lines(console), internal_lines(console)
    assert len(console) < 90, len(console)  # 75 here (2026-12-02); the default size's: README
    assert summary["teacher_top1"] > 50 and summary["pool_rows"] == 2 * 128  # ci size: 2 shards x 1 call x batch 128
    assert summary["kd"]["epochs"] == 2 and summary["kdci"]["test_top1_compensated"] is not None
    assert sorted((r["kdci.n"], r["kdci.alpha"]) for r in summary["sweep"]) == [(4, 1.0), (8, 1.0)]  # ci size: 2 trials
    assert not [r for r in summary["sweep"] if r["error"]]
    folder = Path(summary["storage"])
    assert folder.parent == tmp_path / "ray" / "quickstart"
    assert (folder / "summary.md").read_text().count("\n|") >= 8

    from kdci_ray.tracking.store import client

    mlflow = client(uri)
    runs = mlflow.search_runs([mlflow.get_experiment_by_name("kdci-quickstart").experiment_id])
    by_id = {r.info.run_id: r for r in runs}
    top = by_id[summary["mlflow_run_id"]]
    assert "mlflow.parentRunId" not in top.data.tags and top.info.status == "FINISHED"
    children = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == top.info.run_id}
    assert set(children) == {"quickstart-deepinv-kd", "quickstart-deepinv-kdci", "sweep"}
    trials = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == children["sweep"].info.run_id]
    assert len(trials) == 2 and all("test_top1" in t.data.metrics for t in trials)
    for t in trials:  # each N's dictionary built once for the sweep on its pool, loaded by the trials (not rebuilt)
        assert t.data.params["kdci.dictionary"].endswith(f"dictionary-n{t.data.params['kdci.n']}.safetensors")
        assert t.data.params["kdci.rebuild_every"] == "0"
    assert {"figures/substitution_images.png", "figures/class_proportions.png", "figures/top1_vs_n.png"} <= {
        a.path for a in mlflow.list_artifacts(children["sweep"].info.run_id, "figures")}
    assert {a.path for a in mlflow.list_artifacts(top.info.run_id, "figures")} == {"figures/student_tsne.png"}
    assert {"summary.json", "summary.md"} <= {a.path for a in mlflow.list_artifacts(top.info.run_id)}
    kdci = children["quickstart-deepinv-kdci"]
    assert [m.step for m in mlflow.get_metric_history(kdci.info.run_id, "test_top1_compensated")] == [1, 2]
    assert {"student", "dictionary", "figures", "config.yaml", "metrics.json"} <= {a.path for a in mlflow.list_artifacts(kdci.info.run_id)}
    models = mlflow.search_logged_models(experiment_ids=[top.info.experiment_id])
    assert kdci.info.run_id in {m.source_run_id for m in models}  # the student as an MLflow model
