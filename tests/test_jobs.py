"""The `jobs/` entry points: run as scripts on a local Ray, and submitted with `ray job submit` to a
`ray start --head` cluster on 127.0.0.1 (token auth on, as recent Ray turns it on)."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "MLFLOW_DISABLE_TELEMETRY": "true"}


def job(*args, env=ENV, timeout=600):
    proc = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env)
    return proc.returncode, proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else "", proc.stderr


@pytest.mark.slow(seconds=100)
def test_synthesize_then_build_dictionary_jobs_on_a_local_ray(ray_env, digits_teacher, tmp_path):
    """The jobs join the suite's local Ray through RAY_ADDRESS, as they join a cluster under `ray job submit`."""
    config = REPO / "configs" / "deepinv-digits-digits_cnn-digits_cnn_small.yaml"
    common = ["--config", config, "--set", f"teacher.weights={digits_teacher}"]

    def run(*args):
        return job(*args, env=ray_env)

    rc, line, err = run("jobs/synthesize.py", *common, "--set", "synthesis.batch_size=16", "--set", "synthesis.g_steps=2",
                        "--out", tmp_path / "pool", "--shards", 2, "--calls-per-shard", 2)
    assert rc == 0, err[-3000:]
    summary = json.loads(line)
    assert summary["rows"] == 2 * 2 * 16 and summary["files"] == 2 and summary["method"] == "deepinv"
    rc, line, err = run("jobs/build_dictionary.py", *common, "--set", "kdci.n=8", "--pool", tmp_path / "pool",
                        "--cache-dir", tmp_path / "cache", "--out", tmp_path / "dictionary.safetensors")
    assert rc == 0, err[-3000:]
    built = json.loads(line)
    assert built["n"] == 8 and built["samples"] == 64 and (tmp_path / "dictionary.safetensors").is_file()
    # Distillation on Ray Train on that pool with that dictionary, recorded as one MLflow run.
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    rc, line, err = run("jobs/distill.py", *common, "--set", f"pool={tmp_path / 'pool'}", "--set", "kdci.n=8",
                        "--set", f"kdci.dictionary={tmp_path / 'dictionary.safetensors'}", "--set", "kdci.rebuild_every=0",
                        "--set", "optim.epochs=1", "--set", "optim.batch_size=16", "--set", "name=from-job", "--workers", 1,
                        "--storage", tmp_path / "ray", "--tracking-uri", uri)
    assert rc == 0, err[-3000:]
    trained = json.loads(line)
    assert trained["epochs"] == 1 and trained["test_top1_compensated"] is not None
    assert Path(trained["run_dir"]) == tmp_path / "ray" / "from-job" / "outputs"
    from kdci_ray.tracking.store import client

    record = client(uri).get_run(trained["mlflow_run_id"])
    assert record.info.status == "FINISHED" and record.data.params["kdci.dictionary"] == str(tmp_path / "dictionary.safetensors")
    # A second run into the same folder is refused with a one-line message (exit 2), nothing overwritten.
    before = sorted(p.stat().st_mtime_ns for p in (tmp_path / "pool").iterdir())
    rc, _, err = run("jobs/synthesize.py", *common, "--out", tmp_path / "pool")
    assert rc == 2 and "already holds files" in err
    assert sorted(p.stat().st_mtime_ns for p in (tmp_path / "pool").iterdir()) == before


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_head(tmp_path):
    """`ray start --head` on 127.0.0.1 with token auth, a cluster of this test's own. It runs with --block in
    its own process group, which is killed as a whole at the end: `ray stop` would end every Ray on the
    machine (the other xdist worker's, other people's)."""
    ray_cli = shutil.which("ray", path=str(Path(sys.executable).parent)) or "ray"
    port, dashboard = free_port(), free_port()
    env = {**ENV, "RAY_AUTH_MODE": "token"}
    log = tmp_path / "ray-head.log"
    with open(log, "w") as out:
        # Every port its own: the suite's local clusters (their dashboard agents too) may be running beside it.
        ports = [f"--{name}={free_port()}" for name in ("dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port",
                                                          "runtime-env-agent-port")]
        head = subprocess.Popen([ray_cli, "start", "--head", "--block", f"--port={port}", "--node-ip-address=127.0.0.1",
                                 "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", *ports, "--num-cpus=2",
                                 "--include-dashboard=true", "--disable-usage-stats"],
                                stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.time() + 180
        while "Ray runtime started" not in log.read_text():
            assert head.poll() is None and time.time() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        yield ray_cli, f"http://127.0.0.1:{dashboard}", env
    finally:  # what `ray stop --force` does, to this head's processes only
        os.killpg(head.pid, signal.SIGKILL)
        head.wait(timeout=60)
        # `ray start` recorded this head as the machine's current cluster; `ray stop` would have removed that.
        current = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
        if current.is_file() and current.read_text().strip().endswith(f":{port}"):
            current.unlink()


@pytest.mark.slow(seconds=90)
def test_ray_job_submit_runs_the_pipeline_against_a_head_on_localhost(ray_head, digits_teacher, tmp_path):
    ray_cli, address, env = ray_head
    storage = tmp_path / "storage"
    # The job runs in the uploaded working dir on the cluster: paths it reads and writes are absolute.
    cmd = [ray_cli, "job", "submit", "--address", address, "--working-dir", str(REPO), "--",
           "python", "jobs/pipeline.py", "--config", "configs/fast-digits-digits_cnn-digits_cnn_small.yaml",
           "--set", f"teacher.weights={digits_teacher}", "--set", "name=submitted", "--set", "optim.epochs=2",
           "--set", "synthesis.warmup_calls=0", "--set", "optim.batch_size=32",
           "--storage", str(storage), "--shards", "2", "--calls-per-shard", "1", "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO, env=env)
    assert proc.returncode == 0 and "succeeded" in proc.stdout + proc.stderr, (proc.stdout + proc.stderr)[-3000:]
    run = storage / "submitted"
    assert json.loads((run / "pool" / "manifest.json").read_text())["rows"] == 2 * 128
    assert (run / "dictionary.safetensors").is_file()
    assert [row["epoch"] for row in json.loads((run / "outputs" / "metrics.json").read_text())] == [1, 2]
    assert (run / "outputs" / "student.safetensors").is_file()
    from kdci_ray.tracking.store import client

    mlflow = client(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = mlflow.search_runs([mlflow.get_experiment_by_name("kdci").experiment_id])
    pipeline = [r for r in runs if "kdci.pipeline" in r.data.tags]
    assert len(runs) == 2 and len(pipeline) == 1 and pipeline[0].info.status == "FINISHED"  # the pipeline and its distillation
    assert [r.data.tags.get("mlflow.parentRunId") for r in runs if r not in pipeline] == [pipeline[0].info.run_id]
