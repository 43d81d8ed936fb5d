"""SpindleKV: pyramid eviction per query head plus per-prompt K/V codebooks.

Eviction uses PyramidKV's window scores and pyramid budget, but under GQA
each query head keeps its own top tokens (the KV head is, in effect, repeated
once per query head). The kept keys (pre-RoPE) and values of a KV group are
then encoded with greedy codebooks (:mod:`ctxpress.kv.codebook`); the copies
of one token kept by several heads of a group are one vector, so the
unfolding costs only a mask byte per head and stored token.

The eviction target that makes the stored bytes meet a ``ratio`` is found
automatically: codebooks are built once on the largest candidate selection;
the codebook of any smaller (nested) selection is the subset of entries its
vectors use, so the exact bytes of every candidate are cheap to count and a
bisection picks the largest selection that fits.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from ..errors import InputError
from . import codebook as cb
from .contracts import PrefilledLayer, Store
from .lowbit import QuantizedColumns, QuantizedStore, quantized_part_nbytes
from .presses import PyramidKV
from .rope import interleave, phases, rotary_module, unrotate
from .scores import group_mean, pooled_ranks, unit_scores
from .store import CodedColumns, CodedKeys, DenseColumns, DenseStore, HeadwiseStore, dtype_size, index_dtype


@dataclass
class SpindleKV(PyramidKV):
    """Per-query-head pyramid eviction + K/V codebooks (Tang et al., ACL 2025).

    Options: PyramidKV's (a budget, ``window``, ``kernel``, ``normalize``,
    ``beta``); the ``ratio`` counts stored bytes, codebooks and masks included.
    ``theta_k`` / ``theta_v`` (0.98 / 0.95): cosine similarity a key / value
    needs to share a codebook entry; ``encode_every`` (64): decoded tokens held
    dense before they are coded together; ``dense_fallback`` (true) and
    ``min_saving`` (0.1): code a layer's K or V only where that saves at least
    this fraction of its bytes. Ablations: ``per_head=False`` (one choice per
    KV group), ``codebook=False`` (eviction only), ``evict=False`` (codebook
    only; no budget), ``head_masks=False`` (the tokens a group stores are
    still the union of its heads' choices, but every head attends to all of
    them: no mask, whose bytes then go to tokens; needs ``codebook=False``).
    ``adaptive=True`` departs from the paper: a layer's budget goes to its
    best (head, token) pairs, as AdaKV allocates it, instead of the same
    number of tokens to every head. ``bits`` (8, 4 or 2) stores the parts
    kept as vectors (all of them without codebooks, the dense fallback with)
    in that many bits, KIVI-style with ``group`` columns per key group, so
    the byte calibration keeps more tokens; codebook entries and magnitudes
    stay in the cache's dtype. ``rest_bits`` applies to the plain eviction
    form only (``per_head``, ``codebook`` and ``adaptive`` false).
    """

    per_head: bool = True
    head_masks: bool = True
    adaptive: bool = False  # AdaKV-style: heads share a layer's budget by score, not equally
    codebook: bool = True
    evict: bool = True
    theta_k: float = 0.98
    theta_v: float = 0.95
    encode_every: int = 64  # decoded tokens held dense before they are encoded together
    dense_fallback: bool = True  # store a layer's K or V densely where its codebook would not save bytes
    # With the fallback, code a part only if it saves this fraction of its dense bytes. A coded part is
    # rebuilt at every decoding step, so one that saves little costs time for few bytes: at ratio 0.5
    # on SmolLM2, 0.1 keeps 1-2% fewer tokens than 0 and decodes 4-6% faster.
    min_saving: float = 0.1
    name: ClassVar[str] = "spindlekv"

    @classmethod
    def takes_budget(cls, options: Mapping[str, object] | None = None) -> bool:
        return (options or {}).get("evict", True) is not False  # codebook-only keeps every token

    def keeps_all_because(self) -> str:
        return " with evict=false"

    def validate(self) -> None:
        super().validate()  # every inherited option is checked, whatever evict is
        if not self.evict and not self.codebook:
            raise InputError("spindlekv with neither eviction nor codebook would not compress")
        if not 0 <= self.min_saving <= 1:
            raise InputError("min_saving is a fraction of a part's dense bytes, in [0, 1]")
        for name in ("theta_k", "theta_v"):
            if not -1 <= getattr(self, name) <= 1:
                raise InputError(f"{name} must be a cosine similarity in [-1, 1]")
        if self.rest_bits is not None and not self.is_pyramidkv:
            raise InputError("spindlekv: rest_bits applies to its plain eviction only "
                             "(per_head=false, codebook=false, adaptive=false)")
        if not self.head_masks and self.codebook:
            raise InputError("spindlekv: head_masks=false stores its columns densely, so it needs codebook=false")
        if self.encode_every < 1:
            raise InputError(f"encode_every must be >= 1 token, got {self.encode_every}")

    @property
    def is_pyramidkv(self) -> bool:
        """Neither per-head choice, codebooks nor shared budgets: compression is exactly PyramidKV's."""
        return not (self.per_head or self.codebook or self.adaptive)

    def compress(self, layers: Sequence[PrefilledLayer], model: torch.nn.Module) -> None:
        if self.is_pyramidkv:
            return super().compress(layers, model)
        if layers[0].keys.shape[0] != 1:
            raise InputError("spindlekv compresses one prompt at a time (batch size 1)")
        n = layers[0].seen
        window = self.effective_window(n) if self.evict else n
        rotary = rotary_module(model) if self.codebook else None
        plans = [LayerPlan(layer, self, window, rotary) for layer in layers]
        if not self.evict:
            counts = [n] * len(layers)
        elif self.ratio is None:
            counts = self.keep_counts(n, len(layers))
        else:
            counts = self.calibrate(plans, n)
        for plan, keep in zip(plans, counts):
            plan.layer.compress_to(plan.store(keep))

    def calibrate(self, plans: list[LayerPlan], n: int) -> list[int]:
        """Per-layer keep counts (tokens per head; with ``adaptive``, their mean over heads) with the
        largest mean whose stored bytes fit ``ratio``.

        ``plans`` are the layers' :class:`LayerPlan` in layer order, ``n`` the prompt length.
        """
        target = self.ratio * sum(plan.dense_bytes for plan in plans)
        layers = len(plans)

        def counts(mean: int) -> list[int]:
            return self.counts_for_mean(n, mean, layers)

        # Largest selection worth encoding: a quarter above the dense budget (the per-head
        # unions cost more columns than the codebook usually saves), doubled while it still fits.
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
        if not fits(lo):
            smallest = sum(p.nbytes(c) for p, c in zip(plans, counts(1))) / sum(p.dense_bytes for p in plans)
            raise InputError(f"spindlekv: ratio {self.ratio:g} is below the smallest cache it can store for "
                             f"this {n}-token prompt (one token per head and layer: {smallest:.2g} of the "
                             "dense bytes); use a larger ratio")
        if fits(hi):
            lo = hi
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
        return [min(c, top) for c, top in zip(counts(lo), ceiling)]


@dataclass
class SpindleKVWords(SpindleKV):
    """SpindleKV's per-query-head selection over whole words, with AdaKV's budgets and no codebooks.

    Options: SpindleKV's; ``unit`` is ``word``, ``codebook`` false and ``adaptive`` true.
    """

    # Departs from SpindleKV (Tang et al., ACL 2025) in three points: tokens are ranked by word, as in
    # snapkv-words; a layer's budget goes to its best (head, word) pairs (AdaKV), not equally to every
    # head; and nothing is coded. Chosen on the dev split (docs/results/kv-spindle-dev, 20% of the bytes,
    # question-aware): the codebooks at the paper's thresholds cost gold NLL on needles (+0.08) for the
    # tokens they made room for, looser ones lost needles; per-head selection beat one choice per KV group
    # (-0.05), its masks being what pays (without them, +0.04); equal budgets per head trailed snapkv-words
    # on key-value retrieval, and the shared budget closed that gap (-0.30 NLL) and gained on needles too.
    unit: str = "word"
    codebook: bool = False
    adaptive: bool = True
    name: ClassVar[str] = "spindlekv-words"


class LayerPlan:
    """One layer's candidate selections and the exact storage cost of each (public for tests and tuning).

    Made from a prefilled layer (its keys, values and per-head scores), a
    press's options, the observation window and the model's rotary module:
    :meth:`nbytes` predicts, exactly, the bytes of :meth:`store` for any
    ``keep`` (tokens per head), which is what :meth:`SpindleKV.calibrate`
    bisects over.

    A selection is "each head keeps its ``keep`` best tokens" (with
    ``adaptive``, "the layer keeps its ``keep`` x heads best (head, token)
    pairs": ranks are then over pairs, and ``keep`` a mean). Group ``g``
    needs the tokens whose best rank among its heads (``union_rank``) is
    below ``keep``; every group stores as many columns as the widest one
    needs, and a narrower group fills its columns with its next tokens by
    union rank, seen by the heads that rank them that high (so its heads
    keep a few more tokens, in bytes that would otherwise be padding). A
    group's stored tokens are therefore always a prefix of one order, and a
    codebook entry is stored once the prefix reaches its first vector: the
    size of any selection is a few binary searches.
    """

    def __init__(self, layer, press: SpindleKV, window: int, rotary) -> None:
        self.layer, self.press, self.rotary = layer, press, rotary
        keys = layer.keys
        self.kv_heads, self.n, self.dim = keys.shape[1], keys.shape[2], keys.shape[3]
        self.itemsize = keys.element_size()
        self.dense_bytes = 2 * self.kv_heads * self.n * self.dim * self.itemsize
        raw = layer.scores if press.per_head else group_mean(layer.scores, self.kv_heads)
        scores = press.ranked(raw, layer)[0]  # (selectors, n): query heads, or KV heads
        if window:
            scores[:, self.n - window :] = float("inf")
        self.selectors = scores.shape[0]
        self.group_size = self.selectors // self.kv_heads  # selectors per KV group
        if press.adaptive:  # one order over the layer's (head, token) pairs; `keep` counts pairs per head
            primary = unit_scores(raw, layer.units, press.unit_score)[0] if press.unit == "word" else raw[0].clone()
            if window:
                primary[:, self.n - window :] = float("inf")
            self.rank, self.scale = pooled_ranks(primary, scores), self.selectors
        else:  # each head's own order
            order = scores.argsort(dim=-1, descending=True, stable=True)
            self.rank = torch.empty_like(order)
            self.rank.scatter_(1, order, torch.arange(self.n, device=order.device).expand_as(order))
            self.scale = 1
        union_rank = self.rank.view(self.kv_heads, self.group_size, self.n).amin(dim=1)  # (kv_heads, n)
        self.order = union_rank.argsort(dim=1, stable=True)  # each group's tokens in the order they are stored
        # sorted union ranks, then one past the last rank (the bound of a group that stores every token)
        self._sorted_union = np.pad(union_rank.gather(1, self.order).cpu().numpy(), ((0, 0), (0, 1)),
                                    constant_values=self.n * self.scale)
        self._entry_firsts: list[np.ndarray] = []  # per part (K, V): sorted first columns of the entries
        self.books: list[tuple[cb.Codebook, cb.Codebook]] = []  # per group, on its first `built` tokens
        self.built = 0

    def width(self, keep: int) -> int:
        """Columns every group stores when each head keeps ``keep`` tokens (with ``adaptive``, on average)."""
        return max(int(np.searchsorted(ranks, keep * self.scale)) for ranks in self._sorted_union)

    def prepare(self, keep: int) -> None:
        """Build the codebooks of the largest selection considered."""
        if not self.press.codebook:
            return
        self.built = self.width(keep)
        column = torch.arange(self.built, device=self.order.device)
        self.books, firsts = [], ([], [])
        for g in range(self.kv_heads):
            tokens = self.order[g, : self.built]
            book_k = cb.build(self._prerope_keys(g, tokens), self.press.theta_k)
            book_v = cb.build(self.layer.values[0, g, tokens], self.press.theta_v)
            self.books.append((book_k, book_v))
            for part, book in enumerate((book_k, book_v)):
                first = torch.full((len(book.entries),), self.built, dtype=column.dtype, device=column.device)
                firsts[part].append(first.scatter_reduce(0, book.index, column, "amin"))
        self._entry_firsts = [np.sort(torch.cat(first).cpu().numpy()) for first in firsts]

    def _prerope_keys(self, g: int, tokens: torch.Tensor) -> torch.Tensor:
        """Keys of ``tokens`` with RoPE undone, interleaved (see :mod:`ctxpress.kv.rope`)."""
        keys = interleave(self.layer.keys[0, g, tokens])
        return unrotate(keys, phases(self.rotary, tokens, keys, self.n))

    def vector_bytes(self, columns: int, part: int) -> int:
        """Bytes of ``columns`` stored columns of the keys (``part`` 0) or values (1) kept as vectors:
        in the cache's dtype, or in the press's ``bits`` (keys per channel, values per column)."""
        if self.press.bits is None:
            return self.kv_heads * columns * self.dim * self.itemsize
        return quantized_part_nbytes(self.kv_heads, columns, self.dim, self.press.bits, self.press.group,
                                     per_channel=part == 0)

    def coded_bytes(self, columns: int) -> tuple[int, int]:
        """Bytes of the keys and of the values of ``columns`` stored columns, if coded (needs
        :meth:`prepare` on at least as many): entries and their group tags, an index and a magnitude
        per column, and for keys the positions that re-apply RoPE."""
        cells = self.kv_heads * columns
        sizes = []
        for part in (0, 1):
            count = int(np.searchsorted(self._entry_firsts[part], columns))
            coded = count * (self.dim * self.itemsize + 1)
            coded += cells * (dtype_size(index_dtype(count)) + self.itemsize)
            coded += cells * 4 if part == 0 else 0
            sizes.append(coded)
        return sizes[0], sizes[1]

    def layout(self, keep: int) -> tuple[int, list[int | None]]:
        """Columns stored for ``keep`` and per part (K, V) the bytes coded, or None for dense.

        A part is coded when its codebook makes it smaller than storing the
        vectors (as they are, or in ``bits``), by at least ``min_saving`` of
        that size (always, with ``dense_fallback=False``): vectors are read
        (or dequantized) at each step, coded parts rebuilt.
        """
        columns = self.width(keep)
        if not self.press.codebook:
            return columns, [None, None]
        layout: list[int | None] = []
        for part, coded in enumerate(self.coded_bytes(columns)):
            dense = self.vector_bytes(columns, part)
            worth = coded < dense and coded <= (1 - self.press.min_saving) * dense
            layout.append(coded if worth or not self.press.dense_fallback else None)
        return columns, layout

    def nbytes(self, keep: int) -> int:
        """Exact bytes of the store :meth:`store` would build for ``keep``."""
        columns, layout = self.layout(keep)
        masks = self.selectors * columns if self.press.head_masks else 0
        return masks + sum(self.vector_bytes(columns, part) if coded is None else coded
                           for part, coded in enumerate(layout))

    def store(self, keep: int) -> Store:
        """The compressed layer for ``keep`` tokens per head (a mean with ``adaptive``): a
        :class:`HeadwiseStore`, or with ``head_masks=False`` the groups' columns as plain tokens
        (a :class:`DenseStore`, or a :class:`QuantizedStore` with ``bits``)."""
        if self.press.codebook and self.width(keep) > self.built:
            self.prepare(keep)
        columns, layout = self.layout(keep)
        tokens = self.order[:, :columns]  # (kv_heads, columns)
        if not self.press.head_masks:  # every head sees its group's columns: plain tensors, in prompt order
            index = tokens.sort(dim=1).values[None, :, :, None].expand(-1, -1, -1, self.dim)
            keys, values = self.layer.keys.gather(2, index), self.layer.values.gather(2, index)
            if self.press.bits is None:
                return DenseStore(keys, values)
            return QuantizedStore(keys, values, self.press.bits, self.press.group)
        # a group's heads see their tokens up to the union rank of its first token not stored
        bound = torch.as_tensor(self._sorted_union[:, columns], device=tokens.device)
        ranks = self.rank.view(self.kv_heads, self.group_size, self.n)
        ranks = ranks.gather(2, tokens[:, None, :].expand(-1, self.group_size, -1))
        visible = (ranks <= bound[:, None, None]).reshape(self.selectors, columns)
        parts = []
        for part, (dense, theta) in enumerate(((self.layer.keys, self.press.theta_k),
                                               (self.layer.values, self.press.theta_v))):
            if layout[part] is None:
                vectors = dense[0].gather(1, tokens[..., None].expand(-1, -1, self.dim))
                parts.append(DenseColumns(vectors) if self.press.bits is None else
                             QuantizedColumns(vectors, self.press.bits, self.press.group, per_channel=part == 0))
            else:
                parts.append(self._coded(tokens, part, theta))
        return HeadwiseStore(parts[0], parts[1], visible)

    def _coded(self, tokens: torch.Tensor, part: int, theta: float) -> CodedColumns:
        """Keys (``part`` 0) or values (1) of the stored ``tokens``, coded with only the entries they use."""
        columns = tokens.shape[1]
        entries, tags, index, magnitude, count = [], [], [], [], 0
        for g in range(self.kv_heads):
            book = self.books[g][part]  # built on a prefix of the same order: the first columns are ours
            used, inverse = torch.unique(book.index[:columns], return_inverse=True)
            entries.append(book.entries[used])
            tags.append(torch.full((len(used),), g, dtype=torch.int8, device=tokens.device))
            index.append(inverse + count)
            magnitude.append(book.magnitude[:columns])
            count += len(used)
        coded = (torch.cat(entries), torch.cat(tags), torch.stack(index).to(index_dtype(count)),
                 torch.stack(magnitude), theta, self.press.encode_every)
        if part == 0:
            return CodedKeys(*coded, positions=tokens.to(torch.int32), rotary=self.rotary)
        return CodedColumns(*coded)
