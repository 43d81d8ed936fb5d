"""ctxpress as a LlamaIndex node postprocessor.

>>> engine = index.as_query_engine(node_postprocessors=[CtxpressNodePostprocessor(rate=0.5)])

The retrieved nodes' texts are compressed together under one budget; each
node keeps its score and metadata; a node that loses every word is dropped.
"""

from __future__ import annotations

from llama_index.core.postprocessor.types import BaseNodePostprocessor
from llama_index.core.schema import MetadataMode, NodeWithScore, QueryBundle

from . import CompressionSettings


class CtxpressNodePostprocessor(CompressionSettings, BaseNodePostprocessor):
    """Compress retrieved nodes with ctxpress (``dac-words`` by default) under one budget."""

    @classmethod
    def class_name(cls) -> str:
        return "CtxpressNodePostprocessor"

    def _postprocess_nodes(self, nodes: list[NodeWithScore],
                           query_bundle: QueryBundle | None = None) -> list[NodeWithScore]:
        if not nodes:
            return []
        texts = self.compress_texts([n.node.get_content(metadata_mode=MetadataMode.NONE) for n in nodes],
                                    query_bundle.query_str if query_bundle else "")
        out = []
        for scored, text in zip(nodes, texts):
            if text:
                node = scored.node.model_copy()
                node.set_content(text)
                out.append(NodeWithScore(node=node, score=scored.score))
        return out


__all__ = ["CtxpressNodePostprocessor"]
