"""Teachers and students from torchvision, timm and the user's own code (issue 17), through the real paths."""

import faiss  # noqa: F401  (before torch)

import json

import pytest
import torch
import torchvision

from kdci_ray.config import ConfigError, DistillConfig, validate_config
from kdci_ray.data import Normalize, SubstitutionSet, dataset_info
from kdci_ray.models import ModelCard, WeightsError, create_model, load_classifier, save_classifier
from kdci_ray.synthesis import create_synthesizer

CIFAR = dataset_info("cifar10")


def test_torchvision_timm_and_import_specs_build_classifiers_with_features_and_bn():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 32, 32)
    tv = create_model("torchvision:resnet18", num_classes=10).eval()
    logits, features = tv(x, return_features=True)
    assert logits.shape == (2, 10) and features.shape == (2, 512) and len(tv.bn_layers()) == 20
    # The wrapped model's own keys: torchvision's weights load as they are, and ours back into torchvision.
    assert list(tv.state_dict()) == list(torchvision.models.resnet18(num_classes=10).state_dict())
    torch.testing.assert_close(tv(x), tv.net(x))
    pytest.importorskip("timm")
    tm = create_model("timm:resnet18", num_classes=7).eval()
    logits, features = tm(x, return_features=True)
    assert logits.shape == (2, 7) and features.shape == (2, 512) and tm.bn_layers()
    mine = create_model("import:models_for_import:tiny_net", num_classes=5, width=6)
    logits, features = mine(torch.rand(2, 3, 16, 16), return_features=True)
    assert logits.shape == (2, 5) and features.shape == (2, 6)


def test_bad_specs_are_one_line_each():
    with pytest.raises(ValueError, match="no such torchvision model 'resnet19'.*did you mean"):
        create_model("torchvision:resnet19", num_classes=10)
    with pytest.raises(ValueError, match="cannot import 'no_such_module'"):
        create_model("import:no_such_module:f", num_classes=10)
    with pytest.raises(ValueError, match="models_for_import has no callable 'nope'"):
        create_model("import:models_for_import:nope", num_classes=10)
    with pytest.raises(ValueError, match="features_layer = 'body' is not a submodule"):
        create_model("torchvision:resnet18", num_classes=10, features_layer="body")
    base = {"name": "x", "data": {"dataset": "cifar10"}, "teacher": {"arch": "resnet34", "weights": "t.safetensors"}}
    with pytest.raises(ConfigError, match="model spec 'import:models_for_import' is incomplete"):
        validate_config(DistillConfig, {**base, "student": {"arch": "import:models_for_import"}})
    with pytest.raises(ConfigError, match="pretrained, features_layer and options are for torchvision"):
        validate_config(DistillConfig, {**base, "student": {"arch": "resnet18", "pretrained": True}})
    with pytest.raises(ConfigError, match="known classifiers: .*torchvision:<name>"):
        validate_config(DistillConfig, {**base, "student": {"arch": "resnet180"}})


def _bn_free_teacher():
    return create_model("import:models_for_import:no_bn_net", num_classes=10).eval().requires_grad_(False)


@pytest.mark.parametrize("method", ["deepinv", "cmi", "fast"])
def test_bn_statistics_methods_refuse_a_teacher_without_batchnorm(method):
    synth = create_synthesizer({"method": method, "batch_size": 4, "g_steps": 1}, (3, 16, 16), 10)
    student = create_model("import:models_for_import:tiny_net", num_classes=10)
    with pytest.raises(ValueError, match="no BatchNorm2d layers.*DAFL, MosaicKD and DFND work without them"):
        synth.bind(_bn_free_teacher(), student, Normalize(CIFAR.mean, CIFAR.std))


def test_dafl_and_dfnd_accept_a_teacher_without_batchnorm():
    synth = create_synthesizer({"method": "dafl", "batch_size": 4, "g_steps": 1, "nz": 8, "ngf": 4}, (3, 16, 16), 10)
    synth.bind(_bn_free_teacher(), create_model("import:models_for_import:tiny_net", num_classes=10), Normalize(CIFAR.mean, CIFAR.std))
    assert torch.isfinite(synth.step()["loss"])
    dfnd = create_synthesizer({"method": "dfnd", "wild": {"dataset": "digits-wild", "limit": 64}, "num_select": 8}, (3, 16, 16), 10)
    dfnd.bind(_bn_free_teacher(), create_model("import:models_for_import:tiny_net", num_classes=10), Normalize(CIFAR.mean, CIFAR.std))
    dfnd.begin_epoch(1, None)
    assert dfnd.pool.filled()[0].shape == (8, 3, 16, 16)


@pytest.mark.slow(seconds=40)
@pytest.mark.parametrize("spec,size", [("torchvision:resnet18", 32), ("timm:resnet18", 64)])
def test_an_external_teacher_goes_through_one_call_of_every_method(spec, size):
    if spec.startswith("timm:"):
        pytest.importorskip("timm")
    torch.manual_seed(0)
    teacher = create_model(spec, num_classes=10).eval().requires_grad_(False)
    student = create_model("torchvision:resnet18", num_classes=10)
    tiny = {"batch_size": 4, "g_steps": 1, "nz": 16, "ngf": 8}
    for method, settings in {"deepinv": {"batch_size": 4, "g_steps": 1}, "fast": {**tiny, "warmup_calls": 0, "adv_after_calls": 0},
                             "cmi": {**tiny, "bank_size": 16, "n_negatives": 8}, "dafl": tiny,
                             "mosaickd": {**tiny, "ndf": 8, "wild": {"dataset": "digits-wild", "limit": 64}, "lr_schedule": "constant"},
                             "dfnd": {"wild": {"dataset": "digits-wild", "limit": 64}, "num_select": 4}}.items():
        synth = create_synthesizer({"method": method, **settings}, (3, size, size), 10)
        synth.bind(teacher, student, Normalize(CIFAR.mean, CIFAR.std))
        if method == "dfnd":  # a selection, not a synthesis call: it fills the pool once, when KD starts
            synth.begin_epoch(1, None)
        else:
            metrics = synth.step()
            assert all(torch.isfinite(v) for v in metrics.values()), (method, metrics)
        assert synth.pool.filled()[0].shape == (4, 3, size, size), method


@pytest.mark.slow(seconds=60)
@pytest.mark.parametrize("teacher_spec,student_spec,size", [("torchvision:resnet18", "timm:resnet18", 32),
                                                            ("timm:mobilenetv3_small_100", "torchvision:resnet18", 64)])
def test_an_external_teacher_from_a_file_distills_with_kdci_and_the_student_exports(teacher_spec, student_spec, size, shared_dir, tmp_path):
    """Weights file + card (random init), one KD epoch with KDCI on, evaluation, then ONNX and TorchScript exports
    of the student checked against torch on test images: at 32 px on CIFAR-10, at 64 px on a Tiny-ImageNet tree."""
    pytest.importorskip("timm")
    from kdci_ray.engine.distill import distill
    from kdci_ray.models.export import export_student

    if size == 32:
        data = {"dataset": "cifar10", "root": str(shared_dir / "data" / "cifar10-jpeg.tar.gz"), "limit": 64}
        dataset, classes = "cifar10", 10
    else:
        from test_data import make_tiny_imagenet

        make_tiny_imagenet(tmp_path / "data")
        data, dataset, classes = {"dataset": "tiny-imagenet", "root": str(tmp_path / "data")}, "tiny-imagenet", 200
    torch.manual_seed(0)
    weights = save_classifier(create_model(teacher_spec, num_classes=classes), tmp_path / "teacher.safetensors",
                              ModelCard(arch=teacher_spec, num_classes=classes, dataset=dataset))
    loaded, card = load_classifier(weights)
    assert card.arch == teacher_spec and type(loaded).__name__ == "ExternalClassifier"
    cfg = validate_config(DistillConfig, {
        "name": "ext", "device": "cpu", "data": data,
        "teacher": {"arch": teacher_spec, "weights": str(weights)}, "student": {"arch": student_spec},
        "kdci": {"n": 4}, "optim": {"epochs": 1, "batch_size": 16}, "output": {"dir": str(tmp_path)},
    })
    pool = torch.randint(0, 256, (32, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    result = distill(cfg, SubstitutionSet(pool, seed=0))
    assert result.finished and 0 <= result.final["test_top1"] <= 100 and "test_top1_compensated" in result.final
    run_dir = tmp_path / "ext"
    assert json.loads((run_dir / "student.json").read_text())["arch"] == student_spec
    for fmt in ("onnx", "torchscript"):
        if fmt == "onnx":
            pytest.importorskip("onnx")
        exported = export_student(run_dir, fmt, check_images=16)
        assert exported["images"] >= 3 and (run_dir / f"student.{'onnx' if fmt == 'onnx' else 'pt'}").is_file(), exported
        if "max_logit_diff" in exported:
            assert exported["max_logit_diff"] < 1e-3 and exported["same_predictions"], exported


@pytest.mark.slow(seconds=20)
def test_onnx_export_of_a_digits_student_keeps_its_test_top1(digits_teacher, tmp_path, capsys):
    """The round trip issue 17 asks for: a trained digits classifier as a run's student, exported through the
    CLI, scored by onnxruntime on the whole digits test split: the same top-1 as torch."""
    pytest.importorskip("onnxruntime")
    from kdci_ray.cli import main

    run_dir = tmp_path / "run"
    model, card = load_classifier(digits_teacher)
    save_classifier(model, run_dir / "student.safetensors", card)
    assert main(["export", "--run", str(run_dir), "--format", "onnx", "--check-images", "100000"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["checked_with"].startswith("onnxruntime") and result["images"] == len_digits_test()
    assert result["top1_export"] == result["top1_torch"] > 90 and result["max_logit_diff"] < 1e-3
    exported_card = json.loads((run_dir / "student.onnx.json").read_text())
    assert exported_card["export"]["format"] == "onnx" and exported_card["arch"] == "digits_cnn"
    assert main(["export", "--run", str(tmp_path / "nothing"), "--format", "onnx"]) == 2
    assert "does not exist: --run must be the folder of a finished distillation run" in capsys.readouterr().err


def len_digits_test() -> int:
    from kdci_ray.data import load_dataset

    return len(load_dataset("digits", split=dataset_info("digits").eval_split).images)


def test_deepinv_multi_resolution_and_a_224_px_generator_run_one_call_each():
    """ImageNet-size synthesis at toy batch: DeepInv's low-resolution phase first, and a generator at 224 px."""
    torch.manual_seed(0)
    teacher = create_model("import:models_for_import:tiny_net", num_classes=10).eval().requires_grad_(False)
    student = create_model("import:models_for_import:tiny_net", num_classes=10)
    normalize = Normalize(CIFAR.mean, CIFAR.std)
    seen = []
    teacher.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0].shape[-1]))
    deepinv = create_synthesizer({"method": "deepinv", "batch_size": 2, "g_steps": 3, "multires_steps": 2}, (3, 224, 224), 10)
    deepinv.bind(teacher, student, normalize)
    seen.clear()
    deepinv.step()
    assert seen[:3] == [112, 112, 224]  # two low-resolution steps, then full resolution (then the pool's teacher pass)
    assert deepinv.pool.filled()[0].shape == (2, 3, 224, 224)
    dafl = create_synthesizer({"method": "dafl", "batch_size": 2, "g_steps": 1, "nz": 8, "ngf": 4}, (3, 224, 224), 10)
    dafl.bind(teacher, student, normalize)
    assert torch.isfinite(dafl.step()["loss"]) and dafl.pool.filled()[0].shape == (2, 3, 224, 224)


def test_a_224_px_pool_bound_that_does_not_fit_the_device_is_refused_before_synthesis(tmp_path):
    from kdci_ray.engine.distill import distill, make_source

    cfg = validate_config(DistillConfig, {
        "name": "big", "device": "cpu", "data": {"dataset": "imagenet"}, "teacher": {"arch": "torchvision:resnet50", "weights": "t.safetensors"},
        "student": {"arch": "torchvision:resnet18"}, "output": {"dir": str(tmp_path)},
        "synthesis": {"method": "deepinv", "batch_size": 2, "pool_size": 10_000_000},
    })
    with pytest.raises(ValueError, match=r"synthesis.pool_size: 10000000 images of 3x224x224 take 14\d\d.\d GiB on cpu, more than half "
                                         r"of its \d+ GiB; lower synthesis.pool_size to <= \d+"):
        distill(cfg, make_source(cfg))
    assert not (tmp_path / "big").exists()  # nothing written, no model loaded


def test_a_teacher_card_of_another_image_size_is_refused_before_training(tmp_path):
    from kdci_ray.engine.distill import load_models
    from kdci_ray.engine.runtime import resolve_runtime

    weights = save_classifier(create_model("resnet18", num_classes=10), tmp_path / "t.safetensors",
                              ModelCard(arch="resnet18", num_classes=10, dataset="tiny-imagenet", extra={"image_size": 64}))
    cfg = validate_config(DistillConfig, {"name": "x", "data": {"dataset": "cifar10"}, "teacher": {"arch": "resnet18", "weights": str(weights)},
                                          "student": {"arch": "resnet18"}})
    with pytest.raises(ValueError, match="takes 3-channel images of 64 px; data.dataset = cifar10 has 3-channel 32 px images"):
        load_models(cfg, resolve_runtime("cpu"))


def test_your_own_import_model_distills_evaluates_and_exports(tmp_path):
    """import:<module>:<callable> as teacher and student on digits: one KD epoch with KDCI on, evaluation, exports."""
    from kdci_ray.engine.distill import distill
    from kdci_ray.models.export import export_student

    torch.manual_seed(0)
    spec = "import:models_for_import:tiny_net"
    weights = save_classifier(create_model(spec, num_classes=10, in_channels=1, width=12), tmp_path / "mine.safetensors",
                              ModelCard(arch=spec, num_classes=10, dataset="digits", in_channels=1, extra={"model_options": {"width": 12}}))
    cfg = validate_config(DistillConfig, {
        "name": "mine", "device": "cpu", "data": {"dataset": "digits"},
        "teacher": {"arch": spec, "weights": str(weights), "options": {"width": 12}}, "student": {"arch": spec, "options": {"width": 6}},
        "kdci": {"n": 4}, "optim": {"epochs": 1, "batch_size": 16}, "augment": {"crop_padding": 1, "hflip": False},
        "output": {"dir": str(tmp_path)},
    })
    pool = torch.randint(0, 256, (64, 1, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    result = distill(cfg, SubstitutionSet(pool, seed=0))
    assert result.finished and "test_top1_compensated" in result.final
    card = json.loads((tmp_path / "mine" / "student.json").read_text())
    assert card["arch"] == spec and card["model_options"] == {"width": 6}  # rebuilt from the card alone
    assert load_classifier(tmp_path / "mine" / "student.safetensors")[0].feature_dim == 6
    exported = export_student(tmp_path / "mine", "torchscript", check_images=32)
    assert exported["same_predictions"] and exported["max_logit_diff"] < 1e-4
