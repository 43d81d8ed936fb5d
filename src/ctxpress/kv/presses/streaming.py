"""StreamingLLM: attention sinks plus the most recent tokens."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ...errors import InputError
from .eviction import EvictionPress


@dataclass
class StreamingLLM(EvictionPress):
    """Attention sinks (the first tokens) plus the most recent tokens.

    Options: a budget; ``sinks`` (default 4): first tokens always kept; ``window`` is unused (recency is the score).
    """

    sinks: int = 4
    name: ClassVar[str] = "streaming"

    def validate(self) -> None:
        super().validate()
        if self.sinks < 0:
            raise InputError(f"streaming: sinks must be >= 0 tokens, got {self.sinks}")

    def score(self, query, key, scaling, columns) -> torch.Tensor:
        b, kv_heads, n, _ = key.shape
        recency = torch.arange(n, dtype=torch.float32, device=key.device)
        recency[: self.sinks] = float("inf")
        return recency.expand(b, kv_heads, n)


__all__ = ["StreamingLLM"]
