"""Shift diagnostics (issue 18): class proportions and their divergences, the Frechet distance in the teacher's
feature space, KDCI's prototype usage; logged by a real run."""

import faiss  # noqa: F401  (before torch)

import json
import math

import numpy as np
import pytest
import torch

from kdci_ray.engine.diagnostics import class_proportions, frechet_distance, kl_divergence, shift_metrics


def test_class_proportion_divergence_matches_a_hand_computation():
    labels = torch.tensor([0, 0, 0, 1])  # proportions (0.75, 0.25, 0) over 3 classes
    p = class_proportions(labels, 3)
    assert p.tolist() == [0.75, 0.25, 0.0]
    by_hand = 0.75 * math.log(0.75 / (1 / 3)) + 0.25 * math.log(0.25 / (1 / 3))  # the empty class adds 0
    assert kl_divergence(p, np.full(3, 1 / 3)) == pytest.approx(by_hand, abs=1e-6)
    metrics = shift_metrics(torch.eye(3)[labels] * 5, torch.zeros(4, 2), 3, test_labels=torch.tensor([0, 1, 2]))
    assert metrics["shift_kl_uniform"] == pytest.approx(by_hand, abs=1e-6) == pytest.approx(metrics["shift_kl_test"], abs=1e-6)
    assert metrics["shift_classes_present"] == 2.0


def test_frechet_distance_of_a_set_to_itself_is_zero_and_grows_with_a_planted_shift():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(2000, 16))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    b = rng.normal(size=(2000, 16))  # the same distribution, another sample: small
    shifts = [frechet_distance(a, b + shift) for shift in (0.0, 0.5, 1.0, 2.0)]
    assert shifts[0] < 0.2 and shifts == sorted(shifts)
    assert shifts[-1] == pytest.approx(16 * 2.0**2, rel=0.05)  # a mean shift of 2 in 16 dimensions: ||mu||^2 = 64
    scaled = frechet_distance(a, 3 * b)  # covariance 9 I vs I: Tr(I + 9I - 2*3I) = 4 per dimension
    assert scaled == pytest.approx(16 * 4.0, rel=0.1)


def test_a_run_logs_shift_diagnostics_at_the_first_epoch_each_build_and_the_end(digits_teacher, tmp_path):
    from kdci_ray.config import DistillConfig, validate_config
    from kdci_ray.data import SubstitutionSet, dataset_info, load_dataset
    from kdci_ray.engine.distill import distill

    info = dataset_info("digits")
    cfg = validate_config(DistillConfig, {
        "name": "shift", "device": "cpu", "data": {"dataset": "digits"}, "teacher": {"arch": "digits_cnn", "weights": str(digits_teacher)},
        "student": {"arch": "digits_cnn_small"}, "kdci": {"n": 8, "rebuild_every": 2}, "optim": {"epochs": 3, "batch_size": 64},
        "augment": {"crop_padding": 1, "hflip": False}, "output": {"dir": str(tmp_path)},
    })
    train = load_dataset("digits", split="train")
    images = torch.from_numpy(train.images).permute(0, 3, 1, 2).contiguous()[:512]
    result = distill(cfg, SubstitutionSet(images, seed=0))
    measured = [row["epoch"] for row in result.history if "shift_frechet_test" in row]
    assert measured == [1, 3]  # epoch 1 (also the first build), the rebuild at 3 (also the end)
    records = json.loads((tmp_path / "shift" / "diagnostics.json").read_text())
    assert [r["epoch"] for r in records] == [1, 3] and len(records[0]["proportions"]) == info.num_classes
    assert len(records[-1]["usage"]) == 8 and sum(records[-1]["usage"]) == pytest.approx(1.0, abs=1e-4)
    # Real digits training images against the real test split: little shift (a planted-shift yardstick: the test above).
    assert records[0]["shift_kl_test"] < 0.05 and records[0]["shift_frechet_test"] >= 0
    assert "val_agreement" in result.final and result.final["test_top1_last"] == result.final["test_top1"]
