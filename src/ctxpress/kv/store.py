"""What a compressed cache layer physically holds: the :class:`~ctxpress.kv.contracts.Store` layouts.

* :class:`DenseStore` - the kept tokens as plain post-RoPE tensors
  (b, kv_heads, tokens, d); used when every query head of a group keeps the
  same tokens and nothing is encoded.
* :class:`HeadwiseStore` - SpindleKV's layout (batch 1). Every KV group
  stores the same number of tokens, its "columns", and a boolean mask per
  query head (or KV head, without per-head selection) marks the columns the
  head attends to, so attention runs once per layer over one key block.
  Keys and values are each a :class:`Columns` part: :class:`DenseColumns`
  (the vectors as they are), :class:`CodedColumns` (codebook index and
  magnitude per column; :class:`CodedKeys` adds the positions to re-apply
  RoPE) or :class:`~ctxpress.kv.lowbit.QuantizedColumns` (low-bit codes).
  Column-shaped index, magnitude and position tensors make rebuilding a
  coded part at a decoding step one gather and one multiplication, with no
  lookup of rows.

Stores rebuild attention-ready tensors on demand (:meth:`materialize`) and
never keep them: what stays in memory between steps is what ``nbytes``
counts.
"""

from __future__ import annotations

from typing import Protocol

import torch

from ..attention import bottom_right_attention
from ..errors import InputError
from . import codebook as cb
from .contracts import Store
from .rope import interleave, phases, unrotate


def _nbytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def index_dtype(n: int) -> torch.dtype:
    """Integer type of stored indices: int32, which ``index_select`` takes as it is.

    int16 would save two bytes per index but cost a conversion of every index
    tensor at every decoding step, which on a CPU outweighs the bytes.
    """
    return torch.int32 if n < 2**31 else torch.int64


ROOM = 16  # columns a dense part reserves at a time for tokens added while decoding


def dtype_size(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()


class DenseStore(Store):
    """Kept tokens as dense post-RoPE keys and values, (b, kv_heads, tokens, d)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        self.keys, self.values = keys.contiguous(), values.contiguous()

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
        return _nbytes(self.keys, self.values)


class Columns(Protocol):
    """The keys or the values of a :class:`HeadwiseStore`: (kv_heads, columns, d) in some encoding."""

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


class DenseColumns:
    """Vectors as they are, (..., columns, d): (kv_heads, columns, d) in a :class:`HeadwiseStore`.

    New vectors go into room reserved ``reserve`` columns at a time, so most
    decoding steps write one column instead of copying the whole part (as a
    concatenation would); the room is allocated memory and counts in
    :meth:`nbytes`.
    """

    def __init__(self, data: torch.Tensor, reserve: int = ROOM) -> None:
        self.buffer = data.contiguous()  # (..., capacity, d); the first `length` columns are filled
        self.length = data.shape[-2]
        self.reserve = reserve

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
        leading dimension is its KV heads, and :class:`HeadwiseStore` never reorders."""
        self.buffer = self.buffer.index_select(0, beam_idx.to(self.buffer.device))

    def nbytes(self) -> int:
        return _nbytes(self.buffer)


class CodedColumns:
    """Vectors stored as ``magnitude * entries[index]``, one codebook per KV group.

    ``index`` and ``magnitude`` are (kv_heads, columns), so rebuilding every
    column is one gather of entries and one multiplication. The entries of
    all groups share one tensor and carry their group in ``entry_group``.
    Vectors added while decoding wait as they are in a small tail; every
    ``encode_every`` of them are encoded together: matched against their
    group's entries, and those with no entry within ``theta`` get entries of
    their own from the same greedy build, run on them together.
    """

    def __init__(self, entries: torch.Tensor, entry_group: torch.Tensor, index: torch.Tensor,
                 magnitude: torch.Tensor, theta: float, encode_every: int = 64) -> None:
        self.entries = entries  # (E, d) unit vectors
        self.entry_group = entry_group  # (E,) int8: the KV group of each entry
        self.index = index  # (kv_heads, columns): entry of each column
        self.magnitude = magnitude  # (kv_heads, columns)
        self.theta = theta
        self.encode_every = encode_every
        self.tail = entries.new_zeros(index.shape[0], 0, entries.shape[-1])  # (kv_heads, t, d), not yet coded
        self.tail_start = 0  # position of the first tail vector; the tail's positions are consecutive

    def __len__(self) -> int:
        return self.index.shape[1] + self.tail.shape[1]

    @property
    def width(self) -> int:
        return self.entries.shape[-1]

    def append(self, vectors: torch.Tensor, position: int) -> None:
        """Add (kv_heads, n, d) vectors, the first at sequence ``position``."""
        if not self.tail.shape[1]:
            self.tail_start = position
        self.tail = torch.cat([self.tail, self._tail_form(vectors.to(self.tail.dtype))], dim=1)
        if self.tail.shape[1] >= self.encode_every:
            self.encode_tail()

    def encode_tail(self) -> None:
        """Encode the waiting vectors into new columns."""
        kv_heads, t, d = self.tail.shape
        groups = torch.arange(kv_heads, device=self.tail.device).repeat_interleave(t)
        index, magnitude = self.encode(self._to_code(self.tail).reshape(kv_heads * t, d), groups)
        self.index = torch.cat([self.index.to(index.dtype), index.view(kv_heads, t)], dim=1)
        self.magnitude = torch.cat([self.magnitude, magnitude.view(kv_heads, t).to(self.magnitude.dtype)], dim=1)
        self.tail = self.tail[:, :0]

    def _tail_form(self, vectors: torch.Tensor) -> torch.Tensor:
        """New vectors as the tail holds them: in the layout :meth:`materialize` returns."""
        return vectors

    def _to_code(self, tail: torch.Tensor) -> torch.Tensor:
        """The tail as the codebook sees it (keys: pre-RoPE)."""
        return tail

    def encode(self, vectors: torch.Tensor, groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Entry index and magnitude of ``vectors`` (N, d) of KV ``groups`` (N,), adding entries as needed."""
        units, norms = cb.normalise(vectors)
        if len(self.entries):
            sims = units @ self.entries.float().T  # (N, E)
            sims.masked_fill_(self.entry_group[None, :].long() != groups[:, None], float("-inf"))
        else:  # nothing to match: every vector is loose
            sims = torch.full((len(units), 1), float("-inf"), device=units.device)
        best, index = sims.max(dim=-1)
        loose = torch.nonzero(best <= self.theta).flatten()
        entries, tags = [self.entries], [self.entry_group]
        count = self.entries.shape[0]
        for group in torch.unique(groups[loose]).tolist():
            mine = loose[groups[loose] == group]
            fresh = cb.build(vectors[mine], self.theta)
            entries.append(fresh.entries.to(self.entries.dtype))
            tags.append(torch.full((fresh.entries.shape[0],), group, dtype=self.entry_group.dtype,
                                   device=self.entry_group.device))
            index[mine] = fresh.index + count
            count += fresh.entries.shape[0]
        self.entries, self.entry_group = torch.cat(entries), torch.cat(tags)
        return index.to(index_dtype(count)), norms

    def materialize(self) -> torch.Tensor:
        """Every column, (kv_heads, columns, d): the coded ones rebuilt, then the tail."""
        kv_heads, coded = self.index.shape
        out = self.tail.new_empty(kv_heads, len(self), self.width)
        self._decode_into(out[:, :coded])
        if self.tail.shape[1]:
            out[:, coded:] = self.tail
        return out

    def _decode_into(self, out: torch.Tensor) -> None:
        rows = self.entries.index_select(0, self.index.view(-1)).view(out.shape)
        torch.mul(rows, self.magnitude[..., None], out=out)

    def nbytes(self) -> int:
        return _nbytes(self.entries, self.entry_group, self.index, self.magnitude, self.tail)


class CodedKeys(CodedColumns):
    """Coded keys: pre-RoPE, interleaved (see :mod:`ctxpress.kv.rope`), with their positions.

    Rebuilding rotates each key back to its position: rotation and
    magnitude are one complex factor per pair, applied in the single
    multiplication that writes the output. The tail holds post-RoPE keys,
    interleaved as they arrive.
    """

    def __init__(self, entries: torch.Tensor, entry_group: torch.Tensor, index: torch.Tensor,
                 magnitude: torch.Tensor, theta: float, encode_every: int, positions: torch.Tensor,
                 rotary: torch.nn.Module) -> None:
        super().__init__(entries, entry_group, index, magnitude, theta, encode_every)
        self.positions = positions  # (kv_heads, columns) int32
        self.rotary = rotary
        self.upto = int(positions.max()) + 1 if positions.numel() else 0  # bounds the positions, read without a sync

    def append(self, vectors: torch.Tensor, position: int) -> None:
        self.upto = max(self.upto, position + vectors.shape[1])
        super().append(vectors, position)

    def encode_tail(self) -> None:
        new = self._tail_positions()
        super().encode_tail()
        self.positions = torch.cat([self.positions, new], dim=1)

    def _tail_positions(self) -> torch.Tensor:
        """(kv_heads, t) int32: the tail's positions, the same in every group."""
        kv_heads, t = self.tail.shape[:2]
        start = self.tail_start
        return torch.arange(start, start + t, device=self.tail.device, dtype=torch.int32).expand(kv_heads, t)

    def _tail_form(self, vectors: torch.Tensor) -> torch.Tensor:
        return interleave(vectors)

    def _to_code(self, tail: torch.Tensor) -> torch.Tensor:
        kv_heads, t, d = tail.shape
        keys = tail.reshape(kv_heads * t, d)
        where = self._tail_positions().reshape(-1)
        return unrotate(keys, phases(self.rotary, where, keys, self.upto)).view(kv_heads, t, d)

    def _decode_into(self, out: torch.Tensor) -> None:
        entries = self.entries if self.entries.dtype in (torch.float32, torch.float64) else self.entries.float()
        z = torch.view_as_complex(entries.view(len(entries), -1, 2)).index_select(0, self.index.view(-1))
        factors = phases(self.rotary, self.positions.view(-1), out, self.upto)  # (columns, d/2), a fresh tensor
        torch.view_as_real(factors).mul_(self.magnitude.view(-1, 1, 1).to(entries.dtype))  # real view: faster
        z = z.view(*out.shape[:2], -1)
        factors = factors.view(z.shape)
        if out.dtype == entries.dtype:
            torch.mul(z, factors, out=torch.view_as_complex(out.unflatten(-1, (-1, 2))))
        else:
            out.copy_(torch.view_as_real(z * factors).flatten(-2))

    def nbytes(self) -> int:
        return super().nbytes() + _nbytes(self.positions)


class HeadwiseStore(Store):
    """SpindleKV's layout for one layer, batch size 1 (see the module docstring).

    Every KV group holds the same number of columns; query head (or KV head)
    ``s`` attends to the columns where ``visible[s]`` is true. Tokens
    arriving while decoding are one new column each, seen by every head.
    """

    batch = 1

    def __init__(self, keys: Columns, values: Columns, visible: torch.Tensor) -> None:
        self.keys, self.values = keys, values
        # Coded keys come back interleaved (see ctxpress.kv.rope); so must the queries.
        self.interleaved = isinstance(keys, CodedKeys)
        self.visible = visible  # (selectors, columns) bool
        # a layer where every head sees every column needs no mask; new tokens are seen by all, so this lasts
        self.masked = not bool(visible.all())

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
        return self.keys.nbytes() + self.values.nbytes() + _nbytes(self.visible)
