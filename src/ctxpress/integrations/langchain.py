"""ctxpress as a LangChain document compressor.

>>> from langchain_classic.retrievers import ContextualCompressionRetriever
>>> retriever = ContextualCompressionRetriever(
...     base_compressor=CtxpressDocumentCompressor(rate=0.5), base_retriever=my_retriever)

The retrieved documents are compressed together under one budget (``rate``
of their tokens, or ``target_tokens`` in all); each keeps its metadata plus
``ctxpress_tokens_before`` / ``ctxpress_tokens_after``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from langchain_core.callbacks import Callbacks
from langchain_core.documents import BaseDocumentCompressor, Document
from pydantic import ConfigDict, Field

from ..prompt import PromptCompressor
from ..prompt.methods import DEFAULT_METHOD
from . import compress_texts


class CtxpressDocumentCompressor(BaseDocumentCompressor):
    """Compress retrieved documents with ctxpress (``dac-words`` by default) under one budget."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    compressor: PromptCompressor | None = None  # None: the embedded model's, made on first use
    rate: float | None = 0.5
    target_tokens: int | None = None  # the documents' tokens in all; wins over rate
    method: str = DEFAULT_METHOD
    options: dict[str, Any] = Field(default_factory=dict)

    def compress_documents(self, documents: Sequence[Document], query: str,
                           callbacks: Callbacks | None = None) -> Sequence[Document]:
        if not documents:
            return []
        self.compressor, texts = compress_texts(
            self.compressor, [doc.page_content for doc in documents], rate=self.rate,
            target_tokens=self.target_tokens, method=self.method, options=self.options, query=query)
        count = self.compressor.count_tokens
        return [Document(page_content=text, id=doc.id,
                         metadata={**doc.metadata, "ctxpress_tokens_before": count(doc.page_content),
                                   "ctxpress_tokens_after": count(text)})
                for doc, text in zip(documents, texts) if text]


__all__ = ["CtxpressDocumentCompressor"]
