"""Question-aware, coarse-to-fine compression of retrieved passages.

A retrieval prompt is a few passages of which one or two hold the answer.
Ranking its words without the question spreads the budget evenly and loses
the answer; ranking the *passages* by the question first, as LongLLMLingua
does (Jiang et al., 2024, "LongLLMLingua: Accelerating and Enhancing LLMs in
Long Context Scenarios via Prompt Compression"), gives the budget to the ones
that matter. Two forward passes at most:

* **Coarse.** Each passage is scored by how well it predicts the question:
  the mean log-probability of the question's tokens read after the passage
  (LongLLMLingua's question-conditioned perplexity), all (passage, question)
  pairs in one batched pass, so it costs about one pass over the context.
* **Budget by relevance.** The most relevant passage is kept whole if it
  fits the budget, the next ones too while they fit ``keep_share`` of it; the
  next ones, in rank order, share the rest while they can keep at least
  ``min_rate`` of their tokens, the more relevant a larger share
  (:func:`rank_shares`); the others are dropped whole.
* **Fine.** One pass of the method's word score (``dac-words``'s fused
  self-information and attention, whole words and phrases) over what is
  left drops words from the shared passages down to the exact budget; the
  whole passages' words are touched only if nothing else can meet it.

Passages are the documents of a list context, else the paragraphs (blank-line
separated) of a text, else its sentences (``split``). The blank lines between
passages are kept only between passages that are kept, so a dropped passage
leaves no empty paragraph behind.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch

from ..errors import InputError
from ..progress import progress_bar
from .job import Job
from .selection import select_drops
from .staged import StagedMethod
from .tokens import TokenizedContext

SPLITS = ("auto", "documents", "paragraphs", "sentences")
SEPARATOR = "\n\n"  # as the compressor joins a list of documents
_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n\s*")
_SENTENCE_BREAK = re.compile(r"(?<=[.!?])\s+(?=\S)")


def _visible(text: str, lo: int, hi: int) -> tuple[int, int] | None:
    """``lo:hi`` without its leading and trailing whitespace (None if nothing is left)."""
    piece = text[lo:hi]
    if not piece.strip():
        return None
    return lo + len(piece) - len(piece.lstrip()), hi - (len(piece) - len(piece.rstrip()))


def _pieces(text: str, pattern: re.Pattern, lo: int, hi: int) -> list[tuple[int, int]]:
    spans, at = [], lo
    for m in pattern.finditer(text, lo, hi):
        spans.append((at, m.start()))
        at = m.end()
    spans.append((at, hi))
    return [v for v in (_visible(text, a, b) for a, b in spans) if v]


def passage_spans(context: str | Sequence[str], split: str = "auto") -> tuple[str, list[tuple[int, int]]]:
    """The context as the compressor joins it, and the character spans of its passages.

    ``documents``: each non-empty document of a list (a string is one document);
    ``paragraphs``: blank-line separated blocks; ``sentences``: sentences of each
    paragraph; ``auto``: documents for a list, else paragraphs, else (a text of
    one paragraph) sentences.
    """
    docs = [context] if isinstance(context, str) else [doc for doc in context if doc.strip()]
    text = SEPARATOR.join(docs)
    spans, at = [], 0
    for doc in docs:
        visible = _visible(text, at, at + len(doc))
        if visible:
            spans.append(visible)
        at += len(doc) + len(SEPARATOR)
    if split == "documents" or (split == "auto" and not isinstance(context, str)):
        return text, spans
    paragraphs = [p for a, b in spans for p in _pieces(text, _PARAGRAPH_BREAK, a, b)]
    if split == "paragraphs" or (split == "auto" and len(paragraphs) > 1):
        return text, paragraphs
    return text, [s for a, b in paragraphs for s in _pieces(text, _SENTENCE_BREAK, a, b)]


@dataclass
class PassageJob(Job):
    """A :class:`Job` that knows which passage each unit belongs to (-1: the blank
    lines between passages) and, once scored, the passages' ranking."""

    passage_of: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=int))
    ranking: list[int] = field(default_factory=list)  # passages, most relevant first
    whole: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))  # units of passages kept whole
    shared: list[int] = field(default_factory=list)  # passages whose words are dropped, most relevant first
    reorder: bool = False

    @property
    def passages(self) -> int:
        return int(self.passage_of.max()) + 1 if len(self.passage_of) else 0

    def passage_units(self, p: int) -> np.ndarray:
        return np.flatnonzero(self.passage_of == p)

    def keep_passages(self, chosen: set[int]) -> int:
        """Keep the units of ``chosen`` passages (and protected units), drop the rest, keep the
        blank lines only where a kept passage follows a kept passage; the tokens then kept."""
        self.alive = np.isin(self.passage_of, list(chosen)) | self.protected
        self.settle_gaps(restore=True)
        return self.kept_tokens

    def settle_gaps(self, restore: bool) -> None:
        """Between two passages with something kept, keep the last run of separating blank lines
        and drop the others; ``restore=False`` only drops (never brings back a dropped run)."""
        present = {int(p) for p in np.unique(self.passage_of[self.alive & (self.passage_of >= 0)])}
        seen = False
        u, n = 0, len(self.passage_of)
        while u < n:
            if self.passage_of[u] >= 0:
                seen = seen or int(self.passage_of[u]) in present
                u += 1
                continue
            end = u
            while end < n and self.passage_of[end] < 0:
                end += 1
            following = int(self.passage_of[end]) if end < n else -1
            wanted = seen and following in present
            self.alive[u:end] = wanted if restore else self.alive[u:end] & wanted
            u = end

    def kept_indices(self) -> torch.Tensor:
        """Kept token indices; with ``reorder``, passages most relevant first, the kept blank
        lines between them (so the indices are in output order, not ascending)."""
        kept = super().kept_indices()
        if not self.reorder or not self.ranking:
            return kept
        owner = torch.from_numpy(np.repeat(self.passage_of, self.sizes))[kept]
        groups = [kept[owner == p] for p in self.ranking if bool((owner == p).any())]
        gaps = kept[owner < 0]
        runs = torch.tensor_split(gaps, (torch.nonzero(gaps[1:] != gaps[:-1] + 1).flatten() + 1).tolist())
        runs = [run for run in runs if len(run)]
        out: list[torch.Tensor] = []
        for g, group in enumerate(groups):
            if g and g - 1 < len(runs):
                out.append(runs[g - 1])
            out.append(group)
        out.extend(runs[len(groups) - 1 :] if groups else runs)
        return torch.cat(out) if out else kept


def allocate(sizes: Sequence[int], ranking: Sequence[int], budget: int, keep_share: float,
             min_rate: float) -> tuple[list[int], list[int]]:
    """Passages kept whole and passages that share the rest of ``budget``, by ``ranking``.

    The most relevant passage is kept whole if it fits the budget, the next
    ones too while all together fit ``keep_share`` of it (the top passage is the
    likeliest to hold the answer: cutting its words to save room for others
    loses more than it gains); the next ones join the shared set while the
    rest of the budget keeps at least ``min_rate`` of their tokens, and always
    until their tokens reach it (so the exact budget can be met); the others are
    dropped.
    """
    whole: list[int] = []
    used = 0
    for p in ranking:
        if used + sizes[p] > (keep_share * budget if whole else budget):
            break
        whole.append(p)
        used += sizes[p]
    rest, shared, pool = budget - used, [], 0
    for p in ranking[len(whole):]:
        if rest <= 0 or (pool >= rest and rest < min_rate * (pool + sizes[p])):
            break
        shared.append(p)
        pool += sizes[p]
    return whole, shared


def rank_shares(tokens: Sequence[int], keep: int) -> list[int]:
    """How many of its ``tokens`` each passage keeps, most relevant first, ``keep`` in all.

    Keep rates fall linearly with rank (the ``r``-th of ``m`` passages keeps a
    share proportional to ``m - r``, capped at all of it), so the budget goes
    first to the passages most likely to hold the answer, as LongLLMLingua's
    rank-dependent compression rates do.
    """
    m = len(tokens)
    weights = [m - r for r in range(m)]

    def kept(c: float) -> list[float]:
        return [min(float(t), c * w * t) for t, w in zip(tokens, weights)]

    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if sum(kept(mid)) < keep else (lo, mid)
    counts = [int(k) for k in kept(hi)]
    extra = keep - sum(counts)
    for r in range(m):  # rounding: the tokens left go to the most relevant passages
        while extra > 0 and counts[r] < tokens[r]:
            counts[r] += 1
            extra -= 1
        while extra < 0 and counts[m - 1 - r] > 0:
            counts[m - 1 - r] -= 1
            extra += 1
    return counts


@dataclass(frozen=True)
class PassageRelevance(StagedMethod):
    """The question-aware coarse-to-fine mechanism; a method class mixes it with a word score.

    ``words``: drop words inside the shared passages (False: drop whole passages
    only, keeping the most relevant ones that fit, which can leave the result a
    few tokens, up to a passage, under the budget). ``reorder``: put the kept
    passages in order of relevance. ``keep_share`` and ``min_rate``: see
    :func:`allocate`. ``split``: what a passage is (:func:`passage_spans`).
    """

    needs_question: ClassVar[bool] = True

    words: bool = True
    reorder: bool = False
    keep_share: float = 0.8
    min_rate: float = 0.3
    split: str = "auto"

    def validate(self) -> None:
        super().validate()
        if self.split not in SPLITS:
            raise InputError(f"{self.name}: split must be one of {', '.join(SPLITS)}, got {self.split!r}")
        for option in ("keep_share", "min_rate"):
            if not 0.0 <= getattr(self, option) <= 1.0:
                raise InputError(f"{self.name}: {option} must be in [0, 1], got {getattr(self, option)!r}")
        if self.stages != 1:
            raise InputError(f"{self.name}: stages must be 1 (one word-scoring pass), got {self.stages!r}")

    def make_job(self, tokenizer, context: str | Sequence[str], tokenized: TokenizedContext, prefix: torch.Tensor,
                 suffix: torch.Tensor, target: int, window_tokens: int) -> PassageJob:
        """The job of one context, each unit assigned to its passage (by its first visible character)."""
        if not len(suffix):
            raise InputError(f"{self.name} ranks passages by the question: give question=..., "
                             "or use dac-words without one")
        text, spans = passage_spans(context, self.split)
        try:
            offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        except NotImplementedError:
            raise InputError(f"{self.name} needs a tokenizer with character offsets (a fast one)") from None
        job = PassageJob(tokenized, prefix, suffix, target, window_tokens, reorder=self.reorder)
        if len(tokenized) and (len(prefix) or not self.words):
            # A window's first unit is kept only because nothing before it lets it be scored; after
            # a BOS or an instruction it can be, and whole passages need no word scores: a dropped
            # first passage then leaves no fragment behind.
            job.protected = np.logical_or.reduceat(tokenized.protected.numpy(), tokenized.unit_starts.numpy())
        starts = [a for a, _ in spans]
        bounds = [*tokenized.unit_starts.tolist(), len(tokenized)]
        owner = np.full(len(bounds) - 1, -1, dtype=int)
        for u in range(len(owner)):
            lo = offsets[bounds[u]][0]
            hi = max(end for _, end in offsets[bounds[u] : bounds[u + 1]])
            visible = _visible(text, lo, hi)
            at = visible[0] if visible else lo
            p = max(0, bisect.bisect_right(starts, at) - 1)
            inside = spans[p][0] <= at < spans[p][1] if visible else spans[p][0] < at < spans[p][1]
            owner[u] = p if inside else -1
        job.passage_of = owner
        return job

    def run(self, model: torch.nn.Module, jobs: Sequence[Job], *, batch_tokens: int, progress: bool | None) -> None:
        passage_jobs = [job for job in jobs if isinstance(job, PassageJob)]
        if len(passage_jobs) != len(jobs):
            raise InputError(f"{self.name} compresses through PromptCompressor (it needs the passages)")
        with progress_bar(sum(len(job.context) for job in passage_jobs) * (1 + self.words), progress,
                          "compress") as bar:
            self._rank(model, passage_jobs, batch_tokens, bar)
            shared = [job for job in passage_jobs if self._share(job)]
            if shared:
                self._drop_words(model, shared, batch_tokens, bar)

    def _rank(self, model, jobs: list[PassageJob], batch_tokens: int, bar) -> None:
        """Rank every job's passages by the mean log-probability of the question given each
        passage, all (passage, question) pairs in one batched pass."""
        seqs, owners = [], []
        for job in jobs:
            room = job.window_tokens - len(job.prefix) - len(job.suffix)
            for p in range(job.passages):
                units = job.passage_units(p)
                if not len(units):  # its text went into a unit of the passage before: nothing to rank
                    continue
                a, b = int(job.sizes[: units[0]].sum()), int(job.sizes[: units[-1] + 1].sum())
                seqs.append(torch.cat([job.prefix, job.context.ids[a:b][:room], job.suffix]))
                owners.append((job, p, min(b - a, room)))
        signals = self.signal_fn(model, seqs, attention=False, batch_tokens=batch_tokens, on_batch=bar.update)
        relevance: dict[int, dict[int, float]] = {id(job): {} for job in jobs}
        for (job, p, n), sig in zip(owners, signals):
            start = len(job.prefix) + n + (1 if len(job.suffix) > 1 else 0)  # skip the separator's token
            relevance[id(job)][p] = -float(sig.self_information[start:].mean())
        for job in jobs:
            scores = relevance[id(job)]
            job.ranking = sorted(scores, key=lambda p: (-scores[p], p))
            job.stages = 1

    def _share(self, job: PassageJob) -> bool:
        """Choose the passages kept; True when words must still be dropped from them."""
        sizes = [int(job.sizes[job.passage_units(p)].sum()) for p in range(job.passages)]
        if not self.words:
            chosen: set[int] = set()
            for p in job.ranking:
                if job.keep_passages(chosen | {p}) <= job.target:
                    chosen.add(p)
            job.keep_passages(chosen)
            return False
        whole, shared = allocate(sizes, job.ranking, job.target, self.keep_share, self.min_rate)
        job.keep_passages(set(whole) | set(shared))
        job.whole = np.isin(job.passage_of, whole)
        job.shared = shared
        return job.kept_tokens > job.target

    def _drop_words(self, model, jobs: list[PassageJob], batch_tokens: int, bar) -> None:
        """One pass of the word score over what is left; the shared passages' words go first."""
        windows = [(job, w) for job in jobs for w in range(len(job.windows))]
        rows = [self.query_rows(job) for job, _ in windows]
        only = {} if all(r is None for r in rows) else {"last_rows": rows}
        signals = self.signal_fn(model, [job.sequence(w) for job, w in windows], attention=self.needs_attention,
                                 batch_tokens=batch_tokens, on_batch=bar.update, **only)
        per_job: dict[int, list[np.ndarray]] = {id(job): [] for job in jobs}
        for (job, w), sig in zip(windows, signals):
            per_job[id(job)].append(self._window_scores(job, w, sig))
        for job in jobs:
            alive = np.flatnonzero(job.alive)
            scores = np.concatenate(per_job[id(job)])
            dropped = self._select(job, alive, scores)
            job.alive[alive[dropped]] = False
            job.stages = 2
            self._refill(job, alive[dropped], scores[dropped])

    @staticmethod
    def _select(job: PassageJob, alive: np.ndarray, scores: np.ndarray) -> np.ndarray:
        """Which ``alive`` units to drop: each shared passage down to its :func:`rank_shares`
        count, lowest word scores first; if the shared passages cannot give the whole quota,
        one ranking over everything left, the whole passages' words after the shared ones'."""
        quota = job.kept_tokens - job.target
        droppable = ~job.protected[alive]
        owner = job.passage_of[alive]
        tokens = [int(job.sizes[alive][droppable & (owner == p)].sum()) for p in job.shared]
        if quota > sum(tokens):
            finite = scores[np.isfinite(scores)]
            lift = float(finite.max() - finite.min()) + 1.0 if finite.size else 1.0
            return select_drops(job.drop_order(scores + lift * job.whole[alive], alive), job.sizes[alive],
                                droppable, quota, consecutive=False)
        dropped = np.zeros(len(alive), dtype=bool)
        for p, have, keep in zip(job.shared, tokens, rank_shares(tokens, sum(tokens) - quota)):
            mine = owner == p
            dropped[mine] = select_drops(job.drop_order(scores[mine], alive[mine]), job.sizes[alive[mine]],
                                         droppable[mine], have - keep, consecutive=False)
        return dropped

    @staticmethod
    def _refill(job: PassageJob, dropped: np.ndarray, scores: np.ndarray) -> None:
        """Give back what the selection kept under the budget: a shared passage whose every word
        was dropped leaves no blank lines behind, and a passage's quota may be missed by a unit
        bigger than its rest. The tokens go to the best-scored words dropped from the passages
        still there, the most relevant passage first."""
        job.settle_gaps(restore=False)
        present = set(np.unique(job.passage_of[job.alive & (job.passage_of >= 0)]).tolist())
        for p in (p for p in job.ranking if p in present):
            freed = job.target - job.kept_tokens
            if freed <= 0:
                return
            mine = job.passage_of[dropped] == p
            units = dropped[mine]
            chosen = select_drops(-scores[mine], job.sizes[units], np.ones(len(units), dtype=bool), freed,
                                  consecutive=False)
            job.alive[units[chosen]] = True
            if job.kept_tokens > job.target:  # overshot by a unit bigger than the rest: undo it
                job.alive[units[chosen]] = False
