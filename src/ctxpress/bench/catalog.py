"""Every evaluation task by name: the real-data tasks and the generated ones."""

from __future__ import annotations

from .synthetic import CommonWords, MultiKeyNeedle, VariableTracking
from .tasks import NQ, KVRetrieval, NeedleInHaystack

TASKS: dict[str, type] = {
    "nq": NQ, "niah": NeedleInHaystack, "kv-retrieval": KVRetrieval,
    "niah-multikey": MultiKeyNeedle, "variable-tracking": VariableTracking, "common-words": CommonWords,
}

__all__ = ["TASKS"]
