"""Thin adapters that put ctxpress inside retrieval frameworks (optional extras).

* :mod:`ctxpress.integrations.langchain`: a ``BaseDocumentCompressor`` for
  ``ContextualCompressionRetriever`` (``pip install 'ctxpress[langchain]'``).
* :mod:`ctxpress.integrations.llamaindex`: a ``BaseNodePostprocessor``
  (``pip install 'ctxpress[llamaindex]'``).

Both call :meth:`ctxpress.prompt.PromptCompressor.compress_documents`: the
retrieved texts share one budget, the query is kept out of the output, and
a document that loses every word is dropped.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ..prompt import PromptCompressor


def compress_texts(compressor: PromptCompressor | None, texts: Sequence[str], *, rate: float | None,
                   target_tokens: int | None, method: str, options: Mapping[str, Any],
                   query: str) -> tuple[PromptCompressor, list[str]]:
    """The texts compressed together (``target_tokens`` wins over ``rate``), and the compressor used
    (the embedded model's, made on first use when none was given)."""
    compressor = compressor or PromptCompressor(progress=False)
    budget = {"target_tokens": target_tokens} if target_tokens is not None else {"rate": rate}
    return compressor, compressor.compress_documents(list(texts), method=method, question=query, **budget,
                                                     **dict(options))


__all__ = ["compress_texts"]
