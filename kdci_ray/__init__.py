"""kdci_ray: distributed KDCI (Knowledge Distillation Causal Intervention) for data-free KD."""

__version__ = "0.1.0"
