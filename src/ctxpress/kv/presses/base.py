"""The base of every KV press: budget options, the two ways in, and no compression (``full``).

Each press is a small dataclass whose fields are its options: how it scores
tokens at prefill (:meth:`KVPress.score`) and what each layer keeps
(:meth:`KVPress.compress`). The machinery (:mod:`ctxpress.kv.cache`) runs
the prefill, collects the scores layer by layer, then calls ``compress``
once; :mod:`ctxpress.kv.contracts` states the interface. Two ways to use any
press::

    cache = SnapKV(ratio=0.2).cache(model)            # explicit cache
    model.generate(ids, cache=cache, ...)              # past_key_values= on older 5.x releases

    with SnapKV(ratio=0.2)(model):                     # context manager (ctxpress.kv.hooks)
        model.generate(ids, ...)

Budgets: ``ratio`` is the fraction of the dense cache's bytes to keep (for
the eviction baselines this equals the fraction of tokens), ``tokens`` the
number of tokens each head keeps per layer, on average over layers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import ClassVar

import torch

from ...errors import InputError
from ...options import Configurable
from ..cache import CompressedCache, compressed_cache
from ..contracts import PrefilledLayer, Press
from ..hooks import compressing


@dataclass
class KVPress(Configurable, Press):
    """No compression: the reference every press is measured against.

    Options: ``ratio`` (fraction of the dense cache's bytes to keep) or
    ``tokens`` (tokens each head keeps per layer, on average over layers),
    for the presses that take a budget.
    """

    ratio: float | None = None
    tokens: int | None = None

    name: ClassVar[str] = "full"  # the registry's FULL
    needs_budget: ClassVar[bool] = False  # the class's answer to takes_budget, unless options change it

    @classmethod
    def takes_budget(cls, options: Mapping[str, object] | None = None) -> bool:
        return cls.needs_budget

    def validate(self) -> None:
        if self.ratio is not None and self.tokens is not None:
            raise InputError("give a ratio or a token budget, not both")
        if self.ratio is not None and not 0 < self.ratio <= 1:  # types are checked before
            raise InputError(f"ratio must be in (0, 1], got {self.ratio!r}")
        if self.tokens is not None and self.tokens < 1:
            raise InputError(f"tokens must be a positive integer, got {self.tokens!r}")
        budget = self.ratio is not None or self.tokens is not None
        if type(self).takes_budget(vars(self)):
            if not budget:
                raise InputError(f"{self.name} needs a budget: ratio (fraction of the cache) or tokens")
        elif budget:
            raise InputError(f"{self.name}{self.keeps_all_because()} keeps every token: it takes no budget "
                             "(no ratio, no tokens)")

    def keeps_all_because(self) -> str:
        """The options that make this press keep every token, for the error message."""
        return ""

    # -- the two ways in ---------------------------------------------------------------
    def cache(self, model: torch.nn.Module, units: torch.Tensor | None = None) -> CompressedCache:
        """A cache that this press compresses after its first prefill.

        ``units``: the word of every prompt token (:func:`ctxpress.words.token_words`),
        required by presses made with ``unit="word"``. The model's attention
        implementation is set to ctxpress's, which is plain SDPA for
        everything but compressed caches.
        """
        return compressed_cache(self, model, units)

    def __call__(self, model: torch.nn.Module) -> AbstractContextManager[KVPress]:
        """Compress every cache the model fills inside the block (from its first token)."""
        return compressing(self, model)

    # -- the policy ---------------------------------------------------------------------
    def score(self, query, key, scaling, columns) -> torch.Tensor | None:
        return None

    def compress(self, layers: Sequence[PrefilledLayer], model: torch.nn.Module) -> None:
        """Keep everything: the layers stay dense."""


__all__ = ["KVPress"]
