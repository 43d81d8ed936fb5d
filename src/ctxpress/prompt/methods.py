"""The prompt compression methods by name: DAC, the default ``dac-words``, and the baselines.

Each method is a small dataclass over one of two mechanisms, staged
score-and-drop (:class:`StagedMethod`: a subclass only says how tokens are
scored) or left-to-right segments (:class:`SegmentedMethod`). Its fields are
its options, with its defaults (``dac`` with ``stages=1, consecutive=False``
is the one-pass ablation); the first line of its docstring is its
description. Adding a method is one class and one line in ``METHODS``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..errors import InputError
from ..options import build
from .base import Method
from .job import Job
from .relevance import PassageRelevance
from .segmented import SegmentedMethod
from .staged import StagedMethod

FUSIONS = ("additive", "multiplicative")
ATTENTION_FROM = ("all", "question")


def min_max(values: torch.Tensor) -> torch.Tensor:
    """Scale to [0, 1]; a constant vector becomes zeros (as in the DAC reference)."""
    if values.numel() == 0:
        return values
    lo, hi = values.min(), values.max()
    if hi - lo > 1e-8:
        return (values - lo) / (hi - lo)
    return torch.zeros_like(values)


@dataclass(frozen=True)
class DACMethod(StagedMethod):
    """DAC: attention + self-information, re-scored over stages, consecutive rule"""

    name: ClassVar[str] = "dac"

    alpha: float = 0.8  # weight of received attention in the additive fusion
    fusion: str = "additive"
    # "question": count only the attention the question pays to each context token
    # (question-aware scoring; the paper's is task-agnostic: every later row counts)
    attention_from: str = "all"

    def validate(self) -> None:
        super().validate()
        if self.attention_from not in ATTENTION_FROM:
            raise InputError(f"{self.name}: attention_from must be 'all' or 'question', got {self.attention_from!r}")
        if self.fusion not in FUSIONS:
            raise InputError(f"{self.name}: fusion must be 'additive' or 'multiplicative', got {self.fusion!r}")
        if not 0.0 <= self.alpha <= 1.0:
            raise InputError(f"{self.name}: alpha must be in [0, 1], got {self.alpha!r}")

    @property
    def needs_attention(self) -> bool:  # type: ignore[override]
        return self.fusion == "multiplicative" or self.alpha > 0

    def query_rows(self, job: Job) -> int | None:
        if self.attention_from == "all":
            return None
        if not len(job.suffix):
            raise InputError(f"{self.name}: attention_from=question needs a question")
        return len(job.suffix)

    def score(self, info: torch.Tensor, attention: torch.Tensor | None) -> torch.Tensor:
        """``additive``: ``alpha * norm(attention) + (1 - alpha) * norm(self-information)``,
        each min-max scaled over the tokens being scored (``alpha = 0``: self-information
        alone, ``alpha = 1``: attention alone); ``multiplicative``: ``attention *
        self-information``, unscaled, as in the reference code."""
        if self.fusion == "multiplicative":
            return info * attention
        score = (1 - self.alpha) * min_max(info)
        if self.alpha > 0:
            score = score + self.alpha * min_max(attention)
        return score


@dataclass(frozen=True)
class StaticDACMethod(DACMethod):
    """DAC's fused score in one pass (no stages)"""

    name: ClassVar[str] = "dac-static"

    stages: int | None = 1
    consecutive: bool = False


# How dac-words departs from the paper, each choice made on the dev split: whole words (a word with
# its leading space, or one trailing punctuation mark) are kept or dropped together, scored by the
# mean of their tokens' scores, so no two words are glued and numbers are not shredded; a name or a
# date ("Sigmund Freud", "September 27, 2017") is one unit, so it is kept whole or not at all (dev
# split: the gold answer survived more often at both budgets, answer NLL lower); one scoring pass
# instead of stages, because re-scoring over stages lost more of the answer than it saved; and the
# line breaks that carry structure (blank lines, breaks before headings, list items, indented lines)
# are dropped last, so the compressed text keeps its paragraphs apart (dev split: answer NLL tied at
# half the tokens and lower at a third; keeping every line break lost needles in hard-wrapped prose).
@dataclass(frozen=True)
class WordDACMethod(StaticDACMethod):
    """DAC's fused score in one pass over whole words, names and dates whole, paragraphs apart; the default"""

    name: ClassVar[str] = "dac-words"

    unit: str = "phrase"
    line_breaks: str = "structure"


# How dac-rag departs from DAC: it needs the question and reads the context as passages. It ranks
# the passages by how well each predicts the question (LongLLMLingua's question-conditioned
# perplexity, in one batched pass), keeps the most relevant whole, drops the least relevant whole,
# and only then drops words, with dac-words's score, from the passages in between (one more pass).
# DAC's score is task-agnostic and spreads the budget over every word of the context.
@dataclass(frozen=True)
class RelevanceMethod(PassageRelevance, WordDACMethod):
    """passages ranked by how well they predict the question, budget by rank, then dac-words inside"""

    name: ClassVar[str] = "dac-rag"

    # dac-words's settings, restated: the mechanism's base would otherwise bring the defaults back
    unit: str = "phrase"
    line_breaks: str = "structure"
    stages: int | None = 1
    consecutive: bool = False


@dataclass(frozen=True)
class PassageMethod(RelevanceMethod):
    """whole passages by relevance to the question, no word dropped (may keep a little under the budget)"""

    name: ClassVar[str] = "rag-passages"

    words: bool = False


@dataclass(frozen=True)
class EntropyMethod(DACMethod):
    """self-information in one pass (Selective-Context style)"""

    name: ClassVar[str] = "entropy"

    stages: int | None = 1
    consecutive: bool = False
    alpha: float = 0.0


@dataclass(frozen=True)
class DynamicEntropyMethod(DACMethod):
    """self-information re-scored over stages, consecutive rule"""

    name: ClassVar[str] = "entropy-dynamic"

    alpha: float = 0.0


@dataclass(frozen=True)
class AttentionMethod(DACMethod):
    """received attention in one pass"""

    name: ClassVar[str] = "attention"

    stages: int | None = 1
    consecutive: bool = False
    alpha: float = 1.0


@dataclass(frozen=True)
class RandomMethod(StagedMethod):
    """uniformly random tokens (seeded), the floor any informed method must beat"""

    name: ClassVar[str] = "random"
    needs_signals: ClassVar[bool] = False
    needs_attention: ClassVar[bool] = False

    stages: int | None = 1
    consecutive: bool = False
    seed: int = 0

    def score(self, info: torch.Tensor, attention: torch.Tensor | None) -> torch.Tensor:
        # Seeded by the sequence length too, so equal requests get equal drops.
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + info.numel())
        return torch.rand(info.numel(), generator=generator)


METHODS: dict[str, type[Method]] = {cls.name: cls for cls in [
    WordDACMethod,
    RelevanceMethod,
    PassageMethod,
    DACMethod,
    StaticDACMethod,
    EntropyMethod,
    DynamicEntropyMethod,
    AttentionMethod,
    RandomMethod,
    SegmentedMethod,
]}


DEFAULT_METHOD = WordDACMethod.name


def method_names() -> list[str]:
    return list(METHODS)


def build_method(name: str, /, **options) -> Method:
    """The method ``name`` with ``options`` overriding its defaults (one-line InputError otherwise)."""
    return build(METHODS, "method", name, options)


__all__ = [
    "DEFAULT_METHOD", "METHODS", "AttentionMethod", "DACMethod", "DynamicEntropyMethod", "EntropyMethod", "Method",
    "PassageMethod", "RandomMethod", "RelevanceMethod", "SegmentedMethod", "StagedMethod", "StaticDACMethod",
    "WordDACMethod", "build_method", "method_names", "min_max",
]
