"""Data-free validation (issue 18): held-out substitution data that training never sees, scored against the
teacher; the reporting protocols (last, best by test labels, selected by val_agreement)."""

import faiss  # noqa: F401  (before torch)

import contextlib
import json

import pytest
import torch
from test_synthesis import SHAPE, TINY, fresh_student, make

from kdci_ray.config import DistillConfig, validate_config
from kdci_ray.data import SubstitutionSet
from kdci_ray.engine.validation import Validation, held_out_count, with_protocols
from kdci_ray.synthesis import create_synthesizer


def test_a_fixed_sets_held_out_rows_never_reach_a_batch_or_the_dictionary():
    images = torch.arange(200, dtype=torch.int64).to(torch.uint8).view(200, 1, 1, 1).expand(200, 1, 2, 2).contiguous()
    cfg = validate_config(DistillConfig, {"name": "x", "data": {"dataset": "digits"}, "teacher": {"arch": "digits_cnn", "weights": "t"},
                                          "student": {"arch": "digits_cnn_small"}, "validation": {"images": 64, "share": 0.1}})
    source = SubstitutionSet(images, seed=3)
    count = held_out_count(cfg, source)
    assert count == 20  # validation.share caps it: 10 % of 200
    source.hold_out(count)
    held = set(source.validation_images()[:, 0, 0, 0].tolist())
    assert len(held) == 20 and held == set(source.held_out_rows.tolist())  # pixel value = row id
    seen = {int(v) for epoch in range(1, 4) for b in source.batches(epoch, 16) for v in b[:, 0, 0, 0]}
    seen |= {int(v) for b in source.dictionary_images(64) for v in b[:, 0, 0, 0]}
    assert seen == set(range(200)) - held and len(source) == 180
    again = SubstitutionSet(images, seed=3)
    again.hold_out(count)
    assert torch.equal(again.held_out_rows, source.held_out_rows)  # seeded: a resumed run holds out the same rows


@pytest.mark.parametrize("method", sorted(TINY))
def test_held_out_synthesis_calls_leave_training_exactly_as_without_them(method, teacher, normalize):
    """Made with held-out seeds from the current state, then everything put back: the next training call and
    the pool are bit-identical to a synthesizer that never made them, and no held-out image is in the pool."""
    plain, probed = (make(method, teacher, fresh_student(), normalize) for _ in range(2))
    probed.hold_out(40)
    for synth in (plain, probed):
        synth.step()
    held = probed.validation_images()
    assert held.shape == (40, *SHAPE) and held.dtype == torch.uint8
    for synth in (plain, probed):
        synth.step()
    assert probed.calls == plain.calls == 2
    for a, b in zip(plain.pool.filled(), probed.pool.filled()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    pool = probed.pool.filled()[0].flatten(1)
    assert not (held.flatten(1)[:, None, :] == pool[None]).all(-1).any()


def test_dfnd_holds_out_a_share_of_its_selection(teacher, normalize):
    dfnd = create_synthesizer({"method": "dfnd", "wild": {"dataset": "digits-wild", "limit": 400}, "num_select": 100}, SHAPE, 10)
    dfnd.bind(teacher, fresh_student(), normalize)
    cfg = validate_config(DistillConfig, {"name": "x", "data": {"dataset": "digits"}, "teacher": {"arch": "digits_cnn", "weights": "t"},
                                          "student": {"arch": "digits_cnn_small"}})
    count = held_out_count(cfg, dfnd)
    assert count == 10
    dfnd.hold_out(count)
    dfnd.begin_epoch(1, None)
    held, train = dfnd.validation_images().flatten(1), dfnd.pool.filled()[0].flatten(1)
    assert len(held) == 10 and len(train) == 90 and dfnd.steps_per_epoch(30) == 3
    assert not (held[:, None, :] == train[None]).all(-1).any()
    restored = create_synthesizer({"method": "dfnd", "wild": {"dataset": "digits-wild", "limit": 400}, "num_select": 100}, SHAPE, 10)
    restored.bind(teacher, fresh_student(), normalize)
    restored.hold_out(count)
    restored.load_state_dict(dfnd.state_dict())  # a resume: same training rows, same held-out rows
    assert torch.equal(restored.pool.filled()[0], dfnd.pool.filled()[0]) and torch.equal(restored.validation_images(), dfnd.validation_images())


def test_agreement_and_kl_against_a_hand_computation():
    teacher_logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 3.0]])
    val = Validation(torch.zeros(4, 1, 1, 1, dtype=torch.uint8), teacher_logits)
    student_logits = torch.tensor([[1.0, 0.0], [1.0, 0.0], [3.0, 0.0], [0.0, 1.0]])
    student = torch.nn.Module()
    student.forward = lambda x: student_logits[: len(x)]
    scores = val.score(student, lambda x: x, contextlib.nullcontext)
    p, q = teacher_logits.softmax(1), student_logits.softmax(1)
    assert float(scores["val_agreement"]) == 75.0
    assert float(scores["val_kl"]) == pytest.approx(float((p * (p.log() - q.log())).sum(1).mean()), rel=1e-6)


def test_protocols_label_last_best_and_val_selected_epochs():
    history = []
    for epoch, (top1, agree) in enumerate([(50.0, 70.0), (60.0, 90.0), (55.0, 80.0)], start=1):
        history.append(with_protocols({"epoch": epoch, "test_top1": top1, "val_agreement": agree}, history))
    last = history[-1]
    assert last["test_top1_last"] == 55.0 and (last["test_top1_best"], last["test_top1_best_epoch"]) == (60.0, 2)
    assert (last["test_top1_val_selected"], last["test_top1_val_selected_epoch"]) == (60.0, 2)


def test_a_launcher_preflights_every_digits_method_before_binding(digits_teacher):
    """What `tune`/`reproduce` check on the driver before any trial: every method, unbound (MosaicKD's wild set
    not loaded yet: its index is read for the dictionary-size check)."""
    from pathlib import Path

    from kdci_ray.config import load_config
    from kdci_ray.engine.distill import preflight

    configs = Path(__file__).resolve().parents[1] / "configs"
    for method in ("dafl", "deepinv", "fast", "cmi", "mosaickd", "dfnd"):
        cfg = load_config(configs / f"{method}-digits-digits_cnn-digits_cnn_small.yaml", DistillConfig, [f"teacher.weights={digits_teacher}"])
        assert preflight(cfg) >= cfg.kdci.n, method


def test_spearman_rank_correlation_by_hand():
    from kdci_ray.distributed.tune import rank_correlation

    rows = [{"a": 1, "b": 10}, {"a": 2, "b": 20}, {"a": 3, "b": 30}, {"a": 4, "b": None}]
    assert rank_correlation(rows, "a", "b") == {"between": ["a", "b"], "spearman": 1.0, "trials": 3}
    assert rank_correlation([{"a": 1, "b": 3}, {"a": 2, "b": 2}, {"a": 3, "b": 1}], "a", "b")["spearman"] == -1.0
    # ties share their mean rank: a = [1, 1, 2, 3] -> ranks [0.5, 0.5, 2, 3]; b ranks [0, 1, 2, 3]
    rho = rank_correlation([{"a": 1, "b": 1}, {"a": 1, "b": 2}, {"a": 2, "b": 3}, {"a": 3, "b": 4}], "a", "b")["spearman"]
    assert rho == pytest.approx(0.9487, abs=1e-4)
    assert rank_correlation(rows[:2], "a", "b") is None  # too few trials to rank


def test_the_public_recipe_options_decay_every_parameter_and_cmis_dafl_generator(teacher, normalize):
    """Issue 18's recipe switches: weight decay on BN weights and biases too; DAFL as the CMI repository runs it."""
    from kdci_ray.engine.teacher import param_groups
    from kdci_ray.models import create_model

    model = create_model("digits_cnn_small", num_classes=10, in_channels=1)
    ours, public = param_groups(model, 5e-4), param_groups(model, 5e-4, decay_norm_and_bias=True)
    assert [g["weight_decay"] for g in ours] == [5e-4, 0.0] and any(p.ndim == 1 for p in ours[1]["params"])
    assert len(public) == 1 and len(public[0]["params"]) == len(list(model.parameters()))
    dafl = make("dafl", teacher, fresh_student(), normalize, variant="cmi")
    assert dafl.generator.conv_blocks[0].num_features == 4 * TINY["dafl"]["ngf"]  # 256 channels at ngf 64
    before = {k: v.clone() for k, v in dafl.generator.named_buffers()}
    dafl.sample(8, torch.Generator().manual_seed(0))
    assert not dafl.generator.training and all(torch.equal(before[k], v) for k, v in dafl.generator.named_buffers())
    fast_variant = make("dafl", teacher, fresh_student(), normalize)
    assert fast_variant.generator.conv_blocks[0].num_features == 2 * TINY["dafl"]["ngf"]
    fast_variant.sample(8, torch.Generator().manual_seed(0))
    assert fast_variant.generator.training  # Fast-Datafree's: batch statistics when sampling for KD


def test_the_first_dictionary_waits_for_enough_pool_images(digits_teacher, tmp_path):
    """kdci.min_images_per_prototype: DeepInv adds 32 images a call (one call an epoch); N = 8 x 8 per prototype =
    64 images: epoch 1 is plain KD (no compensated score, no attention), the dictionary comes at epoch 2."""
    from kdci_ray.engine.distill import distill_from_config

    cfg = validate_config(DistillConfig, {
        "name": "wait", "device": "cpu", "data": {"dataset": "digits"}, "teacher": {"arch": "digits_cnn", "weights": str(digits_teacher)},
        "student": {"arch": "digits_cnn_small"}, "kdci": {"n": 8, "min_images_per_prototype": 8}, "optim": {"epochs": 3, "batch_size": 16},
        "augment": {"crop_padding": 1, "hflip": False}, "output": {"dir": str(tmp_path)}, "validation": {"images": 16},
        "synthesis": {"method": "deepinv", "batch_size": 32, "g_steps": 2, "kd_steps_per_call": 4},
    })
    history = distill_from_config(cfg).history
    assert ["attention_entropy" in row for row in history] == [False, True, True]
    # A run too short to reach the target builds at the latest after half of it (here at once: 1 epoch).
    short = distill_from_config(cfg.model_copy(update={"name": "short", "optim": cfg.optim.model_copy(update={"epochs": 1})})).history
    assert "test_top1_compensated" in short[0]
    assert "test_top1_compensated" not in history[0] and "test_top1_compensated" in history[1]
    dictionary = json.loads((tmp_path / "wait" / "dictionary.json").read_text()) if (tmp_path / "wait" / "dictionary.json").exists() else None
    assert dictionary is None or dictionary.get("samples", 64) >= 64


def test_a_synthesizer_holds_out_at_most_one_calls_batch(teacher, normalize):
    cfg = validate_config(DistillConfig, {"name": "x", "data": {"dataset": "digits"}, "teacher": {"arch": "digits_cnn", "weights": "t"},
                                          "student": {"arch": "digits_cnn_small"}})
    assert held_out_count(cfg, make("deepinv", teacher, fresh_student(), normalize)) == 32  # 512 asked, batch 32
