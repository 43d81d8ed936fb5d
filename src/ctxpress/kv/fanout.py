"""One prefill, several presses: each gets the cache it would have built from a prefill of its own.

Comparing presses on one prompt (the bench does, for every example) would
otherwise repeat the same prefill forward pass once per press, and that pass
is most of the cost of a long prompt. :class:`SharedPrefill` is a press that
scores the prefill for every press it holds (they see the same queries and
keys a prefill of their own would show them) and, after the last layer,
gives each a fresh cache holding a copy of the dense prefill, its own
scores, and its own compression. The prefill's cache itself stays dense and
is dropped by its owner.

Presses that share a prefill must want the same from it: the same words of
the prompt's tokens (:meth:`~ctxpress.kv.contracts.Press.needs_words`) and
the same attention (column sums are computed by another kernel, whose last
bits differ from SDPA's, and would change the keys of later layers).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

import torch
from transformers.cache_utils import DynamicLayer

from .cache import CompressedCache, compressed_cache
from .contracts import PrefilledLayer, Press


def prefill_needs(press: Press) -> tuple[str | None, bool]:
    """What a press needs from the prefill: presses with equal needs can share one."""
    return press.needs_words(), press.needs_column_sums


class SharedPrefill(Press):
    """Scores one prefill for several presses; after it, :attr:`caches` holds one compressed cache each."""

    name = "shared-prefill"

    def __init__(self, presses: Sequence[Press]) -> None:
        needs = {prefill_needs(press) for press in presses}
        if len(needs) != 1:
            raise ValueError("presses that share a prefill must need the same words and attention from it")
        self.presses = list(presses)
        self.needs_column_sums = self.presses[0].needs_column_sums
        self.scores: list[list[torch.Tensor | None]] = [[] for _ in self.presses]  # per press, per layer
        self.seconds = [0.0] * len(self.presses)  # per press: scoring and compressing, as its own cache counts
        self.caches: list[CompressedCache] = []

    @classmethod
    def takes_budget(cls, options: Mapping[str, object]) -> bool:
        return False

    def needs_words(self) -> str | None:
        return self.presses[0].needs_words()

    def score(self, query: torch.Tensor, key: torch.Tensor, scaling: float,
              columns: torch.Tensor | None) -> None:
        for i, press in enumerate(self.presses):
            start = time.perf_counter()
            self.scores[i].append(press.score(query, key, scaling, columns))
            self.seconds[i] += time.perf_counter() - start
        return None

    def compress(self, layers: Sequence[PrefilledLayer], model: torch.nn.Module) -> None:
        for i, press in enumerate(self.presses):
            cache = compressed_cache(press, model, layers[0].units)
            for shared, layer, scores in zip(layers, cache.layers, self.scores[i], strict=True):
                # a copy each: a press may keep the prefill's tensors in its store and grow them in place
                DynamicLayer.update(layer, shared.keys.clone(), shared.values.clone())
                layer.seen, layer.scores = shared.seen, scores
                layer.kv_heads, layer.head_dim = shared.keys.shape[1], shared.keys.shape[-1]
                layer.dtype_size = shared.keys.element_size()
            start = time.perf_counter()
            press.compress(cache.layers, model)
            cache.state.compressed = True
            cache.state.compress_seconds = self.seconds[i] + time.perf_counter() - start
            self.caches.append(cache)
        self.scores = [[] for _ in self.presses]


__all__ = ["SharedPrefill", "prefill_needs"]
