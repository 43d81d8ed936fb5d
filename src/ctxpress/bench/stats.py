"""Paired comparisons with bootstrap intervals.

Every method is run on the same examples, so methods are compared example by
example: the mean of the per-example differences, with a percentile
bootstrap 95% interval over examples. A difference counts only when its
interval excludes zero; with few examples most intervals do not, and the
tables say so instead of ranking noise.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

RESAMPLES = 10_000
LEVEL = 0.95
# Below this many paired examples no verdict is drawn: a bootstrap over a handful of values
# is far too narrow (over one value it has no width at all).
MIN_PAIRED = 10

# Which direction is better for each measure compared (the rest are costs, not compared).
HIGHER_IS_BETTER = {"score": True, "survival": True, "nll": False, "kl": False}


@dataclass(frozen=True)
class Interval:
    """A mean with its bootstrap interval."""

    mean: float
    low: float
    high: float
    n: int

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def __str__(self) -> str:
        return f"{self.mean + 0.0:+.3f} [{self.low + 0.0:+.3f}, {self.high + 0.0:+.3f}]"  # + 0.0: no -0.000


def bootstrap_mean(values: Sequence[float], *, resamples: int = RESAMPLES, level: float = LEVEL,
                   seed: int = 0) -> Interval:
    """Mean of ``values`` with a percentile bootstrap interval (fixed seed: tables are reproducible)."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        raise ValueError("no values to bootstrap")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(resamples, x.size))].mean(axis=1)
    tail = (1 - level) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return Interval(float(x.mean()), float(low), float(high), int(x.size))


def paired_difference(a: dict[str, float], b: dict[str, float], **kwargs) -> Interval | None:
    """Mean of ``a[k] - b[k]`` over the keys both have (None when they share none)."""
    keys = sorted(a.keys() & b.keys())
    if not keys:
        return None
    return bootstrap_mean([a[k] - b[k] for k in keys], **kwargs)


def verdict(difference: Interval, measure: str) -> str:
    """"better", "worse" or "tie" for the first of the two compared on ``measure``
    ("tie" also when fewer than :data:`MIN_PAIRED` examples are paired)."""
    if difference.n < MIN_PAIRED or not difference.excludes_zero:
        return "tie"
    return "better" if (difference.mean > 0) == HIGHER_IS_BETTER[measure] else "worse"


__all__ = ["HIGHER_IS_BETTER", "MIN_PAIRED", "Interval", "bootstrap_mean", "paired_difference", "verdict"]
