"""What every prompt compression method is: a configurable dataclass that runs over jobs."""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..errors import InputError
from ..options import Configurable
from ..words import LINE_BREAKS
from .job import Job
from .tokens import UNITS, TokenizedContext


@dataclass(frozen=True)
class Method(Configurable, ABC):
    """Base of the prompt compression methods.

    A method is a frozen dataclass whose fields are its options (see
    :mod:`ctxpress.options`); ``name`` is its registry name and the first line
    of its docstring is its one-line description. ``unit`` is what it keeps
    or drops: single tokens (the papers' granularity; a multi-byte character
    stays whole), whole words (see :func:`ctxpress.words.word_starts`) or
    phrases, where a name or a date is one unit (:func:`ctxpress.words.phrase_starts`).
    ``line_breaks`` makes line breaks units that are dropped only when the
    budget leaves nothing else, so compressed text keeps its paragraphs,
    headings and list items apart: ``"structure"`` the breaks between
    paragraphs and before structured lines, ``"keep"`` every one, ``"score"``
    none (a line break is then ranked like any unit, as in the papers).
    """

    name: ClassVar[str] = "method"
    # Whether the method ranks by the question (refused without one); the bench's task-agnostic grids
    # and the tests that compress without a question leave such methods out.
    needs_question: ClassVar[bool] = False

    unit: str = "token"
    line_breaks: str = "score"

    def validate(self) -> None:
        if self.unit not in UNITS:
            raise InputError(f"{self.name}: unit must be one of {', '.join(UNITS)}, got {self.unit!r}")
        if self.line_breaks not in LINE_BREAKS:
            raise InputError(f"{self.name}: line_breaks must be one of {', '.join(LINE_BREAKS)}, "
                             f"got {self.line_breaks!r}")

    @classmethod
    def description(cls) -> str:
        return inspect.cleandoc(cls.__doc__ or "").partition("\n")[0]

    def make_job(self, tokenizer, context: str | Sequence[str], tokenized: TokenizedContext, prefix: torch.Tensor,
                 suffix: torch.Tensor, target: int, window_tokens: int) -> Job:
        """The job of one context. A method that needs more of the context than its tokens (where each
        passage lies) builds a richer job; the rest take the tokens as they are."""
        return Job(tokenized, prefix, suffix, target, window_tokens)

    @abstractmethod
    def run(self, model: torch.nn.Module, jobs: Sequence[Job], *, batch_tokens: int, progress: bool | None) -> None:
        """Compress every job in place (its ``alive`` units), sharing forward passes where it can."""
