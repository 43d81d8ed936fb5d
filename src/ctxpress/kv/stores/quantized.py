"""Low-bit storage of kept keys and values (KIVI-style), for any press: :class:`QuantizedStore`
for a whole layer, :class:`QuantizedColumns` for one part of a headwise store.

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

from ..contracts import Store
from .dense import DenseColumns, tensor_nbytes

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
        return tensor_nbytes(self.codes, self.low, self.step)


class QuantizedColumns:
    """Keys or values in ``bits`` bits along the token dimension, (..., tokens, d): keys per channel
    over groups of ``group`` tokens, values per token (KIVI's split). Both parts of a
    :class:`QuantizedStore` (b, kv_heads, tokens, d) and one part of SpindleKV's
    :class:`~ctxpress.kv.stores.headwise.HeadwiseStore` (kv_heads, columns, d).

    The prompt is one chunk of codes and every later full group of generated tokens another, so
    reading the part back costs a few operations per chunk, not per group. Tokens added while
    decoding wait as they are until a full group of them can be quantized together.
    """

    interleaved = False  # vectors come back as they were given

    def __init__(self, data: torch.Tensor, bits: int, group: int, per_channel: bool) -> None:
        self.bits, self.group, self.per_channel, self.dtype = bits, group, per_channel, data.dtype
        self.chunks: list[Quantized] = []  # the prompt's tokens, then each full group of generated ones
        self.length = 0
        # tokens waiting for a full group (fewer than `group` between appends), so no room is reserved:
        # the bytes held are exactly the codes, the statistics and the waiting tokens
        self.tail = DenseColumns(data[..., :0, :].clone(), reserve=0)
        self._quantize(data)

    @staticmethod
    def nbytes_for(rows: int, n: int, dim: int, bits: int, group: int, per_channel: bool) -> int:
        """Bytes of a fresh part of ``rows`` x ``n`` vectors of ``dim`` in ``bits`` bits: per channel over
        groups of ``group`` tokens (keys) or per token (values); a minimum and a step per group."""
        stats = math.ceil(n / group) * dim if per_channel else n
        return rows * n * dim * bits // 8 + 2 * rows * stats * STATS.itemsize

    def _quantize(self, data: torch.Tensor) -> None:
        if not data.shape[-2]:
            return
        if self.per_channel:
            self.chunks.append(Quantized.of(data, self.bits, dim=-2, group=self.group))
        else:
            self.chunks.append(Quantized.of(data, self.bits, dim=-1))
        self.length += data.shape[-2]

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
            self._quantize(waiting[..., :full, :])
            self.tail = DenseColumns(waiting[..., full:, :].clone(), reserve=0)

    def new_empty(self, n: int) -> torch.Tensor:
        """An uninitialised (..., n, d) tensor of this part's shape, dtype and device."""
        like = self.tail.buffer
        return like.new_empty(*like.shape[:-2], n, like.shape[-1])

    def write_into(self, out: torch.Tensor) -> None:
        """Each chunk dequantized straight into its slice of ``out``: no concatenation copies it again."""
        start = 0
        for chunk in self.chunks:
            end = start + chunk.codes.shape[-2]
            chunk.values(self.bits, self.dtype, out=out[..., start:end, :])
            start = end
        out[..., start:, :] = self.tail.materialize()

    def materialize(self) -> torch.Tensor:
        out = self.new_empty(len(self))
        self.write_into(out)
        return out

    def reorder(self, beam_idx: torch.Tensor) -> None:
        """Reorder the leading (batch) dimension (beam search)."""
        def pick(t: torch.Tensor) -> torch.Tensor:
            return t.index_select(0, beam_idx.to(t.device))

        for chunk in self.chunks:
            chunk.codes, chunk.low, chunk.step = pick(chunk.codes), pick(chunk.low), pick(chunk.step)
        self.tail.reorder(beam_idx)

    def nbytes(self) -> int:
        return sum(chunk.nbytes() for chunk in self.chunks) + self.tail.nbytes()


class QuantizedStore(Store):
    """A layer's tokens in ``bits`` bits: keys and values each a :class:`QuantizedColumns`,
    (b, kv_heads, tokens, d)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, bits: int, group: int) -> None:
        self.bits, self.group = bits, group
        self.keys = QuantizedColumns(keys, bits, group, per_channel=True)
        self.values = QuantizedColumns(values, bits, group, per_channel=False)

    @staticmethod
    def nbytes_for(batch: int, kv_heads: int, n: int, dim: int, bits: int, group: int) -> int:
        """Bytes of a store of ``n`` prompt tokens, without building it: keys per channel, values per token."""
        rows = batch * kv_heads
        return sum(QuantizedColumns.nbytes_for(rows, n, dim, bits, group, per_channel) for per_channel in (True, False))

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def batch(self) -> int:
        return self.keys.tail.buffer.shape[0]

    def append(self, keys: torch.Tensor, values: torch.Tensor, position: int) -> None:
        self.keys.append(keys, position)
        self.values.append(values, position)

    def materialize(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.keys.materialize(), self.values.materialize()

    def write_into(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        self.keys.write_into(keys)
        self.values.write_into(values)

    def reorder(self, beam_idx: torch.Tensor) -> None:
        self.keys.reorder(beam_idx)
        self.values.reorder(beam_idx)

    def nbytes(self) -> int:
        return self.keys.nbytes() + self.values.nbytes()


__all__ = ["BITS", "STATS", "Quantized", "QuantizedColumns", "QuantizedStore"]
