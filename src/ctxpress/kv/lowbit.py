"""Low-bit storage of kept keys and values (KIVI-style), for any press.

As KIVI (Liu et al., ICML 2024) observes, keys have outlier channels and
values do not: keys are quantized per channel over groups of ``group``
tokens, values per token over the head dimension, both asymmetric (a
minimum and a step per group, in float16). Tokens generated after the
prefill wait in a small dense tail until a full group of them can be
quantized together. Bytes are counted exactly: codes, steps, minimums and
tail.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .contracts import Store
from .store import DenseColumns, DenseStore

BITS = (8, 4, 2)  # most bits first: a ratio gets the most that fit
STATS = torch.float16


def _pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes in [0, 2**bits) along the last dimension, ``8 // bits`` to a byte."""
    per = 8 // bits
    grouped = codes.view(*codes.shape[:-1], -1, per).to(torch.uint8)
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=codes.device)
    return (grouped << shifts).sum(dim=-1, dtype=torch.uint8)


def _unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    if bits == 8:
        return packed
    # One masked shift per position in the byte, stacked: several times faster on a CPU than one
    # broadcast shift over a new axis, and this runs at every decoding step.
    mask = 2**bits - 1
    return torch.stack([(packed >> shift) & mask for shift in range(0, 8, bits)], dim=-1).flatten(-2)


@dataclass
class Quantized:
    """Asymmetric uniform codes of a tensor, with a minimum and a step per group along ``dim``.

    ``group=None``: one group spans all of ``dim``. With ``group`` (``dim=-2`` only), tokens are
    grouped ``group`` at a time from the first, the last group possibly shorter, so a whole
    prompt is quantized (and later dequantized) in a few tensor operations instead of a loop
    over its groups.
    """

    codes: torch.Tensor  # packed uint8
    low: torch.Tensor  # float16, reduced over each group
    step: torch.Tensor
    group: int | None = None

    @classmethod
    def of(cls, x: torch.Tensor, bits: int, dim: int, group: int | None = None) -> Quantized:
        grouped = x
        if group is not None:
            if dim != -2:
                raise ValueError("token groups are along dim -2")
            n = x.shape[-2]
            pad = -n % group  # repeat the last token: a group's minimum and maximum stay its own
            if pad:
                grouped = torch.cat([x, x[..., -1:, :].expand(*x.shape[:-2], pad, x.shape[-1])], dim=-2)
            grouped, dim = grouped.unflatten(-2, (-1, group)), -2  # (..., groups, group, d)
        low, high = grouped.amin(dim, keepdim=True), grouped.amax(dim, keepdim=True)
        low, step = low.to(STATS), ((high - low) / (2**bits - 1)).to(STATS)
        codes = ((grouped - low.to(x.dtype)) / step.to(x.dtype).clamp_min(1e-8)).round_().clamp_(0, 2**bits - 1)
        if group is not None:
            codes, low, step = codes.flatten(-3, -2)[..., : x.shape[-2], :], low.squeeze(-2), step.squeeze(-2)
        return cls(_pack(codes.to(torch.uint8), bits), low, step, group)

    def values(self, bits: int, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
        """The dequantized tensor, written into ``out`` if given: ``code * step + minimum`` as one
        multiply-add per part (a group's statistics are broadcast over its tokens, not repeated)."""
        codes = _unpack(self.codes, bits)
        low, step = self.low.to(dtype), self.step.to(dtype)
        if out is None:
            out = torch.empty(codes.shape, dtype=dtype, device=codes.device)
        if self.group is None:  # statistics (..., n, 1) broadcast over the last dimension
            return torch.addcmul(low, codes, step, out=out)
        n = codes.shape[-2]
        whole = n // self.group  # full groups; a shorter last one is done on its own
        full = whole * self.group
        if whole:
            torch.addcmul(low[..., :whole, None, :], codes[..., :full, :].unflatten(-2, (whole, self.group)),
                          step[..., :whole, None, :], out=out[..., :full, :].unflatten(-2, (whole, self.group)))
        if full < n:
            torch.addcmul(low[..., whole:, :], codes[..., full:, :], step[..., whole:, :], out=out[..., full:, :])
        return out

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.low, self.step))


class QuantizedStore(Store):
    """Keys per channel over token groups, values per token; a dense tail for tokens still to quantize.

    The prompt is one chunk of codes and every later full group of generated tokens another, so
    reading the cache back costs a few operations per chunk, not per group.
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, bits: int, group: int) -> None:
        self.bits, self.group, self.dtype = bits, group, keys.dtype
        self.key_chunks: list[Quantized] = []  # (b, kv_heads, tokens, d) each, a multiple of group but the last
        self.value_chunks: list[Quantized] = []
        self.tail = DenseStore(keys[..., :0, :], values[..., :0, :])  # tokens waiting for a full group
        self.length = 0
        self._quantize(keys, values)

    def _quantize(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        if not keys.shape[-2]:
            return
        self.key_chunks.append(Quantized.of(keys, self.bits, dim=-2, group=self.group))  # per channel
        self.value_chunks.append(Quantized.of(values, self.bits, dim=-1))  # per token
        self.length += keys.shape[-2]

    def __len__(self) -> int:
        return self.length + len(self.tail)

    @property
    def batch(self) -> int:
        return self.tail.batch

    def append(self, keys: torch.Tensor, values: torch.Tensor, position: int) -> None:
        self.tail.append(keys, values, position)
        if len(self.tail) >= self.group:
            full = len(self.tail) // self.group * self.group
            keys, values = self.tail.keys, self.tail.values
            self._quantize(keys[..., :full, :], values[..., :full, :])
            self.tail = DenseStore(keys[..., full:, :], values[..., full:, :])

    def materialize(self) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (*self.tail.keys.shape[:-2], len(self), self.tail.keys.shape[-1])
        keys = self.tail.keys.new_empty(shape)
        values = self.tail.values.new_empty(shape)
        self.write_into(keys, values)
        return keys, values

    def write_into(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Each chunk dequantized straight into its slice: no concatenation copies the cache again."""
        start = 0
        for key_chunk, value_chunk in zip(self.key_chunks, self.value_chunks):
            end = start + key_chunk.codes.shape[-2]
            key_chunk.values(self.bits, self.dtype, out=keys[..., start:end, :])
            value_chunk.values(self.bits, self.dtype, out=values[..., start:end, :])
            start = end
        self.tail.write_into(keys[..., start:, :], values[..., start:, :])

    def reorder(self, beam_idx: torch.Tensor) -> None:
        def pick(t: torch.Tensor) -> torch.Tensor:
            return t.index_select(0, beam_idx.to(t.device))

        for chunk in (*self.key_chunks, *self.value_chunks):
            chunk.codes, chunk.low, chunk.step = pick(chunk.codes), pick(chunk.low), pick(chunk.step)
        self.tail.reorder(beam_idx)

    def nbytes(self) -> int:
        return sum(c.nbytes() for c in (*self.key_chunks, *self.value_chunks)) + self.tail.nbytes()


class TieredStore(Store):
    """Two precisions in one layer: the most important tokens in ``kept`` (dense or many bits), the rest
    in ``rest`` (few bits). Generated tokens join ``kept``.

    Keys are stored after RoPE, so attention does not depend on where a key sits in the cache; only the
    newest tokens must come last (the causal mask of a multi-token step assumes it), so ``rest``, which
    never grows, is materialized first.
    """

    def __init__(self, kept: Store, rest: QuantizedStore) -> None:
        self.kept, self.rest = kept, rest

    def __len__(self) -> int:
        return len(self.kept) + len(self.rest)

    @property
    def batch(self) -> int:
        return self.kept.batch

    def append(self, keys: torch.Tensor, values: torch.Tensor, position: int) -> None:
        self.kept.append(keys, values, position)

    def materialize(self) -> tuple[torch.Tensor, torch.Tensor]:
        like, rest = self.rest.tail.keys, len(self.rest)  # the tail has the cache's shape and dtype, if no tokens
        shape = (*like.shape[:-2], len(self), like.shape[-1])
        keys, values = like.new_empty(shape), like.new_empty(shape)
        self.rest.write_into(keys[..., :rest, :], values[..., :rest, :])
        self.kept.write_into(keys[..., rest:, :], values[..., rest:, :])
        return keys, values

    def reorder(self, beam_idx: torch.Tensor) -> None:
        self.kept.reorder(beam_idx)
        self.rest.reorder(beam_idx)

    def nbytes(self) -> int:
        return self.kept.nbytes() + self.rest.nbytes()


class QuantizedColumns:
    """One part (keys or values) of a :class:`~ctxpress.kv.store.HeadwiseStore`, (kv_heads, columns, d),
    in ``bits`` bits: keys per channel over groups of ``group`` columns, values per column (KIVI's split).

    Columns added while decoding wait as they are until a full group of them can be quantized together.
    """

    def __init__(self, data: torch.Tensor, bits: int, group: int, per_channel: bool) -> None:
        self.bits, self.group, self.per_channel, self.dtype = bits, group, per_channel, data.dtype
        self.chunks: list[Quantized] = []  # the prompt's columns, then each full group of generated ones
        self.length = 0
        self.tail = DenseColumns(data[:, :0].clone())
        self._quantize(data)

    def _quantize(self, data: torch.Tensor) -> None:
        if not data.shape[1]:
            return
        group = self.group if self.per_channel else None
        self.chunks.append(Quantized.of(data, self.bits, dim=-2 if self.per_channel else -1, group=group))
        self.length += data.shape[1]

    def __len__(self) -> int:
        return self.length + len(self.tail)

    @property
    def width(self) -> int:
        return self.tail.width

    def append(self, vectors: torch.Tensor, position: int) -> None:
        self.tail.append(vectors, position)
        if len(self.tail) >= self.group:
            waiting = self.tail.materialize()
            full = len(self.tail) // self.group * self.group
            self._quantize(waiting[:, :full])
            self.tail = DenseColumns(waiting[:, full:].clone())

    def materialize(self) -> torch.Tensor:
        out = self.tail.buffer.new_empty(self.tail.buffer.shape[0], len(self), self.width)
        start = 0
        for chunk in self.chunks:
            end = start + chunk.codes.shape[-2]
            chunk.values(self.bits, self.dtype, out=out[:, start:end])
            start = end
        out[:, start:] = self.tail.materialize()
        return out

    def nbytes(self) -> int:
        return sum(chunk.nbytes() for chunk in self.chunks) + self.tail.nbytes()


def bits_that_fit(shapes: list[torch.Size], element: int, ratio: float, group: int,
                  choices: tuple[int, ...] = BITS) -> int | None:
    """The most bits (of ``choices``) in which every token of layers of ``shapes`` (b, kv_heads, n, d)
    fits ``ratio`` of their dense bytes (``element`` bytes a number); None if not even the fewest do."""
    dense = sum(2 * math.prod(shape) * element for shape in shapes)
    for bits in choices:
        if sum(quantized_nbytes(*shape[:3], shape[3], bits, group) for shape in shapes) <= ratio * dense:
            return bits
    return None


def quantized_nbytes(batch: int, kv_heads: int, n: int, dim: int, bits: int, group: int) -> int:
    """Bytes of a :class:`QuantizedStore` of ``n`` prompt tokens (one layer), without building it."""
    rows = batch * kv_heads
    return sum(quantized_part_nbytes(rows, n, dim, bits, group, per_channel) for per_channel in (True, False))


def quantized_part_nbytes(rows: int, n: int, dim: int, bits: int, group: int, per_channel: bool) -> int:
    """Bytes of ``rows`` x ``n`` vectors of ``dim`` in ``bits`` bits: per channel over groups of ``group``
    tokens (keys) or per token (values); a minimum and a step per group."""
    stat = torch.finfo(STATS).bits // 8
    stats = math.ceil(n / group) * dim if per_channel else n
    return rows * n * dim * bits // 8 + 2 * rows * stats * stat


__all__ = ["BITS", "Quantized", "QuantizedColumns", "QuantizedStore", "TieredStore", "bits_that_fit",
           "quantized_nbytes", "quantized_part_nbytes"]
