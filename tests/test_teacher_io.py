import json

import pytest
import torch

from kdci_ray.models import ModelCard, WeightsError, card_path, create_model, load_classifier, read_state_dict, save_classifier


def _model(arch="wrn16_1", num_classes=10):
    torch.manual_seed(0)
    return create_model(arch, num_classes=num_classes).eval()


def _same_outputs(a, b):
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        return torch.allclose(a.eval()(x), b.eval()(x), atol=1e-5)


def test_safetensors_roundtrip_with_card(tmp_path):
    model = _model()
    card = ModelCard(arch="wrn16_1", num_classes=10, dataset="cifar10", normalize_mean=[0.1, 0.2, 0.3],
                     normalize_std=[0.3, 0.2, 0.1], accuracy=88.5, extra={"epochs": 3})
    path = save_classifier(model, tmp_path / "t.safetensors", card)
    assert card_path(path).is_file()
    loaded, read_card = load_classifier(path)  # arch and classes from the card
    assert read_card == card and not loaded.training and _same_outputs(model, loaded)
    with pytest.raises(FileExistsError):
        save_classifier(model, path, card)
    save_classifier(model, path, card, overwrite=True)


def test_torch_checkpoint_wrapped_prefixed_and_fp16(tmp_path):
    model = _model()
    state = {f"module.{k}": (v.half() if v.is_floating_point() else v) for k, v in model.state_dict().items()}
    path = tmp_path / "ckpt.pth"
    torch.save({"state_dict": state, "epoch": 199, "best_acc": 0.9}, path)
    loaded, card = load_classifier(path, arch="wrn16_1", num_classes=10)
    assert all(v.dtype != torch.float16 for v in loaded.state_dict().values())
    assert card.arch == "wrn16_1"
    assert _same_outputs(model.half().float(), loaded)


def test_untrusted_pickle_is_refused(tmp_path):
    class Payload:
        def __reduce__(self):
            import os

            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    path = tmp_path / "evil.pt"
    torch.save({"state_dict": _model().state_dict(), "x": Payload()}, path)
    with pytest.raises(WeightsError, match="weights_only=True"):
        read_state_dict(path)
    assert not (tmp_path / "pwned").exists()


def test_wrong_arch_names_the_matching_arch(tmp_path):
    path = save_classifier(_model("wrn16_1"), tmp_path / "w.safetensors", ModelCard("wrn16_1", 10))
    card_path(path).unlink()
    with pytest.raises(WeightsError) as exc:
        load_classifier(path, arch="resnet18", num_classes=10)
    msg = str(exc.value)
    assert "missing key" in msg and "unexpected key" in msg and "['wrn16_1']" in msg


def test_wrong_class_count_is_one_clear_error(tmp_path):
    path = save_classifier(_model("wrn16_1", 10), tmp_path / "w.safetensors", ModelCard("wrn16_1", 10))
    card_path(path).unlink()
    with pytest.raises(WeightsError, match=r"shape mismatch.*fc.weight: file \[10, 64\] vs model \[100, 64\].*10 outputs"):
        load_classifier(path, arch="wrn16_1", num_classes=100)


def test_wrong_input_channels_hint(tmp_path):
    torch.manual_seed(0)
    gray = create_model("wrn16_1", num_classes=10, in_channels=1)
    path = save_classifier(gray, tmp_path / "g.safetensors", ModelCard("wrn16_1", 10, in_channels=1))
    card_path(path).unlink()
    with pytest.raises(WeightsError) as exc:
        load_classifier(path, arch="wrn16_1", num_classes=10)
    assert "1 input channels (wrong in_channels?)" in str(exc.value) and "num_classes?" not in str(exc.value)
    model, card = load_classifier(path, arch="wrn16_1", num_classes=10, in_channels=1)
    assert card.in_channels == 1


def test_card_disagreeing_with_arguments(tmp_path):
    path = save_classifier(_model(), tmp_path / "w.safetensors", ModelCard("wrn16_1", 10))
    with pytest.raises(WeightsError, match="arch mismatch.*'wrn40_2'.*'wrn16_1'"):
        load_classifier(path, arch="wrn40_2")
    with pytest.raises(WeightsError, match="num_classes mismatch"):
        load_classifier(path, num_classes=100)


def test_missing_bad_and_cardless_files(tmp_path):
    with pytest.raises(WeightsError, match="does not exist"):
        load_classifier(tmp_path / "nope.safetensors", arch="wrn16_1")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(WeightsError, match="not a readable safetensors"):
        load_classifier(tmp_path / "junk.safetensors", arch="wrn16_1")
    path = save_classifier(_model(), tmp_path / "w.safetensors", ModelCard("wrn16_1", 10))
    card_path(path).unlink()
    with pytest.raises(WeightsError, match="no arch given"):
        load_classifier(path)
    with pytest.raises(WeightsError, match="no such model 'wrn99'"):
        load_classifier(path, arch="wrn99")
    card_path(path).write_text("{not json")
    with pytest.raises(WeightsError, match="not valid JSON"):
        load_classifier(path)
    card_path(path).write_text(json.dumps({"arch": "wrn16_1"}))
    with pytest.raises(WeightsError, match="num_classes"):
        load_classifier(path)
    card_path(path).write_text(json.dumps([1, 2]))
    with pytest.raises(WeightsError, match="must be a JSON object"):
        load_classifier(path)
    card_path(path).write_text(json.dumps({"arch": "wrn16_1", "num_classes": "10"}))
    with pytest.raises(WeightsError, match="'num_classes' must be a int, got '10'"):
        load_classifier(path)


def test_reads_the_shared_reference_cards(shared_dir):
    card = ModelCard.read(shared_dir / "teachers" / "cifar10_wrn40_2.json")
    assert card.arch == "wrn40_2" and card.num_classes == 10 and card.accuracy == pytest.approx(90.61)
    assert card.normalize_std == [0.2023, 0.1994, 0.201] and card.extra["epochs"] == 147
    model, _ = load_classifier(shared_dir / "teachers" / "cifar10_wrn40_2.safetensors")
    assert sum(p.numel() for p in model.parameters()) == 2243546
