"""Tokens kept as plain tensors: :class:`DenseStore` for a whole layer, :class:`DenseColumns` for one part.

Every store counts its bytes from the tensors it holds (:meth:`nbytes`) and
predicts them before it is built (``nbytes_for``), so a press can size a
budget without building candidates: the two agree exactly for a fresh store.
"""

from __future__ import annotations

import torch

from ..contracts import Store


def tensor_nbytes(*tensors: torch.Tensor | None) -> int:
    """Bytes of the given tensors (None counts nothing)."""
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


ROOM = 16  # columns a dense part reserves at a time for tokens added while decoding


class DenseStore(Store):
    """Kept tokens as dense post-RoPE keys and values, (b, kv_heads, tokens, d)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        self.keys, self.values = keys.contiguous(), values.contiguous()

    @staticmethod
    def nbytes_for(batch: int, kv_heads: int, n: int, dim: int, itemsize: int) -> int:
        """Bytes of a store of ``n`` tokens with ``itemsize``-byte elements, without building it."""
        return 2 * batch * kv_heads * n * dim * itemsize

    def __len__(self) -> int:
        return self.keys.shape[-2]

    @property
    def batch(self) -> int:
        return self.keys.shape[0]

    def append(self, keys: torch.Tensor, values: torch.Tensor, position: int) -> None:
        self.keys = torch.cat([self.keys, keys], dim=-2)
        self.values = torch.cat([self.values, values], dim=-2)

    def reorder(self, beam_idx: torch.Tensor) -> None:
        """Reorder the batch (beam search)."""
        self.keys = self.keys.index_select(0, beam_idx.to(self.keys.device))
        self.values = self.values.index_select(0, beam_idx.to(self.values.device))

    def materialize(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.keys, self.values

    def nbytes(self) -> int:
        return tensor_nbytes(self.keys, self.values)


class DenseColumns:
    """Vectors as they are, (..., columns, d): (kv_heads, columns, d) in a
    :class:`~ctxpress.kv.stores.headwise.HeadwiseStore`.

    New vectors go into room reserved ``reserve`` columns at a time, so most
    decoding steps write one column instead of copying the whole part (as a
    concatenation would); the room is allocated memory and counts in
    :meth:`nbytes`.
    """

    interleaved = False  # vectors come back as they were given

    def __init__(self, data: torch.Tensor, reserve: int = ROOM) -> None:
        self.buffer = data.contiguous()  # (..., capacity, d); the first `length` columns are filled
        self.length = data.shape[-2]
        self.reserve = reserve

    @staticmethod
    def nbytes_for(rows: int, columns: int, dim: int, itemsize: int) -> int:
        """Bytes of a fresh part of ``rows`` x ``columns`` vectors (no room is reserved before an append)."""
        return rows * columns * dim * itemsize

    def __len__(self) -> int:
        return self.length

    @property
    def width(self) -> int:
        return self.buffer.shape[-1]

    def append(self, vectors: torch.Tensor, position: int) -> None:
        end = self.length + vectors.shape[-2]
        if end > self.buffer.shape[-2]:
            grown = self.buffer.new_empty(*self.buffer.shape[:-2], end + self.reserve, self.width)
            grown[..., : self.length, :] = self.buffer[..., : self.length, :]
            self.buffer = grown
        self.buffer[..., self.length : end, :] = vectors
        self.length = end

    def materialize(self) -> torch.Tensor:
        return self.buffer[..., : self.length, :]

    def reorder(self, beam_idx: torch.Tensor) -> None:
        """Reorder the leading dimension (beam search), for a (b, ..., d) layout; a headwise part's
        leading dimension is its KV heads, and a headwise store never reorders."""
        self.buffer = self.buffer.index_select(0, beam_idx.to(self.buffer.device))

    def nbytes(self) -> int:
        return tensor_nbytes(self.buffer)


__all__ = ["ROOM", "DenseColumns", "DenseStore", "tensor_nbytes"]
