"""KV-cache compression policies ("presses"), one per module.

:mod:`.base` holds :class:`KVPress` (no compression, and the budget options
every press shares), :mod:`.eviction` the top-k eviction the baselines
build on; then one press per module: :mod:`.streaming`, :mod:`.h2o`,
:mod:`.snapkv` (and its whole-word form), :mod:`.pyramidkv`,
:mod:`.spindlekv` (its per-layer plans in :mod:`.spindle_plan`),
:mod:`.quantized` and :mod:`.tiered`.
"""

from __future__ import annotations

from .base import KVPress
from .eviction import EvictionPress
from .h2o import H2O
from .pyramidkv import PyramidKV
from .quantized import QuantizedKV
from .snapkv import SnapKV, SnapKVWords
from .spindlekv import SpindleKV, SpindleKVWords
from .streaming import StreamingLLM
from .tiered import SnapKVTiered

__all__ = [
    "H2O", "EvictionPress", "KVPress", "PyramidKV", "QuantizedKV", "SnapKV", "SnapKVTiered", "SnapKVWords",
    "SpindleKV", "SpindleKVWords", "StreamingLLM",
]
