"""H2O: heavy hitters, the tokens that received the most attention over the whole prompt."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .eviction import EvictionPress


@dataclass
class H2O(EvictionPress):
    """Heavy hitters: attention accumulated over every prompt query, plus recent tokens.

    Options: a budget; ``window`` (default 32): recent tokens always kept.
    """

    name: ClassVar[str] = "h2o"
    needs_column_sums: ClassVar[bool] = True

    def score(self, query, key, scaling, columns) -> torch.Tensor:
        return columns


__all__ = ["H2O"]
