"""The KD step compiled into one graph (issue 16): the same training as the eager step, resumable, and its
hand-written optimizer update equal to torch's."""

import faiss  # noqa: F401  (before torch)
import numpy as np
import pytest
import torch

from kdci_ray.config import DistillConfig, apply_overrides, validate_config
from kdci_ray.data import SubstitutionSet, load_dataset
from kdci_ray.engine.distill import distill
from kdci_ray.engine.runtime import resolve_runtime
from kdci_ray.engine.step import create_state, kd_teacher, resolve_compile, update


@pytest.mark.parametrize("kind", ["sgd", "sgd-plain", "adam", "adamw"])
def test_the_traceable_update_is_torchs(kind):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.BatchNorm1d(7), torch.nn.Linear(7, 3))
    twin = [torch.nn.Parameter(p.detach().clone()) for p in model.parameters()]
    mine_params = list(model.parameters())

    def make(params):
        groups = [{"params": params[:2], "weight_decay": 5e-4}, {"params": params[2:], "weight_decay": 0.0}]
        if kind == "sgd":
            return torch.optim.SGD(groups, lr=0.1, momentum=0.9, nesterov=True)
        if kind == "sgd-plain":
            return torch.optim.SGD(groups, lr=0.1)
        return (torch.optim.Adam if kind == "adam" else torch.optim.AdamW)(groups, lr=0.01)

    reference, mine = make(twin), make(mine_params)
    create_state(mine)
    for step in range(4):
        lr = 0.1 / (step + 1)
        for params, opt in ((twin, reference), (mine_params, mine)):
            g = torch.Generator().manual_seed(step)
            for p in params:
                p.grad = torch.randn(p.shape, generator=g)
        for group in reference.param_groups:
            group["lr"] = lr
        reference.step()
        with torch.no_grad():
            update(mine, torch.full((2,), lr))
        assert all(p.grad is None for p in mine_params)
        for a, b in zip(twin, mine_params):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    # The state is torch's own: a checkpoint of one loads into the other.
    assert set(mine.state_dict()["state"].get(0, {})) == set(reference.state_dict()["state"].get(0, {}))


def test_compile_setting_resolves_per_runtime():
    cpu = resolve_runtime("cpu", "fp32", "off")
    assert not resolve_compile("auto", cpu, 1) and resolve_compile("on", cpu, 1)
    assert not resolve_compile("on", cpu, 2)  # DDP ranks keep the eager step
    with pytest.raises(ValueError, match="compile = on cannot run with precision = fp16"):
        resolve_compile("on", resolve_runtime("cpu", "fp16", "off"), 1)
    teacher = torch.nn.Linear(3, 2)
    assert kd_teacher(teacher, cpu) is teacher
    held = kd_teacher(teacher, resolve_runtime("cpu", "bf16", "off"))
    assert held.weight.dtype == torch.bfloat16 and teacher.weight.dtype == torch.float32 and not held.weight.requires_grad


def _config(weights, out_dir, name, **overrides):
    raw = {
        "name": name, "data": {"dataset": "digits"}, "device": "cpu", "precision": "fp32",
        "teacher": {"arch": "digits_cnn", "weights": str(weights)}, "student": {"arch": "digits_cnn_small"},
        "kdci": {"n": 8, "rebuild_every": 1}, "optim": {"lr": 0.05, "batch_size": 64, "epochs": 3, "warmup_epochs": 1},
        "augment": {"crop_padding": 1, "hflip": True}, "output": {"dir": str(out_dir)}, "eval_every": 3,
    }
    return validate_config(DistillConfig, apply_overrides(raw, [f"{k}={v}" for k, v in overrides.items()]))


def _trained(run_dir):
    from safetensors.torch import load_file

    return load_file(run_dir / "student.safetensors")


@pytest.mark.slow(seconds=60)
def test_compiled_kd_step_trains_like_the_eager_one_and_resumes_exactly(digits_teacher, tmp_path):
    """fullgraph=True: a graph break would raise, so a compiled run that finishes has none. KDCI on, with the
    dictionary rebuilt every epoch (in place: the graph is kept)."""
    images = load_dataset("digits", split="train").images
    pool = images[np.random.default_rng(0).integers(0, len(images), 192)]  # 3 steps of 64 an epoch
    from torch._dynamo.utils import counters

    eager = distill(_config(digits_teacher, tmp_path, "eager", compile="off"), SubstitutionSet(pool, seed=0))
    graphs = counters["stats"]["unique_graphs"]
    compiled = distill(_config(digits_teacher, tmp_path, "compiled", compile="on"), SubstitutionSet(pool, seed=0))
    assert counters["stats"]["unique_graphs"] == graphs + 1  # it compiled, once for the whole run
    cfg = _config(digits_teacher, tmp_path, "cut", compile="on")
    distill(cfg, SubstitutionSet(pool, seed=0), stop_after_epoch=1)
    resumed = distill(cfg, SubstitutionSet(pool, seed=0))

    # Same loss terms, same values (fp32: only the order of floating-point sums differs), every epoch.
    assert [set(row) for row in compiled.history] == [set(row) for row in eager.history]
    for key in ("train_loss", "train_kd", "attention_entropy", "lr"):
        assert [row[key] for row in compiled.history] == pytest.approx([row[key] for row in eager.history], rel=1e-3), key
    a, b, c = _trained(tmp_path / "eager"), _trained(tmp_path / "compiled"), _trained(tmp_path / "cut")
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-3, atol=1e-4)
        # Cut after epoch 1 and resumed with compile on: the uninterrupted compiled run.
        torch.testing.assert_close(c[name], b[name], rtol=1e-5, atol=1e-6)
    for key in ("train_loss", "train_kd", "attention_entropy"):
        assert [row[key] for row in resumed.history] == pytest.approx([row[key] for row in compiled.history], rel=1e-5), key


def test_full_batches_wrap_a_small_sets_ragged_batch():
    images = torch.arange(100, dtype=torch.uint8).view(100, 1, 1, 1).expand(100, 1, 2, 2).contiguous()
    ragged = SubstitutionSet(images, seed=0)
    assert [len(b) for b in ragged.batches(1, 64)] == [64, 36]
    full = SubstitutionSet(images, seed=0)
    full.full_batches = True
    batches = list(full.batches(1, 64))
    assert [len(b) for b in batches] == [64, 64]
    seen = torch.cat(batches)[:, 0, 0, 0]
    assert set(seen.tolist()) == set(range(100))  # every image in the epoch, the first 28 of its order twice
    assert torch.equal(batches[0], next(ragged.batches(1, 64)))  # the same order
    tiny = SubstitutionSet(images[:10], seed=0)
    tiny.full_batches = True
    assert [len(b) for b in tiny.batches(1, 64)] == [64]
