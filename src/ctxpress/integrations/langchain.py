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

from langchain_core.callbacks import Callbacks
from langchain_core.documents import BaseDocumentCompressor, Document

from . import CompressionSettings


class CtxpressDocumentCompressor(CompressionSettings, BaseDocumentCompressor):
    """Compress retrieved documents with ctxpress (``dac-words`` by default) under one budget."""

    def compress_documents(self, documents: Sequence[Document], query: str,
                           callbacks: Callbacks | None = None) -> Sequence[Document]:
        if not documents:
            return []
        texts = self.compress_texts([doc.page_content for doc in documents], query)
        count = self.compressor.count_tokens
        return [Document(page_content=text, id=doc.id,
                         metadata={**doc.metadata, "ctxpress_tokens_before": count(doc.page_content),
                                   "ctxpress_tokens_after": count(text)})
                for doc, text in zip(documents, texts) if text]


__all__ = ["CtxpressDocumentCompressor"]
