"""kdci_ray: distributed KDCI (Knowledge Distillation Causal Intervention) for data-free KD."""

# faiss first: loading its OpenMP runtime after torch's can crash on some builds, and any kdci_ray
# import path may reach torch before the KDCI core imports faiss.
try:
    import faiss  # noqa: F401
except ImportError:  # pragma: no cover - faiss is a declared dependency; only the KDCI core needs it
    pass

__version__ = "0.1.0"

# Registers the DFKD methods and their config schemas, so any `DistillConfig` can validate its
# `synthesis:` section however kdci_ray was imported.
from . import synthesis as _synthesis  # noqa: E402,F401
