"""Documents under one budget, and the LangChain and LlamaIndex adapters on the real packages."""

import string

import pytest

from ctxpress.errors import InputError
from ctxpress.prompt import PromptCompressor

from conftest import TEXT

DOCS = [TEXT[:200], "", TEXT[200:], "Numbers like 48151623 and 42 appear once, in a sentence of its own."]


@pytest.fixture(scope="module")
def pc(tiny_lm):
    return PromptCompressor(tiny_lm, progress=False)


def words(text: str) -> set[str]:
    return {w.strip(string.punctuation) for w in text.split()}  # a kept mark may follow a kept word


def test_documents_share_one_budget_and_come_back_apart(pc):
    out = pc.compress_documents(DOCS, rate=0.5)
    assert len(out) == len(DOCS) and out[1] == "" and sum(bool(text) for text in out) >= 2
    for doc, text in zip(DOCS, out):
        assert words(text) <= words(doc)  # nothing moved from one document to another
    joined = "\n\n".join(DOCS)
    whole = pc.compress(joined, rate=0.5)
    # the blank lines between documents are in the budget (the default keeps them) but not in the texts
    separators = (len(DOCS) - 1) * pc.count_tokens("\n\n")
    assert whole.compressed_tokens - separators - len(DOCS) <= sum(pc.count_tokens(t) for t in out)
    assert sum(pc.count_tokens(t) for t in out) <= whole.compressed_tokens + len(DOCS)
    assert pc.compress_documents([], rate=0.5) == []
    for bad in ("one string", [1, 2]):
        with pytest.raises(InputError, match="list of strings"):
            pc.compress_documents(bad, rate=0.5)


def test_langchain_document_compressor(pc):
    pytest.importorskip("langchain_core")
    from langchain_core.documents import BaseDocumentCompressor, Document

    from ctxpress.integrations.langchain import CtxpressDocumentCompressor

    documents = [Document(page_content=text, metadata={"source": i}, id=f"d{i}") for i, text in enumerate(DOCS)]
    compressor = CtxpressDocumentCompressor(compressor=pc, rate=0.5)
    assert isinstance(compressor, BaseDocumentCompressor)
    out = compressor.compress_documents(documents, "Which numbers appear?")
    kept = [d.metadata["source"] for d in out]  # in order, the empty document (and any emptied one) left out
    assert kept == sorted(kept) and 1 not in kept and len(kept) >= 2
    assert [d.id for d in out] == [f"d{i}" for i in kept]
    assert all(d.metadata["ctxpress_tokens_after"] <= d.metadata["ctxpress_tokens_before"] for d in out)
    assert sum(d.metadata["ctxpress_tokens_after"] for d in out) < 0.6 * sum(pc.count_tokens(t) for t in DOCS)
    assert "Which numbers" not in " ".join(d.page_content for d in out)  # the query is not part of the output
    assert compressor.compress_documents([], "q") == []
    with pytest.raises(InputError, match="rate"):
        CtxpressDocumentCompressor(compressor=pc, rate=2.0).compress_documents(documents, "q")


def test_llamaindex_node_postprocessor(pc):
    pytest.importorskip("llama_index.core")
    from llama_index.core.postprocessor.types import BaseNodePostprocessor
    from llama_index.core.schema import NodeWithScore, TextNode

    from ctxpress.integrations.llamaindex import CtxpressNodePostprocessor

    nodes = [NodeWithScore(node=TextNode(text=text, metadata={"n": i}), score=1.0 - i / 10)
             for i, text in enumerate(DOCS)]
    post = CtxpressNodePostprocessor(compressor=pc, target_tokens=120)
    assert isinstance(post, BaseNodePostprocessor)
    out = post.postprocess_nodes(nodes, query_str="Which numbers appear?")
    kept = [n.node.metadata["n"] for n in out]
    assert kept == sorted(kept) and 1 not in kept and len(kept) >= 2
    assert [n.score for n in out] == [1.0 - i / 10 for i in kept]
    assert sum(pc.count_tokens(n.node.get_content()) for n in out) <= 120 + len(DOCS)
    assert nodes[0].node.get_content() == DOCS[0]  # the retrieved nodes themselves are not changed
