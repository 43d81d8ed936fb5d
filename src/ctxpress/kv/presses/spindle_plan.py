"""One SpindleKV layer's candidate selections and the exact bytes each would be stored in.

Kept apart from the press (:mod:`.spindlekv`): the press decides budgets,
the plan knows one layer's ranks, unions and codebooks, and asks the stores
(:mod:`ctxpress.kv.stores`) what a candidate would cost.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from .. import codebook as cb
from ..contracts import PrefilledLayer, Store
from ..rope import interleave, phases, unrotate
from ..scores import group_mean, pooled_ranks, unit_scores
from ..stores.coded import GROUP_TAG, POSITION, CodedColumns, CodedKeys, index_dtype
from ..stores.dense import DenseColumns, DenseStore
from ..stores.headwise import HeadwiseStore
from ..stores.quantized import QuantizedColumns, QuantizedStore

if TYPE_CHECKING:
    from .spindlekv import SpindleKV


class LayerPlan:
    """One layer's candidate selections and the exact storage cost of each (public for tests and tuning).

    Made from a prefilled layer (its keys, values and per-head scores), a
    press's options, the observation window and the model's rotary module:
    :meth:`nbytes` predicts, exactly, the bytes of :meth:`store` for any
    ``keep`` (tokens per head), which is what :meth:`SpindleKV.calibrate`
    searches over; every size is the stores' own ``nbytes_for``.

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

    def __init__(self, layer: PrefilledLayer, press: SpindleKV, window: int, rotary: torch.nn.Module | None) -> None:
        self.layer, self.press, self.rotary = layer, press, rotary
        keys = layer.keys
        self.kv_heads, self.n, self.dim = keys.shape[1], keys.shape[2], keys.shape[3]
        self.itemsize = keys.element_size()
        self.dense_bytes = DenseStore.nbytes_for(1, self.kv_heads, self.n, self.dim, self.itemsize)
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
            return DenseColumns.nbytes_for(self.kv_heads, columns, self.dim, self.itemsize)
        return QuantizedColumns.nbytes_for(self.kv_heads, columns, self.dim, self.press.bits, self.press.group,
                                           per_channel=part == 0)

    def coded_bytes(self, columns: int) -> tuple[int, int]:
        """Bytes of the keys and of the values of ``columns`` stored columns, if coded (needs
        :meth:`prepare` on at least as many): entries and their group tags, an index and a magnitude
        per column, and for keys the positions that re-apply RoPE."""
        cells = self.kv_heads * columns
        keys, values = (int(np.searchsorted(firsts, columns)) for firsts in self._entry_firsts)
        return (CodedKeys.nbytes_for(keys, cells, self.dim, self.itemsize),
                CodedColumns.nbytes_for(values, cells, self.dim, self.itemsize))

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
        if not self.press.head_masks:  # plain tokens (see store): no codebook, so both parts are vectors
            if self.press.bits is None:
                return DenseStore.nbytes_for(1, self.kv_heads, columns, self.dim, self.itemsize)
            return QuantizedStore.nbytes_for(1, self.kv_heads, columns, self.dim, self.press.bits, self.press.group)
        keys, values = (self.vector_bytes(columns, part) if coded is None else coded
                        for part, coded in enumerate(layout))
        return HeadwiseStore.nbytes_for(self.selectors, columns, keys, values)

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
            tags.append(torch.full((len(used),), g, dtype=GROUP_TAG, device=tokens.device))
            index.append(inverse + count)
            magnitude.append(book.magnitude[:columns])
            count += len(used)
        coded = (torch.cat(entries), torch.cat(tags), torch.stack(index).to(index_dtype(count)),
                 torch.stack(magnitude), theta, self.press.encode_every)
        if part == 0:
            return CodedKeys(*coded, positions=tokens.to(POSITION), rotary=self.rotary)
        return CodedColumns(*coded)


__all__ = ["LayerPlan"]
