"""What a compressed cache layer physically holds.

* :class:`DenseStore` - the kept tokens as plain post-RoPE tensors
  (b, kv_heads, tokens, d); used when every query head of a group keeps the
  same tokens and nothing is encoded.
* :class:`HeadwiseStore` - SpindleKV's layout (batch 1). For each KV group,
  the *union* of the tokens its query heads keep is stored once, as "rows":
  densely (post-RoPE keys) or as codebook index + magnitude (pre-RoPE keys,
  with positions). Each query head (or KV head, without per-head selection)
  has the list of rows it sees; tokens added while decoding are seen by every
  head of their group. Rows and codebook entries of all groups live in flat
  tensors so that one decoding step is a handful of tensor operations per
  layer, not a loop over groups.

Stores rebuild attention-ready tensors on demand (:meth:`materialize`) and
never keep them: what stays in memory between steps is what ``nbytes``
counts.
"""

from __future__ import annotations

import torch

from . import codebook as cb
from .rope import interleave, phases, unrotate


def _nbytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def index_dtype(n: int) -> torch.dtype:
    """Integer type of stored indices: int32, which ``index_select`` takes as it is.

    int16 would save two bytes per index but cost a conversion of every index
    tensor at every decoding step, which on a CPU outweighs the bytes.
    """
    return torch.int32 if n < 2**31 else torch.int64


def dtype_size(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()


class DenseStore:
    """Kept tokens as dense post-RoPE keys and values, (b, kv_heads, tokens, d)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        self.keys, self.values = keys.contiguous(), values.contiguous()

    def __len__(self) -> int:
        return self.keys.shape[-2]

    def append(self, keys: torch.Tensor, values: torch.Tensor, start: int) -> None:
        self.keys = torch.cat([self.keys, keys], dim=-2)
        self.values = torch.cat([self.values, values], dim=-2)

    def materialize(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.keys, self.values

    def nbytes(self) -> int:
        return _nbytes(self.keys, self.values)


class DenseRows:
    """Rows stored as they are, (R, d)."""

    def __init__(self, data: torch.Tensor) -> None:
        self.data = data

    def __len__(self) -> int:
        return self.data.shape[0]

    def add(self, vectors: torch.Tensor, groups: torch.Tensor) -> None:
        self.data = torch.cat([self.data, vectors.to(self.data.dtype)])

    def decode(self) -> torch.Tensor:
        return self.data

    def nbytes(self) -> int:
        return _nbytes(self.data)


class CodedRows:
    """Rows stored as ``magnitude * entries[index]``, one codebook per KV group.

    The entries of all groups share one tensor and carry their group in
    ``entry_group``. New rows are matched against their group's entries;
    those with no entry within ``theta`` get entries of their own from the
    same greedy build, run on them together.
    """

    def __init__(self, entries: torch.Tensor, entry_group: torch.Tensor, index: torch.Tensor,
                 magnitude: torch.Tensor, theta: float) -> None:
        self.entries = entries  # (E, d) unit vectors
        self.entry_group = entry_group  # (E,) int8: the KV group of each entry
        self.index = index  # (R,) entry of each row
        self.magnitude = magnitude  # (R,)
        self.theta = theta

    def __len__(self) -> int:
        return self.index.shape[0]

    def add(self, vectors: torch.Tensor, groups: torch.Tensor) -> None:
        units, norms = cb.normalise(vectors)
        sims = torch.full((len(units), max(1, len(self.entries))), float("-inf"), device=units.device)
        if len(self.entries):
            sims = units @ self.entries.float().T  # (new, E)
            sims.masked_fill_(self.entry_group[None, :].long() != groups[:, None], float("-inf"))
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
        self.index = torch.cat([self.index, index]).to(index_dtype(count))
        self.magnitude = torch.cat([self.magnitude, norms.to(self.magnitude.dtype)])

    def decode(self, factors: torch.Tensor | None = None) -> torch.Tensor:
        """The rows; with complex ``factors`` (R, d/2), interleaved rows rotated by them as well.

        The rotation and the magnitude are one complex factor per row pair,
        applied in a single multiplication after the codebook lookup.
        """
        index = self.index
        if factors is None:
            return self.entries.index_select(0, index) * self.magnitude[:, None]
        entries = self.entries if self.entries.dtype in (torch.float32, torch.float64) else self.entries.float()
        z = torch.view_as_complex(entries.view(len(entries), -1, 2)).index_select(0, index)
        rows = torch.view_as_real(z * (factors * self.magnitude[:, None].to(entries.dtype)))
        return rows.view(len(index), -1).to(self.entries.dtype)

    def nbytes(self) -> int:
        return _nbytes(self.entries, self.entry_group, self.index, self.magnitude)


class HeadwiseStore:
    """SpindleKV's layout for one layer, batch size 1 (see the module docstring).

    Tokens arriving while decoding first become plain rows in a small dense
    tail (post-RoPE), already listed in every head's rows of their group;
    every ``encode_every`` tokens the tail is encoded in one batch. Rows keep
    their numbers when that happens, so the head lists never change.
    """

    def __init__(self, keys: DenseRows | CodedRows, values: DenseRows | CodedRows, positions: torch.Tensor | None,
                 select: torch.Tensor, kv_heads: int, rotary: torch.nn.Module | None, encode_every: int = 64) -> None:
        self.keys, self.values = keys, values  # coded keys are pre-RoPE and interleaved
        # Coded keys come back interleaved (see ctxpress.kv.rope); so must the tail and the queries.
        self.interleaved = isinstance(keys, CodedRows)
        self.positions = positions  # (R,) int32, to re-apply RoPE to coded keys
        self.select = select  # (selectors, tokens): rows each query head (or KV head) sees
        self.kv_heads = kv_heads
        self.rotary = rotary
        self.encode_every = encode_every
        self.upto = int(positions.max()) + 1 if positions is not None and len(positions) else 0
        d = keys.decode().shape[-1] if len(keys) else 0
        dtype = values.decode().dtype
        self.tail_keys = select.new_zeros(0, d, dtype=dtype)  # (t * kv_heads, d), post-RoPE, token-major
        self.tail_values = select.new_zeros(0, d, dtype=dtype)
        self.tail_positions = select.new_zeros(0, dtype=torch.int32)  # one per tail token
        # KV group of each selector, as a column: new rows are listed for every head of their group
        self.group_column = (torch.arange(select.shape[0], device=select.device)[:, None]
                             // (select.shape[0] // kv_heads)).to(torch.int16)

    def __len__(self) -> int:
        return self.select.shape[1]

    def append(self, keys: torch.Tensor, values: torch.Tensor, position: int) -> None:
        """Add ``n`` new tokens, the first at sequence ``position``."""
        kv_heads, n, d = keys.shape[1], keys.shape[2], keys.shape[3]
        positions = torch.arange(position, position + n, device=keys.device, dtype=torch.int32)
        start = len(self.keys) + len(self.tail_keys)
        rows = keys[0].transpose(0, 1).reshape(n * kv_heads, d)  # token-major: row = start + t * kv + g
        self.tail_keys = torch.cat([self.tail_keys, interleave(rows) if self.interleaved else rows])
        self.tail_values = torch.cat([self.tail_values, values[0].transpose(0, 1).reshape(n * kv_heads, d)])
        self.tail_positions = torch.cat([self.tail_positions, positions])
        self.upto = max(self.upto, position + n)  # from Python ints: no device sync per step
        if n == 1:
            new = self.group_column + start
        else:
            new = start + torch.arange(n, device=keys.device)[None, :] * kv_heads + self.group_column
        total = start + n * kv_heads
        dtype = index_dtype(total)
        self.select = torch.cat([self.select if self.select.dtype == dtype else self.select.to(dtype),
                                 new.to(dtype)], dim=1)
        if len(self.tail_positions) >= self.encode_every:
            self._encode_tail()

    def _encode_tail(self) -> None:
        """Encode the tail rows (K pre-RoPE) and make them ordinary rows, same numbers."""
        k = self.tail_keys
        groups = torch.arange(self.kv_heads, device=k.device).repeat(len(self.tail_positions))
        positions = self.tail_positions.repeat_interleave(self.kv_heads)
        if self.interleaved:
            k = unrotate(k, phases(self.rotary, positions, k, self.upto))
        self.keys.add(k, groups)
        self.values.add(self.tail_values, groups)
        if self.positions is not None:
            self.positions = torch.cat([self.positions, positions])
        self.tail_keys, self.tail_values = self.tail_keys[:0], self.tail_values[:0]
        self.tail_positions = self.tail_positions[:0]

    def materialize(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys (post-RoPE) and values, (1, selectors, tokens, d)."""
        if self.interleaved:
            k = self.keys.decode(phases(self.rotary, self.positions, self.keys.entries, self.upto))
        else:
            k = self.keys.decode()
        v = self.values.decode()
        if len(self.tail_keys):
            k, v = torch.cat([k, self.tail_keys]), torch.cat([v, self.tail_values])
        selectors, tokens = self.select.shape
        rows = self.select.reshape(-1)
        return (k.index_select(0, rows).view(1, selectors, tokens, -1),
                v.index_select(0, rows).view(1, selectors, tokens, -1))

    def nbytes(self) -> int:
        return (self.keys.nbytes() + self.values.nbytes() + _nbytes(
            self.positions, self.select, self.tail_keys, self.tail_values, self.tail_positions, self.group_column))
