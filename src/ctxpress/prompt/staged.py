"""Score, drop, re-score: the mechanism behind DAC and its one-pass baselines.

Each stage runs the compressor over what is left of every context (all
windows of all contexts in length-sorted batches), scores the tokens, and
drops the lowest-scored units down to the stage's target. DAC uses several
stages so that the signals of a token's neighbours are recomputed after each
removal; the one-pass baselines are the same mechanism with one stage.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch

from ..errors import InputError
from ..options import INTERNAL, option_names
from ..progress import progress_bar
from ..signals import batched_signals
from .base import Method
from .job import Job
from .selection import auto_stages, select_drops, stage_targets

UNIT_SCORES = ("mean", "max")


@dataclass(frozen=True)
class StagedMethod(Method):
    """Staged score-and-drop; a subclass says how tokens are scored (:meth:`score`).

    ``stages``: how many rounds of scoring and dropping (None: DAC's automatic
    count, one per hundred context tokens, 1 to 15). ``consecutive``: within a
    stage, never drop two neighbouring units unless the stage's quota needs it.
    ``unit_score``: how a multi-token unit's score comes from its tokens'
    (``mean`` or ``max``).
    """

    stages: int | None = None
    consecutive: bool = True
    unit_score: str = "mean"
    # How signals are computed; swappable so benchmarks can time the
    # output_attentions reference inside the very same method.
    signal_fn: Callable[..., list] = field(default=batched_signals, metadata=INTERNAL, repr=False, compare=False)

    needs_signals: ClassVar[bool] = True  # does score() read the compressor's signals at all
    needs_attention: ClassVar[bool] = True  # does score() read received attention

    def validate(self) -> None:
        super().validate()
        if self.stages is not None and self.stages < 1:
            raise InputError(f"{self.name}: stages must be a positive integer, got {self.stages!r}")
        if self.unit_score not in UNIT_SCORES:
            raise InputError(f"{self.name}: unit_score must be one of {', '.join(UNIT_SCORES)}, "
                             f"got {self.unit_score!r}")

    @abstractmethod
    def score(self, info: torch.Tensor, attention: torch.Tensor | None) -> torch.Tensor:
        """Scores (higher = keep) of the candidate tokens of one window, from their
        self-information and received attention (None unless ``needs_attention``;
        zeros for ``info`` unless ``needs_signals``)."""

    def query_rows(self, job: Job) -> int | None:
        """How many final rows of each scored sequence (the question) pay the attention that
        counts; None: every row. Question-aware scoring overrides this."""
        return None

    def settings(self) -> dict:
        """The options, all of them, ``stages`` None shown as "auto" (as in results files)."""
        return {k: "auto" if k == "stages" and getattr(self, k) is None else getattr(self, k)
                for k in option_names(type(self))}

    def run(self, model: torch.nn.Module, jobs: Sequence[Job], *, batch_tokens: int, progress: bool | None) -> None:
        plans = []
        for job in jobs:
            n = len(job.context)
            job.stages = self.stages if self.stages is not None else auto_stages(n)
            plans.append(stage_targets(n, job.target, job.stages) if job.target < n else [])
        work = 0
        if self.needs_signals:  # tokens the compressor will read, for the progress bar
            for job, plan in zip(jobs, plans):
                fixed = len(job.windows) * (len(job.prefix) + len(job.suffix))
                work += sum(kept + fixed for kept in [len(job.context), *plan[:-1]])
        with progress_bar(work, progress, "compress") as bar:
            for stage in range(max((len(p) for p in plans), default=0)):
                active = [(j, p[stage]) for j, p in zip(jobs, plans) if stage < len(p)]
                self._stage(model, active, batch_tokens, bar)

    def _stage(self, model, active: list[tuple[Job, int]], batch_tokens: int, bar) -> None:
        windows = [(job, w) for job, _ in active for w in range(len(job.windows))]
        seqs = [job.sequence(w) for job, w in windows]
        if self.needs_signals:
            rows = [self.query_rows(job) for job, _ in windows]
            only = {} if all(r is None for r in rows) else {"last_rows": rows}
            signals = self.signal_fn(model, seqs, attention=self.needs_attention,
                                     batch_tokens=batch_tokens, on_batch=bar.update, **only)
        else:
            signals = [None] * len(seqs)
        unit_scores: dict[int, list[np.ndarray]] = {id(job): [] for job, _ in active}
        for (job, w), sig in zip(windows, signals):
            unit_scores[id(job)].append(self._window_scores(job, w, sig))
        for job, target in active:
            scores = np.concatenate(unit_scores[id(job)])
            alive = np.flatnonzero(job.alive)
            quota = job.kept_tokens - target
            dropped = select_drops(job.drop_order(scores, alive), job.sizes[alive], ~job.protected[alive], quota,
                                   self.consecutive)
            if self.consecutive and np.any(dropped[1:] & dropped[:-1]):
                job.relaxed_stages += 1
            job.alive[alive[dropped]] = False

    def _window_scores(self, job: Job, w: int, sig) -> np.ndarray:
        """Scores of the alive units of window ``w`` (NaN-free, protected units included)."""
        lo, hi = job.windows[w]
        units = lo + np.flatnonzero(job.alive[lo:hi])
        sizes = job.sizes[units]
        n_tok = int(sizes.sum())
        cand = torch.from_numpy(np.repeat(~job.protected[units], sizes))
        token_scores = torch.zeros(n_tok, dtype=torch.float32)
        if cand.any():
            if sig is None:
                info, attn = torch.zeros(int(cand.sum())), None
            else:
                ctx = slice(len(job.prefix), len(job.prefix) + n_tok)
                info = sig.self_information[ctx][cand]
                attn = None if sig.attention is None else sig.attention[ctx][cand]
            token_scores[cand] = self.score(info, attn).float()
        if not len(units):
            return np.zeros(0)
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        if self.unit_score == "max":
            return np.maximum.reduceat(token_scores.numpy(), starts)
        return np.add.reduceat(token_scores.numpy(), starts) / sizes
