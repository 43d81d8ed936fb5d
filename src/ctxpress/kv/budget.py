"""How many tokens each layer keeps, and the one search that fits a budget.

Budgets are per layer and per head: every query head (or KV head) of a layer
keeps the same number of tokens, so a layer stays a rectangular tensor. The
observation window (the last ``window`` prompt tokens) is always kept and
counts towards the budget.

A byte ``ratio`` is met the same way by every press: the press supplies the
exact cost of a candidate (bytes its stores would hold, asked of the stores
themselves), and :func:`largest_fitting` (a number of tokens) or
:func:`first_fitting` (one of a few options, such as bit widths) picks the
candidate that fits.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import TypeVar

T = TypeVar("T")


def largest_fitting(cost: Callable[[int], float], lo: int, hi: int, target: float, *,
                    top_first: bool = False) -> int | None:
    """The largest ``x`` in ``[lo, hi]`` with ``cost(x) <= target``, by bisection; None if ``lo`` does not fit.

    Costs of stored selections are nearly but not exactly monotone (quantization groups and codebook
    layouts change in steps), so the answer is where the bisection lands, which callers rely on being
    reproducible: the probes are always ``lo``, then (with ``top_first``) ``hi``, then the upper
    midpoints. ``top_first`` takes ``hi`` at once when it fits, for a range whose top often does.
    """
    if cost(lo) > target:
        return None
    if top_first and cost(hi) <= target:
        return hi
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if cost(mid) <= target else (lo, mid - 1)
    return lo


def first_fitting(cost: Callable[[T], float], choices: Iterable[T], target: float) -> T | None:
    """The first of ``choices`` (the preferred first) with ``cost(choice) <= target``; None if none fits."""
    return next((choice for choice in choices if cost(choice) <= target), None)


def uniform_keep(n_tokens: int, keep_ratio: float, layers: int) -> list[int]:
    """Every layer keeps ``keep_ratio`` of the tokens."""
    k = min(n_tokens, max(1, math.floor(keep_ratio * n_tokens + 0.5)))
    return [k] * layers


def pyramid_keep(n_tokens: int, keep_ratio: float, layers: int, window: int, beta: float = 0.05) -> list[int]:
    """PyramidKV's linear schedule, as SpindleKV specifies it.

    With context length ``l_c = n - window`` and context keep ratio
    ``r_c = (r*n - window) / l_c``: if ``r_c <= alpha = (1 + beta) / 2`` the
    first layer keeps ``2*r_c - beta`` of the context and the last ``beta``,
    otherwise the first keeps all of it and the last ``2*r_c - 1``; layers in
    between are linear, so the mean over layers is ``r_c``. Returns the total
    kept per layer (context share + window).
    """
    window = min(window, n_tokens)
    context = n_tokens - window
    if context <= 0 or layers == 1:
        return uniform_keep(n_tokens, keep_ratio, layers)
    r_c = min(1.0, max(0.0, (keep_ratio * n_tokens - window) / context))
    alpha = (1 + beta) / 2
    first, last = (2 * r_c - beta, beta) if r_c <= alpha else (1.0, 2 * r_c - 1)
    if r_c < beta:  # below the pyramid's floor: spread evenly (continuous at r_c = beta)
        first = last = r_c
    shares = [first + (last - first) * i / (layers - 1) for i in range(layers)]
    # every layer keeps at least one token: a layer with an empty cache has nothing to attend to
    kept = [max(1, window + min(context, max(0, math.floor(s * context + 0.5)))) for s in shares]
    return _settle(kept, round(r_c * context) * layers + window * layers, max(1, window), n_tokens)


def _settle(kept: list[int], total: int, low: int, high: int) -> list[int]:
    """Nudge per-layer counts (within [low, high]) so they add up to ``total``."""
    diff = total - sum(kept)
    order = range(len(kept)) if diff > 0 else reversed(range(len(kept)))
    for i in list(order) * 2:
        if diff == 0:
            break
        step = 1 if diff > 0 else -1
        if low <= kept[i] + step <= high:
            kept[i] += step
            diff -= step
    return kept
