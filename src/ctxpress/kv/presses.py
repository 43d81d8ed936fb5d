"""KV-cache compression methods ("presses"): pure policy over one mechanism.

Each press is a small dataclass whose fields are its options: how it scores
tokens at prefill (:meth:`KVPress.score`) and how many each layer keeps
(:meth:`EvictionPress.keep_counts`). The machinery (:mod:`ctxpress.kv.cache`)
runs the prefill, collects the scores layer by layer, then calls
:meth:`KVPress.compress` once; :mod:`ctxpress.kv.contracts` states the
interface. Two ways to use any press::

    cache = SnapKV(ratio=0.2).cache(model)            # explicit cache
    model.generate(ids, cache=cache, ...)              # past_key_values= on older 5.x releases

    with SnapKV(ratio=0.2)(model):                     # context manager
        model.generate(ids, ...)

Budgets: ``ratio`` is the fraction of the dense cache's bytes to keep (for
the eviction baselines this equals the fraction of tokens), ``tokens`` the
number of tokens each head keeps per layer, on average over layers.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..attention import ATTN_IMPLEMENTATION, attention_implementation, register
from ..compat import cache_from_kwargs
from ..errors import InputError
from ..options import Configurable
from ..words import PUNCTUATION
from .budget import pyramid_keep, uniform_keep
from .cache import CompressedCache, PressState, compressed_cache, convert_cache, new_state
from .contracts import PrefilledLayer, Press, Store
from .lowbit import BITS, QuantizedStore, TieredStore, quantized_nbytes
from .scores import NORMALIZE, UNIT_SCORES, UNITS, by_unit, group_mean, pool, window_scores
from .store import DenseStore


@dataclass
class KVPress(Configurable, Press):
    """No compression: the reference every press is measured against.

    Options: ``ratio`` (fraction of the dense cache's bytes to keep) or
    ``tokens`` (tokens each head keeps per layer, on average over layers),
    for the presses that take a budget.
    """

    ratio: float | None = None
    tokens: int | None = None

    name: ClassVar[str] = "full"
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

    @contextmanager
    def __call__(self, model: torch.nn.Module) -> Iterator[KVPress]:
        """Compress every cache the model fills inside the block (from its first token)."""
        if self.needs_words() is not None:
            raise InputError(f"{self.name} with unit=word needs the prompt's words, which a model hook "
                             "cannot see: use press.cache(model, units=token_words(tokenizer, ids))")
        register()
        states: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

        def state_for(cache) -> PressState:
            if cache not in states:
                states[cache] = new_state(self, model)
            return states[cache]

        def convert(module, args, kwargs):
            cache = cache_from_kwargs(kwargs)
            if cache is not None and hasattr(cache, "layers"):
                convert_cache(cache, state_for, module.layer_idx)

        hooks = [m.register_forward_pre_hook(convert, with_kwargs=True)
                 for m in model.modules() if _is_attention(m)]
        if not hooks:
            raise InputError(f"no attention layers with a layer index found in {type(model).__name__}")
        try:
            with attention_implementation(model, ATTN_IMPLEMENTATION):
                yield self
        finally:
            for hook in hooks:
                hook.remove()

    # -- the policy ---------------------------------------------------------------------
    def score(self, query, key, scaling, columns) -> torch.Tensor | None:
        return None

    def compress(self, layers: Sequence[PrefilledLayer], model: torch.nn.Module) -> None:
        """Keep everything: the layers stay dense."""


def _is_attention(module: torch.nn.Module) -> bool:
    return hasattr(module, "layer_idx") and hasattr(module, "o_proj") and hasattr(module, "k_proj")


@dataclass
class EvictionPress(KVPress):
    """Keep each layer's top-scored tokens (one choice per KV head) plus a recent window.

    Options: a budget (``ratio`` or ``tokens``, see :class:`KVPress`); ``window``
    (default 32): the most recent prompt tokens, always kept; ``unit``
    (``token`` or ``word``): with ``word`` a head keeps or evicts whole words
    (a number, a name), ranked by ``unit_score`` (``max`` or ``mean`` of
    their tokens' scores), at most one word per head cut by the budget;
    ``punctuation`` (``own`` or ``attached``, see :func:`ctxpress.words.word_starts`).
    ``bits`` (8, 4 or 2; default none): store the kept tokens in that many
    bits (:mod:`ctxpress.kv.lowbit`, ``group`` tokens per key group), so a
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
        if self.bits is not None and self.bits not in BITS:
            raise InputError(f"{self.name}: bits must be one of {', '.join(map(str, BITS))}, got {self.bits}")
        if self.rest_bits is not None:
            if self.rest_bits not in BITS:
                raise InputError(f"{self.name}: rest_bits must be one of {', '.join(map(str, BITS))}, "
                                 f"got {self.rest_bits}")
            if self.bits is not None and self.bits <= self.rest_bits:
                raise InputError(f"{self.name}: the kept tokens need more bits than the rest, got bits={self.bits} "
                                 f"and rest_bits={self.rest_bits}")
            if self.ratio is None:
                raise InputError(f"{self.name}: rest_bits needs a byte ratio, not tokens")
        if self.group < 1:
            raise InputError(f"{self.name}: group must be >= 1 token, got {self.group}")
        if self.unit_score not in UNIT_SCORES:
            raise InputError(f"{self.name}: unit_score must be one of {', '.join(UNIT_SCORES)}, "
                             f"got {self.unit_score!r}")

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

    def stored(self, keys: torch.Tensor, values: torch.Tensor) -> Store:
        """The store of the kept tokens: dense, or in ``bits`` bits."""
        return DenseStore(keys, values) if self.bits is None else QuantizedStore(keys, values, self.bits, self.group)

    def _stored_nbytes(self, shape: torch.Size, count: int, bits: int | None, element: int) -> int:
        """Bytes of ``count`` tokens of a layer of ``shape`` stored in ``bits`` (None: dense)."""
        if bits is None:
            return 2 * shape[0] * shape[1] * count * shape[3] * element
        return quantized_nbytes(shape[0], shape[1], count, shape[3], bits, self.group)

    def counts_in_bytes(self, layers: Sequence[PrefilledLayer]) -> list[int]:
        """Per-layer keep counts with the largest mean whose bytes fit ``ratio``: kept tokens in ``bits``,
        the others in ``rest_bits`` (or gone)."""
        n, shapes = layers[0].seen, [layer.keys.shape for layer in layers]
        element = layers[0].keys.element_size()
        target = self.ratio * sum(2 * math.prod(shape) * element for shape in shapes)

        def size(mean: int) -> tuple[list[int], int]:
            counts = self.counts_for_mean(n, mean, len(layers))
            kept = sum(self._stored_nbytes(s, c, self.bits, element) for s, c in zip(shapes, counts))
            rest = 0 if self.rest_bits is None else sum(
                self._stored_nbytes(s, n - c, self.rest_bits, element) for s, c in zip(shapes, counts) if c < n)
            return counts, kept + rest

        if size(1)[1] > target:
            what = f"{self.bits}-bit token per head and layer" if self.rest_bits is None else (
                f"cache with every token in {self.rest_bits} bits")
            raise InputError(f"{self.name}: ratio {self.ratio:g} is below one {what}; use a larger ratio")
        lo, hi = 1, n
        while lo < hi:  # the largest mean that fits
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if size(mid)[1] <= target else (lo, mid - 1)
        return size(lo)[0]

    def compress(self, layers: Sequence[PrefilledLayer], model: torch.nn.Module) -> None:
        n = layers[0].seen
        window = self.effective_window(n)
        by_bytes = (self.bits is not None or self.rest_bits is not None) and self.ratio is not None
        counts = self.counts_in_bytes(layers) if by_bytes else self.keep_counts(n, len(layers))
        for layer, keep in zip(layers, counts):
            keys, values = layer.keys, layer.values
            if keep >= n:
                layer.compress_to(self.stored(keys, values))
                continue
            scores = layer.scores
            if scores.shape[1] != keys.shape[1]:
                scores = group_mean(scores, keys.shape[1])
            scores = self.ranked(scores, layer)
            recent = min(window, keep - 1)  # a byte budget can keep fewer tokens than ratio * n (rest_bits)
            if recent > 0:
                scores[..., n - recent :] = float("inf")  # the recent window is always kept
            idx = scores.topk(keep, dim=-1).indices.sort(dim=-1).values
            kept = self.stored(gather_tokens(keys, idx), gather_tokens(values, idx))
            if self.rest_bits is None:
                layer.compress_to(kept)
                continue
            others = torch.ones_like(scores, dtype=torch.bool).scatter_(-1, idx, False)
            rest = others.nonzero()[:, -1].view(*idx.shape[:-1], n - keep)  # ascending per head
            layer.compress_to(TieredStore(kept, QuantizedStore(gather_tokens(keys, rest), gather_tokens(values, rest),
                                                               self.rest_bits, self.group)))


def gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``x[b, h, idx[b, h], :]``: the tokens ``idx`` (b, kv_heads, k) of each head of ``x`` (b, kv_heads, n, d)."""
    return x.gather(2, idx[..., None].expand(-1, -1, -1, x.shape[-1]))


@dataclass
class StreamingLLM(EvictionPress):
    """Attention sinks (the first tokens) plus the most recent tokens.

    Options: a budget; ``sinks`` (default 4): first tokens always kept; ``window`` is unused (recency is the score).
    """

    sinks: int = 4
    name: ClassVar[str] = "streaming"

    def validate(self) -> None:
        super().validate()
        if self.sinks < 0:
            raise InputError(f"streaming: sinks must be >= 0 tokens, got {self.sinks}")

    def score(self, query, key, scaling, columns) -> torch.Tensor:
        b, kv_heads, n, _ = key.shape
        recency = torch.arange(n, dtype=torch.float32, device=key.device)
        recency[: self.sinks] = float("inf")
        return recency.expand(b, kv_heads, n)


@dataclass
class H2O(EvictionPress):
    """Heavy hitters: attention accumulated over every prompt query, plus recent tokens.

    Options: a budget; ``window`` (default 32): recent tokens always kept.
    """

    name: ClassVar[str] = "h2o"
    needs_column_sums: ClassVar[bool] = True

    def score(self, query, key, scaling, columns) -> torch.Tensor:
        return columns


@dataclass
class SnapKV(EvictionPress):
    """Attention of an observation window (the last prompt tokens), pooled.

    Options: a budget; ``window`` (default 32): the observation window, whose
    queries score every token and whose tokens are always kept; ``kernel``
    (default 5): width of the max-pooling over neighbouring scores;
    ``normalize`` (default ``sum``): how the window's attention rows are combined.
    """

    kernel: int = 5
    normalize: str = "sum"
    name: ClassVar[str] = "snapkv"

    def validate(self) -> None:
        super().validate()
        if self.window < 1:
            raise InputError(f"{self.name}: the observation window must hold at least 1 token, got {self.window}")
        if self.kernel < 1:
            raise InputError(f"{self.name}: kernel must be >= 1 token, got {self.kernel}")
        if self.normalize not in NORMALIZE:
            raise InputError(f"{self.name}: normalize must be one of {', '.join(NORMALIZE)}, got {self.normalize!r}")

    def score(self, query, key, scaling, columns) -> torch.Tensor:
        n = key.shape[2]
        scores = window_scores(query, key, min(self.window, n), scaling, self.normalize)
        return pool(scores, self.kernel)


@dataclass
class PyramidKV(SnapKV):
    """SnapKV scores with a pyramid budget: more tokens in shallow layers, fewer in deep ones.

    Options: SnapKV's, and ``beta`` (default 0.05): the last layer's share of the context.
    """

    beta: float = 0.05
    name: ClassVar[str] = "pyramidkv"

    def validate(self) -> None:
        super().validate()
        if not 0 <= self.beta <= 1:
            raise InputError(f"{self.name}: beta (the last layer's share of the context) must be in [0, 1], "
                             f"got {self.beta}")

    def counts_for_mean(self, n: int, mean: int, layers: int) -> list[int]:
        window = min(self.effective_window(n), max(0, mean - 1))  # the window never exceeds the budget
        return pyramid_keep(n, mean / n, layers, window, self.beta)


@dataclass
class SnapKVWords(SnapKV):
    """SnapKV over whole words: a head keeps or evicts a word (a number, a name) as a whole.

    Options: SnapKV's; ``unit`` is ``word`` and ``unit_score`` ``max``.
    """

    # Departs from SnapKV (Li et al., 2024) in one point: tokens are ranked by the best score among
    # the tokens of their word, so whole words are kept (see EvictionPress). Chosen on the dev split
    # (docs/results/kv-words-dev): at 20% of the cache, question-aware, SnapKV found 1 of 10 needles and
    # this 10 of 10; the max of a word's scores beat the mean on gold NLL.
    unit: str = "word"
    name: ClassVar[str] = "snapkv-words"
