"""KV-cache compression for transformers generation: SpindleKV and the standard baselines.

What a new press or store must provide: :mod:`ctxpress.kv.contracts`.
"""

from __future__ import annotations

from .cache import CompressedCache, cache_dense_nbytes, cache_nbytes
from .contracts import Press, Store
from .generation import CompressedContext, GenerationResult, answer_questions
from .presses import H2O, EvictionPress, KVPress, PyramidKV, SnapKV, SnapKVWords, StreamingLLM
from .quantized import QuantizedKV
from .registry import DEFAULT_METHOD, DEFAULT_RATIO, PRESSES, build_press, press_with_budget
from .spindle import SpindleKV, SpindleKVWords
from .tiered import SnapKVTiered

__all__ = [
    "DEFAULT_METHOD", "DEFAULT_RATIO", "H2O", "PRESSES", "CompressedCache", "CompressedContext", "EvictionPress",
    "GenerationResult", "KVPress", "Press", "PyramidKV", "QuantizedKV", "SnapKV", "SnapKVTiered", "SnapKVWords",
    "SpindleKV", "SpindleKVWords", "Store", "StreamingLLM", "answer_questions", "build_press", "cache_dense_nbytes",
    "cache_nbytes", "press_with_budget",
]
