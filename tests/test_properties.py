"""Properties that must hold for any input, on generated text and budgets (tiny random model).

The profile (``fast`` inside ``make test``, ``long`` via ``make test-properties``) sets how
many examples each property sees; see ``conftest.py``.
"""

from itertools import pairwise

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from ctxpress.errors import InputError
from ctxpress.kv import PRESSES, build_press
from ctxpress.prompt import METHODS, PromptCompressor
from ctxpress.prompt.tokens import tokenize_context, unit_texts

FRAGMENTS = [
    "東京と大阪は日本の都市です。", "👩‍👩‍👧 family", "👍🏽", "🇫🇷", "e\u0301 combining", "שלום עולם", "مرحبا",
    "def f(x):\n    return x * 2\n", "| a | b |\n|---|---|\n| 1 | 2 |\n", '{"key": [1, 2.5, null]}',
    "x" * 120, "   \t  ", "\n\n\n", "\x00", "\x07\x1b[0m", "Zürich, naïve café.", "3.14159 and 2024-05-01",
    "King Dinis of Portugal met Sigmund Freud on September 27, 2017 in São Paulo.",
]
texts = st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.text(min_size=1, max_size=40)), min_size=1,
                 max_size=8).map(" ".join).filter(lambda t: t.strip())
methods = st.sampled_from(sorted(name for name, method in METHODS.items() if not method.needs_question))
# the question-aware methods have properties of their own (tests/test_relevance.py)
units = st.sampled_from(["token", "word", "phrase"])
rates = st.floats(min_value=0.05, max_value=1.0)


@pytest.fixture(scope="module")
def pc(tiny_lm):
    return PromptCompressor(tiny_lm, progress=False)


@given(text=texts, method=methods, unit=units, rate=rates)
def test_output_is_the_inputs_own_units_in_order_within_budget(pc, text, method, unit, rate):
    ctx = tokenize_context(pc.tokenizer, text, unit=unit, lines=METHODS[method]().line_breaks)  # the method's units
    n = len(ctx)
    target = max(1, int(rate * n + 0.5))
    first = int(ctx.unit_starts[1]) if len(ctx.unit_starts) > 1 else n
    if target < first:  # the first unit has no left context to be scored by: it is always kept
        with pytest.raises(InputError, match="always kept"):
            pc.compress(text, rate=rate, method=method, unit=unit, question="Why?")
        return
    result = pc.compress(text, rate=rate, method=method, unit=unit, question="Why?")
    kept = result.kept_token_indices
    assert kept == sorted(set(kept)) and len(kept) == result.compressed_tokens
    bounds = [*ctx.unit_starts.tolist(), n]
    whole = [set(range(a, b)) <= set(kept) for a, b in pairwise(bounds)]
    partial = [bool(set(range(a, b)) & set(kept)) and not w for (a, b), w in zip(pairwise(bounds), whole)]
    assert not any(partial)  # units are kept or dropped whole: no broken character, no split word
    pieces = unit_texts(pc.tokenizer, ctx.ids, ctx.unit_starts)
    assert result.compressed_text == "".join(p for p, w in zip(pieces, whole) if w)
    # the budget: exact, or a few fewer when every unit left is bigger than the rest (never more)
    biggest = max(b - a for a, b in pairwise(bounds))
    assert target - biggest < result.compressed_tokens <= target or result.compressed_tokens == target
    assert result.compressed_prompt.endswith("\n\nWhy?")


@given(texts=st.lists(texts, min_size=1, max_size=3), method=methods, unit=units,
       rate=st.floats(min_value=0.4, max_value=1.0))  # small budgets: see the property above
def test_equal_requests_give_equal_output_alone_or_batched(pc, texts, method, unit, rate):
    for text in texts:  # budgets below the always-kept first unit are refused (the property above)
        ctx = tokenize_context(pc.tokenizer, text, unit=unit)
        first = int(ctx.unit_starts[1]) if len(ctx.unit_starts) > 1 else len(ctx)
        assume(max(1, int(rate * len(ctx) + 0.5)) >= first)
    batched = pc.compress_batch(texts, rate=rate, method=method, unit=unit)
    for text, together in zip(texts, batched):
        alone = pc.compress(text, rate=rate, method=method, unit=unit)
        again = pc.compress(text, rate=rate, method=method, unit=unit)
        assert alone.kept_token_indices == again.kept_token_indices == together.kept_token_indices


@given(force=st.sampled_from(["[:digit:]", "[:punct:]", "[:newline:]", "x", "café"]), text=texts)
def test_forced_text_is_kept_whole(pc, force, text):
    protected = tokenize_context(pc.tokenizer, text, [force]).protected
    words = tokenize_context(pc.tokenizer, text, unit="word")
    first = int(words.unit_starts[1]) if len(words.unit_starts) > 1 else len(words)
    # a protected token keeps its whole word; budgets below what is always kept are refused (see above)
    assume(int(protected.sum()) <= 0.3 * len(protected) and first <= 0.5 * len(words))
    try:
        result = pc.compress(text, rate=0.5, force_tokens=[force])
    except InputError as err:
        assert "always kept" in str(err)  # forced words, whole, can outgrow the budget
        return
    assert set(protected.nonzero().flatten().tolist()) <= set(result.kept_token_indices)


bad_budgets = st.one_of(st.floats(max_value=0.0), st.floats(min_value=1.0001), st.just(float("nan")),
                        st.booleans(), st.text(max_size=3))


@given(rate=bad_budgets, method=methods)
def test_bad_budgets_are_one_line_errors(pc, rate, method):
    with pytest.raises(InputError) as err:
        pc.compress("some text to compress", rate=rate, method=method)
    assert "\n" not in str(err.value)


option_values = st.one_of(st.integers(-3, 300), st.floats(allow_nan=True), st.booleans(), st.none(),
                          st.sampled_from(["", "word", "token", "abc", "mean", "max"]))


@given(name=st.sampled_from(sorted(PRESSES)), options=st.dictionaries(
    st.sampled_from(["ratio", "tokens", "window", "per_head", "bits", "rest_bits", "evict", "sinks", "kernel",
                     "bogus"]),
    option_values, max_size=3))
def test_every_press_builds_or_refuses_in_one_line(name, options):
    try:
        press = build_press(name, **options)
    except InputError as err:
        assert "\n" not in str(err) and str(err)
    else:
        assert press.name == name


@given(name=methods, options=st.dictionaries(
    st.sampled_from(["unit", "stages", "consecutive", "alpha", "fusion", "unit_score", "attention_from", "seed",
                     "segment_tokens", "bogus"]), option_values, max_size=3), text=texts)
def test_every_method_option_runs_or_refuses_in_one_line(pc, name, options, text):
    try:
        result = pc.compress(text, rate=0.5, method=name, **options)
    except InputError as err:
        assert "\n" not in str(err) and str(err)
    else:
        assert result.method == name
