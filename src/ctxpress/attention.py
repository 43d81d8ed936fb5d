"""Attention probes: observe attention probabilities without storing them.

Both compression methods need attention *probabilities*: DAC the attention
each token receives, the KV presses the attention of a window of recent
queries. Fused kernels (SDPA, flash) never materialise them, and asking a
transformers model for ``output_attentions=True`` keeps every layer's
``heads x n x n`` map alive at once (18 GB for a 30-layer, 9-head model at 4k
tokens).

transformers lets a model's attention function be swapped through its
``AttentionInterface``. ctxpress registers one implementation, ``"ctxpress"``,
which is plain SDPA unless a *probe* is active in the current context. A probe
computes the layer's attention output itself and records what it needs, layer
by layer, so nothing larger than one block of one layer exists at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Protocol

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

ATTN_IMPLEMENTATION = "ctxpress"

# A probe gets (module, query, key, value, attention_mask, scaling) with
# query (b, heads, q, d) and key/value (b, kv_heads, k, d), post-RoPE, and
# returns the attention output as (b, q, heads, d), like transformers kernels.
Probe = Callable[..., torch.Tensor]


class AttendingLayer(Protocol):
    """A cache layer that computes its own attention (a compressed cache layer, :mod:`ctxpress.kv.cache`)."""

    layer_idx: int

    def attend(self, module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attention_mask: torch.Tensor | None, scaling: float) -> torch.Tensor:
        """Attention output (b, q, heads, d) of the call that follows the layer's ``update``: arguments as
        a :data:`Probe` gets them, ``key`` and ``value`` being what that ``update`` returned."""
        ...


_ACTIVE_PROBE: ContextVar[Probe | None] = ContextVar("ctxpress_probe", default=None)
# A cache layer that wants to compute the attention of the call that follows
# its update (set in the layer's ``update``, taken by the next attention call).
_CLAIMING_LAYER: ContextVar[AttendingLayer | None] = ContextVar("ctxpress_claiming_layer", default=None)
_REGISTERED = False
# SDPA's backends on CUDA, cuDNN's left out: it builds an execution plan for every new key length,
# and each decoding step (or each layer of a compressed cache, whose lengths differ) brings one. On an
# H200 that cost 50 ms of CPU time per layer and step (an 8B-shaped model decoded 0.7 tokens/s at 16k
# tokens instead of tens); the other kernels take any length as it comes.
_CUDA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def claim_next_attention(layer: AttendingLayer) -> None:
    """Route the next attention call, if it is the same layer's, to ``layer.attend``.

    transformers calls a cache layer's ``update`` right before the attention
    function of the same layer; a compressed cache layer uses this to take
    over attention (its keys may be stored per query head, or be shorter in
    some layers than in others, which the shared mask cannot express).
    """
    _CLAIMING_LAYER.set(layer)


def _dispatch(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    if query.is_cuda:
        with sdpa_kernel(_CUDA_BACKENDS):
            return _attend(module, query, key, value, attention_mask, scaling, dropout, **kwargs)
    return _attend(module, query, key, value, attention_mask, scaling, dropout, **kwargs)


def _attend(module, query, key, value, attention_mask, scaling, dropout, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    probe = _ACTIVE_PROBE.get()
    if probe is not None:
        return probe(module, query, key, value, attention_mask, scaling), None
    layer = _CLAIMING_LAYER.get()
    if layer is not None:
        _CLAIMING_LAYER.set(None)
        # the module is the model's, typed by no one here: not every attention module has a layer index
        if layer.layer_idx == getattr(module, "layer_idx", None):
            return layer.attend(module, query, key, value, attention_mask, scaling), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)


def register() -> None:
    """Register the ``"ctxpress"`` attention implementation with transformers (idempotent)."""
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTN_IMPLEMENTATION, _dispatch)
    # Same mask format as SDPA: None for a plain causal mask, else boolean 4D.
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)
    _REGISTERED = True


@contextmanager
def attention_implementation(model: torch.nn.Module, name: str) -> Iterator[None]:
    """Temporarily switch a transformers model to another attention implementation."""
    previous = model.config._attn_implementation
    if previous != name:
        model.set_attn_implementation(name)
    try:
        yield
    finally:
        if previous != name:
            model.set_attn_implementation(previous)


def bottom_right_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           scaling: float, visible: torch.Tensor | None = None) -> torch.Tensor:
    """SDPA where the queries are the *last* positions of the keys.

    A compressed cache holds fewer keys than positions seen, and a different
    number in each layer; new queries must still see every cached key and
    the new keys up to their own. Key heads may equal the query heads or
    divide them (GQA). ``visible`` (heads or key heads, k_len) masks the keys
    each head may see. Returns (b, q, heads, d).
    """
    heads, q_len, k_len = query.shape[1], query.shape[2], key.shape[2]
    mask = None
    if q_len > 1:
        mask = torch.arange(k_len, device=query.device)[None, :] <= (
            torch.arange(q_len, device=query.device)[:, None] + (k_len - q_len))
    if visible is not None:
        if visible.shape[0] != heads:
            visible = visible.repeat_interleave(heads // visible.shape[0], dim=0)
        # 4-D: with a 3-D mask SDPA on the CPU leaves its flash kernel for the slow math path
        mask = (visible[:, None, :] if mask is None else visible[:, None, :] & mask)[None]
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, scale=scaling, enable_gqa=key.shape[1] != query.shape[1])
    return out.transpose(1, 2)


@contextmanager
def probing(model: torch.nn.Module, probe: Probe) -> Iterator[Probe]:
    """Run ``probe`` as the attention kernel of every layer inside the block."""
    register()
    token = _ACTIVE_PROBE.set(probe)
    try:
        with attention_implementation(model, ATTN_IMPLEMENTATION):
            yield probe
    finally:
        _ACTIVE_PROBE.reset(token)


def attention_with_column_sums(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scaling: float,
    attention_mask: torch.Tensor | None = None,
    row_mask: torch.Tensor | None = None,
    block_size: int = 128,
    per_head: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact attention, computed query-block by query-block, plus column sums.

    Returns ``(output, column_sums)``: ``output`` is (b, q, heads, d) as
    transformers expects; ``column_sums[b, t]`` is the sum over all heads and
    all query rows of the probability of attending to key ``t``. Only one
    block of probabilities (group x block_size x keys) exists at a time, and a
    query block only touches the keys it can see, so under a causal mask the
    work is the causal half of the score matrix.

    ``attention_mask`` is None (plain causal; the queries are the last ``q``
    of the ``k`` keys) or a 4D boolean/additive mask. ``row_mask`` (b, q)
    excludes query rows, such as right padding, from the column sums. With
    ``per_head`` the sums are kept per query head: (b, heads, k).
    """
    b, heads, q_len, d = query.shape
    kv_heads, k_len = key.shape[1], key.shape[2]
    groups = heads // kv_heads
    offset = k_len - q_len
    # Layout (b, kv, q, group, d): for one KV head, the rows of a query block
    # of all its query heads are contiguous, so the whole GQA group is one
    # matrix product against the shared keys. Looping over KV heads keeps one
    # block's probabilities small enough to stay in cache.
    q = (query * scaling).view(b, kv_heads, groups, q_len, d).transpose(2, 3).contiguous()
    key, value = key.contiguous(), value.contiguous()
    out = query.new_empty(b, q_len, kv_heads, groups, d)
    col = torch.zeros(b, heads if per_head else 1, k_len, dtype=torch.float32, device=query.device)
    causal = attention_mask is None
    if causal:  # inside the diagonal block, row r must not see the keys after it
        future = torch.ones(block_size, block_size, dtype=torch.bool, device=query.device).triu_(1)
    for start in range(0, q_len, block_size):
        stop = min(q_len, start + block_size)
        rows = stop - start
        visible = offset + stop if causal else k_len
        # Weights of the block's rows in the column sums, one per (row, group).
        if row_mask is None:
            weights = torch.ones(b, 1, rows * groups, dtype=torch.float32, device=query.device)
        else:
            weights = row_mask[:, None, start:stop].to(torch.float32).repeat_interleave(groups, -1)
        if causal:
            first = offset + start  # every row of the block sees the keys before `first`
            hidden = future[:rows, :rows, None].expand(rows, rows, groups).transpose(1, 2)
            hidden = hidden.reshape(rows * groups, rows)
        else:
            blk = attention_mask[:, :, start:stop, :visible]  # (b or 1, 1, rows, keys)
            blk = blk[:, :, :, None, :].expand(-1, -1, -1, groups, -1).reshape(
                blk.shape[0], rows * groups, visible
            )
        for h in range(kv_heads):
            scores = torch.matmul(
                q[:, h, start:stop].reshape(b, rows * groups, d), key[:, h, :visible].transpose(-1, -2)
            )
            if causal:
                scores[..., first:visible].masked_fill_(hidden, float("-inf"))
            elif blk.dtype == torch.bool:
                scores.masked_fill_(~blk, float("-inf"))
            else:
                scores.add_(blk)
            probs = torch.softmax(scores, dim=-1, dtype=torch.float32)
            if not causal:
                probs.nan_to_num_(0.0)  # a fully masked row (padding) attends nowhere
            if per_head:
                row_weights = weights[:, 0, ::groups]  # (b, rows)
                col[:, h * groups : (h + 1) * groups, :visible] += torch.einsum(
                    "br,brgk->bgk", row_weights, probs.view(b, rows, groups, visible))
            else:
                col[..., :visible].baddbmm_(weights, probs)
            ob = torch.matmul(probs.to(value.dtype), value[:, h, :visible])
            out[:, start:stop, h] = ob.view(b, rows, groups, d)
    return out.view(b, q_len, heads, d), (col if per_head else col[:, 0])


class ColumnSumProbe:
    """Accumulates the attention each key position receives, over all layers and heads.

    After a forward pass, ``totals[b, t]`` is ``sum_{layer, head, i >= t} A[i, t]``
    and ``matrices`` the number of (layer, head) maps summed.
    """

    def __init__(self, row_mask: torch.Tensor | None = None, block_size: int = 128):
        self.row_mask = row_mask
        self.block_size = block_size
        self.totals: torch.Tensor | None = None
        self.matrices = 0

    def __call__(self, module, query, key, value, attention_mask, scaling) -> torch.Tensor:
        out, col = attention_with_column_sums(
            query, key, value, scaling, attention_mask, self.row_mask, self.block_size
        )
        self.totals = col if self.totals is None else self.totals.add_(col)
        self.matrices += query.shape[1]
        return out
