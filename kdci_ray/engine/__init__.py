"""Plain-PyTorch loops (no Ray, no MLflow): evaluation and supervised teacher training."""

from .evaluate import evaluate, evaluate_classifier
from .runtime import Runtime, resolve_runtime, seed_everything
from .teacher import train_teacher

__all__ = ["Runtime", "evaluate", "evaluate_classifier", "resolve_runtime", "seed_everything", "train_teacher"]
