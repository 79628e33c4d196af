"""The DFKD synthesizers, each through its real code path with a tiny digits teacher (parametrized over
the registry, so a new method is tested by registering it and adding its tiny settings below)."""

import faiss  # noqa: F401  (before torch)
import copy

import numpy as np
import pytest
import torch

from kdci_ray.config import ConfigError, DistillConfig, validate_config
from kdci_ray.data import Normalize, SubstitutionSet
from kdci_ray.models import create_model
from kdci_ray.registry import UnknownNameError
from kdci_ray.synthesis import SYNTHESIZERS, BNStatistics, ImagePool, create_synthesizer, read_pool_parquet, write_pool_parquet
from kdci_ray.synthesis.losses import adversarial_js, adversarial_kl, masked_adversarial_kl

SHAPE = (1, 8, 8)
# Per-method settings small enough for a CPU test; everything else is the method's public default.
TINY = {
    "dafl": {"batch_size": 32, "nz": 16, "ngf": 8, "dictionary_samples": 64},
    "deepinv": {"batch_size": 32, "g_steps": 5},
    "fast": {"batch_size": 32, "g_steps": 3, "nz": 16, "ngf": 8, "warmup_calls": 0, "adv_after_calls": 0},
    "cmi": {"batch_size": 32, "g_steps": 3, "nz": 16, "ngf": 8, "bank_size": 64, "n_negatives": 16},
    "mosaickd": {"batch_size": 32, "nz": 16, "ngf": 8, "ndf": 16, "wild": {"dataset": "digits-wild"}, "lr_schedule": "constant"},
}
# DFND makes no images (it selects wild ones): tests/test_sampling.py.
SELECTING = {"dfnd"}
# The adversarial weight each method runs with in the adversarial test (DAFL's public default is 0).
ADV_ON = {"dafl": {"adv": 1.0}}


def test_every_registered_method_has_tiny_settings():
    assert set(SYNTHESIZERS.names()) == set(TINY) | SELECTING == {"dafl", "deepinv", "fast", "cmi", "mosaickd", "dfnd"}


def make(method, teacher, student, normalize, seed=0, **overrides):
    synth = create_synthesizer({"method": method, **TINY[method], **overrides}, SHAPE, 10, seed=seed)
    synth.bind(teacher, student, normalize)
    return synth


def noisy_copy(teacher, scale=0.05, seed=0):
    """A student that mostly agrees with the teacher but not exactly (so masked KL terms are non-zero)."""
    student = copy.deepcopy(teacher).train()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale * (p.std() if p.numel() > 1 else 1))
    return student.requires_grad_(True)


def fresh_student(seed=0):
    torch.manual_seed(seed)
    return create_model("digits_cnn_small", num_classes=10, in_channels=1)


@pytest.mark.parametrize("method", sorted(TINY))
def test_images_have_the_right_shape_range_and_dtype(method, teacher, normalize):
    synth = make(method, teacher, fresh_student(), normalize)
    metrics = synth.step()
    assert all(torch.isfinite(v).all() for v in metrics.values()), metrics
    pool = synth.pool
    images, logits, _ = pool.filled()
    assert len(pool) == 32 and images.dtype == torch.uint8 and tuple(images.shape[1:]) == SHAPE
    assert logits.shape == (32, 10) and torch.isfinite(logits).all()
    assert images.float().std() > 0  # not a constant image
    batch = synth.sample(16, torch.Generator().manual_seed(0))
    assert tuple(batch.shape) == (16, *SHAPE)
    if batch.dtype != torch.uint8:  # DAFL: fresh generator samples in [0, 1]
        assert batch.dtype == torch.float32 and 0 <= batch.min() and batch.max() <= 1
    # The logits stored with an image are the teacher's on that (uint8) image.
    with torch.no_grad():
        again = teacher(normalize(images[:8]))
    assert torch.allclose(again, logits[:8], atol=1e-4)


# Terms of each method's own objective that must fall (the adversarial term is off: it is meant to
# rise as the student is fooled). DAFL's one-hot term trades off against class balance early on.
OWN_TERMS = {"dafl": ("balance",), "deepinv": ("bn", "oh"), "fast": ("bn", "oh"), "cmi": ("bn", "oh"), "mosaickd": ("balance",)}  # its align term trades off against balance (tested with D fixed in test_sampling)


@pytest.mark.parametrize("method", sorted(TINY))
def test_the_methods_own_losses_fall(method, teacher, normalize):
    steps = 40
    synth = make(method, teacher, fresh_student(), normalize, g_steps=steps, adv=0.0)
    synth.step()
    trace = torch.stack(synth.loss_trace)
    assert len(trace) == steps and torch.isfinite(trace).all()
    early, late = trace[:5].mean().item(), trace[-5:].mean().item()
    assert late < early - 0.05 * abs(early), f"{method}: loss {early:.3f} -> {late:.3f}"
    for name in OWN_TERMS[method]:
        term = torch.stack([step[name] for step in synth.term_trace])
        assert term[-5:].mean() < term[:5].mean(), f"{method}: {name} {term[:5].mean():.3f} -> {term[-5:].mean():.3f}"


@pytest.mark.parametrize("method", sorted(TINY))
def test_adversarial_term_reads_the_student_and_has_gradient_through_it(method, teacher, normalize):
    student = noisy_copy(teacher)
    grads = []
    student.register_full_backward_hook(lambda module, grad_in, grad_out: grads.append(grad_out[0].abs().sum().item()))
    synth = make(method, teacher, student, normalize, **ADV_ON.get(method, {}))
    metrics = synth.step()
    assert "adv" in metrics and metrics["adv"].item() < 0, metrics  # -divergence: non-zero
    assert grads and sum(grads) > 0  # gradient flowed back through the student's forward
    assert all(p.grad is None for p in student.parameters())  # ... but the student itself was not trained
    assert student.training and all(p.requires_grad for p in student.parameters())  # modes restored
    # The public bug: the teacher passed as the student makes the term identically zero. Refused loudly.
    with pytest.raises(ValueError, match="is the teacher"):
        make(method, teacher, teacher, normalize)


def test_adversarial_losses_vanish_for_identical_networks_only():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(64, 10, generator=g)
    s = (t + 0.5 * torch.randn(64, 10, generator=g)).requires_grad_(True)
    for fn in (adversarial_kl, adversarial_js, masked_adversarial_kl):
        assert fn(t.clone(), t).abs().item() < 1e-6  # student == teacher: zero (what the public bug silently did)
        loss = fn(s, t)
        assert loss.item() < 0
        (grad,) = torch.autograd.grad(loss, s)
        assert grad.abs().sum() > 0


@pytest.mark.parametrize("method", sorted(TINY))
def test_pool_stays_bounded(method, teacher, normalize):
    synth = make(method, teacher, fresh_student(), normalize, pool_size=40)
    for _ in range(3):
        synth.step()
    assert len(synth.pool) == 40 and synth.pool.total_added == 96 and synth.pool.images.shape[0] == 40
    # The newest call's images are all present (the oldest were overwritten).
    assert (synth.pool.calls == 3).sum() == 32


@pytest.mark.parametrize("method", sorted(TINY))
def test_fixed_seed_reproduces_the_first_batch(method, teacher, normalize):
    student = fresh_student()

    def first(seed):
        synth = make(method, teacher, student, normalize, seed=seed)
        synth.begin_epoch(1, None)
        return synth.pool.filled()[0].clone(), next(iter(synth.batches(1, 16)))

    (pool_a, batch_a), (pool_b, batch_b), (pool_c, _) = first(0), first(0), first(1)
    assert torch.equal(pool_a, pool_b) and torch.equal(batch_a, batch_b)
    assert not torch.equal(pool_a, pool_c)


@pytest.mark.parametrize("method", sorted(TINY))
def test_state_dict_continues_exactly(method, teacher, normalize):
    student = fresh_student()
    a = make(method, teacher, student, normalize)
    for _ in range(2):
        a.step()
    state = copy.deepcopy(a.state_dict())
    b = make(method, teacher, student, normalize)
    b.load_state_dict(state)
    a.step()
    b.step()
    for mine, theirs in zip(a.pool.filled(), b.pool.filled()):
        assert torch.equal(mine, theirs)
    with pytest.raises(ValueError, match="seed"):
        make(method, teacher, student, normalize, seed=5).load_state_dict(state)


@pytest.mark.parametrize("method", sorted(TINY))
def test_parquet_round_trip(method, teacher, normalize, tmp_path):
    synth = make(method, teacher, fresh_student(), normalize)
    synth.step()
    synth.step()
    path = synth.to_parquet(tmp_path / "pool.parquet", {"note": "test"})
    data = read_pool_parquet(path)
    images, logits, _ = synth.pool.filled()
    assert torch.equal(data.images, images) and torch.equal(data.logits, logits)
    assert data.calls.tolist() == [1] * 32 + [2] * 32
    assert data.meta["method"] == method and data.meta["seed"] == 0 and data.meta["note"] == "test"
    assert data.meta["image_shape"] == list(SHAPE) and data.meta["rows"] == 64
    assert data.meta["config"]["method"] == method
    # An exported pool is a fixed substitution set for a later run.
    assert SubstitutionSet(data.images).image_shape == SHAPE


def test_parquet_shards_and_bad_files(tmp_path):
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (10, 3, 4, 4), dtype=torch.uint8, generator=g)
    logits = torch.randn(10, 5, generator=g)
    calls = torch.arange(10)
    write_pool_parquet(tmp_path / "shards" / "part-0.parquet", images[:6], logits[:6], calls[:6])
    write_pool_parquet(tmp_path / "shards" / "part-1.parquet", images[6:], logits[6:], calls[6:])
    data = read_pool_parquet(tmp_path / "shards")
    assert torch.equal(data.images, images) and torch.equal(data.logits, logits) and data.meta["files"] == 2
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"x": [1, 2]}), tmp_path / "other.parquet")
    with pytest.raises(ValueError, match="not a kdci_ray pool"):
        read_pool_parquet(tmp_path / "other.parquet")
    with pytest.raises(FileNotFoundError):
        read_pool_parquet(tmp_path / "missing.parquet")


def test_pool_ring_buffer_and_oversized_batches():
    pool = ImagePool(5, (1, 2, 2), 3)
    for call in range(1, 4):
        pool.add(torch.full((2, 1, 2, 2), call, dtype=torch.uint8), torch.zeros(2, 3), call)
    assert len(pool) == 5 and sorted(pool.calls.tolist()) == [1, 2, 2, 3, 3]
    pool.add(torch.full((7, 1, 2, 2), 9, dtype=torch.uint8), torch.zeros(7, 3), 4)  # more than the capacity
    assert len(pool) == 5 and (pool.images == 9).all() and pool.total_added == 13
    with pytest.raises(ValueError, match="pool expects"):
        pool.add(torch.zeros(2, 3, 2, 2, dtype=torch.uint8), torch.zeros(2, 3), 5)


def test_bn_statistics_loss_is_zero_at_the_running_statistics():
    bn = torch.nn.BatchNorm2d(3).eval()
    model = torch.nn.Sequential(bn)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 3, 4, 4, generator=g) * 2 + 1
    bn.running_mean.copy_(x.mean((0, 2, 3)))
    bn.running_var.copy_(x.var((0, 2, 3), unbiased=False))
    with BNStatistics(model) as hooks:
        model(x)
        assert hooks.loss().item() < 1e-5
        model(torch.randn(512, 3, 4, 4, generator=g))
        assert hooks.loss().item() > 1.0
    model(x)  # hooks are gone outside the context: nothing recorded, nothing kept
    with pytest.raises(ValueError, match="no BatchNorm"):
        BNStatistics(torch.nn.Linear(2, 2))


def _per_layer_bn_loss(layers, inputs, ema=None, momentum=0.0):
    """The BN-statistics loss written layer by layer (the public code's form): the reference."""
    total = 0.0
    for i, (layer, x) in enumerate(zip(layers, inputs)):
        mean, var = x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False)
        if ema is not None:
            mean, var = (1 - momentum) * mean + momentum * ema[i][0], (1 - momentum) * var + momentum * ema[i][1]
        total = total + torch.norm(layer.running_var - var, 2) + torch.norm(layer.running_mean - mean, 2)
    return total


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_the_vectorised_bn_loss_is_the_per_layer_loss(momentum):
    """BN layers fused with their statistics, all layers' loss in one padded block: the same output, loss
    value and pixel gradient as BatchNorm with a per-layer loss, on layers of different widths (and with
    Fast's moving averages), across calls and a state round trip."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                                torch.nn.Conv2d(4, 7, 3, padding=1), torch.nn.BatchNorm2d(7), torch.nn.ReLU()).eval()
    layers = [model[1], model[4]]
    for layer in layers:
        layer.running_mean.uniform_(-1, 1)
        layer.running_var.uniform_(0.5, 2)
    seen: list[torch.Tensor] = []
    taps = [layer.register_forward_hook(lambda m, i, o: seen.append(i[0])) for layer in layers]
    stats, ema = BNStatistics(model, momentum=momentum), None
    for call in range(3):
        x = torch.randn(6, 3, 5, 5, requires_grad=True)
        seen.clear()
        with stats:  # the BN layers run fused with their statistics in here
            out = model(x)
            loss = stats.loss() + out.square().mean()
        seen.clear()
        plain = model(x)  # outside: BatchNorm as usual, the reference
        reference = _per_layer_bn_loss(layers, seen, ema if momentum else None, momentum) + plain.square().mean()
        assert torch.allclose(out, plain, atol=1e-5)
        assert loss.item() == pytest.approx(reference.item(), rel=1e-5)
        (grad,) = torch.autograd.grad(loss, x)
        (expected,) = torch.autograd.grad(reference, x)
        assert torch.allclose(grad, expected, rtol=1e-4, atol=1e-6)
        stats.update_ema()
        if momentum:
            now = [(s.mean((0, 2, 3)).detach(), s.var((0, 2, 3), unbiased=False).detach()) for s in seen]
            ema = now if ema is None else [(momentum * e[0] + (1 - momentum) * n[0], momentum * e[1] + (1 - momentum) * n[1])
                                           for e, n in zip(ema, now)]
    for tap in taps:
        tap.remove()
    restored = BNStatistics(model, momentum=momentum)
    restored.load_state_dict(stats.state_dict(), "cpu")
    assert [t.shape for t in stats.state_dict()["ema"]] == ([(2, 4), (2, 7)] if momentum else [])
    assert (restored.ema is None) == (stats.ema is None)
    if momentum:
        assert all(torch.equal(a, b) for a, b in zip(restored.ema, stats.ema))


def test_unknown_method_and_bad_fields_are_named():
    base = {"name": "x", "data": {"dataset": "digits"}, "teacher": {"arch": "digits_cnn", "weights": "w.safetensors"},
            "student": {"arch": "digits_cnn_small"}}
    with pytest.raises(ConfigError, match=r"no such synthesis method 'deepinversion'.*known synthesis methods: cmi, dafl, deepinv, dfnd, fast, mosaickd"):
        validate_config(DistillConfig, {**base, "synthesis": {"method": "deepinversion"}})
    with pytest.raises(ConfigError, match=r"synthesis: g_steps = 0: .*greater than or equal to 1"):
        validate_config(DistillConfig, {**base, "synthesis": {"method": "cmi", "g_steps": 0}})
    with pytest.raises(ConfigError, match=r"synthesis: cr_temp = 0.1: unknown key for method 'cmi'"):
        validate_config(DistillConfig, {**base, "synthesis": {"method": "cmi", "cr_temp": 0.1}})
    with pytest.raises(UnknownNameError, match="no such synthesis method"):
        create_synthesizer({"method": "nope"}, SHAPE, 10)
    cfg = validate_config(DistillConfig, {**base, "synthesis": {"method": "fast", "g_steps": 2}})
    dumped = cfg.model_dump(mode="json")["synthesis"]
    assert dumped["method"] == "fast" and dumped["g_steps"] == 2 and dumped["lr_z"] == 0.01  # method fields survive a dump


def test_best_iterate_keeps_the_lowest_finite_loss():
    from kdci_ray.synthesis import BestIterate

    best = BestIterate()
    for loss, value in [(float("nan"), 0.0), (3.0, 1.0), (1.0, 2.0), (float("nan"), 3.0), (2.0, 4.0)]:
        best.update(torch.tensor(loss), torch.tensor([value]))
    assert best.loss.item() == 1.0 and best.values[0].item() == 2.0


def test_empty_pool_exports_and_reads_back(tmp_path):
    pool = ImagePool(8, (3, 4, 4), 5)
    data = read_pool_parquet(pool.to_parquet(tmp_path / "empty.parquet"))
    assert data.images.shape == (0, 3, 4, 4) and data.logits.shape == (0, 5)


def test_cmi_variants_stage_features_and_no_contrastive_term(normalize):
    torch.manual_seed(0)
    resnet = create_model("resnet18", num_classes=10, in_channels=1).eval().requires_grad_(False)
    synth = make("cmi", resnet, fresh_student(), normalize)
    assert synth.head[0].in_features == 64 + 64 + 128 + 256  # the four stage inputs, as the public resnet variant
    assert "cr" in synth.step() and synth.bank_filled == 32
    plain = make("cmi", resnet, fresh_student(), normalize, cr=0.0, feature_layers="bn_inputs")
    metrics = plain.step()
    assert "cr" not in metrics and plain.bank_filled == 0 and len(plain.pool) == 32
    with pytest.raises(ValueError, match="layer1..layer4"):
        make("cmi", create_model("digits_cnn", num_classes=10, in_channels=1).eval(), fresh_student(), normalize, feature_layers="stages")


def test_bf16_synthesis_runs_and_stays_finite(teacher, normalize):
    synth = make("fast", teacher, fresh_student(), normalize, precision="bf16")
    metrics = synth.step()
    assert all(torch.isfinite(v) for v in metrics.values()) and len(synth.pool) == 32


@pytest.mark.parametrize("bad, message", [
    ({"method": "cmi", "local_scale": [0.9, 0.1]}, "0 < low <= high <= 1"),
    ({"method": "dafl", "betas": [0.5, 1.5]}, r"betas must each be in \[0, 1\)"),
    ({"method": "fast", "bn_momentum": 1.0}, "less than 1"),
])
def test_method_settings_are_validated_before_any_work(bad, message):
    with pytest.raises(ConfigError, match=message):
        create_synthesizer(bad, SHAPE, 10)


def test_a_pool_imported_from_parquet_seeds_a_new_synthesizer(teacher, normalize, tmp_path):
    first = make("deepinv", teacher, fresh_student(), normalize)
    first.step()
    path = first.to_parquet(tmp_path / "pre.parquet")
    second = make("cmi", teacher, fresh_student(), normalize, init_pool=str(path))
    assert second.min_dictionary_images() == 32 + 32 and len(second.pool) == 0  # counted from the footer, imported lazily
    second.begin_epoch(1, None)  # imports, then the epoch's first call
    images, logits, calls = second.pool.filled()
    assert torch.equal(images[:32], first.pool.filled()[0]) and torch.allclose(logits[:32], first.pool.filled()[1], atol=1e-5)
    assert calls[:32].eq(0).all() and calls[32:].eq(1).all() and len(second.pool) == 64
    synth = create_synthesizer({"method": "deepinv", **TINY["deepinv"], "init_pool": str(path)}, (3, 8, 8), 10)
    synth.bind(create_model("digits_cnn", num_classes=10, in_channels=3).eval(), fresh_student(), Normalize([0.5] * 3, [0.5] * 3))
    with pytest.raises(ValueError, match=r"images are \(1, 8, 8\), this run needs \(3, 8, 8\)"):
        synth.begin_epoch(1, None)
    missing = create_synthesizer({"method": "deepinv", **TINY["deepinv"], "init_pool": str(tmp_path / "nope")}, SHAPE, 10)
    with pytest.raises(FileNotFoundError, match="init_pool"):
        missing.min_dictionary_images()


def test_fast_reset_and_reptile_paths(teacher, normalize):
    synth = make("fast", teacher, fresh_student(), normalize, reset_l0_at_call=2)
    synth.step()
    assert synth.generator.conv_blocks[0].weight.mean().item() > 0.5  # BN weight still ~1 after call 1
    synth.step()
    assert synth.generator.conv_blocks[0].weight.abs().mean().item() < 0.2  # re-drawn from N(0, 0.02) at call 2
    reptile = make("fast", teacher, fresh_student(), normalize, meta="reptile")
    before = [p.detach().clone() for p in reptile.generator.parameters()]
    reptile.step()
    assert all(not torch.equal(a, b) for a, b in zip(before, reptile.generator.parameters()))
    assert all(torch.isfinite(p).all() for p in reptile.generator.parameters())


@pytest.mark.parametrize("method", ["deepinv", "fast", "cmi"])
def test_pool_logits_are_the_teachers_on_the_pool_images(method, teacher, normalize):
    """The logits stored with the pool rows are what a teacher pass over the pool's images gives: the
    dictionary build reads them instead of running the teacher again."""
    from kdci_ray.kdci import teacher_blocks

    synth = make(method, teacher, fresh_student(), normalize)
    synth.step()
    synth.step()
    stored = torch.cat(list(synth.dictionary_logits(batch_size=16)))
    computed = [logits for _, logits in teacher_blocks(teacher, synth.dictionary_images(batch_size=16), normalize)]
    assert stored.shape == (len(synth), 10)
    assert torch.allclose(stored, torch.from_numpy(np.concatenate(computed)), atol=1e-4)


def test_bn_statistics_of_the_first_rows_of_a_forward():
    """CMI's two views in one teacher forward: the statistics (and their gradient) are the first view's."""
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 5, 3, padding=1), torch.nn.BatchNorm2d(5), torch.nn.ReLU()).eval()
    model[1].running_mean.uniform_(-1, 1)
    model[1].running_var.uniform_(0.5, 2)
    first, second = torch.randn(4, 3, 6, 6, requires_grad=True), torch.randn(4, 3, 6, 6, requires_grad=True)
    seen: list[torch.Tensor] = []
    tap = model[1].register_forward_hook(lambda m, i, o: seen.append(i[0]))
    stats = BNStatistics(model, rows=4)
    with stats:
        out = model(torch.cat([first, second]))
        loss = stats.loss() + out.square().mean()
    seen.clear()
    plain = model(torch.cat([first, second]))
    reference = _per_layer_bn_loss([model[1]], [seen[0][:4]]) + plain.square().mean()
    tap.remove()
    assert loss.item() == pytest.approx(reference.item(), rel=1e-5)
    got, expected = torch.autograd.grad(loss, [first, second]), torch.autograd.grad(reference, [first, second])
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(got, expected))


# Methods whose inner step compiles into one graph (issue 16); the others run their eager loop under compile.
COMPILED = {"cmi": 1, "dafl": 1, "deepinv": 1, "fast": 2, "mosaickd": 1}  # graphs: Fast blends moving-average BN statistics from its second call on


@pytest.mark.slow(seconds=40)
@pytest.mark.parametrize("method", sorted(COMPILED))
def test_compiled_inner_steps_match_the_eager_ones(method, teacher, normalize):
    """fullgraph=True raises on a graph break: a call that runs has none. Two calls (the second reuses the
    first's graph and buffers), three inner steps each: the same loss terms and images as the eager steps."""
    from torch._dynamo.utils import counters

    overrides = {"g_steps": 3}
    runs = {}
    for compiled in (False, True):
        synth = create_synthesizer({"method": method, **TINY[method], **overrides}, SHAPE, 10, seed=0)
        synth.bind(teacher, fresh_student(), normalize, compiled=compiled)
        graphs = counters["stats"]["unique_graphs"]
        traces = []
        for _ in range(2):
            synth.step()
            traces.append((torch.stack(synth.loss_trace), synth.term_trace))
        if compiled:
            assert counters["stats"]["unique_graphs"] == graphs + COMPILED[method], "a graph per kind of call, not per step"
        runs[compiled] = (traces, synth.pool.filled()[0])
    (eager, eager_images), (compiled, compiled_images) = runs[False], runs[True]
    for (a, a_terms), (b, b_terms) in zip(eager, compiled):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-5)
        assert [set(t) for t in b_terms] == [set(t) for t in a_terms]
        for x, y in zip(a_terms, b_terms):
            for name in x:
                torch.testing.assert_close(y[name], x[name], rtol=1e-3, atol=1e-5)
    assert (compiled_images.int() - eager_images.int()).abs().max() <= 1  # uint8 rounding of equal images


def test_tensor_jitter_is_torch_roll_and_flip():
    from kdci_ray.synthesis.augment import draw_jitter_and_flip, jitter_and_flip

    x = torch.randn(2, 3, 5, 7)
    for dy, dx, flip in [(0, 0, False), (2, -3, False), (-1, 4, True)]:
        expected = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
        expected = expected.flip(3) if flip else expected
        assert torch.equal(jitter_and_flip(x, torch.tensor([dy, dx]), torch.tensor(flip)), expected)
    shifts, flips = draw_jitter_and_flip(200, 2, True, torch.Generator().manual_seed(0), "cpu")
    assert shifts.shape == (200, 2) and shifts.min() == -2 and shifts.max() == 2 and 0.3 < flips.float().mean() < 0.7
    assert not draw_jitter_and_flip(10, 2, False, torch.Generator().manual_seed(0), "cpu")[1].any()


def test_masked_contrastive_loss_is_the_loss_without_the_masked_rows():
    from kdci_ray.synthesis.losses import contrastive_loss

    torch.manual_seed(0)
    local, global_ = torch.randn(10, 6, requires_grad=True), torch.randn(10, 6)
    for held in (0, 2, 6):  # bank rows that hold features, of 6
        valid = torch.arange(10) < 4 + held
        masked = contrastive_loss(local, global_, 0.2, n_current=4, valid=valid)
        plain = contrastive_loss(local[: 4 + held], global_[: 4 + held], 0.2, n_current=4)
        torch.testing.assert_close(masked, plain)
        grad_masked, = torch.autograd.grad(masked, local)
        grad_plain, = torch.autograd.grad(plain, local)
        torch.testing.assert_close(grad_masked, grad_plain)  # masked rows: no gradient, as absent ones


def test_pool_journal_writes_only_new_rows_and_restores_the_ring(tmp_path):
    """Checkpoints keep the pool as segment files of the rows added since the previous one; rows that the
    ring has overwritten drop out of the state, and their files are deleted one checkpoint later."""
    pool = ImagePool(10, (1, 2, 2), 3)
    added = 0

    def add(n):
        nonlocal added
        images = (torch.arange(added, added + n) % 256).to(torch.uint8).view(n, 1, 1, 1).expand(n, 1, 2, 2).contiguous()
        pool.add(images, torch.full((n, 3), float(added)), call=added)
        added += n

    add(4)
    state, files = pool.journal_state(tmp_path)
    assert [f.name for f in files] == ["pool-000000000000-000000000004.safetensors"]
    add(3)
    state, files = pool.journal_state(tmp_path)
    assert [f.name for f in files][-1] == "pool-000000000004-000000000007.safetensors" and len(files) == 2  # only the new rows
    add(9)  # 16 written: the ring (10) holds rows 6..15; rows 0..5 are gone
    state, files = pool.journal_state(tmp_path)
    assert [tuple(seg[:2]) for seg in state["journal"]] == [(4, 7), (7, 16)]  # (0, 4) dropped: all its rows overwritten
    assert (tmp_path / "pool-000000000000-000000000004.safetensors").is_file()  # the checkpoint on disk may still need it
    state = torch.load(_saved(state, tmp_path), weights_only=True)
    state["folder"] = str(tmp_path)
    restored = ImagePool(10, (1, 2, 2), 3)
    restored.load_state_dict(state)
    for a, b in zip(restored.filled(), pool.filled()):
        assert torch.equal(a, b)
    assert (restored.next, restored.total_added, len(restored)) == (pool.next, pool.total_added, len(pool))
    add(1)
    pool.journal_state(tmp_path)
    assert not (tmp_path / "pool-000000000000-000000000004.safetensors").exists()  # deleted one checkpoint later
    restored.add(pool.images[pool.next - 1 : pool.next], pool.logits[pool.next - 1 : pool.next], call=16)
    assert torch.equal(restored.filled()[0], pool.filled()[0])  # the restored ring continues where it was
    # A missing segment is one clear line.
    (tmp_path / state["journal"][0][2]).unlink()
    with pytest.raises(ValueError, match="is missing: the checkpoint's image pool is kept in segment files"):
        ImagePool(10, (1, 2, 2), 3).load_state_dict(state)


def _saved(state, folder):
    torch.save(state, folder / "state.pt")
    return folder / "state.pt"
