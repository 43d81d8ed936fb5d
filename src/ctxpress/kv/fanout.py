"""One prefill, several presses: each gets the cache it would have built from a prefill of its own.

Comparing presses on one prompt (the bench does, for every example) would
otherwise repeat the same prefill forward pass once per press, and that pass
is most of the cost of a long prompt. :class:`SharedPrefill` is the
machinery for it, used in a press's place: during the prefill it asks every
press it holds for its scores (each sees the queries and keys a prefill of
its own would show it); afterwards :meth:`SharedPrefill.cache_for` gives a
press a fresh cache holding a copy of the dense prefill and its own scores,
compressed by that press. Caches are built one at a time, when asked for, so
memory holds the dense prefill and the caches in use, not every press's at
once; the dense prefill is released with the last.

Presses that share a prefill must want the same from it: the same words of
the prompt's tokens (:meth:`~ctxpress.kv.contracts.Press.needs_words`) and
the same attention (column sums are computed by another kernel, whose last
bits differ from SDPA's, and would change the keys of later layers).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

import torch

from .cache import CompressedCache, compressed_cache
from .contracts import PrefilledLayer, Press


def prefill_needs(press: Press) -> tuple[str | None, bool]:
    """What a press needs from the prefill: presses with equal needs can share one."""
    return press.needs_words(), press.needs_column_sums


def _clock(device: torch.device) -> float:
    """Now, after the device's queued work: on CUDA a timer would otherwise charge one press for
    kernels another queued."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


class SharedPrefill(Press):
    """Scores one prefill for several presses; :meth:`cache_for` then builds each one's cache."""

    name = "shared-prefill"

    def __init__(self, presses: Sequence[Press]) -> None:
        if not presses:
            raise ValueError("give at least one press to share a prefill")
        if len({prefill_needs(press) for press in presses}) != 1:
            raise ValueError("presses that share a prefill must need the same words and attention from it")
        self.presses = list(presses)
        self.needs_column_sums = self.presses[0].needs_column_sums
        self.scores: list[list[torch.Tensor | None]] = [[] for _ in self.presses]  # per press, per layer
        self.seconds = [0.0] * len(self.presses)  # per press: scoring and compressing, as its own cache counts
        self.layers: list[PrefilledLayer] = []  # the dense prefill, until the last press has its cache
        self.model: torch.nn.Module | None = None
        self.left = len(self.presses)

    @classmethod
    def takes_budget(cls, options: Mapping[str, object]) -> bool:
        return False

    def needs_words(self) -> str | None:
        return self.presses[0].needs_words()

    def settings(self) -> dict:
        """No options of its own: each press it holds reports its own."""
        return {}

    def cache(self, model: torch.nn.Module, units: torch.Tensor | None = None) -> CompressedCache:
        """The cache the shared prefill runs through (it stays dense)."""
        return compressed_cache(self, model, units)

    def score(self, query: torch.Tensor, key: torch.Tensor, scaling: float,
              columns: torch.Tensor | None) -> None:
        for i, press in enumerate(self.presses):
            start = _clock(query.device)
            # a copy of the shared column sums: no press can change what the next one is given
            self.scores[i].append(press.score(query, key, scaling, None if columns is None else columns.clone()))
            self.seconds[i] += _clock(query.device) - start
        return None

    def compress(self, layers: Sequence[PrefilledLayer], model: torch.nn.Module) -> None:
        self.layers, self.model = list(layers), model  # kept dense; each press compresses a copy

    def cache_for(self, i: int) -> CompressedCache:
        """Press ``i``'s cache, as its own prefill would have left it. Each press's cache is built once;
        after the last, the dense prefill is let go."""
        if not self.layers or not self.scores[i]:
            raise ValueError(f"press {i}'s cache is not available: run the prefill first, and ask once")
        press, model = self.presses[i], self.model
        cache = press.cache(model, self.layers[0].units)
        for shared, layer, scores in zip(self.layers, cache.layers, self.scores[i], strict=True):
            # A copy each, so no store can grow the shared tensors in place (transformers' update
            # concatenates, which copies too, but that is its business, not a promise).
            layer.adopt_prefill(shared.keys.clone(), shared.values.clone(), scores)
        self.scores[i] = []
        start = _clock(self.layers[0].keys.device)
        press.compress(cache.layers, model)
        cache.state.compressed = True
        cache.state.compress_seconds = self.seconds[i] + _clock(self.layers[0].keys.device) - start
        self.left -= 1
        if not self.left:  # the shared prefill's own layers hold the only dense copy left
            for shared in self.layers:
                shared.keys = shared.values = None
            self.layers = []
        return cache


__all__ = ["SharedPrefill", "prefill_needs"]
