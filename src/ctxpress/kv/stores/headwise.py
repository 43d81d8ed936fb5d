"""SpindleKV's layout: one key block per layer, a mask per head marking the columns it attends to.

Every KV group stores the same number of tokens, its "columns", and a
boolean mask per query head (or KV head, without per-head selection) marks
the columns the head attends to, so attention runs once per layer over one
key block. Keys and values are each a :class:`Columns` part:
:class:`~ctxpress.kv.stores.dense.DenseColumns` (the vectors as they are),
:class:`~ctxpress.kv.stores.coded.CodedColumns` (codebook index and
magnitude per column; ``CodedKeys`` adds the positions to re-apply RoPE) or
:class:`~ctxpress.kv.stores.quantized.QuantizedColumns` (low-bit codes).
"""

from __future__ import annotations

from typing import Protocol

import torch

from ...attention import bottom_right_attention
from ...errors import InputError
from ..contracts import Store
from ..rope import interleave
from .dense import tensor_nbytes


class Columns(Protocol):
    """The keys or the values of a :class:`HeadwiseStore`: (kv_heads, columns, d) in some encoding."""

    interleaved: bool  # whether :meth:`materialize` returns vectors in the interleaved RoPE layout

    def __len__(self) -> int: ...

    @property
    def width(self) -> int:
        """The head dimension ``d``."""
        ...

    def append(self, vectors: torch.Tensor, position: int) -> None:
        """Add (kv_heads, n, d) vectors as new columns, the first at sequence ``position``."""
        ...

    def materialize(self) -> torch.Tensor:
        """Every column as a plain tensor, (kv_heads, columns, d); never kept."""
        ...

    def nbytes(self) -> int:
        """Bytes held between decoding steps."""
        ...


class HeadwiseStore(Store):
    """SpindleKV's layout for one layer, batch size 1 (see the module docstring).

    Every KV group holds the same number of columns; query head (or KV head)
    ``s`` attends to the columns where ``visible[s]`` is true. Tokens
    arriving while decoding are one new column each, seen by every head.
    """

    batch = 1

    def __init__(self, keys: Columns, values: Columns, visible: torch.Tensor) -> None:
        self.keys, self.values = keys, values
        self.interleaved = keys.interleaved  # then the queries must be interleaved too (see ctxpress.kv.rope)
        self.visible = visible  # (selectors, columns) bool
        # a layer where every head sees every column needs no mask; new tokens are seen by all, so this lasts
        self.masked = not bool(visible.all())

    @staticmethod
    def nbytes_for(selectors: int, columns: int, keys: int, values: int) -> int:
        """Bytes of a fresh store of ``columns`` columns seen by ``selectors`` heads, whose key and value
        parts hold ``keys`` and ``values`` bytes (their own ``nbytes_for``): the parts and a mask byte
        per head and column."""
        return selectors * columns * torch.bool.itemsize + keys + values

    def __len__(self) -> int:
        return self.visible.shape[1]

    def append(self, keys: torch.Tensor, values: torch.Tensor, position: int) -> None:
        """Add ``n`` new tokens (1, kv_heads, n, d), the first at sequence ``position``."""
        self.keys.append(keys[0], position)
        self.values.append(values[0], position)
        self.visible = torch.nn.functional.pad(self.visible, (0, keys.shape[2]), value=True)

    def reorder(self, beam_idx: torch.Tensor) -> None:
        """Beam search: one beam is this prompt itself; several cannot share one prompt's store."""
        if beam_idx.numel() != 1:
            raise InputError("spindlekv compresses one prompt at a time: beam search needs num_beams=1")

    def materialize(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys (post-RoPE) and values, (1, kv_heads, columns, d); :attr:`mask` masks them per head."""
        return self.keys.materialize()[None], self.values.materialize()[None]

    def attend(self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scaling: float) -> torch.Tensor:
        if self.interleaved:  # coded keys come back in the interleaved RoPE layout: so must the queries
            query = interleave(query)
        return bottom_right_attention(query, keys, values, scaling, self.mask)

    def attended_tokens(self) -> float:
        return float(self.visible.sum(dim=-1, dtype=torch.float32).mean())

    @property
    def mask(self) -> torch.Tensor | None:
        """:attr:`visible`, or None where every head sees every column."""
        return self.visible if self.masked else None

    def nbytes(self) -> int:
        return self.keys.nbytes() + self.values.nbytes() + tensor_nbytes(self.visible)


__all__ = ["Columns", "HeadwiseStore"]
