"""KV-cache compression methods ("presses") on one mechanism.

Each press is a small dataclass: how it scores tokens at prefill
(:meth:`KVPress.score`) and how many each layer keeps (:meth:`KVPress.keep_counts`).
The shared machinery (:mod:`ctxpress.kv.cache`) runs the prefill, collects
the scores layer by layer, then calls :meth:`KVPress.compress` once. Two
ways to use any press::

    cache = SnapKV(ratio=0.2).cache(model)            # explicit cache
    model.generate(ids, cache=cache, ...)              # past_key_values= before transformers 5.2x

    with SnapKV(ratio=0.2)(model):                     # context manager
        model.generate(ids, ...)

Budgets: ``ratio`` is the fraction of the dense cache's bytes to keep (for
the eviction baselines this equals the fraction of tokens), ``tokens`` the
number of tokens each head keeps per layer, on average over layers.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..attention import ATTN_IMPLEMENTATION, attention_implementation, attention_with_column_sums, register
from ..compat import cache_from_kwargs
from ..errors import InputError
from .budget import pyramid_keep, uniform_keep
from .cache import CompressedCache, CompressedLayer, PressState, convert_cache, new_state, timed
from .scores import NORMALIZE, group_mean, pool, window_scores
from .store import DenseStore


@dataclass
class KVPress:
    """No compression: the reference every press is measured against."""

    ratio: float | None = None
    tokens: int | None = None

    name: ClassVar[str] = "full"
    needs_budget: ClassVar[bool] = False

    def __post_init__(self) -> None:
        self.check_types()
        if self.ratio is not None and self.tokens is not None:
            raise InputError("give a ratio or a token budget, not both")
        if self.ratio is not None and not 0 < self.ratio <= 1:  # types are checked above
            raise InputError(f"ratio must be in (0, 1], got {self.ratio!r}")
        if self.tokens is not None and self.tokens < 1:
            raise InputError(f"tokens must be a positive integer, got {self.tokens!r}")
        if self.needs_budget and self.ratio is None and self.tokens is None:
            raise InputError(f"{self.name} needs a budget: ratio (fraction of the cache) or tokens")

    def check_types(self) -> None:
        """Every option must have its declared type, so a mistyped value is an error
        (``per_head=maybe`` is not silently true, ``window=abc`` fails before the prefill)."""
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            annotation = field.type if isinstance(field.type, str) else getattr(field.type, "__name__", str(field.type))
            allowed = {t.strip() for t in annotation.split("|")}
            if not allowed <= {"bool", "int", "float", "str", "None"}:
                continue  # a richer annotation (a subclass's own option): its class checks it
            if value is None and "None" in allowed:
                continue
            if isinstance(value, bool):
                ok = "bool" in allowed
            elif isinstance(value, numbers.Integral):
                ok = bool(allowed & {"int", "float"})
            elif isinstance(value, numbers.Real):
                ok = "float" in allowed
            else:
                ok = isinstance(value, str) and "str" in allowed
            if not ok:
                kinds = {"bool": "true or false", "int": "an integer", "float": "a number", "str": "text"}
                wanted = " or ".join(kinds[t] for t in ("bool", "int", "float", "str") if t in allowed)
                raise InputError(f"{self.name}: {field.name} must be {wanted}, got {value!r}")

    # -- the two ways in ---------------------------------------------------------------
    def cache(self, model: torch.nn.Module) -> CompressedCache:
        """A cache that this press compresses after its first prefill.

        The model's attention implementation is set to ctxpress's, which is
        plain SDPA for everything but compressed caches.
        """
        register()
        if model.config._attn_implementation != ATTN_IMPLEMENTATION:
            model.set_attn_implementation(ATTN_IMPLEMENTATION)
        return CompressedCache(self, model)

    @contextmanager
    def __call__(self, model: torch.nn.Module) -> Iterator[KVPress]:
        """Compress every cache the model fills inside the block (from its first token)."""
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

    # -- the mechanism -----------------------------------------------------------------
    needs_column_sums: ClassVar[bool] = False

    def prefill(self, layer: CompressedLayer, module, query, key, value, attention_mask, scaling) -> torch.Tensor:
        """Attention of the prefill pass, plus this layer's scores; compress after the last layer."""
        state = layer.state
        if attention_mask is not None and not _is_plain_causal(attention_mask):
            raise InputError("KV compression needs unpadded input (one prompt, or prompts of equal length)")
        window = getattr(module.config, "sliding_window", None)
        if window and query.shape[2] > window:
            raise InputError(f"the prompt is longer than the model's sliding window ({window})")
        columns = None
        if self.needs_column_sums:
            out, columns = attention_with_column_sums(query, key, value, scaling, per_head=True)
        else:
            out = torch.nn.functional.scaled_dot_product_attention(
                query, key, value, is_causal=True, scale=scaling, enable_gqa=key.shape[1] != query.shape[1]
            ).transpose(1, 2)
        with torch.no_grad():  # choosing and storing tokens is not differentiable: the cache keeps no graph
            layer.scores = timed(state, lambda: self.score(query, key, scaling, columns))
            if layer.layer_idx == state.num_layers - 1:
                timed(state, lambda: self.compress(state))
                state.compressed = True
        return out

    def score(self, query, key, scaling, columns) -> torch.Tensor | None:
        """Importance of every prompt token, (b, heads, n); None if the press needs none."""
        return None

    def compress(self, state: PressState) -> None:
        """Replace every layer's prefill tensors by what it keeps."""

    def settings(self) -> dict:
        return {k: v for k, v in vars(self).items() if v is not None}


def _is_plain_causal(mask: torch.Tensor) -> bool:
    """Whether a 4D prefill mask (boolean or additive) only encodes causality, no padding."""
    q, k = mask.shape[-2:]
    causal = torch.ones(q, k, dtype=torch.bool, device=mask.device).tril_(k - q)
    allowed = mask if mask.dtype == torch.bool else mask == 0
    return bool(torch.equal(allowed, causal.expand_as(allowed)))


def _is_attention(module: torch.nn.Module) -> bool:
    return hasattr(module, "layer_idx") and hasattr(module, "o_proj") and hasattr(module, "k_proj")


@dataclass
class EvictionPress(KVPress):
    """Keep each layer's top-scored tokens (one choice per KV head) plus a recent window."""

    window: int = 32
    needs_budget: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.window < 0:
            raise InputError(f"{self.name}: window must be >= 0 tokens, got {self.window}")

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

    def compress(self, state: PressState) -> None:
        layers = sorted(state.layers, key=lambda layer: layer.layer_idx)
        n = layers[0].seen
        window = self.effective_window(n)
        for layer, keep in zip(layers, self.keep_counts(n, len(layers))):
            keys, values = layer.keys, layer.values
            if keep >= n:
                layer.compress_to(DenseStore(keys, values))
                continue
            scores = layer.scores
            if scores.shape[1] != keys.shape[1]:
                scores = group_mean(scores, keys.shape[1])
            scores = scores.clone()
            if window:
                scores[..., n - window :] = float("inf")  # the recent window is always kept
            idx = scores.topk(keep, dim=-1).indices.sort(dim=-1).values
            gather = idx[..., None].expand(-1, -1, -1, keys.shape[-1])
            layer.compress_to(DenseStore(keys.gather(2, gather), values.gather(2, gather)))


@dataclass
class StreamingLLM(EvictionPress):
    """Attention sinks (the first tokens) plus the most recent tokens."""

    sinks: int = 4
    name: ClassVar[str] = "streaming"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.sinks < 0:
            raise InputError(f"streaming: sinks must be >= 0 tokens, got {self.sinks}")

    def score(self, query, key, scaling, columns) -> torch.Tensor:
        b, kv_heads, n, _ = key.shape
        recency = torch.arange(n, dtype=torch.float32, device=key.device)
        recency[: self.sinks] = float("inf")
        return recency.expand(b, kv_heads, n)


@dataclass
class H2O(EvictionPress):
    """Heavy hitters: attention accumulated over every prompt query, plus recent tokens."""

    name: ClassVar[str] = "h2o"
    needs_column_sums: ClassVar[bool] = True

    def score(self, query, key, scaling, columns) -> torch.Tensor:
        return columns


@dataclass
class SnapKV(EvictionPress):
    """Attention of an observation window (the last prompt tokens), pooled."""

    kernel: int = 5
    normalize: str = "sum"
    name: ClassVar[str] = "snapkv"

    def __post_init__(self) -> None:
        super().__post_init__()
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
    """SnapKV scores with a pyramid budget: more tokens in shallow layers, fewer in deep ones."""

    beta: float = 0.05
    name: ClassVar[str] = "pyramidkv"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.beta <= 1:
            raise InputError(f"{self.name}: beta (the last layer's share of the context) must be in [0, 1], "
                             f"got {self.beta}")

    def counts_for_mean(self, n: int, mean: int, layers: int) -> list[int]:
        window = min(self.effective_window(n), max(0, mean - 1))  # the window never exceeds the budget
        return pyramid_keep(n, mean / n, layers, window, self.beta)
