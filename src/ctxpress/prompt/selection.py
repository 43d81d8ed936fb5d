"""Budgets and the choice of which units to drop.

The budget is exact: a request for ``k`` context tokens gets ``k``, except
when the units left to drop are all bigger than what remains to remove (a
multi-token character, or a word or a phrase under ``unit="word"`` or ``"phrase"``); then it gets a few
fewer, never more. Staged methods spread the removal over stages whose
targets are derived from the *original* length, so the last stage lands on ``k``.
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import InputError

MAX_AUTO_STAGES = 15


def resolve_target(n: int, rate: float | None, target_tokens: int | None) -> int:
    """Number of context tokens to keep, from exactly one of ``rate`` or ``target_tokens``."""
    if (rate is None) == (target_tokens is None):
        raise InputError("give exactly one budget: rate or target_tokens")
    if rate is not None:
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 < rate <= 1:
            raise InputError(f"rate must be in (0, 1], got {rate!r}")
        return max(1, math.floor(rate * n + 0.5))
    if isinstance(target_tokens, bool) or not isinstance(target_tokens, int) or target_tokens < 1:
        raise InputError(f"target_tokens must be a positive integer, got {target_tokens!r}")
    if target_tokens > n:
        raise InputError(f"target_tokens {target_tokens} is more than the {n} tokens of the context")
    return target_tokens


def auto_stages(n: int) -> int:
    """The DAC reference's stage count: one per 100 tokens, between 1 and 15."""
    return min(max(1, n // 100), MAX_AUTO_STAGES)


def stage_targets(n: int, target: int, stages: int) -> list[int]:
    """Tokens left after each stage: a geometric path from ``n`` that ends exactly at ``target``.

    Each stage removes the same share of what is left, as in the reference,
    but the targets are computed from the original length so rounding never
    accumulates and the last one is the requested budget.
    """
    keep = target / n
    targets = [math.floor(n * keep ** (s / stages) + 0.5) for s in range(1, stages + 1)]
    targets[-1] = target
    return [max(t, target) for t in targets]


def select_drops(
    scores: np.ndarray,
    sizes: np.ndarray,
    droppable: np.ndarray,
    quota: int,
    consecutive: bool,
) -> np.ndarray:
    """Choose units to drop, lowest score first, removing ``quota`` tokens.

    ``scores``, ``sizes`` and ``droppable`` describe the units currently in
    the sequence, in order. With ``consecutive`` no two neighbouring units are
    dropped in one call (DAC's consecutive-token rule, applied while choosing
    so the quota is still met). If the rule leaves the quota unmet (a stage
    asked to remove more than about half), the rest is taken by score alone.
    Units bigger than what remains are skipped. Units scored ``inf`` (line
    breaks a method keeps) are a second tier: touched only when the finite
    ones cannot meet the quota, even by an exact swap. Only if nothing else
    fits is the smallest unit that overshoots dropped, so the result keeps
    fewer tokens than asked (by one for a split character, by a few for a
    word), never more.
    """
    count = len(scores)
    dropped = np.zeros(count, dtype=bool)
    if quota <= 0:
        return dropped
    order = np.argsort(scores, kind="stable")
    order = order[droppable[order]]
    last = np.isposinf(scores[order])
    remaining = quota

    def walk(tier: np.ndarray, respect_rule: bool) -> None:
        nonlocal remaining
        for u in tier:
            if remaining == 0:
                return
            if dropped[u] or sizes[u] > remaining:
                continue
            if respect_rule and ((u > 0 and dropped[u - 1]) or (u + 1 < count and dropped[u + 1])):
                continue
            dropped[u] = True
            remaining -= int(sizes[u])

    for tier in (order[~last], order[last]):
        walk(tier, consecutive)
        if remaining and consecutive:
            walk(tier, False)
        if remaining and _swap(tier, sizes, dropped, remaining):
            remaining = 0
    if remaining:  # only units bigger than the rest are left: keep a few tokens fewer than asked
        left = [u for u in order if not dropped[u]]
        if left:
            dropped[min(left, key=lambda u: sizes[u])] = True
    return dropped


def _swap(order: np.ndarray, sizes: np.ndarray, dropped: np.ndarray, remaining: int) -> bool:
    """Finish a quota the greedy walk left ``remaining`` tokens short of, exactly, if one more
    drop ``u`` and one restored unit ``v`` of ``order`` (``size[u] - size[v] == remaining``)
    make it: the lowest-scored such ``u``, the highest-scored such ``v``."""
    taken = {}  # size -> highest-scored dropped unit of that size
    for v in order:
        if dropped[v]:
            taken[int(sizes[v])] = v
    for u in order:
        v = None if dropped[u] else taken.get(int(sizes[u]) - remaining)
        if v is not None:
            dropped[u], dropped[v] = True, False
            return True
    return False
