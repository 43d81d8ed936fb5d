"""One context under compression: its units, fixed parts, budget and state."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import InputError
from .tokens import TokenizedContext


@dataclass
class Job:
    """A context being compressed, tracked at the level of atomic units.

    ``prefix`` (BOS, instruction) and ``suffix`` (question) are kept whole and
    surround every window the compressor scores; they do not count towards
    the budget. ``windows`` partition the units so that prefix + window +
    suffix fits the compressor's context length.
    """

    context: TokenizedContext
    prefix: torch.Tensor
    suffix: torch.Tensor
    target: int
    window_tokens: int
    sizes: np.ndarray = field(init=False)
    protected: np.ndarray = field(init=False)
    breaks: np.ndarray = field(init=False)  # line-break units, dropped last
    alive: np.ndarray = field(init=False)
    windows: list[tuple[int, int]] = field(init=False)
    stages: int = 0
    relaxed_stages: int = 0  # stages where the consecutive rule could not hold

    def __post_init__(self) -> None:
        starts = self.context.unit_starts.numpy()
        n = len(self.context)
        self.sizes = np.diff(np.append(starts, n))
        self.protected = np.logical_or.reduceat(self.context.protected.numpy(), starts) if n else np.zeros(0, bool)
        self.breaks = np.logical_or.reduceat(self.context.breaks.numpy(), starts) if n else np.zeros(0, bool)
        self.alive = np.ones(len(starts), dtype=bool)
        room = self.window_tokens - len(self.prefix) - len(self.suffix)
        if room < min(n, 16):
            raise InputError(
                f"instruction and question take {len(self.prefix) + len(self.suffix)} tokens, "
                f"leaving too little of the {self.window_tokens}-token window for the context"
            )
        self.windows = self._split(room)
        for lo, _ in self.windows:  # the first token of every scored window has no left context
            self.protected[lo] = True
        protected_tokens = int(self.sizes[self.protected].sum())
        if protected_tokens > self.target:
            forced = bool(self.context.protected.any())
            raise InputError(
                f"the budget of {self.target} context tokens is smaller than the {protected_tokens} that are "
                f"always kept ({'force_tokens and ' if forced else ''}the first "
                f"{'unit' if len(self.windows) == 1 else 'unit of each window'}, which has no left context to "
                f"be scored by): ask for at least {protected_tokens}"
            )

    def _split(self, room: int) -> list[tuple[int, int]]:
        windows, lo, used = [], 0, 0
        for u, size in enumerate(self.sizes):
            if used + size > room and u > lo:
                windows.append((lo, u))
                lo, used = u, 0
            used += int(size)
        if len(self.sizes):
            windows.append((lo, len(self.sizes)))
        return windows

    def drop_order(self, scores: np.ndarray, units: np.ndarray) -> np.ndarray:
        """``scores`` of ``units`` with line breaks ranked above every other unit, so they are
        dropped only when the budget leaves nothing else (a soft protection, never an error)."""
        return np.where(self.breaks[units], np.inf, scores)

    @property
    def kept_tokens(self) -> int:
        return int(self.sizes[self.alive].sum())

    def token_mask(self, lo: int = 0, hi: int | None = None) -> torch.Tensor:
        """Which context tokens of units ``lo:hi`` are still kept."""
        hi = len(self.sizes) if hi is None else hi
        return torch.from_numpy(np.repeat(self.alive[lo:hi], self.sizes[lo:hi]))

    def window_ids(self, w: int) -> torch.Tensor:
        """Context ids still kept in window ``w``."""
        lo, hi = self.windows[w]
        a = int(self.sizes[:lo].sum())
        b = a + int(self.sizes[lo:hi].sum())
        return self.context.ids[a:b][self.token_mask(lo, hi)]

    def sequence(self, w: int, with_suffix: bool = True) -> torch.Tensor:
        parts = [self.prefix, self.window_ids(w)]
        if with_suffix:
            parts.append(self.suffix)
        return torch.cat(parts)

    def kept_indices(self) -> torch.Tensor:
        return torch.nonzero(self.token_mask(), as_tuple=True)[0]
