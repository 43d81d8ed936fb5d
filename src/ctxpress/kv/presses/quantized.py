"""A quantized KV cache: every token kept, each stored in fewer bits (KIVI-style, :mod:`..stores.quantized`).

What a memory-limited user tries first, so the baseline every eviction and
codebook method must beat at equal bytes. Unlike transformers'
``QuantizedCache`` (which needs the quanto or HQQ package), this store runs
on plain torch and counts its bytes exactly, codes, steps, minimums and tail
included, like every other store.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from ...errors import InputError
from ..budget import first_fitting
from ..contracts import PrefilledLayer
from ..stores.dense import DenseStore
from ..stores.quantized import BITS, QuantizedStore
from .base import KVPress


def bits_for_ratio(layers: Sequence[PrefilledLayer], ratio: float, group: int,
                   choices: Sequence[int] = BITS) -> int | None:
    """The most bits (of ``choices``, most first) in which every token of ``layers`` fits ``ratio`` of
    their dense bytes; None if not even the fewest do."""
    shapes = [layer.keys.shape for layer in layers]
    itemsize = layers[0].keys.element_size()
    dense = sum(DenseStore.nbytes_for(*shape, itemsize) for shape in shapes)

    def cost(bits: int) -> int:
        return sum(QuantizedStore.nbytes_for(*shape, bits, group) for shape in shapes)

    return first_fitting(cost, choices, ratio * dense)


@dataclass
class QuantizedKV(KVPress):
    """Every token kept, in ``bits`` bits (KIVI-style: keys per channel, values per token).

    Options: ``bits`` (8, 4 or 2), or a budget ``ratio``, which picks the most
    bits whose stored bytes fit it (for a float32 cache with 64-dimensional
    heads: 0.27 at 8 bits, 0.14 at 4, 0.08 at 2); ``group`` (default 64): tokens per key
    quantization group. ``tokens`` is not a budget here (no token is evicted).
    """

    bits: int | None = None
    group: int = 64
    name: ClassVar[str] = "quantized"

    @classmethod
    def takes_budget(cls, options: Mapping[str, object] | None = None) -> bool:
        return (options or {}).get("bits") is None  # bits set the size; otherwise a ratio picks them

    def keeps_all_because(self) -> str:
        return " with bits given"

    def validate(self) -> None:
        super().validate()
        if self.bits is not None and self.bits not in BITS:
            raise InputError(f"quantized: bits must be one of {', '.join(map(str, BITS))}, got {self.bits}")
        if self.tokens is not None:
            raise InputError("quantized keeps every token: give a ratio (or bits), not tokens")
        if self.group < 1:
            raise InputError(f"quantized: group must be >= 1 token, got {self.group}")

    def bits_for(self, layers: Sequence[PrefilledLayer]) -> int:
        """``bits``, or the most bits whose bytes fit ``ratio`` of the dense cache."""
        if self.bits is not None:
            return self.bits
        bits = bits_for_ratio(layers, self.ratio, self.group)
        if bits is None:
            raise InputError(f"quantized: ratio {self.ratio:g} is below the smallest quantized cache "
                             f"({BITS[-1]} bits); use a larger ratio")
        return bits

    def compress(self, layers: Sequence[PrefilledLayer], model: torch.nn.Module) -> None:
        bits = self.bits_for(layers)
        for layer in layers:
            layer.compress_to(QuantizedStore(layer.keys, layer.values, bits, self.group))


__all__ = ["QuantizedKV", "bits_for_ratio"]
