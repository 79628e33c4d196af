"""Model zoo: one registry, one factory. Importing this package registers every architecture."""

from __future__ import annotations

from torch import nn

from . import generator as _generator  # noqa: F401  (registers)
from . import resnet as _resnet  # noqa: F401
from . import small as _small  # noqa: F401
from . import vgg as _vgg  # noqa: F401
from . import wrn as _wrn  # noqa: F401
from .base import Classifier, bn_layers
from .external import ExternalClassifier, build_external, is_external
from .generator import Generator
from .io import ModelCard, WeightsError, card_path, load_classifier, read_state_dict, save_classifier
from .registry import MODELS


def create_model(name: str, num_classes: int | None = None, **kwargs) -> nn.Module:
    """Build a model: a registered one (classifiers take `num_classes` and `in_channels`, generators their own
    kwargs), or a classifier from a spec `torchvision:<name>`, `timm:<name>`, `import:<module>:<callable>`
    (also `pretrained=`, `features_layer=` and the library's own keyword arguments)."""
    if is_external(name):
        if num_classes is not None and num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        return build_external(name, num_classes, **kwargs)
    factory = MODELS.get(name)
    if num_classes is not None:
        if MODELS.meta(name)["kind"] != "classifier":
            raise ValueError(f"model {name!r} is a {MODELS.meta(name)['kind']}: it takes no num_classes")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        kwargs["num_classes"] = num_classes
    return factory(**kwargs)


def classifier_names() -> list[str]:
    return [n for n in MODELS.names() if MODELS.meta(n)["kind"] == "classifier"]


def check_classifier_spec(name: str) -> str:
    """`name` if it can name a classifier (a registered one, or a well-formed external spec), else a ValueError
    listing what can. External specs are resolved when the model is built (timm may not be installed here)."""
    if name in classifier_names():
        return name
    if is_external(name):
        kind, _, rest = name.partition(":")
        if not rest or (kind == "import" and ":" not in rest):
            example = "import:my_models:build_net" if kind == "import" else f"{kind}:resnet18"
            raise ValueError(f"model spec {name!r} is incomplete: write e.g. {example}")
        return name
    raise ValueError(f"no such classifier {name!r}; known classifiers: {', '.join(classifier_names())}, or a spec "
                     "torchvision:<name>, timm:<name>, import:<module>:<callable>")


__all__ = [
    "MODELS",
    "Classifier",
    "ExternalClassifier",
    "check_classifier_spec",
    "is_external",
    "Generator",
    "ModelCard",
    "WeightsError",
    "bn_layers",
    "card_path",
    "classifier_names",
    "create_model",
    "load_classifier",
    "read_state_dict",
    "save_classifier",
]
