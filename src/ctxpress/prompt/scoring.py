"""Token scores: how much each token is worth keeping (higher = keep).

Every method ranks tokens with one of these small scorers; everything else
(stages, budgets, windows) is shared machinery.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import InputError


def min_max(values: torch.Tensor) -> torch.Tensor:
    """Scale to [0, 1]; a constant vector becomes zeros (as in the DAC reference)."""
    if values.numel() == 0:
        return values
    lo, hi = values.min(), values.max()
    if hi - lo > 1e-8:
        return (values - lo) / (hi - lo)
    return torch.zeros_like(values)


@dataclass(frozen=True)
class FusedScorer:
    """DAC's fusion of received attention and self-information.

    ``additive``: ``alpha * norm(attention) + (1 - alpha) * norm(self-information)``,
    each min-max scaled over the tokens being scored; ``alpha = 0`` is
    self-information alone (Selective-Context), ``alpha = 1`` attention alone.
    ``multiplicative``: ``attention * self-information``, unscaled, as in the
    reference code.
    """

    alpha: float = 0.8
    fusion: str = "additive"

    def __post_init__(self) -> None:
        if self.fusion not in ("additive", "multiplicative"):
            raise InputError(f"fusion must be 'additive' or 'multiplicative', got {self.fusion!r}")
        if not 0.0 <= self.alpha <= 1.0:
            raise InputError(f"alpha must be in [0, 1], got {self.alpha!r}")

    @property
    def needs_signals(self) -> bool:
        return True

    @property
    def needs_attention(self) -> bool:
        return self.fusion == "multiplicative" or self.alpha > 0

    def __call__(self, info: torch.Tensor, attention: torch.Tensor | None) -> torch.Tensor:
        if self.fusion == "multiplicative":
            return info * attention
        score = (1 - self.alpha) * min_max(info)
        if self.alpha > 0:
            score = score + self.alpha * min_max(attention)
        return score


@dataclass(frozen=True)
class RandomScorer:
    """Uniform random scores: the floor any informed method must beat."""

    seed: int = 0

    needs_signals = False
    needs_attention = False

    def __call__(self, info: torch.Tensor, attention: torch.Tensor | None) -> torch.Tensor:
        # Seeded by the sequence length too, so equal requests get equal drops.
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + info.numel())
        return torch.rand(info.numel(), generator=generator)
