import math

import pytest
import torch
from torch.nn.modules.batchnorm import _BatchNorm

from kdci_ray.models import MODELS, Classifier, classifier_names, create_model, read_state_dict
from kdci_ray.registry import UnknownNameError

# Reference parameter counts (millions) of the CIFAR definitions used by the public DFKD code.
REFERENCE_PARAMS = {"resnet34": 21.28, "resnet18": 11.17, "wrn40_2": 2.24, "wrn16_1": 0.175}


def _input_for(name: str, batch: int = 2) -> torch.Tensor:
    if name.startswith("digits"):
        return torch.rand(batch, 1, 8, 8)
    return torch.rand(batch, 3, 32, 32)


@pytest.mark.parametrize("name", classifier_names())
def test_classifier_forward_backward_features_bn(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=7)
    assert isinstance(model, Classifier)
    x = _input_for(name)
    logits, feats = model(x, return_features=True)
    assert logits.shape == (2, 7)
    assert feats.shape == (2, model.feature_dim)
    assert torch.equal(model(x), logits)
    # the features are what the head sees
    assert torch.allclose(model.head(feats), logits, atol=1e-6)
    (logits.sum() + feats.sum()).backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    bns = model.bn_layers()
    assert bns and all(isinstance(b, _BatchNorm) for b in bns)
    assert len(bns) == sum(isinstance(m, _BatchNorm) for m in model.modules())


@pytest.mark.parametrize("name,millions", sorted(REFERENCE_PARAMS.items()))
def test_reference_parameter_counts(name, millions):
    n = sum(p.numel() for p in create_model(name, num_classes=10).parameters())
    assert math.isclose(n / 1e6, millions, abs_tol=0.005 if millions > 1 else 0.0005), n


@pytest.mark.parametrize("img_size,nc,activation", [(32, 3, "sigmoid"), (8, 1, "tanh"), (64, 3, "sigmoid")])
def test_generator_shapes_and_range(img_size, nc, activation):
    torch.manual_seed(0)
    g = create_model("generator", nz=64, ngf=16, img_size=img_size, nc=nc, activation=activation)
    z = g.sample_latent(4)
    out = g(z)
    assert out.shape == (4, nc, img_size, img_size)
    lo = 0.0 if activation == "sigmoid" else -1.0
    assert out.min() >= lo and out.max() <= 1.0
    out.mean().backward()
    assert g.l1.weight.grad is not None and g.l1.weight.grad.abs().sum() > 0
    assert len([m for m in g.modules() if isinstance(m, _BatchNorm)]) >= 2


def test_generator_rejects_bad_sizes():
    with pytest.raises(ValueError, match="power of two"):
        create_model("generator", img_size=24, init_size=5)
    with pytest.raises(ValueError, match="activation"):
        create_model("generator", activation="relu")
    with pytest.raises(ValueError, match="takes no num_classes"):
        create_model("generator", num_classes=10)


def test_unknown_model_lists_known():
    with pytest.raises(UnknownNameError) as exc:
        create_model("resnet1000", num_classes=10)
    assert "resnet18" in str(exc.value) and "wrn40_2" in str(exc.value)
    assert set(classifier_names()) | {"generator", "patch_discriminator"} == set(MODELS.names())


def _keys_file(path):
    rows = {}
    for line in path.read_text().splitlines():
        name, _dtype, shape = line.split("\t")
        rows[name] = list(eval(shape))  # "[64, 3, 3, 3]" / "[]": trusted file from ../shared
    return rows


@pytest.mark.parametrize("arch", ["resnet34", "wrn40_2"])
def test_reference_teacher_keys_and_strict_load(arch, shared_dir):
    keys = _keys_file(shared_dir / "teachers" / f"cifar10_{arch}.keys.txt")
    model = create_model(arch, num_classes=10)
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert ours == keys
    state = read_state_dict(shared_dir / "teachers" / f"cifar10_{arch}.safetensors")
    assert all(v.dtype in (torch.float32, torch.int64) for v in state.values())
    model.load_state_dict(state, strict=True)
