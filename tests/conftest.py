import os
from pathlib import Path

# Before anything imports ray / mlflow: no usage reporting, no telemetry from tests.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import faiss  # noqa: E402,F401  (faiss before torch: the other order can crash on some builds)
import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def _session_cache(tmp_path_factory):
    """Decoded arrays and unpacked archives go to a per-session folder, never the user's cache."""
    if "KDCI_RAY_TEST_CACHE" in os.environ:  # reuse between local runs when asked
        os.environ["KDCI_RAY_CACHE"] = os.environ["KDCI_RAY_TEST_CACHE"]
    else:
        os.environ["KDCI_RAY_CACHE"] = str(tmp_path_factory.mktemp("kdci_cache"))
    # MLflow runs of the tests go to a per-session sqlite store, never runs/mlflow of the checkout.
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    yield


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
