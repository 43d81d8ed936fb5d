"""Eviction: keep each layer's top-scored tokens, optionally in fewer bits, optionally demoting the rest.

The base of the eviction presses (:mod:`.streaming`, :mod:`.h2o`,
:mod:`.snapkv`, :mod:`.pyramidkv`, and SpindleKV's plain form): a subclass
scores tokens and may shape the budget over layers; this class chooses the
tokens and stores them. With ``bits`` or ``rest_bits`` a byte ``ratio`` is
met by :func:`~ctxpress.kv.budget.largest_fitting` over the bytes the stores
say they will hold.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from ...errors import InputError
from ...words import PUNCTUATION
from ..budget import largest_fitting, uniform_keep
from ..contracts import PrefilledLayer, Store
from ..scores import UNIT_SCORES, UNITS, by_unit, group_mean
from ..stores.dense import DenseStore
from ..stores.quantized import BITS, QuantizedStore
from ..stores.tiered import TieredStore
from .base import KVPress


@dataclass
class EvictionPress(KVPress):
    """Keep each layer's top-scored tokens (one choice per KV head) plus a recent window.

    Options: a budget (``ratio`` or ``tokens``, see :class:`~ctxpress.kv.presses.base.KVPress`);
    ``window`` (default 32): the most recent prompt tokens, always kept; ``unit``
    (``token`` or ``word``): with ``word`` a head keeps or evicts whole words
    (a number, a name), ranked by ``unit_score`` (``max`` or ``mean`` of
    their tokens' scores), at most one word per head cut by the budget;
    ``punctuation`` (``own`` or ``attached``, see :func:`ctxpress.words.word_starts`).
    ``bits`` (8, 4 or 2; default none): store the kept tokens in that many
    bits (:mod:`ctxpress.kv.stores.quantized`, ``group`` tokens per key group), so a
    byte ``ratio`` keeps more tokens: eviction and quantization together.
    ``rest_bits`` (8, 4 or 2; default none: evicted): the tokens not kept
    are stored in that many bits instead of dropped, so nothing is lost
    outright; the byte ``ratio`` then sets how many tokens keep the higher
    precision (``bits``, or the cache's own dtype without it).
    """

    window: int = 32
    unit: str = "token"
    unit_score: str = "max"
    punctuation: str = "own"
    bits: int | None = None
    rest_bits: int | None = None
    group: int = 64
    needs_budget: ClassVar[bool] = True

    def validate(self) -> None:
        super().validate()
        if self.window < 0:
            raise InputError(f"{self.name}: window must be >= 0 tokens, got {self.window}")
        if self.unit not in UNITS:
            raise InputError(f"{self.name}: unit must be one of {', '.join(UNITS)}, got {self.unit!r}")
        if self.punctuation not in PUNCTUATION:
            raise InputError(f"{self.name}: punctuation must be one of {', '.join(PUNCTUATION)}, "
                             f"got {self.punctuation!r}")
        self.validate_bits()
        if self.group < 1:
            raise InputError(f"{self.name}: group must be >= 1 token, got {self.group}")
        if self.unit_score not in UNIT_SCORES:
            raise InputError(f"{self.name}: unit_score must be one of {', '.join(UNIT_SCORES)}, "
                             f"got {self.unit_score!r}")

    def validate_bits(self) -> None:
        """``bits`` and ``rest_bits``: widths a store packs, the kept ones wider, the rest by bytes only."""
        if self.bits is not None and self.bits not in BITS:
            raise InputError(f"{self.name}: bits must be one of {', '.join(map(str, BITS))}, got {self.bits}")
        if self.rest_bits is None:
            return
        if self.rest_bits not in BITS:
            raise InputError(f"{self.name}: rest_bits must be one of {', '.join(map(str, BITS))}, "
                             f"got {self.rest_bits}")
        if self.bits is not None and self.bits <= self.rest_bits:
            raise InputError(f"{self.name}: the kept tokens need more bits than the rest, got bits={self.bits} "
                             f"and rest_bits={self.rest_bits}")
        if self.ratio is None:
            raise InputError(f"{self.name}: rest_bits needs a byte ratio, not tokens")

    def needs_words(self) -> str | None:
        return self.punctuation if self.unit == "word" else None

    def ranked(self, scores: torch.Tensor, layer: PrefilledLayer) -> torch.Tensor:
        """The layer's scores in the order tokens are kept: by whole word under ``unit="word"``."""
        return by_unit(scores, layer.units, self.unit_score) if self.unit == "word" else scores.clone()

    def mean_keep(self, n: int) -> int:
        """Tokens kept per layer on average."""
        if self.tokens is not None:
            return min(n, self.tokens)
        if self.ratio * n < 1:  # keeping one token would already exceed the budget
            raise InputError(f"{self.name}: ratio {self.ratio:g} keeps less than one token of this {n}-token "
                             f"prompt; the smallest ratio that fits is {1 / n:.2g}")
        return min(n, math.floor(self.ratio * n))

    def keep_counts(self, n: int, layers: int) -> list[int]:
        return self.counts_for_mean(n, self.mean_keep(n), layers)

    def counts_for_mean(self, n: int, mean: int, layers: int) -> list[int]:
        """Per-layer keep counts averaging ``mean`` (a press's budget shape; uniform here)."""
        return uniform_keep(n, mean / n, layers)

    def effective_window(self, n: int) -> int:
        return max(0, min(self.window, self.mean_keep(n) - 1, n))

    def stored(self, keys: torch.Tensor, values: torch.Tensor, bits: int | None) -> Store:
        """The store of the given tokens: dense, or in ``bits`` bits."""
        return DenseStore(keys, values) if bits is None else QuantizedStore(keys, values, bits, self.group)

    def stored_nbytes(self, shape: torch.Size, count: int, bits: int | None, itemsize: int) -> int:
        """Bytes :meth:`stored` holds for ``count`` tokens of a layer of ``shape`` (b, kv_heads, n, d)."""
        batch, kv_heads, _, dim = shape
        if bits is None:
            return DenseStore.nbytes_for(batch, kv_heads, count, dim, itemsize)
        return QuantizedStore.nbytes_for(batch, kv_heads, count, dim, bits, self.group)

    def counts_in_bytes(self, layers: Sequence[PrefilledLayer], bits: int | None,
                        rest_bits: int | None) -> list[int] | None:
        """Per-layer keep counts with the largest mean whose bytes fit ``ratio``: kept tokens in ``bits``
        (None: dense), the others in ``rest_bits`` (None: gone); None if one token per head and layer
        (with ``rest_bits``: every token in ``rest_bits``) is already over."""
        n, shapes = layers[0].seen, [layer.keys.shape for layer in layers]
        itemsize = layers[0].keys.element_size()
        target = self.ratio * sum(DenseStore.nbytes_for(*shape, itemsize) for shape in shapes)

        def cost(mean: int) -> int:
            counts = self.counts_for_mean(n, mean, len(layers))
            kept = sum(self.stored_nbytes(s, c, bits, itemsize) for s, c in zip(shapes, counts))
            rest = 0 if rest_bits is None else sum(
                self.stored_nbytes(s, n - c, rest_bits, itemsize) for s, c in zip(shapes, counts) if c < n)
            return kept + rest

        mean = largest_fitting(cost, 1, n, target)
        return None if mean is None else self.counts_for_mean(n, mean, len(layers))

    def compress(self, layers: Sequence[PrefilledLayer], model: torch.nn.Module) -> None:
        self.compress_in(layers, self.bits, self.rest_bits)

    def compress_in(self, layers: Sequence[PrefilledLayer], bits: int | None, rest_bits: int | None) -> None:
        """Compress every layer: its top tokens in ``bits`` (None: dense), the others in ``rest_bits``
        (None: evicted); with either, a byte ``ratio`` counts the bytes of both."""
        n = layers[0].seen
        window = self.effective_window(n)
        if (bits is not None or rest_bits is not None) and self.ratio is not None:
            counts = self.counts_in_bytes(layers, bits, rest_bits)
            if counts is None:
                what = f"{bits}-bit token per head and layer" if rest_bits is None else (
                    f"cache with every token in {rest_bits} bits")
                raise InputError(f"{self.name}: ratio {self.ratio:g} is below one {what}; use a larger ratio")
        else:
            counts = self.keep_counts(n, len(layers))
        for layer, keep in zip(layers, counts):
            layer.compress_to(self.layer_store(layer, keep, window, bits, rest_bits))

    def layer_store(self, layer: PrefilledLayer, keep: int, window: int, bits: int | None,
                    rest_bits: int | None) -> Store:
        """The store of one layer keeping its ``keep`` top tokens per KV head, the recent ``window`` first."""
        keys, values, n = layer.keys, layer.values, layer.seen
        if keep >= n:
            return self.stored(keys, values, bits)
        scores = layer.scores
        if scores.shape[1] != keys.shape[1]:
            scores = group_mean(scores, keys.shape[1])
        scores = self.ranked(scores, layer)
        recent = min(window, keep - 1)  # a byte budget can keep fewer tokens than ratio * n (rest_bits)
        if recent > 0:
            scores[..., n - recent :] = float("inf")  # the recent window is always kept
        idx = scores.topk(keep, dim=-1).indices.sort(dim=-1).values
        kept = self.stored(gather_tokens(keys, idx), gather_tokens(values, idx), bits)
        if rest_bits is None:
            return kept
        others = torch.ones_like(scores, dtype=torch.bool).scatter_(-1, idx, False)
        rest = others.nonzero()[:, -1].view(*idx.shape[:-1], n - keep)  # ascending per head
        return TieredStore(kept, QuantizedStore(gather_tokens(keys, rest), gather_tokens(values, rest), rest_bits,
                                                self.group))


def gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``x[b, h, idx[b, h], :]``: the tokens ``idx`` (b, kv_heads, k) of each head of ``x`` (b, kv_heads, n, d)."""
    return x.gather(2, idx[..., None].expand(-1, -1, -1, x.shape[-1]))


__all__ = ["EvictionPress", "gather_tokens"]
