"""dac-rag and rag-passages: question-aware, coarse-to-fine compression of passages."""

from __future__ import annotations

import pytest
import torch

from ctxpress.errors import InputError
from ctxpress.prompt import PassageMethod, PromptCompressor, RelevanceMethod
from ctxpress.prompt.relevance import allocate, passage_spans, rank_shares
from ctxpress.signals import TokenSignals, batched_signals

QUESTION = "Which caches grow with the context during decoding?"
RELEVANT = ("Which caches grow with the context during decoding? Key-value caches grow with the context "
            "during decoding.")
DOCS = [
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.",
    "Prompt compression removes the tokens of a prompt that carry the least information.",
    RELEVANT,
    "Numbers such as 3.14159, 2025 and 1,000,000 appear in reports; so do dates like 2024-05-01.",
    "A small language model reads the prompt once and scores every token by its surprise.",
]


@pytest.fixture
def pc(tiny_lm) -> PromptCompressor:
    return PromptCompressor(tiny_lm, progress=False)


def question_oracle(tokenizer):
    """Signals as a model that reads the question easily only after the passage that repeats it:
    the coarse pass (no attention) gets that self-information; the word pass is the real one.
    A random tiny model cannot tell passages apart, so the ranking is made known here."""
    relevant = tokenizer(RELEVANT, add_special_tokens=False)["input_ids"]

    def signals(model, sequences, *, attention=True, **kwargs):
        real = batched_signals(model, sequences, attention=attention, **kwargs)
        if attention:
            return real
        out = []
        for seq, sig in zip(sequences, real):
            ids = seq.tolist()
            holds = any(ids[i : i + len(relevant)] == relevant for i in range(len(ids) - len(relevant) + 1))
            out.append(TokenSignals(torch.full_like(sig.self_information, 0.1 if holds else 5.0), None))
        return out

    return signals


def test_exact_budget_for_documents_paragraphs_and_sentences(pc):
    paragraphs = "\n\n".join(DOCS)
    sentences = " ".join(DOCS)
    for context in (DOCS, paragraphs, sentences):
        n = pc.count_tokens(context if isinstance(context, str) else paragraphs)
        for rate in (0.5, 0.33, 0.2):
            r = pc.compress(context, rate=rate, method="dac-rag", question=QUESTION)
            assert r.compressed_tokens == round(rate * n) and r.origin_tokens == n
        r = pc.compress(context, target_tokens=17, method="dac-rag", question=QUESTION)
        assert r.compressed_tokens == 17


def test_long_contexts_are_scored_in_windows_under_one_budget(tiny_lm):
    pc = PromptCompressor(tiny_lm, progress=False, window_tokens=96)
    docs = DOCS * 3
    n = pc.count_tokens("\n\n".join(docs))
    assert n > 2 * 96
    for rate in (0.5, 0.2):
        r = pc.compress(docs, rate=rate, method="dac-rag", question=QUESTION, instruction="Answer briefly.")
        assert r.compressed_tokens == round(rate * n)


def test_refuses_without_a_question(pc):
    for method in ("dac-rag", "rag-passages"):
        with pytest.raises(InputError, match="dac-words") as err:
            pc.compress(DOCS, rate=0.5, method=method)
        assert "\n" not in str(err.value)


def test_the_most_relevant_passage_is_kept_whole_at_a_low_rate(pc, tokenizer):
    method = RelevanceMethod(signal_fn=question_oracle(tokenizer))
    n = pc.count_tokens("\n\n".join(DOCS))
    r = pc.compress(DOCS, rate=0.33, method=method, question=QUESTION)
    assert RELEVANT in r.compressed_text and r.compressed_tokens == round(0.33 * n)
    # Too big to be kept whole at 0.25: shared, it keeps the largest part of the budget.
    r = pc.compress(DOCS, rate=0.25, method=method, question=QUESTION)
    pieces = r.compressed_text.split("\n\n")
    assert r.compressed_tokens == round(0.25 * n)
    assert max(pieces, key=pc.count_tokens).startswith("Which caches")
    passages = pc.compress(DOCS, rate=0.33, method=PassageMethod(signal_fn=question_oracle(tokenizer)),
                           question=QUESTION)
    assert passages.compressed_text.startswith(RELEVANT) or f"\n\n{RELEVANT}" in passages.compressed_text


def test_the_ranking_is_the_question_likelihood_given_each_passage(pc, tiny_lm):
    """Without an oracle: the passage after which the tiny model finds the question most likely
    (computed here directly) is the one the passage-level baseline keeps first."""
    tok = tiny_lm.tokenizer
    question = tok("\n\n" + QUESTION, add_special_tokens=False)["input_ids"]
    seqs = [torch.tensor(tok(doc, add_special_tokens=False)["input_ids"] + question) for doc in DOCS]
    sigs = batched_signals(tiny_lm.model, seqs, attention=False)
    best = max(range(len(DOCS)), key=lambda p: -float(sigs[p].self_information[-(len(question) - 1):].mean()))
    budget = pc.count_tokens(DOCS[best]) + 1
    r = pc.compress(DOCS, target_tokens=budget, method="rag-passages", question=QUESTION)
    assert DOCS[best] in r.compressed_text


def test_reorder_puts_the_most_relevant_passage_first_and_keeps_the_same_tokens(pc, tokenizer):
    kept = pc.compress(DOCS, rate=0.5, method=RelevanceMethod(signal_fn=question_oracle(tokenizer)),
                       question=QUESTION)
    moved = pc.compress(DOCS, rate=0.5, method=RelevanceMethod(signal_fn=question_oracle(tokenizer), reorder=True),
                        question=QUESTION)
    assert moved.compressed_text.startswith(RELEVANT + "\n\n")
    assert not kept.compressed_text.startswith(RELEVANT)
    assert sorted(moved.kept_token_indices) == kept.kept_token_indices
    assert moved.compressed_tokens == kept.compressed_tokens
    assert sorted(moved.compressed_text.split("\n\n")) == sorted(kept.compressed_text.split("\n\n"))


def test_the_passage_level_baseline_keeps_whole_passages_only(pc):
    n = pc.count_tokens("\n\n".join(DOCS))
    for docs in (DOCS, DOCS[::-1]):
        for rate in (0.7, 0.5, 0.33):
            r = pc.compress(docs, rate=rate, method="rag-passages", question=QUESTION)
            pieces = r.compressed_text.split("\n\n")
            assert pieces and all(piece in DOCS for piece in pieces)  # no fragment of a dropped passage
            assert round(rate * n) - max(map(pc.count_tokens, DOCS)) < r.compressed_tokens <= round(rate * n)
            assert r.settings["words"] is False


def test_after_an_instruction_a_dropped_first_passage_leaves_nothing(pc, tokenizer):
    docs = [DOCS[1], DOCS[3], RELEVANT]
    method = RelevanceMethod(signal_fn=question_oracle(tokenizer))
    budget = pc.count_tokens(RELEVANT)
    r = pc.compress(docs, target_tokens=budget, method=method, question=QUESTION, instruction="Answer briefly.")
    assert r.compressed_text == RELEVANT and r.compressed_tokens == budget


def test_deterministic(pc):
    first = pc.compress(DOCS, rate=0.33, method="dac-rag", question=QUESTION)
    second = pc.compress(DOCS, rate=0.33, method="dac-rag", question=QUESTION)
    assert first.kept_token_indices == second.kept_token_indices


def test_batch_matches_one_by_one(pc):
    contexts = [DOCS, DOCS[::-1], "\n\n".join(DOCS[:3])]
    batch = pc.compress_batch(contexts, rate=0.4, method="dac-rag", question=QUESTION)
    for context, result in zip(contexts, batch):
        alone = pc.compress(context, rate=0.4, method="dac-rag", question=QUESTION)
        assert result.kept_token_indices == alone.kept_token_indices
        assert result.compressed_tokens == round(0.4 * result.origin_tokens)


def test_at_most_two_forward_passes_per_context(tiny_lm):
    pc = PromptCompressor(tiny_lm, progress=False, batch_tokens=1 << 20)
    calls: list[int] = []
    hook = tiny_lm.model.base_model.register_forward_pre_hook(
        lambda _m, args, kwargs: calls.append(int(kwargs["input_ids"].numel())), with_kwargs=True)
    try:
        pc.compress_batch([DOCS, DOCS[1:]], rate=0.33, method="dac-rag", question=QUESTION)
        words = len(calls)
        calls.clear()
        pc.compress(DOCS, rate=0.33, method="rag-passages", question=QUESTION)
        passages = len(calls)
    finally:
        hook.remove()
    assert words == 2  # one batched pass over (passage, question) pairs, one over what is left
    assert passages == 1


def test_passage_spans():
    text, spans = passage_spans(["  first doc ", "", "second\n\nparagraph"])
    assert text == "  first doc \n\nsecond\n\nparagraph"
    assert [text[a:b] for a, b in spans] == ["first doc", "second\n\nparagraph"]
    text, spans = passage_spans("One. Two!\n\n  Three?  Four.\n")
    assert [text[a:b] for a, b in spans] == ["One. Two!", "Three?  Four."]
    _, spans = passage_spans("One. Two! Three?")
    assert len(spans) == 3
    _, spans = passage_spans("One. Two!\n\nThree.", "sentences")
    assert len(spans) == 3


def test_rank_shares_favour_the_most_relevant():
    assert rank_shares([100, 100, 100], 120) == [60, 40, 20]
    assert rank_shares([10, 100, 100], 150) == [10, 94, 46]  # capped at all of a passage
    assert sum(rank_shares([7, 13, 29, 41], 37)) == 37
    assert rank_shares([5, 5], 10) == [5, 5]


def test_allocate_keeps_the_top_whole_and_shares_the_rest():
    sizes = [100, 100, 100, 100, 100]
    whole, shared = allocate(sizes, [2, 0, 4, 1, 3], 200, keep_share=0.8, min_rate=0.3)
    assert whole == [2] and shared == [0, 4, 1]  # 100 left for 300 tokens, at least 0.3 each
    whole, shared = allocate(sizes, [2, 0, 4, 1, 3], 60, keep_share=0.8, min_rate=0.4)
    assert whole == [] and shared == [2]  # the top passage is shared when it does not fit whole
    assert allocate([10, 500], [1, 0], 100, keep_share=0.8, min_rate=0.3) == ([], [1])
    # The top passage is kept whole whenever it fits the budget, beyond keep_share.
    assert allocate([150, 100, 100], [0, 1, 2], 160, keep_share=0.8, min_rate=0.3) == ([0], [1])


def test_options_are_checked():
    with pytest.raises(InputError, match="split"):
        RelevanceMethod(split="words")
    with pytest.raises(InputError, match="keep_share"):
        RelevanceMethod(keep_share=1.5)
    with pytest.raises(InputError, match="stages"):
        RelevanceMethod(stages=3)
