"""SpindleKV: pyramid eviction per query head plus per-prompt K/V codebooks.

Eviction uses PyramidKV's window scores and pyramid budget, but under GQA
each query head keeps its own top tokens (the KV head is, in effect, repeated
once per query head). The kept keys (pre-RoPE) and values of a KV group are
then encoded with greedy codebooks (:mod:`ctxpress.kv.codebook`); the copies
of one token kept by several heads of a group are one vector, so the
unfolding costs only a mask byte per head and stored token.

The eviction target that makes the stored bytes meet a ``ratio`` is found
automatically: codebooks are built once on the largest candidate selection;
the codebook of any smaller (nested) selection is the subset of entries its
vectors use, so the exact bytes of every candidate are cheap to count
(:class:`~ctxpress.kv.presses.spindle_plan.LayerPlan`) and the budget search
(:func:`~ctxpress.kv.budget.largest_fitting`) picks the largest selection that fits.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from ...errors import InputError
from ..budget import largest_fitting
from ..contracts import PrefilledLayer
from ..rope import rotary_module
from .pyramidkv import PyramidKV
from .spindle_plan import LayerPlan


@dataclass
class SpindleKV(PyramidKV):
    """Per-query-head pyramid eviction + K/V codebooks (Tang et al., ACL 2025).

    Options: PyramidKV's (a budget, ``window``, ``kernel``, ``normalize``,
    ``beta``); the ``ratio`` counts stored bytes, codebooks and masks included.
    ``theta_k`` / ``theta_v`` (0.98 / 0.95): cosine similarity a key / value
    needs to share a codebook entry; ``encode_every`` (64): decoded tokens held
    dense before they are coded together; ``dense_fallback`` (true) and
    ``min_saving`` (0.1): code a layer's K or V only where that saves at least
    this fraction of its bytes. Ablations: ``per_head=False`` (one choice per
    KV group), ``codebook=False`` (eviction only), ``evict=False`` (codebook
    only; no budget), ``head_masks=False`` (the tokens a group stores are
    still the union of its heads' choices, but every head attends to all of
    them: no mask, whose bytes then go to tokens; needs ``codebook=False``).
    ``adaptive=True`` departs from the paper: a layer's budget goes to its
    best (head, token) pairs, as AdaKV allocates it, instead of the same
    number of tokens to every head. ``bits`` (8, 4 or 2) stores the parts
    kept as vectors (all of them without codebooks, the dense fallback with)
    in that many bits, KIVI-style with ``group`` columns per key group, so
    the byte calibration keeps more tokens; codebook entries and magnitudes
    stay in the cache's dtype. ``rest_bits`` applies to the plain eviction
    form only (``per_head``, ``codebook`` and ``adaptive`` false).
    """

    per_head: bool = True
    head_masks: bool = True
    adaptive: bool = False  # AdaKV-style: heads share a layer's budget by score, not equally
    codebook: bool = True
    evict: bool = True
    theta_k: float = 0.98
    theta_v: float = 0.95
    encode_every: int = 64  # decoded tokens held dense before they are encoded together
    dense_fallback: bool = True  # store a layer's K or V densely where its codebook would not save bytes
    # With the fallback, code a part only if it saves this fraction of its dense bytes. A coded part is
    # rebuilt at every decoding step, so one that saves little costs time for few bytes: at ratio 0.5
    # on SmolLM2, 0.1 keeps 1-2% fewer tokens than 0 and decodes 4-6% faster.
    min_saving: float = 0.1
    name: ClassVar[str] = "spindlekv"

    @classmethod
    def takes_budget(cls, options: Mapping[str, object] | None = None) -> bool:
        return (options or {}).get("evict", True) is not False  # codebook-only keeps every token

    def keeps_all_because(self) -> str:
        return " with evict=false"

    def validate(self) -> None:
        super().validate()  # every inherited option is checked, whatever evict is
        if not self.evict and not self.codebook:
            raise InputError("spindlekv with neither eviction nor codebook would not compress")
        if not 0 <= self.min_saving <= 1:
            raise InputError("min_saving is a fraction of a part's dense bytes, in [0, 1]")
        for name in ("theta_k", "theta_v"):
            if not -1 <= getattr(self, name) <= 1:
                raise InputError(f"{name} must be a cosine similarity in [-1, 1]")
        if self.rest_bits is not None and not self.is_pyramidkv:
            raise InputError("spindlekv: rest_bits applies to its plain eviction only "
                             "(per_head=false, codebook=false, adaptive=false)")
        if not self.head_masks and self.codebook:
            raise InputError("spindlekv: head_masks=false stores its columns densely, so it needs codebook=false")
        if self.encode_every < 1:
            raise InputError(f"encode_every must be >= 1 token, got {self.encode_every}")

    @property
    def is_pyramidkv(self) -> bool:
        """Neither per-head choice, codebooks nor shared budgets: compression is exactly PyramidKV's."""
        return not (self.per_head or self.codebook or self.adaptive)

    def compress(self, layers: Sequence[PrefilledLayer], model: torch.nn.Module) -> None:
        if self.is_pyramidkv:
            return super().compress(layers, model)
        if layers[0].keys.shape[0] != 1:
            raise InputError("spindlekv compresses one prompt at a time (batch size 1)")
        n = layers[0].seen
        window = self.effective_window(n) if self.evict else n
        rotary = rotary_module(model) if self.codebook else None
        plans = [LayerPlan(layer, self, window, rotary) for layer in layers]
        if not self.evict:
            counts = [n] * len(layers)
        elif self.ratio is None:
            counts = self.keep_counts(n, len(layers))
        else:
            counts = self.calibrate(plans, n)
        for plan, keep in zip(plans, counts):
            plan.layer.compress_to(plan.store(keep))

    def calibrate(self, plans: list[LayerPlan], n: int) -> list[int]:
        """Per-layer keep counts (tokens per head; with ``adaptive``, their mean over heads) with the
        largest mean whose stored bytes fit ``ratio``.

        ``plans`` are the layers' :class:`LayerPlan` in layer order, ``n`` the prompt length.
        """
        target = self.ratio * sum(plan.dense_bytes for plan in plans)
        k_max, ceiling = self.encode_ceiling(plans, n, target)

        def cost(mean: int) -> int:
            sizes = [min(c, top) for c, top in zip(self.counts_for_mean(n, mean, len(plans)), ceiling)]
            return sum(p.nbytes(c) for p, c in zip(plans, sizes))

        mean = largest_fitting(cost, 1, k_max, target, top_first=True)
        if mean is None:
            counts = self.counts_for_mean(n, 1, len(plans))
            smallest = sum(p.nbytes(c) for p, c in zip(plans, counts)) / sum(p.dense_bytes for p in plans)
            raise InputError(f"spindlekv: ratio {self.ratio:g} is below the smallest cache it can store for "
                             f"this {n}-token prompt (one token per head and layer: {smallest:.2g} of the "
                             "dense bytes); use a larger ratio")
        return [min(c, top) for c, top in zip(self.counts_for_mean(n, mean, len(plans)), ceiling)]

    def encode_ceiling(self, plans: list[LayerPlan], n: int, target: float) -> tuple[int, list[int]]:
        """The largest mean worth encoding and its per-layer counts, the plans' codebooks built on them.

        A quarter above the dense budget (the per-head unions cost more columns than the codebook
        usually saves), doubled while it still fits.
        """
        k_max = min(n, max(1, math.ceil(1.25 * self.ratio * n)) if self.codebook else self.mean_keep(n))
        while True:
            ceiling = self.counts_for_mean(n, k_max, len(plans))
            for plan, keep in zip(plans, ceiling):
                plan.prepare(keep)
            if k_max == n or sum(p.nbytes(c) for p, c in zip(plans, ceiling)) > target:
                return k_max, ceiling
            k_max = min(n, 2 * k_max)


@dataclass
class SpindleKVWords(SpindleKV):
    """SpindleKV's per-query-head selection over whole words, with AdaKV's budgets and no codebooks.

    Options: SpindleKV's; ``unit`` is ``word``, ``codebook`` false and ``adaptive`` true.
    """

    # Departs from SpindleKV (Tang et al., ACL 2025) in three points: tokens are ranked by word, as in
    # snapkv-words; a layer's budget goes to its best (head, word) pairs (AdaKV), not equally to every
    # head; and nothing is coded. Chosen on the dev split (docs/results/kv-spindle-dev, 20% of the bytes,
    # question-aware): the codebooks at the paper's thresholds cost gold NLL on needles (+0.08) for the
    # tokens they made room for, looser ones lost needles; per-head selection beat one choice per KV group
    # (-0.05), its masks being what pays (without them, +0.04); equal budgets per head trailed snapkv-words
    # on key-value retrieval, and the shared budget closed that gap (-0.30 NLL) and gained on needles too.
    unit: str = "word"
    codebook: bool = False
    adaptive: bool = True
    name: ClassVar[str] = "spindlekv-words"


__all__ = ["SpindleKV", "SpindleKVWords"]
