"""The KDCI core, plain PyTorch + faiss: confounder dictionary, causal intervention, distiller.

Knows nothing about which DFKD method made the substitution data, nor about Ray or MLflow.
"""

from .dictionary import (
    ConfounderDictionary,
    DictionaryError,
    DictionaryMeta,
    build_dictionary,
    build_dictionary_from_arrays,
)
from .distiller import CompensatedStudent, DistillOutput, Distiller, total_loss
from .features import teacher_blocks, teacher_fingerprint
from .intervention import CausalIntervention, InterventionOutput, attention_entropy

__all__ = [
    "CausalIntervention",
    "CompensatedStudent",
    "ConfounderDictionary",
    "DictionaryError",
    "DictionaryMeta",
    "DistillOutput",
    "Distiller",
    "InterventionOutput",
    "attention_entropy",
    "build_dictionary",
    "build_dictionary_from_arrays",
    "teacher_blocks",
    "teacher_fingerprint",
    "total_loss",
]
