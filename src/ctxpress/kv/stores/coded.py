"""Columns stored as codebook entries: a magnitude times a shared unit vector (SpindleKV's coding).

:class:`CodedColumns` holds one codebook per KV group, an entry index and a
magnitude per column; :class:`CodedKeys` adds the position of every column,
so keys are coded before RoPE and rotated back when rebuilt. Column-shaped
index, magnitude and position tensors make rebuilding a part at a decoding
step one gather and one multiplication, with no lookup of rows.
"""

from __future__ import annotations

import torch

from .. import codebook as cb
from ..rope import interleave, phases, unrotate
from .dense import tensor_nbytes

GROUP_TAG = torch.int8  # the KV group of each entry
POSITION = torch.int32  # the sequence position of each coded key


def index_dtype(n: int) -> torch.dtype:
    """Integer type of stored indices: int32, which ``index_select`` takes as it is.

    int16 would save two bytes per index but cost a conversion of every index
    tensor at every decoding step, which on a CPU outweighs the bytes.
    """
    return torch.int32 if n < 2**31 else torch.int64


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

    interleaved = False  # vectors come back as they were given

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

    @classmethod
    def nbytes_for(cls, entries: int, cells: int, dim: int, itemsize: int) -> int:
        """Bytes of a fresh part with ``entries`` codebook entries and ``cells`` coded columns over all
        groups, entries and magnitudes in ``itemsize`` bytes: entries and their group tags, then an
        index and a magnitude per column (the tail is empty)."""
        return entries * (dim * itemsize + GROUP_TAG.itemsize) + cells * (index_dtype(entries).itemsize + itemsize)

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
        return tensor_nbytes(self.entries, self.entry_group, self.index, self.magnitude, self.tail)


class CodedKeys(CodedColumns):
    """Coded keys: pre-RoPE, interleaved (see :mod:`ctxpress.kv.rope`), with their positions.

    Rebuilding rotates each key back to its position: rotation and
    magnitude are one complex factor per pair, applied in the single
    multiplication that writes the output. The tail holds post-RoPE keys,
    interleaved as they arrive.
    """

    interleaved = True  # keys come back in the interleaved RoPE layout: so must the queries

    def __init__(self, entries: torch.Tensor, entry_group: torch.Tensor, index: torch.Tensor,
                 magnitude: torch.Tensor, theta: float, encode_every: int, positions: torch.Tensor,
                 rotary: torch.nn.Module) -> None:
        super().__init__(entries, entry_group, index, magnitude, theta, encode_every)
        self.positions = positions  # (kv_heads, columns) int32
        self.rotary = rotary
        self.upto = int(positions.max()) + 1 if positions.numel() else 0  # bounds the positions, read without a sync

    @classmethod
    def nbytes_for(cls, entries: int, cells: int, dim: int, itemsize: int) -> int:
        """:meth:`CodedColumns.nbytes_for`, plus the position of every coded column."""
        return super().nbytes_for(entries, cells, dim, itemsize) + cells * POSITION.itemsize

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
        return torch.arange(start, start + t, device=self.tail.device, dtype=POSITION).expand(kv_heads, t)

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
        return super().nbytes() + tensor_nbytes(self.positions)


__all__ = ["GROUP_TAG", "POSITION", "CodedColumns", "CodedKeys", "index_dtype"]
