"""ctxpress as a LlamaIndex node postprocessor.

>>> engine = index.as_query_engine(node_postprocessors=[CtxpressNodePostprocessor(rate=0.5)])

The retrieved nodes' texts are compressed together under one budget; each
node keeps its score and metadata; a node that loses every word is dropped.
"""

from __future__ import annotations

from typing import Any

from llama_index.core.bridge.pydantic import ConfigDict, Field
from llama_index.core.postprocessor.types import BaseNodePostprocessor
from llama_index.core.schema import MetadataMode, NodeWithScore, QueryBundle

from ..prompt import PromptCompressor
from ..prompt.methods import DEFAULT_METHOD
from . import compress_texts


class CtxpressNodePostprocessor(BaseNodePostprocessor):
    """Compress retrieved nodes with ctxpress (``dac-words`` by default) under one budget."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    compressor: PromptCompressor | None = None  # None: the embedded model's, made on first use
    rate: float | None = 0.5
    target_tokens: int | None = None  # the nodes' tokens in all; wins over rate
    method: str = DEFAULT_METHOD
    options: dict[str, Any] = Field(default_factory=dict)

    @classmethod
    def class_name(cls) -> str:
        return "CtxpressNodePostprocessor"

    def _postprocess_nodes(self, nodes: list[NodeWithScore],
                           query_bundle: QueryBundle | None = None) -> list[NodeWithScore]:
        if not nodes:
            return []
        self.compressor, texts = compress_texts(
            self.compressor, [n.node.get_content(metadata_mode=MetadataMode.NONE) for n in nodes], rate=self.rate,
            target_tokens=self.target_tokens, method=self.method, options=self.options,
            query=query_bundle.query_str if query_bundle else "")
        out = []
        for scored, text in zip(nodes, texts):
            if text:
                node = scored.node.model_copy()
                node.set_content(text)
                out.append(NodeWithScore(node=node, score=scored.score))
        return out


__all__ = ["CtxpressNodePostprocessor"]
