"""What a compressed cache layer physically holds: the :class:`~ctxpress.kv.contracts.Store` layouts.

* :mod:`.dense` - the kept tokens as plain post-RoPE tensors.
* :mod:`.quantized` - the kept tokens in 8, 4 or 2 bits (KIVI-style).
* :mod:`.tiered` - two precisions in one layer: the best tokens in one store, the rest in fewer bits.
* :mod:`.headwise` - SpindleKV's layout: one key block per layer and a mask per head, its key and
  value parts dense, quantized or :mod:`.coded` (codebook entries).

Stores rebuild attention-ready tensors on demand (``materialize``) and
never keep them: what stays in memory between steps is what ``nbytes``
counts, and each store's ``nbytes_for`` predicts it, exactly, before the
store is built.
"""

from __future__ import annotations

from .coded import CodedColumns, CodedKeys
from .dense import ROOM, DenseColumns, DenseStore
from .headwise import Columns, HeadwiseStore
from .quantized import BITS, Quantized, QuantizedColumns, QuantizedStore
from .tiered import TieredStore

__all__ = [
    "BITS", "ROOM", "CodedColumns", "CodedKeys", "Columns", "DenseColumns", "DenseStore", "HeadwiseStore",
    "Quantized", "QuantizedColumns", "QuantizedStore", "TieredStore",
]
