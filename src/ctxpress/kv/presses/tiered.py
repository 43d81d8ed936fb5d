"""``snapkv-tiered``: whole-word SnapKV that demotes instead of evicting, with precisions the ratio sets.

Evicting is final: when the question arrives after compression (the
question-agnostic setting, one context cache serving several questions),
whatever the observation window did not point at is gone, and every
eviction press loses most needles there at 20% of the bytes while a
quantized cache keeps them. Quantizing everything, though, spends the
budget evenly on tokens that matter and tokens that do not, and leaves
bytes unused between its precisions (4 bits use 0.14 of a float32 cache's
bytes, 8 bits 0.27). This press keeps every token where the ratio allows:
all of them in the most bits that fit (8 or 4), and as many whole words as
the rest of the budget allows, ranked as ``snapkv-words`` ranks them, one
precision higher (8 bits over 4, the cache's own dtype over 8). It never
stores in 2 bits: on the dev needles, 2-bit keys and values derailed the
copying of a number (a 2-bit cache found 0 of 10, 2-bit rest under 4-bit
words 2 of 10), so below a 4-bit cache of every token it evicts whole
words and stores the ones it keeps in 4 bits (8 of 10).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from ...errors import InputError
from ..contracts import PrefilledLayer
from ..stores.quantized import BITS
from .quantized import bits_for_ratio
from .snapkv import SnapKVWords


@dataclass
class SnapKVTiered(SnapKVWords):
    """SnapKV over whole words with two precisions: the best words in more bits, the rest in fewer.

    Options: SnapKV's; given ``bits`` or ``rest_bits`` (see :class:`~ctxpress.kv.presses.eviction.EvictionPress`)
    are used as given instead of the ratio choosing (``bits`` alone: eviction in those bits). Needs a
    byte ``ratio``.
    """

    # Departs from snapkv-words in one point: tokens outside the budget are demoted to fewer bits
    # rather than evicted, where a 4-bit cache of every token fits. Chosen on the dev split
    # (docs/results/kv-tiers-dev, question-agnostic): at 20% of the bytes 8 bits over 4 beat the quantized
    # cache on gold NLL and tied dense over 4 bits; at 10% 4-bit eviction found 8 needles of 10, 4 bits
    # over 2 found 2, dense over 2 and the 2-bit cache none.
    name: ClassVar[str] = "snapkv-tiered"
    rest_choices: ClassVar[tuple[int, ...]] = (8, 4)  # the fewest bits a token is kept in

    def validate(self) -> None:
        super().validate()
        if self.ratio is None:
            raise InputError(f"{self.name}: needs a byte ratio, not tokens")

    def tiers(self, layers: Sequence[PrefilledLayer]) -> tuple[int | None, int | None]:
        """(bits of the kept words, bits of the rest) for these layers: given, or set by the ratio."""
        if self.bits is not None or self.rest_bits is not None:
            return self.bits, self.rest_bits
        rest = bits_for_ratio(layers, self.ratio, self.group, self.rest_choices)
        if rest is None:  # not every token fits: evict, keeping words in the fewest bits allowed
            return self.rest_choices[-1], None
        above = BITS.index(rest) - 1
        kept = BITS[above] if above >= 0 else None
        if self.counts_in_bytes(layers, kept, rest) is None:  # every token fits in `rest` bits, not one word more
            return rest, None
        return kept, rest

    def compress(self, layers: Sequence[PrefilledLayer], model: torch.nn.Module) -> None:
        self.compress_in(layers, *self.tiers(layers))


__all__ = ["SnapKVTiered"]
