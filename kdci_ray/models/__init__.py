"""Model zoo: one registry, one factory. Importing this package registers every architecture."""

from __future__ import annotations

from torch import nn

from . import generator as _generator  # noqa: F401  (registers)
from . import resnet as _resnet  # noqa: F401
from . import small as _small  # noqa: F401
from . import vgg as _vgg  # noqa: F401
from . import wrn as _wrn  # noqa: F401
from .base import Classifier, bn_layers
from .generator import Generator
from .io import ModelCard, WeightsError, card_path, load_classifier, read_state_dict, save_classifier
from .registry import MODELS


def create_model(name: str, num_classes: int | None = None, **kwargs) -> nn.Module:
    """Build a registered model. Classifiers take `num_classes` (and `in_channels`); generators their own kwargs."""
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


__all__ = [
    "MODELS",
    "Classifier",
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
