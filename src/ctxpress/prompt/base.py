"""What every prompt compression method is: a configurable dataclass that runs over jobs."""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import ClassVar

import torch

from ..options import Configurable
from .job import Job


class Method(Configurable, ABC):
    """Base of the prompt compression methods.

    A method is a frozen dataclass whose fields are its options (see
    :mod:`ctxpress.options`); ``name`` is its registry name and the first line
    of its docstring is its one-line description.
    """

    name: ClassVar[str] = "method"

    @classmethod
    def description(cls) -> str:
        return inspect.cleandoc(cls.__doc__ or "").partition("\n")[0]

    @abstractmethod
    def run(self, model: torch.nn.Module, jobs: Sequence[Job], *, batch_tokens: int, progress: bool | None) -> None:
        """Compress every job in place (its ``alive`` units), sharing forward passes where it can."""
