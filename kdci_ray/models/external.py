"""Models from outside our registry, behind the zoo's interface: `torchvision:<name>`, `timm:<name>` and
`import:<module>:<callable>` (the user's own code), as torchdistill names models in its YAML.

Any classifier `nn.Module` becomes an `ExternalClassifier`: `forward(x, return_features=True)` returns the
penultimate features too (the input of the final linear layer, read by a forward pre-hook; found
automatically, or named with `features_layer`), `bn_layers()` finds BatchNorm layers wherever they are.
Its `state_dict()` is the wrapped model's own (no prefix), so weights move freely between kdci_ray and the
library: a torchvision checkpoint loads as it is, and a distilled student loads back into torchvision.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

import torch
from torch import nn

from .base import bn_layers

PREFIXES = ("torchvision:", "timm:", "import:")


def is_external(spec: str) -> bool:
    return isinstance(spec, str) and spec.startswith(PREFIXES)


class ExternalClassifier(nn.Module):
    def __init__(self, net: nn.Module, spec: str, features_layer: str | None = None):
        super().__init__()
        self.net, self.spec = net, spec
        self.head_name, head = final_linear(net, features_layer, spec)
        self.num_classes, self.feature_dim = head.out_features, head.in_features
        self._capture = False
        self._features: torch.Tensor | None = None
        head.register_forward_pre_hook(self._read_features)

    @property
    def head(self) -> nn.Linear:
        return self.net.get_submodule(self.head_name)

    def _read_features(self, module, inputs) -> None:
        if self._capture:
            self._features = inputs[0]

    def forward(self, x: torch.Tensor, return_features: bool = False):
        if not return_features:
            return self.net(x)
        self._capture = True
        try:
            logits = self.net(x)
        finally:
            self._capture = False
        features, self._features = self._features, None
        return logits, features.flatten(1)

    def bn_layers(self):
        return bn_layers(self)

    # The wrapped model's own keys: files are interchangeable with the library's.
    def state_dict(self, *args, **kwargs):
        return self.net.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        return self.net.load_state_dict(state_dict, strict=strict, assign=assign)

    def extra_repr(self) -> str:
        return f"spec={self.spec!r}, head={self.head_name!r}, num_classes={self.num_classes}"


def final_linear(net: nn.Module, name: str | None, spec: str) -> tuple[str, nn.Linear]:
    """The classifier's final linear layer: `name` when given, else the last `nn.Linear` in the module tree."""
    if name is not None:
        try:
            layer = net.get_submodule(name)
        except AttributeError:
            raise ValueError(f"{spec}: features_layer = {name!r} is not a submodule; its linear layers are "
                             f"{[n for n, m in net.named_modules() if isinstance(m, nn.Linear)]}") from None
        if not isinstance(layer, nn.Linear):
            raise ValueError(f"{spec}: features_layer = {name!r} is a {type(layer).__name__}, not the final nn.Linear")
        return name, layer
    linears = [(n, m) for n, m in net.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{spec} has no nn.Linear layer: name its classifier layer with features_layer, or wrap the model "
                         "so that it ends in one")
    return linears[-1]


def build_external(spec: str, num_classes: int | None = None, in_channels: int = 3, pretrained: bool = False,
                   features_layer: str | None = None, **kwargs: Any) -> ExternalClassifier:
    """Build the model a spec names, with `num_classes` outputs."""
    kind, _, name = spec.partition(":")
    if not name:
        raise ValueError(f"model spec {spec!r} names no model: write {kind}:<name>")
    if kind == "torchvision":
        net = _torchvision(name, num_classes, in_channels, pretrained, kwargs)
    elif kind == "timm":
        net = _timm(name, num_classes, in_channels, pretrained, kwargs)
    else:
        net = _imported(name, num_classes, in_channels, kwargs, spec)
    model = ExternalClassifier(net, spec, features_layer)
    if num_classes is not None and model.num_classes != num_classes:
        raise ValueError(f"{spec} has {model.num_classes} outputs at its final linear layer {model.head_name!r}, "
                         f"{num_classes} are needed: set features_layer to the classifier layer, or num_classes")
    return model


def _no_such(library: str, name: str, known: list[str], lister: str) -> ValueError:
    import difflib

    close = difflib.get_close_matches(name, known, n=3)
    return ValueError(f"no such {library} model {name!r}" + (f" (did you mean {', '.join(close)}?)" if close else "")
                      + f"; {lister} has them all")


def _offline_hint(exc: Exception, spec: str) -> ValueError:
    return ValueError(f"{spec}: pretrained weights could not be downloaded ({type(exc).__name__}: {str(exc)[:120]}); "
                      "offline, set pretrained: false and give the weights as a local file (teacher.weights)")


def _torchvision(name, num_classes, in_channels, pretrained, kwargs) -> nn.Module:
    import torchvision.models as tvm

    if name not in tvm.list_models():
        raise _no_such("torchvision", name, tvm.list_models(), "torchvision.models.list_models()")
    if in_channels != 3:
        raise ValueError(f"torchvision:{name} takes 3 input channels; this dataset has {in_channels}: use a 3-channel dataset "
                         "or an import: model")
    if pretrained:
        try:
            net = tvm.get_model(name, weights="DEFAULT", **kwargs)
        except Exception as exc:  # no network, no cache
            raise _offline_hint(exc, f"torchvision:{name}") from None
        if num_classes is not None:
            _replace_head(net, num_classes)
        return net
    return tvm.get_model(name, weights=None, **({"num_classes": num_classes} if num_classes else {}), **kwargs)


def _replace_head(net: nn.Module, num_classes: int) -> None:
    """Pretrained weights come with the library's classes: a new final layer for ours."""
    name, head = final_linear(net, None, "model")
    if head.out_features == num_classes:
        return
    parent_name, _, attr = name.rpartition(".")
    parent = net.get_submodule(parent_name) if parent_name else net
    setattr(parent, attr, nn.Linear(head.in_features, num_classes))


def _timm(name, num_classes, in_channels, pretrained, kwargs) -> nn.Module:
    try:
        import timm
    except ImportError:
        raise ValueError(f"timm:{name} needs timm: pip install 'kdci-ray[timm]' (or pip install timm)") from None
    if not timm.list_models(name) and not timm.is_model(name):
        raise _no_such("timm", name, timm.list_models(), "timm.list_models()")
    options = dict(kwargs, in_chans=in_channels)
    if num_classes is not None:
        options["num_classes"] = num_classes
    try:
        return timm.create_model(name, pretrained=pretrained, **options)
    except Exception as exc:
        if pretrained:
            raise _offline_hint(exc, f"timm:{name}") from None
        raise


def _imported(target, num_classes, in_channels, kwargs, spec) -> nn.Module:
    module_name, _, attr = target.partition(":")
    if not attr:
        raise ValueError(f"model spec {spec!r}: write import:<module>:<callable>, e.g. import:my_models:build_net")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"{spec}: cannot import {module_name!r} ({exc}); put it on PYTHONPATH (or in the job's working dir)") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ValueError(f"{spec}: {module_name} has no callable {attr!r}")
    options = dict(kwargs)
    params = inspect.signature(factory).parameters
    takes = lambda key: key in params or any(p.kind is p.VAR_KEYWORD for p in params.values())  # noqa: E731
    if num_classes is not None and takes("num_classes"):
        options["num_classes"] = num_classes
    if takes("in_channels"):
        options["in_channels"] = in_channels
    net = factory(**options)
    if not isinstance(net, nn.Module):
        raise ValueError(f"{spec} returned a {type(net).__name__}, not an nn.Module")
    return net
