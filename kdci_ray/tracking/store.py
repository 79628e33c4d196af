"""Where MLflow runs go: any tracking URI from the config or MLFLOW_TRACKING_URI, else an embedded local
store — a sqlite database in `runs/mlflow/mlflow.db` with artifacts beside it in `runs/mlflow/artifacts/`
(MLflow 3 refuses the old file store). `kdci-ray ui` serves the same store on 127.0.0.1."""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_DIR = Path("runs") / "mlflow"


def default_uri(root: Path | None = None) -> str:
    root = (root or DEFAULT_DIR).resolve()
    return f"sqlite:///{root / 'mlflow.db'}"


def tracking_uri(uri: str | None = None) -> str:
    """The store to use: `uri`, else $MLFLOW_TRACKING_URI, else an embedded sqlite store (created on use) in
    $KDCI_STORAGE/mlflow (shared storage on a cluster) or runs/mlflow here. Inside `ray job submit` the
    working directory is a temporary copy: there a store must be named (or KDCI_STORAGE set)."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri and uri.startswith("sqlite:///"):  # absolute: Ray workers and trials run in other directories
        path = Path(uri.removeprefix("sqlite:///"))
        if not path.is_absolute() and "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ:
            raise ValueError(f"tracking URI {uri}: inside `ray job submit` the working directory is a temporary copy; "
                             "give the sqlite file as an absolute path on shared storage (sqlite:////abs/path/mlflow.db)")
        return f"sqlite:///{path.resolve()}"
    if uri:
        _check_remote_store(uri)
        return uri
    if os.environ.get("KDCI_STORAGE"):
        root = Path(os.environ["KDCI_STORAGE"]) / "mlflow"
    elif "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ:
        raise ValueError("no MLflow store named inside `ray job submit`: pass --tracking-uri (a tracking server, or sqlite on "
                         "shared storage) or set KDCI_STORAGE on the cluster")
    else:
        root = DEFAULT_DIR
    root.mkdir(parents=True, exist_ok=True)
    return default_uri(root)


_ANSWERED: set[str] = set()  # tracking servers that answered in this process: asked once


def _check_remote_store(uri: str, timeout: float = 5.0) -> None:
    """A tracking server that does not answer fails here in seconds, with one line naming it (MLflow's own
    client retries for minutes first); MLflow's file store, which MLflow 3 no longer takes, is named with the fix."""
    scheme = uri.split("://", 1)[0].lower() if "://" in uri else ""
    if scheme == "file" or (not scheme and ("/" in uri or uri.startswith((".", "~")))):  # (not "databricks")
        path = uri.removeprefix("file://") if scheme else uri
        raise ValueError(f"tracking URI {uri} is MLflow's file store, which MLflow 3 no longer takes: use a sqlite store, "
                         f"e.g. --tracking-uri sqlite:///{Path(path).resolve() / 'mlflow.db'} (kdci-ray ui serves it)")
    if scheme not in ("http", "https") or uri in _ANSWERED:
        return
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as answer:
            answer.read(64)
    except urllib.error.HTTPError:
        pass  # it answered (an error status, e.g. authentication, is MLflow's client's to report)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ValueError(f"MLflow tracking server {uri} does not answer ({reason}): start it, correct --tracking-uri / "
                         "MLFLOW_TRACKING_URI, or use a local store (--tracking-uri sqlite:///<abs path>/mlflow.db)") from None
    _ANSWERED.add(uri)


def artifact_location(uri: str) -> str | None:
    """Artifacts of a local sqlite store live beside its database (not in ./mlartifacts of whatever the
    working directory is); remote stores keep their server's default."""
    if uri.startswith("sqlite:///"):
        return (Path(uri.removeprefix("sqlite:///")).parent / "artifacts").resolve().as_uri()
    return None


def client(uri: str | None = None):
    """An `MlflowClient` on the resolved store (no global MLflow state: several runs per process, and Ray
    workers, each hold their own)."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri(uri))


# MLflow 3's UI opens an experiment on the page of its kind; untagged ones land on the GenAI overview (traces,
# token usage). Ours are model training: the UI then opens on the runs. MLflow 3.17's UI has a GenAI / Model
# training switch of its own (kept in the browser, GenAI at first) that wins over the tag: UI_VIEW in a link sets it.
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
UI_VIEW = "workflowType=machine_learning"


def ui_links(uri: str, base: str, limit: int = 5) -> list[tuple[str, str]]:
    """(name, link) of the store's most recently updated experiments (MLflow's "Default" only when it holds runs),
    each opening on its training runs."""
    mlflow_client = client(uri)
    found = [e for e in mlflow_client.search_experiments(max_results=50, order_by=["last_update_time DESC"])
             if e.name != "Default" or mlflow_client.search_runs([e.experiment_id], max_results=1)]
    return [(e.name, f"{base}/#/experiments/{e.experiment_id}?{UI_VIEW}") for e in found[:limit]]


def experiment_id(mlflow_client, name: str) -> str:
    """The experiment called `name`, created on first use (artifacts beside a local store), marked as a
    model-training experiment (also when an earlier version created it unmarked)."""
    found = mlflow_client.get_experiment_by_name(name)
    if found is None:
        return mlflow_client.create_experiment(name, artifact_location=artifact_location(mlflow_client.tracking_uri),
                                               tags=dict([EXPERIMENT_KIND]))
    if found.tags.get(EXPERIMENT_KIND[0]) is None:
        mlflow_client.set_experiment_tag(found.experiment_id, *EXPERIMENT_KIND)
    return found.experiment_id


def flatten(config: dict, prefix: str = "") -> dict[str, str]:
    """{"a": {"b": 1}} -> {"a.b": "1"}: a config as MLflow params (values as strings, None as "null")."""
    flat: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = "null" if value is None else str(value)
    return flat
