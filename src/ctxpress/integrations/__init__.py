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
from ..request import DEFAULT_RATE, PromptRequest


class CompressionSettings(BaseModel):
    """The fields both adapters take, and the one call they make."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    compressor: PromptCompressor | None = None  # None: the embedded model's, made on first use
    rate: float | None = DEFAULT_RATE
    target_tokens: int | None = None  # the texts' tokens in all; wins over rate
    method: str = DEFAULT_METHOD
    options: dict[str, Any] = Field(default_factory=dict)

    def compress_texts(self, texts: Sequence[str], query: str) -> list[str]:
        """The texts compressed together under this budget, each given back on its own."""
        request = self.prompt_request()  # checked before a model loads
        if self.compressor is None:
            self.compressor = PromptCompressor(progress=False)
        return self.compressor.compress_documents(list(texts), method=request.method_object(), question=query,
                                                  **request.budget)

    def prompt_request(self) -> PromptRequest:
        """These settings as a checked request: ``target_tokens``, when set, replaces ``rate``."""
        rate = None if self.target_tokens is not None else self.rate
        return PromptRequest(rate=rate, target_tokens=self.target_tokens, method=self.method, options=self.options,
                             where="")


__all__ = ["CompressionSettings"]
