import os
from pathlib import Path

# Before anything imports ray / mlflow: no usage reporting, no telemetry from tests.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
# Ray Train's controller polls its workers every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (2 s by default) and a
# worker's `ray.train.report` can wait for that poll (a queue of one), the end of a run too: the tests'
# epochs are sub-second. Subprocess drivers (jobs, benchmarks, the quickstart) inherit these; Train passes
# them on to its controller.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
# Its spot-instance preemption watcher is one more actor process per Train run, with nothing to watch here.
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
# Ray runs its workers at nice 15: beside a Ray-free xdist worker they would get almost no CPU.
os.environ.setdefault("RAY_worker_niceness", "0")
# The tests start (or join) their own local clusters, never one the shell points at.
os.environ.pop("RAY_ADDRESS", None)
# Under xdist (-n, see pyproject) each worker takes its share of the cores, subprocesses included: two
# workers each running torch on every core would only contend.
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    _threads = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_var, str(_threads))

import faiss  # noqa: E402,F401  (faiss before torch: the other order can crash on some builds)
import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def _session_cache(tmp_path_factory):
    """Decoded arrays and unpacked archives go to a per-session folder, never the user's cache. The xdist
    workers of one session share it (the cache's build lock makes one of them decode, the others wait)."""
    if "KDCI_RAY_TEST_CACHE" in os.environ:  # reuse between local runs when asked
        os.environ["KDCI_RAY_CACHE"] = os.environ["KDCI_RAY_TEST_CACHE"]
    else:
        base = tmp_path_factory.getbasetemp()
        shared = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "kdci_cache"
        shared.mkdir(exist_ok=True)
        os.environ["KDCI_RAY_CACHE"] = str(shared)
    # MLflow runs of the tests go to a per-session sqlite store, never runs/mlflow of the checkout.
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    yield


# -- Ray -------------------------------------------------------------------------------------------------
# One local cluster per test process is shared by every test that only needs *a* cluster (`ray_cluster`,
# in-process; `ray_env`, the environment of a subprocess driver that joins it). Tests that need their own
# head (killing workers or drivers, token auth, `ray job submit`) start one of their own (`own_ray`, or a
# subprocess). All of them are marked `ray`.
RAY_CPUS = 2  # the suite's Ray tests are sized for 2 CPUs (actor and worker CPU shares)
RAY_FIXTURES = {"ray_cluster", "ray_env", "own_ray", "gpu_ray", "ray_head", "fast_pipeline"}
# Tests that share one expensive Ray run through a session fixture: one xdist group each, so the run is made
# once (in one worker) and not once per worker.
SHARED_RUN_GROUPS = {"fast_pipeline": "fast-pipeline"}


def _start_ray():
    """The shared local Ray, started if it is not running. A test hands it back with every CPU free, or it
    is shut down (see ray_cluster), so what this returns has all its CPUs free."""
    from kdci_ray.distributed import ensure_ray

    return ensure_ray(num_cpus=RAY_CPUS)


def _ray_running() -> bool:
    import sys

    return "ray" in sys.modules and sys.modules["ray"].is_initialized()


@pytest.fixture(scope="session")
def _ray_session():
    """Shuts down whatever local Ray the session left running (at most one per process)."""
    yield
    if _ray_running():
        import ray

        ray.shutdown()


def _wait_for_free_cpus(ray, seconds: float = 5.0) -> bool:
    """True once every CPU of the cluster is free again (a finished test's actors and placement groups gone)."""
    import time

    deadline = time.time() + seconds
    while time.time() < deadline:
        if ray.available_resources().get("CPU", 0.0) >= ray.cluster_resources().get("CPU", 0.0) - 1e-6:
            return True
        time.sleep(0.5)
    return False


@pytest.fixture
def ray_cluster(_ray_session):
    """The shared local Ray: started by the first test that asks, kept for the session (started again only
    after a test that needed its own, or one that left CPUs reserved)."""
    ray = _start_ray()
    yield ray
    if ray.is_initialized() and not _wait_for_free_cpus(ray):
        # e.g. an ASHA-stopped trial: Ray Train's placement-group cleaner needs the State API, which a Ray
        # without its dashboard does not serve, so the stopped run's CPUs stay reserved. The next test would
        # starve (a Ray Data read waiting for a CPU forever): it gets a fresh cluster instead.
        import warnings

        held = ray.cluster_resources().get("CPU", 0.0) - ray.available_resources().get("CPU", 0.0)
        warnings.warn(f"the test left {held:g} CPUs of the shared Ray cluster reserved; starting a fresh one")
        ray.shutdown()


def _joining_env(ray) -> dict:
    return {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}


@pytest.fixture
def ray_env(ray_cluster):
    """The environment for a subprocess driver (a job script, a benchmark, the CLI) that joins the shared
    cluster instead of starting its own (RAY_ADDRESS, as `ray job submit` sets it)."""
    return _joining_env(ray_cluster)


@pytest.fixture(scope="session")
def fast_pipeline(_ray_session, digits_teacher, tmp_path_factory):
    """One run of the whole Ray pipeline (Fast on digits: Ray Data generation of 2 shards x (1 warm-up + 2
    calls) x 128 images by 2 actors, the dictionary by 2 shard actors, 3 epochs of Ray Train on 2 workers),
    made by the end-to-end benchmark (`benchmarks/pipeline_e2e.py`) joined to the shared cluster and tracked
    in its own sqlite store. The benchmark's test and the pipeline's tests read the same run.
    Returns {"work": folder, "result": the benchmark's JSON, "stdout": its table}."""
    import json
    import subprocess
    import sys

    env = _joining_env(_start_ray())
    work = tmp_path_factory.mktemp("fast-pipeline")
    cmd = [sys.executable, str(REPO / "benchmarks" / "pipeline_e2e.py"), "--config", str(REPO / "configs" / "fast-digits-digits_cnn-digits_cnn_small.yaml"),
           "--teacher-weights", str(digits_teacher), "--shards", "2", "--calls-per-shard", "2",
           "--set", "synthesis.warmup_calls=1", "--set", "optim.epochs=3", "--set", "optim.batch_size=32",
           "--actors", "2", "--workers", "2", "--dictionary-shards", "2", "--work-dir", str(work), "--out", str(work / "e2e.json")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=work, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"work": work, "result": json.loads((work / "e2e.json").read_text()), "stdout": proc.stdout}


@pytest.fixture
def own_ray(_ray_session):
    """A local Ray of this test's own (the shared one is shut down first and comes back for the next test
    that asks): for tests that kill Ray's processes."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray = _start_ray()
    yield ray
    ray.shutdown()


@pytest.fixture
def gpu_ray(_ray_session):
    """A local Ray of this test's own with one logical GPU (Ray's accounting only, no CUDA behind it): every
    GPU placement decision is made as on a 1-GPU machine. The shared cluster comes back for the next test."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=RAY_CPUS, num_gpus=1, include_dashboard=False)
    yield ray
    ray.shutdown()


@pytest.fixture(autouse=True)
def _no_ray_unless_marked(request):
    """A test that is not a Ray test must not start Ray (it would leave a cluster running unaccounted for)."""
    if request.node.get_closest_marker("ray"):
        yield
        return
    before = _ray_running()
    yield
    if not before and _ray_running():
        pytest.fail("this test started Ray: use the ray_cluster / ray_env fixture or mark it `ray`")


def _expected_seconds(item) -> float:
    marker = item.get_closest_marker("slow")
    return 0.0 if marker is None else float(marker.kwargs.get("seconds", 20))


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the xdist_group marks
def pytest_collection_modifyitems(config, items):
    """Ray tests (a Ray fixture, or marked `ray`) are marked; tests sharing a session run are grouped (xdist's
    `--dist loadgroup` keeps a group in one worker). Slow tests go first, longest first: each xdist worker
    takes the next test when it is free, so a long test started last would be the suite's tail."""
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        if RAY_FIXTURES & fixtures or item.get_closest_marker("ray"):
            item.add_marker(pytest.mark.ray)
        for fixture, group in SHARED_RUN_GROUPS.items():
            if fixture in fixtures:
                item.add_marker(pytest.mark.xdist_group(group))
    items.sort(key=lambda item: -_expected_seconds(item))  # stable: the rest keep their order


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """../shared beside the checkout (or $KDCI_RAY_SHARED). Required in CI; skipped elsewhere if absent."""
    path = Path(os.environ.get("KDCI_RAY_SHARED", REPO.parent / "shared"))
    if not (path / "data").is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"shared data folder {path} is missing in CI")
        pytest.skip(f"shared data folder {path} not found")
    return path


@pytest.fixture(scope="session")
def cifar10_archive(shared_dir) -> Path:
    return shared_dir / "data" / "cifar10-jpeg.tar.gz"


@pytest.fixture(scope="session")
def digits_teacher(tmp_path_factory) -> Path:
    """A digits_cnn teacher trained here (~5 s, ~99 % test top-1): the tiny teacher of the distillation tests."""
    from kdci_ray.config import TeacherTrainConfig, validate_config
    from kdci_ray.engine.teacher import train_teacher

    out = tmp_path_factory.mktemp("teachers")
    cfg = validate_config(TeacherTrainConfig, {
        "name": "digits_cnn", "data": {"dataset": "digits"}, "model": {"arch": "digits_cnn"},
        "optim": {"lr": 0.05, "batch_size": 64, "epochs": 30, "warmup_epochs": 1},
        "augment": {"crop_padding": 1, "hflip": False}, "output": {"dir": str(out)},
    })
    result = train_teacher(cfg)
    assert result["top1"] > 95
    return Path(result["weights"])


@pytest.fixture(scope="module")
def teacher(digits_teacher):
    """The digits teacher as a frozen eval-mode model (synthesis and selection tests)."""
    from kdci_ray.models import load_classifier

    model, _ = load_classifier(digits_teacher, "digits_cnn", 10, 1)
    return model.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def normalize():
    """The digits teacher's input normalisation."""
    from kdci_ray.data import Normalize, dataset_info

    info = dataset_info("digits")
    return Normalize(info.mean, info.std)
