"""PyramidKV: SnapKV's scores with more tokens in shallow layers than in deep ones."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ...errors import InputError
from ..budget import pyramid_keep
from .snapkv import SnapKV


@dataclass
class PyramidKV(SnapKV):
    """SnapKV scores with a pyramid budget: more tokens in shallow layers, fewer in deep ones.

    Options: SnapKV's, and ``beta`` (default 0.05): the last layer's share of the context.
    """

    beta: float = 0.05
    name: ClassVar[str] = "pyramidkv"

    def validate(self) -> None:
        super().validate()
        if not 0 <= self.beta <= 1:
            raise InputError(f"{self.name}: beta (the last layer's share of the context) must be in [0, 1], "
                             f"got {self.beta}")

    def counts_for_mean(self, n: int, mean: int, layers: int) -> list[int]:
        window = min(self.effective_window(n), max(0, mean - 1))  # the window never exceeds the budget
        return pyramid_keep(n, mean / n, layers, window, self.beta)


__all__ = ["PyramidKV"]
