"""DFKD methods as plug-ins that make substitution data: one file per method, registered by name.

`create_synthesizer(cfg.synthesis, image_shape, num_classes, seed)` builds one; the distillation loop
binds it to the teacher and the raw student and drives it (see `base.Synthesizer`). Registered:
generation methods dafl, deepinv, fast, cmi; sampling methods on real wild data mosaickd, dfnd
(`wild.WildImages`; DFND's shardable selection in `selection.py`). Pools export to / import from Parquet (`pool.read_pool_parquet`).
"""

from __future__ import annotations

from . import cmi as _cmi  # noqa: F401  (registers)
from . import dafl as _dafl  # noqa: F401
from . import deepinv as _deepinv  # noqa: F401
from . import dfnd as _dfnd  # noqa: F401
from . import fast as _fast  # noqa: F401
from . import mosaickd as _mosaickd  # noqa: F401
from .base import BestIterate, CallRandom, Synthesizer, synthesis_mode
from .hooks import BNStatistics
from .pool import ImagePool, PoolData, PoolSchema, read_pool_parquet, read_pool_rows, read_pool_schema, write_pool_parquet
from .registry import SYNTHESIZERS, create_synthesizer, register_method
from .selection import Selection, merge_selections, select_top_k, self_confidence, top_k
from .wild import WildImages

__all__ = [
    "SYNTHESIZERS",
    "BNStatistics",
    "BestIterate",
    "CallRandom",
    "ImagePool",
    "PoolData",
    "PoolSchema",
    "Selection",
    "Synthesizer",
    "WildImages",
    "create_synthesizer",
    "merge_selections",
    "read_pool_parquet",
    "read_pool_rows",
    "read_pool_schema",
    "register_method",
    "select_top_k",
    "self_confidence",
    "top_k",
    "synthesis_mode",
    "write_pool_parquet",
]
