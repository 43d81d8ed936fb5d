"""Every evaluation task by name: the real-data tasks and the generated ones."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from .synthetic import CommonWords, MultiKeyNeedle, VariableTracking
from .tasks import NQ, KVRetrieval, NeedleInHaystack

# Each name builds its task with default settings; a variant of a task has a name of its own, so its
# rows never mix with the original's.
TASKS: dict[str, Callable[[], object]] = {
    "nq": NQ, "nq-lexical": partial(NQ, distractors="lexical", name="nq-lexical"),
    "niah": NeedleInHaystack, "kv-retrieval": KVRetrieval,
    "niah-multikey": MultiKeyNeedle, "variable-tracking": VariableTracking, "common-words": CommonWords,
}

__all__ = ["TASKS"]
