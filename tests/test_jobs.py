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


def _refused(args, env=ENV):
    """Run a job that must refuse its input: (the last line of stderr, its whole stderr) after checking the
    refusal is what the entry points promise: exit code 2, no traceback, within seconds, Ray never started."""
    t0 = time.time()
    rc, _, err = job(*args, env=env, timeout=120)
    seconds = time.time() - t0
    last = err.strip().splitlines()[-1] if err.strip() else ""
    assert rc == 2 and last.startswith("error: ") and "Traceback" not in err and seconds < 30, (rc, seconds, err[-3000:])
    assert "started a local Ray" not in err and "connected to" not in err  # refused on the driver, before Ray
    return last, err


@pytest.mark.slow(seconds=30)
def test_distill_and_tune_jobs_refuse_bad_input_before_ray_starts(digits_teacher, tmp_path):
    """What a worker would refuse in its first seconds is refused by the driver, as one line, before Ray or
    MLflow start, leaving nothing behind: a pool without the logits column, a pool of the wrong image shape,
    kdci.n beyond the pool (in a config and in a sweep's space), a teacher file that is not the config's arch."""
    import pyarrow.parquet as pq
    import torch

    from kdci_ray.synthesis import write_pool_parquet

    config = REPO / "configs" / "fast-digits-digits_cnn-digits_cnn_small.yaml"
    storage = tmp_path / "ray"
    common = ["--config", config, "--set", f"teacher.weights={digits_teacher}", "--storage", storage, "--set", "name=refused"]
    good, shape, nologits = tmp_path / "good.parquet", tmp_path / "shape.parquet", tmp_path / "nologits.parquet"
    write_pool_parquet(good, torch.zeros(64, 1, 8, 8, dtype=torch.uint8), torch.zeros(64, 10), torch.zeros(64, dtype=torch.long))
    write_pool_parquet(shape, torch.zeros(64, 3, 8, 8, dtype=torch.uint8), torch.zeros(64, 10), torch.zeros(64, dtype=torch.long))
    pq.write_table(pq.read_table(good).drop_columns(["logits"]), nologits)  # keeps the pool's metadata

    last, _ = _refused(["jobs/distill.py", *common, "--set", f"pool={nologits}", "--no-track"])
    assert "is not a kdci_ray pool" in last and "missing logits" in last
    last, _ = _refused(["jobs/distill.py", *common, "--set", f"pool={shape}", "--no-track"])
    assert "images are (3, 8, 8)" in last and "needs (1, 8, 8)" in last
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    last, _ = _refused(["jobs/distill.py", *common, "--set", f"pool={good}", "--set", "kdci.n=100", "--tracking-uri", uri])
    assert "kdci.n = 100" in last and "only 64 images" in last
    last, _ = _refused(["jobs/distill.py", *common, "--set", "teacher.arch=digits_cnn_small", "--no-track"])
    assert "digits_cnn_small" in last
    last, _ = _refused(["jobs/tune.py", *common, "--set", f"pool={good}", "--space", "kdci.n=[8,100]", "--scheduler", "fifo",
                        "--tracking-uri", uri])
    assert last.startswith("error: search space kdci.n=100:") and "only 64 images" in last
    assert not storage.exists() and not (tmp_path / "mlflow.db").exists()  # no run folder, no MLflow store


def free_ports(count: int) -> list[int]:
    """`count` distinct free ports: every socket stays bound until all are chosen, so the kernel cannot hand the
    same port out twice (one at a time, it did: the dashboard and its agent were once given one port)."""
    socks = [socket.socket() for _ in range(count)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@pytest.fixture
def ray_head(tmp_path):
    """`ray start --head` on 127.0.0.1 with token auth, a cluster of this test's own. It runs with --block in
    its own process group, which is killed as a whole at the end: `ray stop` would end every Ray on the
    machine (the other xdist worker's, other people's)."""
    ray_cli = shutil.which("ray", path=str(Path(sys.executable).parent)) or "ray"
    port, dashboard, *others = free_ports(6)
    env = {**ENV, "RAY_AUTH_MODE": "token"}
    log = tmp_path / "ray-head.log"
    with open(log, "w") as out:
        # Every port its own: the suite's local clusters (their dashboard agents too) may be running beside it.
        names = ("dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port", "runtime-env-agent-port")
        ports = [f"--{name}={p}" for name, p in zip(names, others)]
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
        try:
            os.killpg(head.pid, signal.SIGKILL)
        except ProcessLookupError:  # the head failed to start and its group is gone already
            pass
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
    # What `ray job submit` shows: the job's stages, epochs and result, none of Ray's or faiss's internal lines.
    from test_console import internal_lines

    console = (proc.stdout + proc.stderr).splitlines()
    for stage in ("[1/3", "] generation: fast on Ray Data", "[2/3", "] dictionary: distributed k-means", "[3/3", "epoch 2/2 loss",
                  "student top-1"):
        assert any(stage in line for line in console), stage
    assert not internal_lines(console), internal_lines(console)
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

    # A refused job through `ray job submit`: its one line, exit code 2, in seconds, nothing of the run touched.
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}
    t0 = time.time()
    cmd = [ray_cli, "job", "submit", "--address", address, "--working-dir", str(REPO), "--", "python", "jobs/distill.py",
           "--config", "configs/fast-digits-digits_cnn-digits_cnn_small.yaml", "--set", f"teacher.weights={digits_teacher}",
           "--set", "name=submitted", "--set", f"pool={run / 'pool'}", "--set", "kdci.n=100000", "--storage", str(storage), "--no-track"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO, env=env)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "exit code 2" in out and "Traceback" not in out and time.time() - t0 < 30, out[-3000:]
    assert "error: kdci.n = 100000 prototypes but the substitution source has only 256 images" in out
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()} == before


def _ray_helpers_of(session: str) -> list[int]:
    """Pids of this user's Ray processes holding files open in `session` (a Ray session folder)."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and (entry / "cmdline").read_bytes().startswith(b"ray::") and any(
                os.readlink(fd).startswith(session + os.sep) for fd in (entry / "fd").iterdir()
            ):
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


@pytest.mark.slow(seconds=20)
def test_the_next_start_ends_the_ray_helpers_a_killed_driver_left(tmp_path):
    """Ray's agents of a killed driver's local Ray outlive it (Ray 2.60); the next local start ends them."""
    from kdci_ray.distributed.session import end_helpers_of_killed_drivers

    code = ("import sys, time; sys.path.insert(0, sys.argv[1]); from kdci_ray.distributed.session import ensure_ray; "
            "ray = ensure_ray(); print(ray._private.worker._global_node.get_session_dir_path(), flush=True); time.sleep(600)")
    env = {k: v for k, v in ENV.items() if k != "RAY_ADDRESS"}
    driver = subprocess.Popen([sys.executable, "-c", code, str(REPO)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        session = driver.stdout.readline().strip()
        assert session, "the driver did not start its local Ray"
        deadline = time.time() + 60
        while len(_ray_helpers_of(session)) < 2 and time.time() < deadline:  # the dashboard and runtime-env agents
            time.sleep(0.5)
    finally:
        driver.kill()
        driver.wait(timeout=30)
    time.sleep(3)  # the rest of its session ends with the driver
    left = _ray_helpers_of(session)
    assert left, "Ray no longer leaves its agents behind a killed driver: end_helpers_of_killed_drivers can go"
    ended = end_helpers_of_killed_drivers()
    assert set(left) <= set(ended)
    deadline = time.time() + 20
    while _ray_helpers_of(session) and time.time() < deadline:
        time.sleep(0.5)
    assert not _ray_helpers_of(session)
    assert end_helpers_of_killed_drivers() == []  # the record is gone with them: nothing to do the next time
