"""LLMLingua-style iterative compression, as a baseline.

The context is cut into segments of about ``segment_tokens`` tokens and
compressed left to right. Each segment is scored by self-information
conditioned on the *already compressed* text before it, which lives in the
model's KV cache: after a segment is scored, the cache is cut back to the
compressed prefix and only the kept tokens of the segment are fed again, in
front of the next segment. Tokens are dropped lowest self-information first,
segment budgets following the global one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from ..compat import with_cache
from ..errors import InputError
from ..progress import progress_bar
from .base import Method
from .job import Job
from .selection import select_drops


@dataclass(frozen=True)
class SegmentedMethod(Method):
    """LLMLingua-style segments, each scored given the compressed prefix (KV cache)"""

    name: ClassVar[str] = "llmlingua"

    segment_tokens: int = 100

    def validate(self) -> None:
        super().validate()
        if self.segment_tokens < 1:
            raise InputError(f"{self.name}: segment_tokens must be a positive integer, got {self.segment_tokens!r}")

    def run(self, model: torch.nn.Module, jobs: Sequence[Job], *, batch_tokens: int, progress: bool | None) -> None:
        total = sum(len(job.context) for job in jobs)
        with progress_bar(total, progress, "compress") as bar:
            for job in jobs:
                self._compress(model, job, bar)

    @torch.no_grad()
    def _compress(self, model: torch.nn.Module, job: Job, bar) -> None:
        from transformers import DynamicCache

        device = next(model.parameters()).device
        n_tokens = len(job.context)
        info = np.full(len(job.sizes), np.nan)  # mean self-information per unit
        token_start = np.concatenate([[0], np.cumsum(job.sizes)])
        consumed = kept = 0
        for lo, hi in job.windows:  # a fresh cache (prefix only) per window
            cache = DynamicCache(config=model.config)
            pending = job.prefix  # kept ids not yet in the cache
            carry = None  # logits predicting the token after the cache + pending
            for seg_lo, seg_hi in self._segments(job, lo, hi):
                seg_ids = job.context.ids[token_start[seg_lo] : token_start[seg_hi]]
                inp = torch.cat([pending, seg_ids]).to(device)
                logits = model(input_ids=inp[None], use_cache=True, **with_cache(model, cache)).logits[0].float()
                # Row r of the logits predicts input r + 1; the first segment token
                # is predicted by the last pending token, or by the previous call.
                if len(pending):
                    rows = logits[len(pending) - 1 : -1]
                else:
                    first = carry if carry is not None else torch.full_like(logits[0], float("nan"))
                    rows = torch.cat([first[None], logits[:-1]])
                tok_info = torch.logsumexp(rows, -1) - rows.gather(-1, seg_ids.to(device)[:, None]).squeeze(-1)
                starts = token_start[seg_lo:seg_hi] - token_start[seg_lo]
                info[seg_lo:seg_hi] = np.add.reduceat(tok_info.cpu().numpy(), starts) / job.sizes[seg_lo:seg_hi]
                carry = logits[len(pending) - 1] if len(pending) else carry
                cache.crop(-len(seg_ids))  # back to the compressed prefix + pending

                seg_len = int(job.sizes[seg_lo:seg_hi].sum())
                consumed += seg_len
                droppable = ~job.protected[seg_lo:seg_hi] & ~np.isnan(info[seg_lo:seg_hi])
                keep = round(job.target * consumed / n_tokens) - kept
                keep = min(seg_len, max(keep, seg_len - int(job.sizes[seg_lo:seg_hi][droppable].sum())))
                dropped = select_drops(job.drop_order(info[seg_lo:seg_hi], np.arange(seg_lo, seg_hi)),
                                       job.sizes[seg_lo:seg_hi], droppable,
                                       seg_len - keep, consecutive=False)
                job.alive[seg_lo:seg_hi] = ~dropped
                kept += int(job.sizes[seg_lo:seg_hi][~dropped].sum())
                pending = seg_ids[torch.from_numpy(np.repeat(~dropped, job.sizes[seg_lo:seg_hi]))]
                bar.update(seg_len)
        # Protected tokens can push early segments over their share; settle the
        # global budget by dropping the least informative units left.
        if kept > job.target:
            alive = np.flatnonzero(job.alive)
            droppable = ~job.protected[alive] & ~np.isnan(info[alive])
            extra = select_drops(job.drop_order(info[alive], alive), job.sizes[alive], droppable, kept - job.target,
                                 consecutive=False)
            job.alive[alive[extra]] = False
        job.stages = 1

    def _segments(self, job: Job, lo: int, hi: int):
        start, used = lo, 0
        for u in range(lo, hi):
            used += int(job.sizes[u])
            if used >= self.segment_tokens:
                yield start, u + 1
                start, used = u + 1, 0
        if start < hi:
            yield start, hi
