"""A transformers cache whose layers are compressed once, after prefill: the machinery.

:class:`CompressedLayer` is a ``DynamicLayer`` until the first prefill has
run through every layer; then its press replaces each layer's tensors by a
smaller :class:`~ctxpress.kv.contracts.Store`. The layer keeps counting every
token it has seen, so transformers derives the right positions for new
tokens (RoPE stays correct after eviction), while the store holds only what
was kept.

Attention for these layers runs through ctxpress's registered attention
implementation: after ``update`` the layer claims the attention call of its
layer (:func:`ctxpress.attention.claim_next_attention`). During the first
prefill it computes the attention itself, asks the press for this layer's
scores and, after the last layer, has the press compress every layer
(:mod:`ctxpress.kv.contracts` states who calls whom); afterwards it lets its
store attend.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from ..attention import ATTN_IMPLEMENTATION, attention_with_column_sums, claim_next_attention, register
from ..compat import query_length
from ..errors import InputError
from .contracts import Press, Store


@dataclass
class PressState:
    """What the layers of one cache share: their press and its bookkeeping."""

    press: Press
    model: torch.nn.Module
    num_layers: int
    compressed: bool = False
    compress_seconds: float = 0.0
    layers: list[CompressedLayer] = field(default_factory=list)
    units: torch.Tensor | None = None  # word index per prompt token, for presses that evict whole words


class CompressedLayer(DynamicLayer):
    """One layer of a KV cache that a press compresses after prefill.

    A :class:`~ctxpress.kv.contracts.PrefilledLayer` to its press and an
    :class:`~ctxpress.attention.AttendingLayer` to the attention function.
    """

    def __init__(self, state: PressState, layer_idx: int) -> None:
        super().__init__()
        self.state = state
        self.layer_idx = layer_idx
        self.store: Store | None = None  # set when the press compresses this layer
        self.seen = 0  # tokens this layer has been given, kept or not
        self.scores: torch.Tensor | None = None  # the press's prefill scores, until compression
        self.kv_heads = self.head_dim = 0
        self.dtype_size = 0

    def _count(self, key_states: torch.Tensor) -> None:
        self.seen += key_states.shape[-2]
        self.kv_heads, self.head_dim = key_states.shape[1], key_states.shape[-1]
        self.dtype_size = key_states.element_size()

    def adopt_prefill(self, keys: torch.Tensor, values: torch.Tensor, scores: torch.Tensor | None) -> None:
        """Take a prefill run elsewhere (:mod:`ctxpress.kv.fanout`): its dense tensors, which this layer
        now owns, and this layer's press's scores of it; the press compresses as after its own."""
        self._count(keys)
        DynamicLayer.update(self, keys, values)  # not this class's update: no attention follows to claim
        self.scores = scores

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        claim_next_attention(self)
        start = self.seen
        self._count(key_states)
        if self.store is None:
            return super().update(key_states, value_states)
        with torch.no_grad():  # like the compression, the store is for inference: it keeps no graph
            self.store.append(key_states, value_states, start)
            return self.store.materialize()

    def attend(self, module, query, key, value, attention_mask, scaling) -> torch.Tensor:
        """Attention for this layer's call; the prefill also scores and, last layer, compresses."""
        if not self.state.compressed and query.shape[2] > 1:
            return self._prefill(module, query, key, value, attention_mask, scaling)
        if self.store is None:  # nothing removed: exactly what transformers' SDPA does
            from transformers.integrations.sdpa_attention import sdpa_attention_forward

            return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling)[0]
        return self.store.attend(query, key, value, scaling)

    def _prefill(self, module, query, key, value, attention_mask, scaling) -> torch.Tensor:
        """Attention of the prefill pass, plus this layer's scores; the last layer has the press compress."""
        state, press = self.state, self.state.press
        if state.units is not None and state.units.shape[-1] != query.shape[2]:
            raise InputError(f"units give the words of {state.units.shape[-1]} tokens; the prompt has "
                             f"{query.shape[2]}")
        if attention_mask is not None and not _is_plain_causal(attention_mask):
            raise InputError("KV compression needs unpadded input (one prompt, or prompts of equal length)")
        window = getattr(module.config, "sliding_window", None)
        if window and query.shape[2] > window:
            raise InputError(f"the prompt is longer than the model's sliding window ({window})")
        columns = None
        if press.needs_column_sums:
            out, columns = attention_with_column_sums(query, key, value, scaling, per_head=True)
        else:
            out = torch.nn.functional.scaled_dot_product_attention(
                query, key, value, is_causal=True, scale=scaling, enable_gqa=key.shape[1] != query.shape[1]
            ).transpose(1, 2)
        with torch.no_grad():  # choosing and storing tokens is not differentiable: the cache keeps no graph
            self.scores = timed(state, lambda: press.score(query, key, scaling, columns))
            if self.layer_idx == state.num_layers - 1:
                layers = sorted(state.layers, key=lambda layer: layer.layer_idx)
                timed(state, lambda: press.compress(layers, state.model))
                state.compressed = True
        return out

    @property
    def units(self) -> torch.Tensor | None:
        return self.state.units

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Reorder the batch for beam search (stores that hold one prompt refuse several beams)."""
        if self.store is None:
            return super().reorder_cache(beam_idx)
        self.store.reorder(beam_idx)

    def compress_to(self, store: Store) -> None:
        """Replace the dense prefill tensors by ``store``."""
        self.store = store
        self.keys = self.values = None
        self.scores = None

    def get_seq_length(self) -> int:
        return self.seen

    def physical_length(self) -> int:
        if self.store is not None:
            return len(self.store)
        return 0 if self.keys is None or self.keys.numel() == 0 else self.keys.shape[-2]

    def get_mask_sizes(self, query: int | torch.Tensor) -> tuple[int, int]:
        kept = self.physical_length()
        return kept + query_length(query), self.seen - kept

    def attended_tokens(self) -> float:
        """Cached tokens a head of this layer attends to, averaged over its heads."""
        return self.store.attended_tokens() if self.store is not None else float(self.physical_length())

    def nbytes(self) -> int:
        """Bytes this layer holds now."""
        if self.store is not None:
            return self.store.nbytes()
        if self.keys is None:
            return 0
        return self.keys.numel() * self.keys.element_size() + self.values.numel() * self.values.element_size()

    def dense_nbytes(self, batch: int) -> int:
        """Bytes a plain dense cache would hold for the same tokens."""
        return 2 * batch * self.kv_heads * self.seen * self.head_dim * self.dtype_size

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove == 0:
            return
        if self.store is None:
            super().crop(tokens_to_remove)
            self.seen = self.keys.shape[-2] if self.keys is not None else 0
            return
        raise NotImplementedError("a compressed cache cannot be cropped; copy() it before use instead")


class CompressedCache(DynamicCache):
    """A ``DynamicCache`` whose layers a press compresses after the first prefill.

    Pass it to ``model(...)`` or ``model.generate(...)`` as ``cache=`` (``past_key_values=`` on
    transformers releases that predate the rename; :func:`ctxpress.compat.with_cache` picks the right one).
    ``nbytes()`` is what it holds, ``dense_nbytes()`` what a dense cache of the
    same tokens would hold; ``copy()`` forks it, e.g. to answer several
    questions from one compressed context.
    """

    def __init__(self, press: Press, model: torch.nn.Module, units: torch.Tensor | None = None) -> None:
        super().__init__(config=model.config)
        if press.needs_words() is not None and units is None:
            raise InputError(f"{press.name} with unit=word needs the word of every prompt token: pass "
                             "units=ctxpress.words.token_words(tokenizer, ids)")
        self.state = new_state(press, model)
        self.state.units = units
        self.layers = [CompressedLayer(self.state, i) for i in range(self.state.num_layers)]
        self.state.layers = self.layers

    def nbytes(self) -> int:
        return cache_nbytes(self)

    def dense_nbytes(self) -> int:
        return cache_dense_nbytes(self)

    def attended_tokens(self) -> float:
        """Cached tokens a head attends to, averaged over heads and layers.

        Equal bytes can hold different numbers of tokens (under SpindleKV a
        KV group stores the union of its heads' choices, and codebooks win
        room back), so this is what a byte budget buys.
        """
        layers = _layers(self)
        return sum(layer.attended_tokens() for layer in layers) / max(1, len(layers))

    @property
    def compress_seconds(self) -> float:
        return self.state.compress_seconds

    def copy(self) -> CompressedCache:
        """An independent copy sharing only the model reference."""
        memo = {id(self.state.model): self.state.model, id(self.state.press): self.state.press}
        return copy.deepcopy(self, memo)


def compressed_cache(press: Press, model: torch.nn.Module, units: torch.Tensor | None = None) -> CompressedCache:
    """A cache that ``press`` compresses after its first prefill, with ``model`` set to attend through
    ctxpress (plain SDPA for everything but compressed caches)."""
    register()
    if model.config._attn_implementation != ATTN_IMPLEMENTATION:
        model.set_attn_implementation(ATTN_IMPLEMENTATION)
    return CompressedCache(press, model, units)


def new_state(press: Press, model: torch.nn.Module) -> PressState:
    config = model.config.get_text_config(decoder=True)
    return PressState(press=press, model=model, num_layers=config.num_hidden_layers)


def _layers(cache) -> list[CompressedLayer]:
    return [layer for layer in cache.layers if isinstance(layer, CompressedLayer)]


def _batch(cache) -> int:
    for layer in _layers(cache):
        if layer.store is not None:
            return layer.store.batch
        if layer.keys is not None and layer.keys.dim() == 4:
            return layer.keys.shape[0]
    return 1


def cache_nbytes(cache) -> int:
    """Bytes held by the compressed layers of ``cache``."""
    return sum(layer.nbytes() for layer in _layers(cache))


def cache_dense_nbytes(cache) -> int:
    """Bytes a dense cache of the same tokens would hold."""
    batch = _batch(cache)
    return sum(layer.dense_nbytes(batch) for layer in _layers(cache))


def convert_cache(cache, state_for: Callable[[object], PressState], layer_idx: int) -> None:
    """Make layer ``layer_idx`` of a fresh transformers cache a :class:`CompressedLayer`."""
    if isinstance(cache.layers[layer_idx] if layer_idx < len(cache.layers) else None, CompressedLayer):
        return
    state = state_for(cache)
    while len(cache.layers) <= layer_idx:
        cache.layers.append(DynamicLayer())
    old = cache.layers[layer_idx]
    if old.get_seq_length() > 0:
        raise InputError("a press can only compress a cache it has seen from the first token")
    layer = CompressedLayer(state, layer_idx)
    cache.layers[layer_idx] = layer
    state.layers.append(layer)


def _is_plain_causal(mask: torch.Tensor) -> bool:
    """Whether a 4D prefill mask (boolean or additive) only encodes causality, no padding."""
    q, k = mask.shape[-2:]
    causal = torch.ones(q, k, dtype=torch.bool, device=mask.device).tril_(k - q)
    allowed = mask if mask.dtype == torch.bool else mask == 0
    return bool(torch.equal(allowed, causal.expand_as(allowed)))


def timed(state: PressState, fn: Callable[[], object]) -> object:
    """Run ``fn``, adding its time to the cache's compression time.

    On a GPU, kernels run after the call that queues them returns: the queue
    is drained before and after, so the prefill's kernels are not counted as
    compression, nor the compression's left out.
    """
    device = next(state.model.parameters()).device
    _drain(device)
    start = time.perf_counter()
    try:
        return fn()
    finally:
        _drain(device)
        state.compress_seconds += time.perf_counter() - start


def _drain(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
