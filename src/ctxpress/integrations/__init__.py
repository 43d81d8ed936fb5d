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

from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from ..prompt import PromptCompressor
from ..prompt.methods import DEFAULT_METHOD


class CompressionSettings(BaseModel):
    """The fields both adapters take, and the one call they make."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    compressor: PromptCompressor | None = None  # None: the embedded model's, made on first use
    rate: float | None = 0.5
    target_tokens: int | None = None  # the texts' tokens in all; wins over rate
    method: str = DEFAULT_METHOD
    options: dict[str, Any] = Field(default_factory=dict)

    def compress_texts(self, texts: Sequence[str], query: str) -> list[str]:
        """The texts compressed together under this budget, each given back on its own."""
        if self.compressor is None:
            self.compressor = PromptCompressor(progress=False)
        budget = {"target_tokens": self.target_tokens} if self.target_tokens is not None else {"rate": self.rate}
        return self.compressor.compress_documents(list(texts), method=self.method, question=query, **budget,
                                                  **self.options)


__all__ = ["CompressionSettings"]
