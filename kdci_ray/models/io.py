"""Classifier weights on disk: safetensors (preferred) or torch checkpoints read with weights_only=True,
plus a JSON card beside them (`X.safetensors` -> `X.json`) describing what the weights are.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..registry import UnknownNameError
from .external import build_external, is_external
from .registry import MODELS

# Keys under which public DFKD / Lightning / timm checkpoints wrap their state dict.
_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "net", "student")


class WeightsError(ValueError):
    """Weights that cannot be (or must not be) loaded as asked; the message says what does not match."""


@dataclass
class ModelCard:
    arch: str
    num_classes: int
    dataset: str | None = None
    normalize_mean: list[float] | None = None
    normalize_std: list[float] | None = None
    accuracy: float | None = None  # test top-1 in percent, fp32 evaluation
    in_channels: int = 3
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "card") -> "ModelCard":
        if not isinstance(raw, dict):
            raise WeightsError(f"{source}: a card must be a JSON object, got {type(raw).__name__}")
        data = dict(raw)
        missing = [k for k in ("arch", "num_classes") if k not in data]
        if missing:
            raise WeightsError(f"{source}: card lacks required field(s) {missing}")
        for key, kind in (("arch", str), ("num_classes", int), ("in_channels", int), ("dataset", str)):
            value = data.get(key)
            if value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
                raise WeightsError(f"{source}: card field {key!r} must be a {kind.__name__}, got {value!r}")
        # The shared reference cards record accuracy as test_acc_fp32; accept both spellings.
        accuracy = data.pop("accuracy", None)
        if accuracy is None:
            accuracy = data.get("test_acc_fp32", data.get("test_acc"))
        known = {f for f in cls.__dataclass_fields__ if f not in ("extra", "accuracy")}
        kwargs = {k: data.pop(k) for k in list(data) if k in known}
        extra = {**data.pop("extra", {}), **data}
        return cls(**kwargs, accuracy=accuracy, extra=extra)

    @classmethod
    def read(cls, path: str | Path) -> "ModelCard":
        try:
            raw = json.loads(Path(path).read_text())
        except json.JSONDecodeError as exc:
            raise WeightsError(f"card {path} is not valid JSON: {exc}") from exc
        return cls.from_dict(raw, source=str(path))

    def write(self, path: str | Path) -> None:
        data = asdict(self)
        extra = data.pop("extra")
        Path(path).write_text(json.dumps({**data, **extra}, indent=1) + "\n")


def card_path(weights: str | Path) -> Path:
    return Path(weights).with_suffix(".json")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from .safetensors or a torch checkpoint (never unpickling arbitrary objects).

    Unwraps `{"state_dict": ...}`-style wrappers and DDP's `module.` prefix; casts half floats to fp32.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except Exception as exc:
            raise WeightsError(f"{path} is not a readable safetensors file: {exc}") from exc
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise WeightsError(
                f"{path} cannot be loaded with weights_only=True ({type(exc).__name__}: {str(exc)[:200]}); "
                "only tensors and plain containers are accepted: re-save the state_dict, or convert it to safetensors"
            ) from exc
        for key in _WRAPPER_KEYS:
            if isinstance(state, dict) and isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path} does not hold a state dict of tensors")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


def _matching_archs(state: dict[str, torch.Tensor]) -> list[str]:
    """Registered classifiers whose key set equals the file's: a hint for a wrong --arch."""
    names = []
    for name in MODELS.names():
        if MODELS.meta(name)["kind"] != "classifier":
            continue
        if set(MODELS.get(name)().state_dict()) == set(state):
            names.append(name)
    return names


def load_into(model: nn.Module, state: dict[str, torch.Tensor], what: str, arch: str) -> None:
    """Strict load with one readable error listing missing / unexpected keys and shape mismatches."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [
        f"{k}: file {list(state[k].shape)} vs model {list(expected[k].shape)}"
        for k in sorted(set(expected) & set(state))
        if state[k].shape != expected[k].shape
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s), e.g. {missing[:3]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s), e.g. {unexpected[:3]}")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatch(es), e.g. {shapes[:2]}")
        hint = ""
        if missing or unexpected:
            matches = _matching_archs(state)
            hint = f"; the file's keys match arch {matches}" if matches else "; no registered arch has these keys"
        else:
            bad = {k for k in expected if k in state and state[k].shape != expected[k].shape}
            head_key = next((k for k in bad if k.endswith(".weight") and state[k].dim() == 2), None)
            first_conv = next((k for k in expected if expected[k].dim() == 4), None)
            if head_key is not None:
                hint = f"; the file's head {head_key} has {state[head_key].shape[0]} outputs (wrong num_classes?)"
            elif first_conv in bad:
                hint = f"; the file's first conv takes {state[first_conv].shape[1]} input channels (wrong in_channels?)"
        raise WeightsError(f"cannot load {what} into {arch}: " + "; ".join(parts) + hint)
    model.load_state_dict(state, strict=True)


def load_classifier(
    weights: str | Path,
    arch: str | None = None,
    num_classes: int | None = None,
    in_channels: int | None = None,
    map_location: str | torch.device = "cpu",
    options: dict[str, Any] | None = None,
) -> tuple[nn.Module, ModelCard]:
    """Build a classifier and load `weights`; arch / num_classes come from the arguments or the card.
    `options`: an external model's (`features_layer`, constructor keywords; also read from the card).

    When both an argument and the card give a value they must agree. Returns the model in eval mode and
    the (possibly synthesised) card.
    """
    weights = Path(weights)
    cpath = card_path(weights)
    card = ModelCard.read(cpath) if cpath.is_file() else None
    if card is not None:
        for field_name, given in (("arch", arch), ("num_classes", num_classes), ("in_channels", in_channels)):
            if given is not None and getattr(card, field_name) != given:
                raise WeightsError(
                    f"{field_name} mismatch: asked for {given!r} but the card {cpath} says {getattr(card, field_name)!r}"
                )
    arch = arch or (card.arch if card else None)
    if arch is None:
        raise WeightsError(f"no arch given and no card at {cpath}: pass the architecture (--arch)")
    if is_external(arch):  # torchvision:/timm:/import: - the weights come from the file, never downloaded
        saved = dict(card.extra.get("model_options", {})) if card else {}
        opts = {**saved, **(options or {}), "pretrained": False}

        def factory(**kw):
            try:
                return build_external(arch, **kw, **opts)
            except ValueError as exc:
                raise WeightsError(str(exc)) from None
    else:
        try:
            factory = MODELS.get(arch)
        except UnknownNameError as exc:
            raise WeightsError(str(exc)) from None
    if num_classes is None:
        num_classes = card.num_classes if card else None
    kwargs: dict[str, Any] = {}
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    channels = in_channels if in_channels is not None else (card.in_channels if card else None)
    if channels is not None:
        kwargs["in_channels"] = channels
    model = factory(**kwargs)
    load_into(model, read_state_dict(weights), str(weights), arch)
    if card is None:
        first_conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
        card = ModelCard(arch=arch, num_classes=model.num_classes, in_channels=first_conv.in_channels if first_conv else channels or 3)
    return model.to(map_location).eval(), card


def save_classifier(model: nn.Module, path: str | Path, card: ModelCard, overwrite: bool = False) -> Path:
    """Write fp32 safetensors + the card beside them. Refuses to replace existing weights unless asked."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"weights path must end in .safetensors, got {path}")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite to replace it")
    if card.accuracy is not None and not math.isfinite(card.accuracy):
        raise ValueError(f"card accuracy must be finite, got {card.accuracy}")
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tmp = path.with_suffix(".tmp")
    save_file(state, str(tmp), metadata={"arch": card.arch, "num_classes": str(card.num_classes)})
    tmp.replace(path)
    card.write(card_path(path))
    return path
