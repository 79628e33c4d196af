"""Method name -> synthesizer class (and its config schema). A new DFKD method is one file that
subclasses `Synthesizer` and `SynthesisConfig` and decorates the class with `@register_method`."""

from __future__ import annotations

from typing import Callable

from ..config import SYNTHESIS_CONFIGS, SynthesisConfig, validate_config
from ..registry import Registry
from .base import Synthesizer

SYNTHESIZERS: Registry = Registry("synthesis method")


def register_method(name: str, config: type[SynthesisConfig]) -> Callable[[type[Synthesizer]], type[Synthesizer]]:
    def decorator(cls: type[Synthesizer]) -> type[Synthesizer]:
        SYNTHESIZERS.register(name)(cls)
        SYNTHESIS_CONFIGS.register(name)(config)
        cls.method = name
        return cls

    return decorator


def create_synthesizer(
    cfg: SynthesisConfig | dict, image_shape: tuple[int, int, int], num_classes: int, seed: int = 0
) -> Synthesizer:
    """Build the registered method named by `cfg.method` (a validated config, or a dict to validate)."""
    if isinstance(cfg, dict):
        if cfg.get("method") not in SYNTHESIZERS:
            SYNTHESIZERS.get(str(cfg.get("method")))  # raises "no such synthesis method ... known: ..."
        cfg = validate_config(SYNTHESIS_CONFIGS.get(cfg["method"]), cfg, "synthesis")
    cls = SYNTHESIZERS.get(cfg.method)
    if not isinstance(cfg, SYNTHESIS_CONFIGS.get(cfg.method)):
        raise TypeError(f"config for {cfg.method!r} must be a {SYNTHESIS_CONFIGS.get(cfg.method).__name__}, got {type(cfg).__name__}")
    return cls(cfg, image_shape, num_classes, seed)
