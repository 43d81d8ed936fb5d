"""KV-cache compression for transformers generation: SpindleKV and the standard baselines.

What a new press or store must provide: :mod:`ctxpress.kv.contracts`. The
policies are in :mod:`ctxpress.kv.presses`, the layouts they store tokens
in in :mod:`ctxpress.kv.stores`.
"""

from __future__ import annotations

from .cache import CompressedCache, cache_dense_nbytes, cache_nbytes
from .contracts import Press, Store
from .generation import CompressedContext, GenerationResult, answer_questions
from .presses import (
    H2O,
    EvictionPress,
    KVPress,
    PyramidKV,
    QuantizedKV,
    SnapKV,
    SnapKVTiered,
    SnapKVWords,
    SpindleKV,
    SpindleKVWords,
    StreamingLLM,
)
from .registry import DEFAULT_METHOD, DEFAULT_RATIO, FULL, PRESSES, build_press, press_with_budget

__all__ = [
    "DEFAULT_METHOD", "DEFAULT_RATIO", "FULL", "H2O", "PRESSES", "CompressedCache", "CompressedContext",
    "EvictionPress", "GenerationResult", "KVPress", "Press", "PyramidKV", "QuantizedKV", "SnapKV", "SnapKVTiered",
    "SnapKVWords", "SpindleKV", "SpindleKVWords", "Store", "StreamingLLM", "answer_questions", "build_press",
    "cache_dense_nbytes", "cache_nbytes", "press_with_budget",
]
