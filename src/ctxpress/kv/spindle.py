"""SpindleKV: pyramid eviction per query head plus per-prompt K/V codebooks.

Eviction uses PyramidKV's window scores and pyramid budget, but under GQA
each query head keeps its own top tokens (the KV head is, in effect, repeated
once per query head). The kept keys (pre-RoPE) and values of a KV group are
then encoded with greedy codebooks (:mod:`ctxpress.kv.codebook`); the copies
of one token kept by several heads of a group are one vector, so the
unfolding costs only the per-head index lists.

The eviction target that makes the stored bytes meet a ``ratio`` is found
automatically: codebooks are built once on the largest candidate selection;
the codebook of any smaller (nested) selection is the subset of entries its
vectors use, so the exact bytes of every candidate are cheap to count and a
bisection picks the largest selection that fits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from ..errors import InputError
from . import codebook as cb
from .cache import PressState
from .presses import PyramidKV
from .rope import interleave, phases, rotary_module, unrotate
from .scores import group_mean
from .store import CodedRows, DenseRows, HeadwiseStore, dtype_size, index_dtype


@dataclass
class SpindleKV(PyramidKV):
    """Per-query-head pyramid eviction + K/V codebooks (Tang et al., ACL 2025).

    Ablations: ``per_head=False`` (one choice per KV group), ``codebook=False``
    (eviction only), ``evict=False`` (codebook only; no budget).
    """

    per_head: bool = True
    codebook: bool = True
    evict: bool = True
    theta_k: float = 0.98
    theta_v: float = 0.95
    encode_every: int = 64  # decoded tokens held dense before they are encoded together
    dense_fallback: bool = True  # store a layer's K or V densely where its codebook would not save bytes
    min_saving: float = 0.0  # with the fallback: code a part only if it saves this fraction of its dense bytes
    name: ClassVar[str] = "spindlekv"

    def __post_init__(self) -> None:
        if not self.evict and (self.ratio is not None or self.tokens is not None):
            raise InputError("spindlekv with evict=False keeps every token: the codebook alone sets the size, "
                             "so it takes no ratio or token budget")
        if not self.evict and not self.codebook:
            raise InputError("spindlekv with neither eviction nor codebook would not compress")
        if not 0 <= self.min_saving <= 1:
            raise InputError("min_saving is a fraction of a part's dense bytes, in [0, 1]")
        for name in ("theta_k", "theta_v"):
            if not -1 <= getattr(self, name) <= 1:
                raise InputError(f"{name} must be a cosine similarity in [-1, 1]")
        if self.evict:
            super().__post_init__()

    def compress(self, state: PressState) -> None:
        if not self.per_head and not self.codebook:
            return super().compress(state)  # exactly PyramidKV
        layers = sorted(state.layers, key=lambda layer: layer.layer_idx)
        if layers[0].keys.shape[0] != 1:
            raise InputError("spindlekv compresses one prompt at a time (batch size 1)")
        n = layers[0].seen
        window = self.effective_window(n) if self.evict else n
        rotary = rotary_module(state.model) if self.codebook else None
        plans = [_LayerPlan(layer, self, window, rotary) for layer in layers]
        if not self.evict:
            counts = [n] * len(layers)
        elif self.ratio is None:
            counts = self.keep_counts(n, len(layers))
        else:
            counts = self._calibrate(plans, n)
        for plan, keep in zip(plans, counts):
            plan.layer.compress_to(plan.store(keep))

    def _calibrate(self, plans: list[_LayerPlan], n: int) -> list[int]:
        """Per-layer keep counts with the largest mean whose stored bytes fit ``ratio``."""
        target = self.ratio * sum(plan.dense_bytes for plan in plans)
        layers = len(plans)

        def counts(mean: int) -> list[int]:
            return self.counts_for_mean(n, mean, layers)

        # Largest selection worth encoding: a quarter above the dense budget (the per-head
        # unions cost more rows than the codebook usually saves), doubled while it still fits.
        k_max = min(n, max(1, math.ceil(1.25 * self.ratio * n)) if self.codebook else self.mean_keep(n))
        while True:
            ceiling = counts(k_max)
            for plan, keep in zip(plans, ceiling):
                plan.prepare(keep)
            if k_max == n or sum(p.nbytes(c) for p, c in zip(plans, ceiling)) > target:
                break
            k_max = min(n, 2 * k_max)

        def fits(mean: int) -> bool:
            sizes = [min(c, top) for c, top in zip(counts(mean), ceiling)]
            return sum(p.nbytes(c) for p, c in zip(plans, sizes)) <= target

        lo, hi = 1, k_max  # largest mean that fits, by bisection
        if fits(hi):
            lo = hi
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
        return [min(c, top) for c, top in zip(counts(lo), ceiling)]


class _LayerPlan:
    """One layer's candidate selections and the exact storage cost of each.

    A selection is "each head keeps its ``keep`` best tokens". Token ``t``
    enters group ``g``'s stored rows once ``keep`` exceeds its best rank
    among the heads of ``g`` (``union_rank``), and a codebook entry is stored
    once any of its vectors is; with those first-use ranks sorted, the size
    of any selection is a few binary searches.
    """

    def __init__(self, layer, press: SpindleKV, window: int, rotary) -> None:
        self.layer, self.press, self.rotary = layer, press, rotary
        keys = layer.keys
        self.kv_heads, self.n, self.dim = keys.shape[1], keys.shape[2], keys.shape[3]
        self.itemsize = keys.element_size()
        self.dense_bytes = 2 * self.kv_heads * self.n * self.dim * self.itemsize
        scores = layer.scores if press.per_head else group_mean(layer.scores, self.kv_heads)
        scores = scores[0].clone()  # (selectors, n): query heads, or KV heads
        if window:
            scores[:, self.n - window :] = float("inf")
        order = scores.argsort(dim=-1, descending=True, stable=True)
        self.rank = torch.empty_like(order)
        self.rank.scatter_(1, order, torch.arange(self.n, device=order.device).expand_as(order))
        self.selectors = scores.shape[0]
        self.group_size = self.selectors // self.kv_heads  # selectors per KV group
        self.union_rank = self.rank.view(self.kv_heads, self.group_size, self.n).amin(dim=1)  # (kv_heads, n)
        self._group_ranks = np.sort(self.union_rank.cpu().numpy(), axis=1)
        self._entry_ranks: list[np.ndarray] = []  # per part (K, V): sorted first-use ranks of the entries
        self.books: list[tuple[cb.Codebook, cb.Codebook, torch.Tensor]] = []

    def prepare(self, keep: int) -> None:
        """Build the codebooks of the largest selection considered."""
        if not self.press.codebook:
            return
        union = self.union_rank < keep
        self.books, firsts = [], ([], [])
        for g in range(self.kv_heads):
            rows = torch.nonzero(union[g]).flatten()
            book_k = cb.build(self._prerope_keys(g, rows), self.press.theta_k)
            book_v = cb.build(self.layer.values[0, g, rows], self.press.theta_v)
            self.books.append((book_k, book_v, rows))
            for part, book in enumerate((book_k, book_v)):
                first = torch.full((len(book.entries),), self.n, dtype=self.union_rank.dtype, device=rows.device)
                firsts[part].append(first.scatter_reduce(0, book.index, self.union_rank[g, rows], "amin"))
        self._entry_ranks = [np.sort(torch.cat(first).cpu().numpy()) for first in firsts]

    def _prerope_keys(self, g: int, rows: torch.Tensor) -> torch.Tensor:
        """Keys of ``rows`` with RoPE undone, interleaved (see :mod:`ctxpress.kv.rope`)."""
        keys = interleave(self.layer.keys[0, g, rows])
        return unrotate(keys, phases(self.rotary, rows, keys, self.n))

    def _layout(self, keep: int) -> tuple[int, int, list[int | None]]:
        """Rows stored for ``keep``, columns per group, and per part (K, V) the bytes coded, or None for dense.

        A part is coded when its codebook makes it smaller than storing the
        rows as they are, by more than ``min_saving`` of the dense size
        (always, with ``dense_fallback=False``): dense rows are read as they
        are at each step, coded ones rebuilt. Coded keys also pay for their
        positions.
        """
        sizes = [int(np.searchsorted(ranks, keep)) for ranks in self._group_ranks]  # each group's rows
        rows, columns = sum(sizes), max(sizes)
        if not self.press.codebook:
            return rows, columns, [None, None]
        dense = rows * self.dim * self.itemsize
        layout: list[int | None] = []
        for part in (0, 1):
            count = int(np.searchsorted(self._entry_ranks[part], keep))
            coded = count * (self.dim * self.itemsize + 1)  # entries and their group tags
            coded += rows * (dtype_size(index_dtype(count)) + self.itemsize)  # index and magnitude per row
            coded += rows * 4 if part == 0 else 0  # positions, to re-apply RoPE
            worth = coded < dense and coded <= (1 - self.press.min_saving) * dense
            layout.append(coded if worth or not self.press.dense_fallback else None)
        return rows, columns, layout

    def nbytes(self, keep: int) -> int:
        """Exact bytes of the store :meth:`store` would build for ``keep``."""
        rows, columns, layout = self._layout(keep)
        total = self.kv_heads * columns * dtype_size(index_dtype(rows))  # each group's row per column
        total += self.selectors * columns  # which columns each head sees (bool)
        return total + sum(rows * self.dim * self.itemsize if coded is None else coded for coded in layout)

    def store(self, keep: int) -> HeadwiseStore:
        """The compressed layer for ``keep`` tokens per head."""
        if self.press.codebook and not self.books:
            self.prepare(keep)
        union = self.union_rank < keep
        tokens = [torch.nonzero(union[g]).flatten() for g in range(self.kv_heads)]
        sizes = torch.tensor([len(t) for t in tokens], device=union.device)
        rows, columns, layout = self._layout(keep)
        # group g's rows follow the rows of the groups before it; narrower groups repeat their
        # first token up to the widest one, in columns no head sees
        offsets = torch.cumsum(sizes, 0) - sizes
        column = torch.arange(columns, device=union.device)
        used = column[None, :] < sizes[:, None]  # (kv_heads, columns)
        within = torch.where(used, column[None, :], 0)
        slots = (offsets[:, None] + within).to(index_dtype(rows))
        token_of = torch.stack([t[w] for t, w in zip(tokens, within)])  # (kv_heads, columns)
        ranks = self.rank.view(self.kv_heads, self.group_size, self.n)
        seen = ranks.gather(2, token_of[:, None, :].expand(-1, self.group_size, -1)) < keep
        visible = (seen & used[:, None, :]).reshape(self.selectors, columns)
        parts = []
        for part, (dense, theta) in enumerate(((self.layer.keys, self.press.theta_k),
                                               (self.layer.values, self.press.theta_v))):
            if layout[part] is None:
                parts.append(DenseRows(torch.cat([dense[0, g, t] for g, t in enumerate(tokens)])))
            else:
                parts.append(self._coded(tokens, part, theta))
        positions = torch.cat(tokens).to(torch.int32) if isinstance(parts[0], CodedRows) else None
        return HeadwiseStore(parts[0], parts[1], positions, slots, visible, self.rotary, self.press.encode_every)

    def _coded(self, tokens: list[torch.Tensor], part: int, theta: float) -> CodedRows:
        """Keys (``part`` 0) or values (1) of the kept tokens, coded with only the entries they use."""
        entries, tags, index, magnitude, count = [], [], [], [], 0
        for g, rows in enumerate(tokens):
            book = self.books[g][part]
            pick = torch.searchsorted(self.books[g][2], rows)  # kept rows are a subset of the built ones
            used, inverse = torch.unique(book.index[pick], return_inverse=True)
            entries.append(book.entries[used])
            tags.append(torch.full((len(used),), g, dtype=torch.int8, device=rows.device))
            index.append(inverse + count)
            magnitude.append(book.magnitude[pick])
            count += len(used)
        return CodedRows(torch.cat(entries), torch.cat(tags), torch.cat(index).to(index_dtype(count)),
                         torch.cat(magnitude), theta)
