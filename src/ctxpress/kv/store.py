"""What a compressed cache layer physically holds.

* :class:`DenseStore` - the kept tokens as plain post-RoPE tensors
  (b, kv_heads, tokens, d); used when every query head of a group keeps the
  same tokens and nothing is encoded.
* :class:`HeadwiseStore` - SpindleKV's layout (batch 1). For each KV group,
  the *union* of the tokens its query heads keep is stored once, as "rows":
  densely (post-RoPE keys) or as codebook index + magnitude (pre-RoPE keys,
  with positions). Attention runs over each group's rows as one key block,
  with a mask of the rows each query head (or KV head, without per-head
  selection) keeps; tokens added while decoding are seen by every head of
  their group. Rows and codebook entries of all groups live in flat tensors
  so that one decoding step is a handful of tensor operations per layer,
  not a loop over heads.

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


class _Rows:
    """Rows of ``d``-dimensional vectors in the model's dtype, both read off the tensor named ``_vectors``."""

    _vectors: str

    @property
    def dtype(self) -> torch.dtype:
        return getattr(self, self._vectors).dtype

    @property
    def width(self) -> int:
        return getattr(self, self._vectors).shape[-1]


class DenseRows(_Rows):
    """Rows stored as they are, (R, d)."""

    _vectors = "data"

    def __init__(self, data: torch.Tensor) -> None:
        self.data = data

    def __len__(self) -> int:
        return self.data.shape[0]

    def add(self, vectors: torch.Tensor, groups: torch.Tensor) -> None:
        self.data = torch.cat([self.data, vectors.to(self.data.dtype)])

    def decode_into(self, rows: torch.Tensor, out: torch.Tensor, factors: torch.Tensor | None = None) -> None:
        """Write ``rows`` (groups * m, group-major) into ``out`` (groups, m, d): one gather, or one per group."""
        if out.is_contiguous():
            torch.index_select(self.data, 0, rows, out=out.view(-1, out.shape[-1]))
            return
        m = out.shape[1]
        for g in range(out.shape[0]):
            torch.index_select(self.data, 0, rows[g * m : (g + 1) * m], out=out[g])

    def nbytes(self) -> int:
        return _nbytes(self.data)


class CodedRows(_Rows):
    """Rows stored as ``magnitude * entries[index]``, one codebook per KV group.

    The entries of all groups share one tensor and carry their group in
    ``entry_group``. New rows are matched against their group's entries;
    those with no entry within ``theta`` get entries of their own from the
    same greedy build, run on them together.
    """

    _vectors = "entries"

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

    def decode(self) -> torch.Tensor:
        """All rows, (R, d)."""
        out = self.entries.new_empty(1, len(self), self.width)
        self.decode_into(torch.arange(len(self), device=self.index.device), out)
        return out[0]

    def decode_into(self, rows: torch.Tensor, out: torch.Tensor, factors: torch.Tensor | None = None) -> None:
        """Write ``rows`` (groups * m, group-major) into ``out`` (groups, m, d), maybe a view of a larger buffer.

        With complex ``factors`` (groups, m, d/2) the interleaved rows are also
        rotated: rotation and magnitude are one complex factor per pair,
        applied in the single multiplication that writes ``out``.
        """
        index = self.index.index_select(0, rows)
        magnitude = self.magnitude.index_select(0, rows).view(*out.shape[:2], 1)
        if factors is None:
            torch.mul(self.entries.index_select(0, index).view(out.shape), magnitude, out=out)
            return
        entries = self.entries if self.entries.dtype in (torch.float32, torch.float64) else self.entries.float()
        z = torch.view_as_complex(entries.view(len(entries), -1, 2)).index_select(0, index)
        torch.view_as_real(factors).mul_(magnitude.to(entries.dtype)[..., None])  # real view: faster than complex
        if out.dtype == entries.dtype:
            torch.mul(z.view(factors.shape), factors, out=torch.view_as_complex(out.unflatten(-1, (-1, 2))))
        else:
            out.copy_(torch.view_as_real(z.view(factors.shape) * factors).flatten(-2))

    def nbytes(self) -> int:
        return _nbytes(self.entries, self.entry_group, self.index, self.magnitude)


class HeadwiseStore:
    """SpindleKV's layout for one layer, batch size 1 (see the module docstring).

    Column ``c`` of group ``g`` is row ``slots[g, c]``; query head (or KV
    head) ``s`` attends to the columns where ``visible[s]`` is true. Groups
    narrower than the widest repeat a row in columns no head sees. Tokens
    arriving while decoding are one new column each, seen by every head;
    they wait as plain post-RoPE vectors in a small dense tail, and every
    ``encode_every`` tokens the tail is encoded in one batch into the rows
    already listed for it.
    """

    def __init__(self, keys: DenseRows | CodedRows, values: DenseRows | CodedRows, positions: torch.Tensor | None,
                 slots: torch.Tensor, visible: torch.Tensor, rotary: torch.nn.Module | None,
                 encode_every: int = 64) -> None:
        self.keys, self.values = keys, values  # coded keys are pre-RoPE and interleaved
        # Coded keys come back interleaved (see ctxpress.kv.rope); so must the tail and the queries.
        self.interleaved = isinstance(keys, CodedRows)
        self.positions = positions  # (R,) int32, to re-apply RoPE to coded keys
        self.slots = slots  # (kv_heads, columns): the row in each group's column
        self.visible = visible  # (selectors, columns) bool: the columns each query head (or KV head) sees
        self.kv_heads = slots.shape[0]
        self.rotary = rotary
        self.encode_every = encode_every
        self.upto = int(positions.max()) + 1 if positions is not None and len(positions) else 0
        # a head that keeps every token needs no mask; new tokens are seen by all heads, so this lasts
        self.masked = not bool(visible.all())
        d = keys.width
        self.tail_keys = slots.new_zeros(self.kv_heads, 0, d, dtype=values.dtype)  # (kv_heads, t, d), post-RoPE
        self.tail_values = slots.new_zeros(self.kv_heads, 0, d, dtype=values.dtype)
        self.tail_start = 0  # position of the first tail token; the tail's positions are consecutive

    def __len__(self) -> int:
        return self.slots.shape[1]

    def append(self, keys: torch.Tensor, values: torch.Tensor, position: int) -> None:
        """Add ``n`` new tokens, the first at sequence ``position``."""
        kv_heads, n = keys.shape[1], keys.shape[2]
        waiting = self.tail_keys.shape[1]
        if not waiting:
            self.tail_start = position
        start = len(self.keys) + waiting * kv_heads  # rows are numbered token-major: start + t * kv + g
        self.tail_keys = torch.cat([self.tail_keys, keys[0]], dim=1)
        self.tail_values = torch.cat([self.tail_values, values[0]], dim=1)
        self.upto = max(self.upto, position + n)  # from Python ints: no device sync per step
        new = (start + torch.arange(n, device=keys.device)[None, :] * kv_heads
               + torch.arange(kv_heads, device=keys.device)[:, None])
        dtype = index_dtype(start + n * kv_heads)
        self.slots = torch.cat([self.slots if self.slots.dtype == dtype else self.slots.to(dtype), new.to(dtype)], 1)
        self.visible = torch.nn.functional.pad(self.visible, (0, n), value=True)
        if waiting + n >= self.encode_every:
            self._encode_tail()

    def _encode_tail(self) -> None:
        """Encode the tail rows (K pre-RoPE) and make them ordinary rows, with the numbers listed for them."""
        kv_heads, t, d = self.tail_keys.shape
        k = self.tail_keys.transpose(0, 1).reshape(t * kv_heads, d)
        v = self.tail_values.transpose(0, 1).reshape(t * kv_heads, d)
        groups = torch.arange(kv_heads, device=k.device).repeat(t)
        positions = torch.arange(self.tail_start, self.tail_start + t, device=k.device,
                                 dtype=torch.int32).repeat_interleave(kv_heads)
        if self.interleaved:
            k = interleave(k)
            k = unrotate(k, phases(self.rotary, positions, k, self.upto))
        self.keys.add(k, groups)
        self.values.add(v, groups)
        if self.positions is not None:
            self.positions = torch.cat([self.positions, positions])
        self.tail_keys, self.tail_values = self.tail_keys[:, :0], self.tail_values[:, :0]

    def materialize(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys (post-RoPE) and values, (1, kv_heads, columns, d); :attr:`mask` masks them per head."""
        kv_heads, columns = self.slots.shape
        waiting = self.tail_keys.shape[1]  # the tail is the last columns
        stored = columns - waiting
        rows = self.slots[:, :stored].reshape(-1)  # group-major
        k = self.tail_keys.new_empty(kv_heads, columns, self.keys.width)
        v = self.tail_values.new_empty(kv_heads, columns, self.values.width)
        factors = None
        if self.interleaved:
            where = self.positions.index_select(0, rows)
            factors = phases(self.rotary, where, k, self.upto).view(kv_heads, stored, -1)
        self.keys.decode_into(rows, k[:, :stored], factors)
        self.values.decode_into(rows, v[:, :stored])
        if waiting:
            k[:, stored:] = interleave(self.tail_keys) if self.interleaved else self.tail_keys
            v[:, stored:] = self.tail_values
        return k[None], v[None]

    @property
    def mask(self) -> torch.Tensor | None:
        """:attr:`visible`, or None where every head sees every column."""
        return self.visible if self.masked else None

    def nbytes(self) -> int:
        return (self.keys.nbytes() + self.values.nbytes() + _nbytes(
            self.positions, self.slots, self.visible, self.tail_keys, self.tail_values))
