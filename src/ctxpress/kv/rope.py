"""Rotary position embedding for coded keys, in an interleaved complex layout.

Cached keys are post-RoPE. SpindleKV's key codebook works on pre-RoPE keys
(the same direction at two positions is one entry), so keys are rotated back
when encoded and rotated again, from their stored positions, at every
decoding step. Llama-family models rotate the pairs ``(x_i, x_{i+d/2})``;
stored *interleaved* (``x_0, x_{d/2}, x_1, x_{d/2+1}, ...``) each pair is one
complex number and the rotation is a single complex multiplication, about
twice as fast as the rotate-half form. Attention is unchanged as long as the
query is interleaved the same way (:func:`interleave`), since a dot product
does not depend on the order of the coordinates.
"""

from __future__ import annotations

import weakref

import torch

from ..errors import InputError

_TABLES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def rotary_module(model: torch.nn.Module) -> torch.nn.Module:
    rotary = getattr(model.base_model, "rotary_emb", None)
    if rotary is None or not hasattr(rotary, "inv_freq"):
        raise InputError(f"{type(model).__name__} has no shared rotary embedding; the key codebook needs one")
    return rotary


def interleave(x: torch.Tensor) -> torch.Tensor:
    """(..., d) rotate-half layout -> interleaved pairs (x_i, x_{i+d/2})."""
    half = x.shape[-1] // 2
    return x.unflatten(-1, (2, half)).transpose(-1, -2).reshape(x.shape)


def deinterleave(x: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`interleave`."""
    half = x.shape[-1] // 2
    return x.unflatten(-1, (half, 2)).transpose(-1, -2).reshape(x.shape)


def _complex_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.complex128 if dtype == torch.float64 else torch.complex64


def _table(rotary: torch.nn.Module, upto: int, like: torch.Tensor) -> torch.Tensor:
    """``attention_scaling * exp(i * p * inv_freq)`` for positions ``0..upto-1`` at least.

    Cached per rotary module, like the ``cos_cached`` buffers older
    transformers kept: one table per model, shared by every cache, computed
    from the module's (possibly scaled) inverse frequencies as its forward
    does. It depends on positions only, so it is not per-cache storage.
    """
    key = (_complex_dtype(like.dtype), like.device)
    tables = _TABLES.setdefault(rotary, {})
    cached = tables.get(key)
    inv_freq = rotary.inv_freq
    if cached is None or cached[0].shape[0] < upto or cached[1] is not inv_freq:
        length = max(upto, 4096, 2 * int(getattr(rotary, "max_seq_len_cached", 0) or 0))
        real = torch.float64 if key[0] == torch.complex128 else torch.float32
        angles = torch.arange(length, device=like.device, dtype=real)[:, None] * inv_freq.to(like.device, real)[None]
        scale = torch.full_like(angles, float(getattr(rotary, "attention_scaling", 1.0)))
        cached = (torch.polar(scale, angles), inv_freq)
        tables[key] = cached
    return cached[0]


def phases(rotary: torch.nn.Module, positions: torch.Tensor, like: torch.Tensor,
           upto: int | None = None) -> torch.Tensor:
    """Complex rotation factors (n, d/2) of 1-D ``positions`` (``upto`` bounds them, saving a sync)."""
    if upto is None:
        upto = int(positions.max()) + 1 if positions.numel() else 1
    index = positions if positions.dtype in (torch.int32, torch.int64) else positions.long()
    return _table(rotary, upto, like).index_select(0, index.to(like.device))


def rotate(x: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved (n, d) vectors by complex ``factors`` (n, d/2); returns interleaved, x's dtype."""
    work = x if x.dtype in (torch.float32, torch.float64) else x.float()
    z = torch.view_as_complex(work.reshape(*work.shape[:-1], -1, 2).contiguous())
    return torch.view_as_real(z * factors).reshape(x.shape).to(x.dtype)


def unrotate(x: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """Undo :func:`rotate` (divide by the factors: conjugate rotation, inverse scaling)."""
    return rotate(x, factors.reciprocal())
