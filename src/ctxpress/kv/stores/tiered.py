"""Two precisions in one layer: the tokens a press ranks highest in one store, the rest in fewer bits."""

from __future__ import annotations

import torch

from ..contracts import Store
from .quantized import QuantizedStore


class TieredStore(Store):
    """Two precisions in one layer: the most important tokens in ``kept`` (dense or many bits), the rest
    in ``rest`` (few bits). Generated tokens join ``kept``.

    Keys are stored after RoPE, so attention does not depend on where a key sits in the cache; only the
    newest tokens must come last (the causal mask of a multi-token step assumes it), so ``rest``, which
    never grows, is materialized first.
    """

    def __init__(self, kept: Store, rest: QuantizedStore) -> None:
        self.kept, self.rest = kept, rest

    @staticmethod
    def nbytes_for(kept: int, rest: int) -> int:
        """Bytes of a store whose parts hold ``kept`` and ``rest`` bytes (their own ``nbytes_for``)."""
        return kept + rest

    def __len__(self) -> int:
        return len(self.kept) + len(self.rest)

    @property
    def batch(self) -> int:
        return self.kept.batch

    def append(self, keys: torch.Tensor, values: torch.Tensor, position: int) -> None:
        self.kept.append(keys, values, position)

    def materialize(self) -> tuple[torch.Tensor, torch.Tensor]:
        rest = len(self.rest)
        keys, values = self.rest.keys.new_empty(len(self)), self.rest.values.new_empty(len(self))
        self.rest.write_into(keys[..., :rest, :], values[..., :rest, :])
        self.kept.write_into(keys[..., rest:, :], values[..., rest:, :])
        return keys, values

    def reorder(self, beam_idx: torch.Tensor) -> None:
        self.kept.reorder(beam_idx)
        self.rest.reorder(beam_idx)

    def nbytes(self) -> int:
        return self.kept.nbytes() + self.rest.nbytes()


__all__ = ["TieredStore"]
