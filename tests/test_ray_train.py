"""Ray Train distillation on a real local Ray (2 CPUs, 2 DDP workers with gloo, digits): it trains and
checkpoints, a killed worker ends in a finished run resumed from the last checkpoint, a finished run name
is not started over, and a fixed Parquet pool streams through Ray Data with a prebuilt dictionary."""

import faiss  # noqa: F401  (before torch)
import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch

from kdci_ray.config import DistillConfig, load_config

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "fast-digits-digits_cnn-digits_cnn_small.yaml"


def fast_config(teacher: Path, name: str, *overrides: str) -> DistillConfig:
    return load_config(CONFIG, DistillConfig, [
        f"name={name}", f"teacher.weights={teacher}", "synthesis.warmup_calls=1", "kdci.rebuild_every=2", *overrides,
    ])


def ray_checkpoints(run_folder: Path) -> list[Path]:
    return sorted(p for p in run_folder.glob("checkpoint_*") if p.is_dir())


@pytest.mark.slow(seconds=30)
def test_ddp_distillation_trains_checkpoints_and_does_not_restart_a_finished_run(ray_cluster, digits_teacher, tmp_path):
    from kdci_ray.distributed import distill_on_ray

    cfg = fast_config(digits_teacher, "ddp", "optim.epochs=4")
    result = distill_on_ray(cfg, num_workers=2, storage_path=tmp_path)
    history = result.history
    assert [row["epoch"] for row in history] == [1, 2, 3, 4] and result.resumed_from == 0
    assert history[-1]["train_loss"] < 0.7 * history[0]["train_loss"]  # the student learns the teacher
    assert all("test_top1" in row and "test_top1_compensated" in row for row in history)  # rank 0 evaluates
    # Outputs from rank 0, Ray's checkpoints (newest two kept) in the run folder.
    for name in ("student.safetensors", "student.json", "dictionary.safetensors", "metrics.json", "config.yaml"):
        assert (result.run_dir / name).is_file(), name
    kept = ray_checkpoints(result.storage)
    assert len(kept) == 2
    state = torch.load(kept[-1] / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 4 and state["world_size"] == 2 and state["source"] is None
    # Each rank ran its own synthesizer (seeds 0 and 1000, pools of different images) and wrote its own part
    # of the checkpoint: no rank's pool went through rank 0.
    parts = [torch.load(kept[-1] / f"checkpoint-rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert [(p["rank"], p["epoch"], p["world_size"]) for p in parts] == [(0, 4, 2), (1, 4, 2)]
    sources = [p["source"] for p in parts]
    assert [s["seed"] for s in sources] == [0, 1000]
    # Their pools are segment files of new rows (own prefix per rank) inside the same Ray checkpoint folder.
    from safetensors.torch import load_file

    pools = [torch.cat([load_file(kept[-1] / name)["images"] for _, _, name in s["pool"]["journal"]]) for s in sources]
    assert all(name.startswith(f"pool-rank{r}-") for r, s in enumerate(sources) for _, _, name in s["pool"]["journal"])
    assert not torch.equal(pools[0], pools[1])
    # The dictionary (rebuilt at epoch 3) covers both ranks' pools as they were then: 1 warm-up + 3 calls of
    # 128 images each (built by rank 0, broadcast).
    meta = json.loads(state["dictionary"]["meta"])
    assert state["dictionary"]["epoch"] == 3 and meta["extra"]["ranks"] == 2
    assert meta["samples"] == 2 * 128 * (1 + 3)

    # The same name again: the finished outputs are returned, nothing trained or rewritten, no worker started —
    # also when Ray had not registered the last checkpoint (a driver killed right after the last epoch).
    metrics_before = (result.run_dir / "metrics.json").read_text()
    again = distill_on_ray(cfg, num_workers=2, storage_path=tmp_path)
    assert again.resumed_from == 4 and again.history == history and again.seconds == 0
    assert ray_checkpoints(result.storage) == kept
    assert (result.run_dir / "metrics.json").read_text() == metrics_before

    # Resuming this checkpoint with another worker count is refused on the driver, before Ray, naming the fix;
    # a checkpoint folder missing a rank's part is refused by that rank, naming the file.
    from kdci_ray.engine.checkpoint import load_rank_part
    from kdci_ray.engine.distill import preflight

    with pytest.raises(ValueError, match=r"written by 2 data-parallel worker\(s\), this run has 1: resume with 2"):
        preflight(cfg, 1, kept[-1] / "checkpoint.pt")
    (kept[-1] / "checkpoint-rank1.pt").rename(tmp_path / "part1.pt")
    with pytest.raises(ValueError, match=r"checkpoint-rank1.pt is missing"):
        load_rank_part(kept[-1] / "checkpoint.pt", 1, 2, 4)
    import shutil

    shutil.rmtree(kept[-1])
    again = distill_on_ray(cfg, num_workers=2, storage_path=tmp_path)
    assert again.history == history and again.seconds == 0 and (result.run_dir / "metrics.json").read_text() == metrics_before


def _train_worker_pids() -> list[int]:
    """This session's Ray Train worker processes: children of our raylet that Ray titles
    `ray::RayTrainWorker...` (other Ray sessions on the machine are left alone)."""
    import ray

    raylet = ray._private.worker._global_node.all_processes["raylet"][0].process.pid
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if not entry.name.isdigit():
                continue
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if parent == raylet and (entry / "cmdline").read_bytes().startswith(b"ray::RayTrainWorker"):
                pids.append(int(entry.name))
        except (OSError, IndexError, ValueError):  # the process ended while we looked
            continue
    return pids


@pytest.mark.slow(seconds=60)
def test_a_killed_worker_resumes_from_the_last_checkpoint(own_ray, digits_teacher, tmp_path):
    from kdci_ray.distributed import distill_on_ray

    epochs = 14
    # A checkpoint every epoch: the kill must land between two of them (the auto policy may space them wider).
    cfg = fast_config(digits_teacher, "killed", f"optim.epochs={epochs}", "synthesis.kd_steps_per_call=40", "checkpoint_every=1")
    run_folder = tmp_path / "killed"
    killed = {}

    def registered_epoch() -> int:
        """The epoch of the newest checkpoint Ray's controller has registered (a checkpoint folder exists
        before its registration; an unregistered one is not resumed from)."""
        try:
            snapshot = json.loads((run_folder / "checkpoint_manager_snapshot.json").read_text())
            return int((snapshot.get("latest_checkpoint_result") or {}).get("metrics", {}).get("epoch", 0))
        except (OSError, ValueError):
            return 0

    def kill_a_worker_after_two_checkpoints():
        deadline = time.time() + 240
        while time.time() < deadline:
            registered = registered_epoch()
            if registered >= 2:
                pids = _train_worker_pids()
                if len(pids) == 2:
                    killed["registered"] = registered
                    killed["epoch"] = torch.load(run_folder / "outputs" / "checkpoint.pt", weights_only=True)["epoch"]
                    killed["pid"] = max(pids)
                    os.kill(killed["pid"], signal.SIGKILL)
                    return
            time.sleep(0.1)

    killer = threading.Thread(target=kill_a_worker_after_two_checkpoints, daemon=True)
    killer.start()
    result = distill_on_ray(cfg, num_workers=2, storage_path=tmp_path, max_failures=2)
    killer.join(timeout=5)
    assert "pid" in killed, "the worker was never killed (the run ended first?)"
    assert killed["epoch"] < epochs
    # A finished run whose last attempt continued from the newest checkpoint Ray had registered at the kill...
    assert killed["registered"] <= result.resumed_from <= killed["epoch"]
    # ...and each epoch once in the metrics history (the cut epoch's row was never checkpointed).
    assert [row["epoch"] for row in result.history] == list(range(1, epochs + 1))
    assert (result.run_dir / "student.safetensors").is_file()
    attempts = [json.loads(line) for line in (result.run_dir / "attempts.jsonl").read_text().splitlines()]
    assert attempts[-1]["status"] == "finished" and attempts[-1]["epoch"] == epochs and attempts[-1]["resumed_from"] == result.resumed_from
    # Every attempt is on record, the killed one too: it started and never finished.
    started = [a for a in attempts if a["status"] == "started"]
    assert len(started) >= 2 and started[0]["checkpoint"] is None and started[-1]["checkpoint"] is not None
    assert len([a for a in attempts if a["status"] == "finished"]) == 1
    # No checkpoint folder outside the two Ray keeps (the killed attempt's half-written one included).
    assert len(ray_checkpoints(result.storage)) == 2
    assert str(ray_checkpoints(result.storage)[-1]) == result.checkpoint


def test_pipeline_generates_builds_the_dictionary_and_distills_on_the_pool(fast_pipeline, ray_cluster):
    """Offline path: Ray Data generation -> distributed dictionary -> Ray Train on the Parquet pool (split into
    equal row ranges, each held by its worker) with that dictionary; submitting again continues, redoing nothing.
    (The first submission is the end-to-end benchmark's run, `fast_pipeline`; the second is made here.)"""
    from kdci_ray.distributed import run_pipeline
    from kdci_ray.kdci import ConfounderDictionary

    work, bench = fast_pipeline["work"], fast_pipeline["result"]
    out = bench["run"]
    storage, uri = work / "ray", f"sqlite:///{work / 'mlflow.db'}"
    folder = storage / "pipeline-e2e"
    assert out["pool_rows"] == 2 * (1 + 2) * 128  # shards x (warm-up + calls) x synthesis.batch_size
    assert sorted(p.name for p in (folder / "pool").glob("*.parquet")) == ["part-00000.parquet", "part-00001.parquet"]
    assert out["distill_epochs"] == 3 and out["resumed_from"] == 0 and set(out["stage_seconds"]) == {"generate", "dictionary", "distill"}
    history = json.loads((folder / "outputs" / "metrics.json").read_text())
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    # The run trained on the pool (each worker its half of the rows, held: 384 rows, 346 trained on / 32 = 10 steps) with the
    # prebuilt dictionary.
    state = torch.load(ray_checkpoints(folder)[-1] / "checkpoint.pt", weights_only=True)
    parts = [torch.load(ray_checkpoints(folder)[-1] / f"checkpoint-rank{r}.pt", weights_only=True) for r in (0, 1)]
    # (of which each holds out 10 % for data-free validation, 38 rows: rank 0 scores on its own)
    assert [(p["source"]["size"], p["source"]["held_out"]) for p in parts] == [(346, 38), (346, 38)]
    assert [p["source"]["name"].split(" (rows ")[1] for p in parts] == ["0..384)", "384..768)"]
    dictionary = str(folder / "dictionary.safetensors")
    assert state["config"]["pool"] == str(folder / "pool") and state["config"]["kdci"]["dictionary"] == dictionary
    prebuilt = ConfounderDictionary.load(dictionary)
    assert torch.equal(state["dictionary"]["tensors"]["prototypes"], prebuilt.prototypes)
    assert prebuilt.meta.samples == out["pool_rows"] and prebuilt.meta.extra["shards"] == 2

    cfg = load_config(CONFIG, DistillConfig, [*bench["overrides"], "name=pipeline-e2e"])  # the benchmark's config
    pool_files = {p: p.stat().st_mtime_ns for p in (folder / "pool").glob("*.parquet")}
    cached = list((storage / "dictionaries").glob("*.safetensors"))
    again = run_pipeline(cfg, storage_path=storage, shards=2, calls_per_shard=2, actors=2, dictionary_shards=2, workers=2,
                         experiment="pipeline-e2e", tracking_uri=uri)
    assert again["resumed_from"] == 3 and again["test_top1"] == out["test_top1"] and again["dictionary"] == dictionary
    assert {p: p.stat().st_mtime_ns for p in (folder / "pool").glob("*.parquet")} == pool_files  # shards kept
    assert list((storage / "dictionaries").glob("*.safetensors")) == cached and len(cached) == 1  # cache hit

    # MLflow: one pipeline run (stage times, figures of the pool) with the distillation as its child; the
    # second submission continued both instead of opening new ones.
    from kdci_ray.tracking.store import client

    mlflow = client(uri)
    exp = mlflow.get_experiment_by_name("pipeline-e2e").experiment_id
    pipeline = mlflow.search_runs([exp], filter_string=f"tags.`kdci.pipeline` = '{folder}'")
    assert len(pipeline) == 1 and again["mlflow_run_id"] == out["mlflow_run_id"] == pipeline[0].info.run_id
    assert pipeline[0].info.status == "FINISHED" and {"seconds_generate", "pool_rows", "test_top1"} <= set(pipeline[0].data.metrics)
    children = mlflow.search_runs([exp], filter_string=f"tags.`mlflow.parentRunId` = '{out['mlflow_run_id']}'")
    assert [c.info.run_id for c in children] == [out["mlflow_distill_run_id"]] == [again["mlflow_distill_run_id"]]
    steps = [m.step for m in mlflow.get_metric_history(children[0].info.run_id, "train_loss")]
    assert steps == [1, 2, 3]  # per-epoch metrics from rank 0, not repeated by the second submission
    parent_files = {a.path for a in mlflow.list_artifacts(out["mlflow_run_id"], "figures")}
    assert parent_files == {"figures/substitution_images.png", "figures/class_proportions.png"}
    child_files = {a.path for a in mlflow.list_artifacts(out["mlflow_distill_run_id"])}
    assert {"config.yaml", "metrics.json", "student", "dictionary", "figures"} <= child_files


@pytest.mark.slow(seconds=21)
def test_teacher_training_on_ray_train_with_two_workers(ray_cluster, tmp_path):
    """`train-teacher` on 2 DDP workers: each takes half of every epoch; rank 0 writes a teacher that works."""
    from kdci_ray.config import TeacherTrainConfig, validate_config
    from kdci_ray.distributed import train_teacher_on_ray
    from kdci_ray.models import load_classifier

    cfg = validate_config(TeacherTrainConfig, {
        "name": "digits_ddp", "data": {"dataset": "digits"}, "model": {"arch": "digits_cnn"},
        "optim": {"lr": 0.05, "batch_size": 32, "epochs": 12, "warmup_epochs": 1},
        "augment": {"crop_padding": 1, "hflip": False}, "output": {"dir": str(tmp_path / "teachers")},
    })
    result = train_teacher_on_ray(cfg, num_workers=2, storage_path=tmp_path / "ray")
    assert result["top1"] > 90, result
    model, card = load_classifier(result["weights"], "digits_cnn", 10, 1)
    assert card.accuracy == result["top1"] and card.extra["epochs"] == 12


def test_inputs_are_checked_before_any_worker_starts(digits_teacher, tmp_path, monkeypatch):
    """No Ray needed: bad inputs fail on the driver with the field named."""
    from kdci_ray.distributed import distill_on_ray
    from kdci_ray.distributed.train import resolve_storage
    from kdci_ray.engine.distill import check_pool_run

    missing = fast_config(digits_teacher, "bad", f"pool={tmp_path / 'nowhere'}")
    with pytest.raises(FileNotFoundError, match="pool = "):
        distill_on_ray(missing, storage_path=tmp_path)
    dfnd = load_config(CONFIG.with_name("dfnd-digits-digits_cnn-digits_cnn_small.yaml"), DistillConfig,
                       [f"teacher.weights={digits_teacher}", f"pool={tmp_path}"])
    with pytest.raises(ValueError, match="noise_adaptation"):  # DFND's own student term would be lost on a fixed pool
        check_pool_run(dfnd)
    check_pool_run(dfnd.model_copy(update={"synthesis": dfnd.synthesis.model_copy(update={"noise_adaptation": 0.0})}))
    # Inside `ray job submit` the working directory is a temporary copy: storage must be absolute.
    monkeypatch.delenv("KDCI_STORAGE", raising=False)
    assert resolve_storage(None) == Path("runs/ray").resolve()
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")
    with pytest.raises(ValueError, match="--storage"):
        resolve_storage(None)
    with pytest.raises(ValueError, match="--storage"):
        resolve_storage("runs/ray")
    assert resolve_storage(tmp_path) == tmp_path
    monkeypatch.setenv("KDCI_STORAGE", str(tmp_path))
    assert resolve_storage(None) == tmp_path / "ray"


def digits_pool(folder: Path, teacher: Path, rows: int, files: int = 2) -> Path:
    """A fixed pool of `rows` digits training images in `files` Parquet files (logits: the teacher's)."""
    import numpy as np

    from kdci_ray.data import load_dataset
    from kdci_ray.engine.distill import load_models
    from kdci_ray.engine.runtime import resolve_runtime
    from kdci_ray.synthesis import write_pool_parquet

    cfg = fast_config(teacher, "pool")
    models = load_models(cfg, resolve_runtime("cpu"))
    images = torch.from_numpy(np.ascontiguousarray(load_dataset("digits", None, "train").images[:rows])).permute(0, 3, 1, 2).contiguous()
    with torch.no_grad():
        logits = models.teacher(models.normalize(images))
    bounds = [round(i * rows / files) for i in range(files + 1)]
    for i, (lo, hi) in enumerate(zip(bounds, bounds[1:])):
        write_pool_parquet(folder / f"part-{i:05d}.parquet", images[lo:hi], logits[lo:hi], torch.zeros(hi - lo, dtype=torch.long),
                           {"teacher_id": models.teacher_id})
    return folder


@pytest.mark.slow(seconds=25)
def test_a_pool_run_on_one_ray_worker_is_the_single_process_run(ray_cluster, digits_teacher, tmp_path):
    """The worker reads its rows once and holds them (no Ray Data stream per epoch): with one worker it is the
    single-process run on the same pool, the same student to float tolerance."""
    from kdci_ray.distributed import distill_on_ray
    from kdci_ray.engine.distill import distill_from_config
    from kdci_ray.models import load_classifier

    pool = digits_pool(tmp_path / "pool", digits_teacher, 640)
    cfg = fast_config(digits_teacher, "pool-one", f"pool={pool}", "optim.epochs=2", "kdci.rebuild_every=0", "device=cpu",
                      f"output.dir={tmp_path / 'single'}")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the Ray worker (one CPU): the same reduction order
    try:
        single = distill_from_config(cfg)
    finally:
        torch.set_num_threads(threads)
    on_ray = distill_on_ray(cfg, num_workers=1, storage_path=tmp_path / "ray")
    a, _ = load_classifier(single.student_weights, "digits_cnn_small")
    b, _ = load_classifier(on_ray.run_dir / "student.safetensors", "digits_cnn_small")
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.allclose(x.float(), y.float(), atol=1e-4, rtol=1e-4), name
    assert [r["train_loss"] for r in on_ray.history] == pytest.approx([r["train_loss"] for r in single.history], rel=1e-4)
    assert on_ray.history[-1]["test_top1"] == pytest.approx(single.history[-1]["test_top1"], abs=0.3)
    state = torch.load(Path(on_ray.checkpoint) / "checkpoint.pt", weights_only=True)  # one worker: no parts
    assert (state["source"]["size"], state["source"]["held_out"]) == (576, 64) and state["source"]["name"].endswith("(rows 0..640)")


@pytest.mark.slow(seconds=25)
def test_a_deterministic_worker_error_is_not_retried(ray_cluster, digits_teacher, tmp_path):
    """A loss that diverges on the workers ends the run at once as itself (Train does not restart a worker
    group to meet the same error again): one attempt on record, the error with its fix."""
    from kdci_ray.distributed import distill_on_ray
    from kdci_ray.distributed.train import read_attempts

    cfg = fast_config(digits_teacher, "diverges", "optim.lr=1e12", "optim.epochs=3", "kdci.enabled=false")
    t0 = time.time()
    with pytest.raises(FloatingPointError, match="lower optim.lr"):
        distill_on_ray(cfg, num_workers=2, storage_path=tmp_path, max_failures=2)
    attempts = read_attempts(tmp_path / "diverges" / "outputs")
    assert [a["status"] for a in attempts] == ["started"], attempts
    assert time.time() - t0 < 60


def test_a_pool_share_beyond_the_devices_memory_is_refused(digits_teacher, tmp_path):
    """A worker's share of a fixed pool is held on its device: more than 80 % of its free memory is refused
    with the numbers and the fix (on CPU the node's available memory; a GPU's free memory as the probe saw it)."""
    from kdci_ray.distributed.train import check_memory, pool_share

    with pytest.raises(ValueError, match=r"needs 8192.00 GiB on cpu but the node has .* GiB available: use more workers"):
        check_memory(8 * 2**40, torch.device("cpu"), "pool = big")
    with pytest.raises(ValueError, match=r"needs 1.00 GiB on cuda but a GPU has 1.0 GiB free"):
        check_memory(2**30, torch.device("cuda"), "pool = big", free=2**30)
    check_memory(2**20, torch.device("cuda"), "pool = small", free=2**30)
    # A real share: rows [rank x n, (rank + 1) x n) of the files, held as uint8 on the device.
    pool = digits_pool(tmp_path / "pool", digits_teacher, 300, files=3)
    cfg = fast_config(digits_teacher, "share", f"pool={pool}")
    shares = [pool_share(cfg, rank, 2, torch.device("cpu")) for rank in (0, 1)]
    from kdci_ray.synthesis import read_pool_parquet

    whole = read_pool_parquet(pool).images
    assert [len(s) for s in shares] == [150, 150] and shares[0].images.dtype == torch.uint8
    assert torch.equal(torch.cat([s.images for s in shares]), whole)
