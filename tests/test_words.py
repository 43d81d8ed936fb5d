"""Whole-word, phrase and line-break units: the rules, and the compressor keeping units whole (tiny model)."""

from itertools import pairwise

import numpy as np
import pytest

from ctxpress.errors import InputError
from ctxpress.prompt import METHODS, PromptCompressor
from ctxpress.prompt.tokens import tokenize_context, unit_texts
from ctxpress.words import MAX_PHRASE_WORDS, MAX_WORD_TOKENS, decode_ids, line_breaks, phrase_starts, word_starts


@pytest.fixture
def pc(tiny_lm):
    return PromptCompressor(tiny_lm, progress=False)


def words(texts, sizes=None, lines="score"):
    starts = word_starts(texts, sizes or [1] * len(texts), breaks=line_breaks(texts, lines))
    return ["".join(texts[a:b]) for a, b in zip(starts, [*starts[1:], len(texts)])]


def test_word_rules():
    # leading whitespace (newlines too) goes with the word after it; digits and inner punctuation stay
    assert words(["The", " number", " ", "1", "9", "8", "4", " is", " well", "-", "known"]) == \
        ["The", " number", " 1984", " is", " well-known"]
    # leading punctuation joins its word, trailing marks stand alone, one by one
    assert words([" (", "really", ").", "\n", "\n", "Next", " don", "'t", ",", " end", "."]) == \
        [" (really", ").", "\n\nNext", " don't", ",", " end", "."]
    # a word of punctuation alone is one unit: dropping its opening quote cannot glue the rest on ("de&")
    assert words([" de", ' "', "&", '"', " and", " --", "."]) == [" de", ' "&"', " and", " --."]
    # characters of scripts without spaces, and emoji, are words of their own
    assert words(["東", "京", "は", " emoji", " 👍", "🏽", " ok"]) == ["東", "京", "は", " emoji", " 👍", "🏽", " ok"]
    # a word never grows past MAX_WORD_TOKENS tokens
    assert word_starts([" x"] + ["a"] * (2 * MAX_WORD_TOKENS), [1] * (2 * MAX_WORD_TOKENS + 1)) == \
        [0, MAX_WORD_TOKENS, 2 * MAX_WORD_TOKENS]
    assert word_starts([" x", "yz", "w"], [MAX_WORD_TOKENS - 2, 2, 1]) == [0, 2]  # counted in tokens


def phrases(words_, sizes=None):
    starts = phrase_starts(words_, sizes or [1] * len(words_))
    return ["".join(words_[a:b]) for a, b in zip(starts, [*starts[1:], len(words_)])]


def test_phrase_rules():
    # names and dates are one unit, joiners inside them too; other words stand alone
    assert phrases(["On", " September", " 27", ",", " 2017", ",", " King", " Dinis", " of", " Portugal", " met",
                    " Procter", " &", " Gamble", " in", " San", " Francisco", "."]) == \
        ["On September 27, 2017", ",", " King Dinis of Portugal", " met", " Procter & Gamble", " in",
         " San Francisco", "."]
    # a comma joins only before a number; a joiner needs a name on both sides; a newline ends a phrase
    assert phrases([" Paris", ",", " France", " of", " course", " Notes", "\nHe"]) == \
        [" Paris", ",", " France", " of", " course", " Notes", "\nHe"]
    # a phrase never grows past MAX_PHRASE_WORDS words or MAX_WORD_TOKENS tokens
    title = [" A"] * (MAX_PHRASE_WORDS + 2)
    assert phrase_starts(title, [1] * len(title)) == [0, MAX_PHRASE_WORDS]
    assert phrase_starts([" New", " York", " City"], [MAX_WORD_TOKENS - 2, 2, 1]) == [0, 2]


def test_phrase_units_come_from_the_context(pc):
    """unit="phrase" groups the context's words: a name is one unit there, two under unit="word"."""
    text = "Yesterday Sigmund Freud wrote a letter."

    def units(unit):
        ctx = tokenize_context(pc.tokenizer, text, unit=unit)
        return unit_texts(pc.tokenizer, ctx.ids, ctx.unit_starts)

    assert units("phrase") == ["Yesterday Sigmund Freud", " wrote", " a", " letter", "."]
    assert units("word") == ["Yesterday", " Sigmund", " Freud", " wrote", " a", " letter", "."]


def test_line_breaks_stand_alone_when_asked():
    texts = ["##", " Title", "\n\n", "First", " words", ".", " \n", "  ", "indented", " \t"]
    assert words(texts) == ["##", " Title", "\n\nFirst", " words", ".", " \n  indented", " \t"]
    split = ["##", " Title", "\n\n", "First", " words", ".", " \n", "  indented", " \t"]
    assert words(texts, lines="keep") == words(texts, lines="structure") == split
    # a newline inside a hard-wrapped paragraph is structure only under "keep"; list items are structure
    wrapped = ["One", " line", "\n", "wraps", " here", "\n", "-", " item", "\n", "1", ".", " first", "\n"]
    assert line_breaks(wrapped, "keep") == [t == "\n" for t in wrapped]
    assert line_breaks(wrapped, "structure") == [i in (5, 8) for i in range(len(wrapped))]
    assert words(wrapped, lines="structure") == ["One", " line", "\nwraps", " here", "\n", "-", " item", "\n",
                                                 "1", ".", " first", "\n"]
    assert not any(line_breaks(wrapped, "score"))


LINES = "# Notes\n\nThe first paragraph says little\nof note.\n- an item\n- another item\n\nThe end, at last."


@pytest.mark.parametrize("lines,kept", [("structure", 6), ("keep", 7)])
def test_line_breaks_are_kept_while_the_budget_allows(pc, lines, kept):
    ctx = tokenize_context(pc.tokenizer, LINES, unit="word", lines=lines)
    assert decode_ids(pc.tokenizer, ctx.ids[ctx.breaks].tolist()) == "\n" * kept
    assert kept + 10 <= len(ctx) // 2
    for target in (len(ctx) // 2, len(ctx) // 3 * 2):
        result = pc.compress(LINES, target_tokens=target, line_breaks=lines)
        assert result.compressed_tokens == target
        assert result.compressed_text.count("\n") >= kept
        if lines == "structure":  # the default method's setting
            assert pc.compress(LINES, target_tokens=target).kept_token_indices == result.kept_token_indices
    # a budget below the line breaks still holds: they are dropped last, never a refusal
    assert pc.compress(LINES, target_tokens=2, line_breaks=lines).compressed_tokens == 2


def test_line_breaks_option(pc):
    scored = pc.compress(LINES, rate=0.5, method="dac-words", line_breaks="score")
    assert scored.compressed_text.count("\n") < LINES.count("\n")
    with pytest.raises(InputError, match="line_breaks must be one of score, structure, keep"):
        pc.compress(LINES, rate=0.5, line_breaks="always")


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("rate", [0.5, 0.2])
@pytest.mark.parametrize("unit", ["word", "phrase"])
def test_word_units_keep_words_whole(pc, text, method, rate, unit):
    lines = METHODS[method]().line_breaks  # the line breaks it keeps are units of their own
    ctx = tokenize_context(pc.tokenizer, text, unit=unit, lines=lines)
    question = {"question": "Which numbers matter?"} if METHODS[method].needs_question else {}
    result = pc.compress(text, rate=rate, method=method, unit=unit, **question)
    n = len(ctx)
    target = max(1, int(rate * n + 0.5))
    assert result.compressed_tokens <= target  # never more than asked
    if method != "rag-passages":  # whole passages only: up to a passage under the budget
        assert result.compressed_tokens >= target - MAX_WORD_TOKENS
    kept = np.zeros(n, dtype=bool)
    kept[result.kept_token_indices] = True
    bounds = [*ctx.unit_starts.tolist(), n]
    for a, b in pairwise(bounds):
        assert kept[a:b].all() or not kept[a:b].any(), (method, a, b)
    # every kept piece of text is a whole word of the original: nothing glued
    kept_words = [t for t, (a, _) in zip(unit_texts(pc.tokenizer, ctx.ids, ctx.unit_starts), pairwise(bounds))
                  if kept[a]]
    assert "".join(kept_words) == result.compressed_text


def test_words_reach_the_budget_on_plain_text(pc):
    text = " ".join(["compression keeps the informative words of every prompt, and drops the rest."] * 6)
    n = len(tokenize_context(pc.tokenizer, text))
    for target in (10, n // 3, n // 2):
        result = pc.compress(text, target_tokens=target, method="dac-static", unit="word")
        assert result.compressed_tokens == target  # one-token words make every count reachable


def test_unit_is_validated(pc, text):
    with pytest.raises(InputError, match="unit must be one of token, word, phrase"):
        pc.compress(text, rate=0.5, method="entropy", unit="sentence")
    with pytest.raises(InputError, match="unit_score must be one of mean, max"):
        pc.compress(text, rate=0.5, method="entropy", unit_score="median")


def test_unit_score_max_differs_from_mean(pc, text):
    mean = pc.compress(text, rate=0.4, method="dac-static", unit="word")
    top = pc.compress(text, rate=0.4, method="dac-static", unit="word", unit_score="max")
    assert mean.kept_token_indices != top.kept_token_indices
    assert top.settings["unit_score"] == "max" and mean.settings["unit"] == "word"
