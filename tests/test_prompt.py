"""Prompt compression behaviour on a tiny random model with a byte-level tokenizer."""

import dataclasses
from typing import ClassVar

import numpy as np
import pytest
import torch

from ctxpress import options
from ctxpress.errors import InputError
from ctxpress.prompt import METHODS, PromptCompressor
from ctxpress.prompt.methods import DACMethod, Method, StagedMethod, build_method, min_max
from ctxpress.prompt.tokens import tokenize_context
from ctxpress.signals import reference_signals

ALL_METHODS = list(METHODS)


@pytest.fixture
def pc(tiny_lm):
    return PromptCompressor(tiny_lm, progress=False)


def context_ids(pc, text):
    return tokenize_context(pc.tokenizer, text).ids


@pytest.mark.parametrize("method", ALL_METHODS)
@pytest.mark.parametrize("budget", [{"rate": 0.5}, {"rate": 0.2}, {"target_tokens": 17}, {"rate": 1.0}])
def test_exact_budget_and_faithful_text(pc, text, method, budget):
    question = {"question": "Which numbers matter?"} if METHODS[method].needs_question else {}
    result = pc.compress(text, method=method, **budget, **question)
    ids = context_ids(pc, text)
    n = len(ids)
    want = budget.get("target_tokens") or max(1, int(budget["rate"] * n + 0.5))
    assert result.origin_tokens == n
    if method == "rag-passages":  # whole passages only: up to a passage under the budget, never over
        assert result.compressed_tokens <= want
    else:
        assert abs(result.compressed_tokens - want) <= 1
    kept = result.kept_token_indices
    assert kept == sorted(set(kept)) and len(kept) == result.compressed_tokens
    if not question:  # a question-aware method may drop the first passage whole
        assert kept[0] == 0  # the first token is kept
    # the output is the input's own tokens, in order, with no broken character
    assert result.compressed_text == pc.tokenizer.decode(ids[kept].tolist())
    assert "\ufffd" not in result.compressed_text
    assert result.method == method and result.seconds >= 0
    assert result.rate == pytest.approx(result.compressed_tokens / n)


def test_unicode_never_broken_at_any_rate(pc):
    text = "東京と大阪 😀👍🏽🤖 café naïve — “quotes” " * 6
    ids = context_ids(pc, text)
    assert len(ids) > len(text.split())  # multi-byte characters really are split over tokens
    for method in ("dac", "entropy", "random", "llmlingua"):
        for rate in (0.15, 0.4, 0.7):
            result = pc.compress(text, rate=rate, method=method)
            assert "\ufffd" not in result.compressed_text, (method, rate)
            assert abs(result.compressed_tokens - round(rate * len(ids))) <= 1


def test_parity_with_reference_definition(pc, tiny_lm, text):
    """One stage, no rule, alpha 0.8: exactly the top-scored tokens of the reference."""
    ids = context_ids(pc, text)
    target = 60
    result = pc.compress(text, target_tokens=target, method="dac", stages=1, consecutive=False)
    ref = reference_signals(tiny_lm.model, ids)
    fused = 0.8 * min_max(ref.attention[1:]) + 0.2 * min_max(ref.self_information[1:])
    top = torch.topk(fused, target - 1).indices + 1
    units = tokenize_context(pc.tokenizer, text).unit_starts
    assert len(units) < len(ids)  # units exist, but
    assert result.kept_token_indices == [0, *sorted(top.tolist())] or _only_unit_ties(result, top, units)


def _only_unit_ties(result, top, units) -> bool:
    """Multi-token characters are scored as one unit; all other picks must agree."""
    singles = set(range(len(result.kept_token_indices) * 4)) - {
        int(i) for a, b in zip(units.tolist(), [*units.tolist()[1:], 10**9]) if b - a > 1 for i in range(a, b)}
    expected = {0, *top.tolist()} & singles
    got = set(result.kept_token_indices) & singles
    return expected == got


def test_parity_on_plain_ascii(pc, tiny_lm):
    text = " ".join(["compression keeps the informative tokens of every prompt"] * 8)
    ids = context_ids(pc, text)
    assert len(tokenize_context(pc.tokenizer, text).unit_starts) == len(ids)  # one token per unit
    result = pc.compress(text, target_tokens=30, method="dac", stages=1, consecutive=False)
    ref = reference_signals(tiny_lm.model, ids)
    fused = 0.8 * min_max(ref.attention[1:]) + 0.2 * min_max(ref.self_information[1:])
    top = torch.topk(fused, 29).indices + 1
    assert result.kept_token_indices == [0, *sorted(top.tolist())]


def test_consecutive_rule_within_a_stage(pc, text):
    ctx = tokenize_context(pc.tokenizer, text)
    n = len(ctx)
    result = pc.compress(text, rate=0.6, method="dac", stages=1)
    dropped = np.setdiff1d(np.arange(n), result.kept_token_indices)
    assert abs(len(dropped) - (n - round(0.6 * n))) <= 1
    # no two neighbouring units dropped (a multi-token character is one unit)
    unit_of = np.searchsorted(ctx.unit_starts.numpy(), np.arange(n), side="right") - 1
    dropped_units = np.unique(unit_of[dropped])
    assert not np.any(np.diff(dropped_units) == 1)
    assert result.settings["rule_relaxed_stages"] == 0


def test_stage_count(pc, text):
    n = len(context_ids(pc, text))
    assert pc.compress(text, rate=0.5, method="dac").settings["stages_run"] == min(max(1, n // 100), 15)
    assert pc.compress(text, rate=0.5, method="dac", stages=4).settings["stages_run"] == 4
    assert pc.compress(text, rate=0.5).settings["stages_run"] == 1  # the default is one pass
    assert pc.compress(text, rate=0.5, method="dac-static").settings["stages_run"] == 1


def test_staged_differs_from_one_pass(pc, text):
    staged = pc.compress(text, rate=0.3, stages=5)
    one_pass = pc.compress(text, rate=0.3, stages=1, consecutive=False)
    assert staged.compressed_tokens == one_pass.compressed_tokens
    assert staged.kept_token_indices != one_pass.kept_token_indices


def test_force_tokens_never_dropped(pc, text):
    tok = pc.tokenizer
    ctx = tokenize_context(tok, text)
    for force in (["[:newline:]"], ["[:digit:]"], ["[:punct:]"], ["matter"], ["\n", "!"]):
        protected = tokenize_context(tok, text, force).protected
        assert protected.any(), force
        for method in ("dac", "entropy", "random", "llmlingua"):
            result = pc.compress(text, rate=0.3, method=method, force_tokens=force)
            kept = set(result.kept_token_indices)
            assert set(torch.nonzero(protected).flatten().tolist()) <= kept, (force, method)
    digits = tokenize_context(tok, text, ["[:digit:]"]).protected
    digit_text = "".join(tok.decode([int(i)]) for i in ctx.ids[digits])
    assert set("123456789") <= set(digit_text)


def test_too_many_forced_tokens_is_an_error(pc, text):
    with pytest.raises(InputError, match="always kept"):
        pc.compress(text, target_tokens=3, force_tokens=["[:punct:]"])


def test_instruction_and_question_kept_whole(pc, text):
    result = pc.compress(text, rate=0.4, instruction="Answer briefly.", question="What is dropped?")
    assert result.compressed_prompt.startswith("Answer briefly.\n\n")
    assert result.compressed_prompt.endswith("\n\nWhat is dropped?")
    assert result.origin_tokens == len(context_ids(pc, text))  # not counted in the budget
    # the question conditions the scores (it is read after the context)
    asked = pc.compress(text, rate=0.4, method="dac", question="What is dropped?")
    plain = pc.compress(text, rate=0.4, method="dac")
    assert plain.kept_token_indices != asked.kept_token_indices


def test_list_of_documents(pc):
    docs = ["First document about foxes and dogs.", "Second document: numbers 12 and 345.", "  "]
    result = pc.compress(docs, rate=0.5)
    assert result.origin_tokens == len(context_ids(pc, "\n\n".join(docs[:2])))


def test_windows_share_one_budget(tiny_lm, text, capsys):
    long_text = (text + "\n") * 6
    pc = PromptCompressor(tiny_lm, window_tokens=128, progress=True)
    result = pc.compress(long_text, rate=0.3, method="dac")
    n = len(context_ids(pc, long_text))
    assert n > 3 * 128
    assert abs(result.compressed_tokens - round(0.3 * n)) <= 1
    assert "compress" in capsys.readouterr().err  # progress bar on stderr
    for method in ("entropy", "llmlingua"):
        assert abs(pc.compress(long_text, rate=0.3, method=method).compressed_tokens - round(0.3 * n)) <= 1


def test_batch_equals_one_by_one(pc, text):
    contexts = [text, text[:150], "A short context with a few words in it, nothing more."]
    batch = pc.compress_batch(contexts, rate=0.5)
    for context, got in zip(contexts, batch):
        alone = pc.compress(context, rate=0.5)
        assert got.kept_token_indices == alone.kept_token_indices


def test_random_is_seeded(pc, text):
    a = pc.compress(text, rate=0.5, method="random", seed=1)
    b = pc.compress(text, rate=0.5, method="random", seed=1)
    c = pc.compress(text, rate=0.5, method="random", seed=2)
    assert a.kept_token_indices == b.kept_token_indices != c.kept_token_indices


def test_llmlingua_one_segment_is_entropy(pc, text):
    entropy = pc.compress(text, rate=0.5, method="entropy")
    lingua = pc.compress(text, rate=0.5, method="llmlingua", segment_tokens=10_000)
    assert entropy.kept_token_indices == lingua.kept_token_indices


def test_llmlingua_conditions_on_compressed_prefix(pc, tiny_lm):
    text = " ".join(["compression keeps the informative tokens of every prompt"] * 6)  # one token per unit
    ids = context_ids(pc, text)
    seg = 20
    result = pc.compress(text, rate=0.5, method="llmlingua", segment_tokens=seg)
    kept = set(result.kept_token_indices)
    prefix = [i for i in range(seg) if i in kept]
    second = list(range(seg, 2 * seg))
    # self-information of the second segment given the *compressed* first one
    inp = torch.cat([ids[prefix], ids[second]])
    logits = tiny_lm.model(inp[None]).logits[0, :-1].float()
    info = -torch.log_softmax(logits, -1).gather(-1, inp[1:, None]).squeeze(-1)[len(prefix) - 1 :]
    keep_second = len([i for i in second if i in kept])
    expected = set((torch.topk(info.detach(), keep_second).indices + seg).tolist())
    assert {i for i in second if i in kept} == expected


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"rate": 0}, "rate"),
        ({"rate": 1.2}, "rate"),
        ({"target_tokens": 10**6}, "more than"),
        ({"rate": 0.5, "target_tokens": 5}, "exactly one"),
        ({}, "exactly one"),
        ({"rate": 0.5, "method": "nope"}, "unknown method"),
        ({"rate": 0.5, "method": "random", "alpha": 0.5}, "no option alpha"),
        ({"rate": 0.5, "stages": 0}, "stages"),
        ({"rate": 0.5, "alpha": 2.0}, "alpha"),
        ({"rate": 0.5, "fusion": "max"}, "fusion"),
    ],
)
def test_bad_arguments(pc, text, kwargs, match):
    with pytest.raises(InputError, match=match):
        pc.compress(text, **kwargs)


@pytest.mark.parametrize("context", ["", "   \n ", [], [""], 42])
def test_bad_context(pc, context):
    with pytest.raises(InputError):
        pc.compress(context, rate=0.5)


def test_llmlingua_compatible_call(pc, text):
    res = pc.compress_prompt(text, instruction="Summarise.", question="Why?", rate=0.5)
    for key in ("compressed_prompt", "origin_tokens", "compressed_tokens", "ratio", "rate", "saving"):
        assert key in res
    assert res["ratio"].endswith("x") and res["rate"].endswith("%")
    assert res["compressed_prompt"].startswith("Summarise.")
    by_target = pc.compress_prompt(text, rate=0.9, target_token=20)
    assert by_target["compressed_tokens"] == 20


def test_multiplicative_fusion(pc, text):
    result = pc.compress(text, rate=0.5, fusion="multiplicative")
    assert result.settings["fusion"] == "multiplicative"
    assert abs(result.compressed_tokens - round(0.5 * result.origin_tokens)) <= 1


# Each method's options, in order, with their defaults: exactly the fields of its class, and the
# keys of its settings (DAC's "auto" stages are None).
FUSED = ("unit", "line_breaks", "stages", "consecutive", "unit_score", "alpha", "fusion", "attention_from")
DEFAULTS = {
    "dac-words": dict(zip(FUSED, ("phrase", "structure", 1, False, "mean", 0.8, "additive", "all"))),
    "dac": dict(zip(FUSED, ("token", "score", None, True, "mean", 0.8, "additive", "all"))),
    "dac-static": dict(zip(FUSED, ("token", "score", 1, False, "mean", 0.8, "additive", "all"))),
    "entropy": dict(zip(FUSED, ("token", "score", 1, False, "mean", 0.0, "additive", "all"))),
    "entropy-dynamic": dict(zip(FUSED, ("token", "score", None, True, "mean", 0.0, "additive", "all"))),
    "attention": dict(zip(FUSED, ("token", "score", 1, False, "mean", 1.0, "additive", "all"))),
    "random": {"unit": "token", "line_breaks": "score", "stages": 1, "consecutive": False, "unit_score": "mean",
               "seed": 0},
    "llmlingua": {"unit": "token", "line_breaks": "score", "segment_tokens": 100},
}
RELEVANCE = {"words": True, "reorder": False, "keep_share": 0.8, "min_rate": 0.3, "split": "auto"}
DEFAULTS["dac-rag"] = {**DEFAULTS["dac-words"], **RELEVANCE}
DEFAULTS["rag-passages"] = {**DEFAULTS["dac-rag"], "words": False}
ORDER = ["dac-words", "dac-rag", "rag-passages", "dac", "dac-static", "entropy", "entropy-dynamic", "attention",
         "random", "llmlingua"]
DEFAULTS = {name: DEFAULTS[name] for name in ORDER}  # the registry's order


def test_registry_lists_every_method():
    assert list(METHODS) == list(DEFAULTS)


@pytest.mark.parametrize("name", ALL_METHODS)
def test_options_are_the_dataclass_fields(name):
    cls = METHODS[name]
    assert cls.name == name and issubclass(cls, Method)
    fields = {f.name: f.default for f in dataclasses.fields(cls) if f.name != "signal_fn"}
    assert fields == DEFAULTS[name] and options.option_names(cls) == list(DEFAULTS[name])
    # its own one-line docstring is its description (the CLI help shows it)
    assert "__doc__" in cls.__dict__ and cls.description() == cls.__doc__.strip() and "\n" not in cls.__doc__
    method = build_method(name, **DEFAULTS[name])
    assert method == build_method(name) and isinstance(method, Method)
    auto = {k: "auto" if k == "stages" and v is None else v for k, v in DEFAULTS[name].items()}
    assert method.settings() == auto and list(method.settings()) == list(auto)
    allowed = ", ".join(DEFAULTS[name])
    for bogus in ("bogus", "signal_fn", "name"):  # internal fields and class attributes are no options
        with pytest.raises(InputError, match=f"no option {bogus} \\(it takes: {allowed}\\)"):
            build_method(name, **{bogus: 1})


@pytest.mark.parametrize(
    "name,items,match",
    [
        ("dac", ["stages=1.5"], "stages must be an integer"),
        ("dac", ["stages=0"], "stages must be a positive integer"),
        ("dac", ["stages=true"], "stages must be an integer"),
        ("entropy-dynamic", ["consecutive=maybe"], "consecutive must be true or false"),
        ("dac", ["consecutive=1"], "consecutive must be true or false"),
        ("dac", ["alpha=2"], "alpha must be in \\[0, 1\\]"),
        ("attention", ["alpha=-0.1"], "alpha must be in"),
        ("dac", ["alpha=high"], "alpha must be a number"),
        ("dac", ["fusion=bogus"], "fusion must be 'additive' or 'multiplicative'"),
        ("dac", ["fusion=1"], "fusion must be text"),
        ("random", ["seed=0.5"], "seed must be an integer"),
        ("llmlingua", ["segment_tokens=0"], "segment_tokens must be a positive integer"),
        ("llmlingua", ["segment_tokens=2.5"], "segment_tokens must be an integer"),
        ("random", ["alpha=0.5"], "no option alpha"),
    ],
)
def test_mistyped_options_are_refused(name, items, match):
    with pytest.raises(InputError, match=match):
        build_method(name, **options.parse_options(items))


def test_options_parsed_from_text_build_the_same_method():
    parsed = options.parse_options(["stages=3", "consecutive=false", "alpha=1", "fusion=multiplicative"])
    assert build_method("dac", **parsed) == DACMethod(stages=3, consecutive=False, alpha=1.0, fusion="multiplicative")
    with pytest.raises(TypeError):
        StagedMethod()  # the mechanism alone has no score


def test_configured_method_object(pc, text):
    by_name = pc.compress(text, rate=0.4, method="dac", stages=1, consecutive=False)
    by_object = pc.compress(text, rate=0.4, method=DACMethod(stages=1, consecutive=False))
    assert by_object.kept_token_indices == by_name.kept_token_indices
    assert by_object.method == "dac" and by_object.settings == by_name.settings
    with pytest.raises(InputError, match="options go with a method name"):
        pc.compress(text, rate=0.4, method=DACMethod(), stages=2)
    with pytest.raises(InputError, match="Method object"):
        pc.compress(text, rate=0.4, method=object())


def test_signal_fn_is_swappable_not_an_option(pc, text):
    from ctxpress.signals import batched_signals

    calls = []

    def recording(model, sequences, **kw):
        calls.append(len(sequences))
        return batched_signals(model, sequences, **kw)

    method = dataclasses.replace(build_method("dac"), signal_fn=recording)
    assert method == build_method("dac") and "signal_fn" not in method.settings()
    got = pc.compress(text, rate=0.5, method=method)
    assert calls and got.kept_token_indices == pc.compress(text, rate=0.5, method="dac").kept_token_indices


@dataclasses.dataclass(frozen=True)
class LatestFirst(StagedMethod):
    """later tokens first (a throwaway method for the test)"""

    name: ClassVar[str] = "latest"
    needs_signals: ClassVar[bool] = False
    needs_attention: ClassVar[bool] = False

    stages: int | None = 1
    consecutive: bool = False
    weight: float = 1.0

    def validate(self) -> None:
        super().validate()
        if self.weight <= 0:
            raise InputError(f"{self.name}: weight must be positive")

    def score(self, info, attention):
        return self.weight * torch.arange(info.numel(), dtype=torch.float32)


def test_a_new_method_is_one_class_and_one_registry_line(pc, text):
    registry = {**METHODS, LatestFirst.name: LatestFirst}
    method = options.build(registry, "method", "latest", {"weight": 2, "stages": 2})
    assert method == LatestFirst(stages=2, weight=2.0)
    assert method.settings() == {"unit": "token", "line_breaks": "score", "stages": 2, "consecutive": False,
                                 "unit_score": "mean", "weight": 2}
    assert LatestFirst.description() == "later tokens first (a throwaway method for the test)"
    result = pc.compress(text, rate=0.5, method=method)
    kept = result.kept_token_indices
    n = result.origin_tokens
    assert kept[0] == 0 and kept[1:] == list(range(kept[1], n))  # the earliest tokens went first
    assert result.method == "latest" and result.settings["weight"] == 2 and result.settings["stages_run"] == 2
    takes = "unit, line_breaks, stages, consecutive, unit_score, weight"
    with pytest.raises(InputError, match=f"no option colour \\(it takes: {takes}\\)"):
        options.build(registry, "method", "latest", {"colour": "red"})
    with pytest.raises(InputError, match="weight must be a number"):
        options.build(registry, "method", "latest", {"weight": "heavy"})
    with pytest.raises(InputError, match="weight must be positive"):
        options.build(registry, "method", "latest", {"weight": 0})
    assert "latest" not in METHODS


def test_question_aware_attention(pc, text):
    question = "Which numbers matter?"
    aware = pc.compress(text, rate=0.4, method="dac-static", question=question, attention_from="question")
    agnostic = pc.compress(text, rate=0.4, method="dac-static", question=question)
    assert aware.compressed_tokens == agnostic.compressed_tokens
    assert aware.kept_token_indices != agnostic.kept_token_indices
    with pytest.raises(InputError, match="needs a question"):
        pc.compress(text, rate=0.4, method="dac-static", attention_from="question")
    with pytest.raises(InputError, match="attention_from must be"):
        pc.compress(text, rate=0.4, method="dac-static", attention_from="answer")
