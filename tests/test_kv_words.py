"""Evicting whole words from the KV cache: the ranking, the presses that use it, and the refusals."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from ctxpress.chat import prompt_ids
from ctxpress.compat import with_cache
from ctxpress.errors import InputError
from ctxpress.kv import (
    DEFAULT_METHOD,
    PyramidKV,
    SnapKV,
    SpindleKV,
    StreamingLLM,
    answer_questions,
    build_press,
    press_with_budget,
)
from ctxpress.kv.scores import by_unit
from ctxpress.kv.stores.dense import DenseColumns
from ctxpress.kv.stores.quantized import QuantizedStore
from ctxpress.words import token_words

from conftest import N, reference_layers


def unit_scores(scores: torch.Tensor, units: torch.Tensor, reduce: str) -> list[float]:
    out = []
    for u in range(int(units.max()) + 1):
        mine = scores[units == u]
        out.append(float(mine.max() if reduce == "max" else mine.mean()))
    return out


@given(st.lists(st.integers(1, 4), min_size=1, max_size=12), st.integers(0, 10_000), st.sampled_from(["max", "mean"]))
def test_top_k_of_ranked_scores_keeps_the_best_units_whole(sizes, seed, reduce):
    generator = torch.Generator().manual_seed(seed)
    units = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    n = len(units)
    scores = torch.rand(2, 3, n, generator=generator)
    ranks = by_unit(scores, units, reduce)
    for b in range(2):
        for h in range(3):
            assert sorted(ranks[b, h].tolist()) == list(range(1, n + 1))
            best_units = sorted(range(len(sizes)), key=lambda u: -unit_scores(scores[b, h], units, reduce)[u])
            for k in range(1, n + 1):
                kept = set(ranks[b, h].topk(k).indices.tolist())
                partial = [u for u in range(len(sizes))
                           if 0 < sum(int(t) in kept for t in torch.nonzero(units == u)) < sizes[u]]
                assert len(partial) <= 1  # only the unit the budget cuts
                whole = [u for u in range(len(sizes)) if all(int(t) in kept for t in torch.nonzero(units == u))]
                assert sorted(whole) == sorted(best_units[: len(whole)])  # best units first
                if partial:  # within the cut unit, its best tokens
                    mine = torch.nonzero(units == partial[0]).flatten()
                    inside = [int(t) for t in mine if int(t) in kept]
                    best = mine[scores[b, h, mine].argsort(descending=True)[: len(inside)]]
                    assert sorted(inside) == sorted(best.tolist())


def test_ties_between_units_never_interleave_them():
    scores = torch.tensor([[[1.0, 1.0, 1.0, 1.0]]])
    ranks = by_unit(scores, torch.tensor([0, 1, 0, 1]), "max")
    assert set(ranks[0, 0].topk(2).indices.tolist()) in ({0, 2}, {1, 3})


def test_token_words_groups_numbers_and_keeps_spaces_with_the_next_word(smollm):
    tok = smollm.tokenizer
    text = "The magic number is 4817293, said Ann-Marie."
    ids = tok(text, add_special_tokens=False)["input_ids"]
    words = token_words(tok, ids)
    pieces = ["".join(tok.decode(ids[i]) for i in range(len(ids)) if words[i] == w) for w in words.unique()]
    assert pieces == ["The", " magic", " number", " is", " 4817293", ",", " said", " Ann-Marie", "."]
    context, question = prompt_ids(tok, text, "Which number?")  # as the KV cache sees a prompt
    chat_words = token_words(tok, torch.cat([context, question], dim=1)[0].tolist())
    assert chat_words[0] == 0 and bool((chat_words.diff() >= 0).all()) and bool((chat_words.diff() <= 1).all())


def words_of(n: int, seed: int = 0) -> torch.Tensor:
    """Random words of 1-4 tokens covering n tokens."""
    generator = torch.Generator().manual_seed(seed)
    sizes = torch.randint(1, 5, (n,), generator=generator)
    return torch.repeat_interleave(torch.arange(n), sizes)[:n]


@pytest.mark.parametrize("press_cls", [SnapKV, PyramidKV, StreamingLLM])
def test_word_eviction_keeps_what_the_ranking_says(lm, prompt, press_cls):
    units = words_of(N)
    press = press_cls(ratio=0.25, unit="word")
    cache = press.cache(lm.model, units)
    with torch.no_grad():
        lm.model(prompt, **with_cache(lm.model, cache))
    dense, maps = reference_layers(lm.model, prompt)
    kv_heads = dense[0][0].shape[1]
    window = press.effective_window(N)
    for i, ((keys, _), attn, keep) in enumerate(zip(dense, maps, press.keep_counts(N, len(dense)))):
        if press_cls is StreamingLLM:
            scores = torch.arange(N, dtype=torch.float32).expand(1, kv_heads, N).clone()
            scores[..., :4] = float("inf")
        else:
            scores = torch.nn.functional.avg_pool1d(
                attn[:, :, -window:].sum(dim=2).view(-1, 1, N), 5, 1, 2).view(1, -1, N)
            scores = scores.view(1, kv_heads, -1, N).mean(2)
        ranked = by_unit(scores, units, "max")
        ranked[..., N - window:] = float("inf")
        idx = ranked.topk(keep, dim=-1).indices.sort(dim=-1).values
        store = cache.layers[i].store
        assert len(store) == keep
        torch.testing.assert_close(store.keys, keys.gather(2, idx[..., None].expand(-1, -1, -1, keys.shape[-1])),
                                   atol=1e-5, rtol=1e-5)
        for head in idx[0]:  # whole words, but for the window's first and the one the budget cuts
            kept = set(head.tolist())
            cut = {int(u) for u in units.unique() if 0 < sum(int(t) in kept for t in torch.nonzero(units == u))
                   < int((units == u).sum())}
            assert len(cut - {int(units[N - window])}) <= 1


def test_spindlekv_by_words_keeps_its_byte_budget(tiny_lm, prompt):
    cache = SpindleKV(ratio=0.3, unit="word").cache(tiny_lm.model, words_of(N))
    with torch.no_grad():
        tiny_lm.model(prompt, **with_cache(tiny_lm.model, cache))
    assert cache.nbytes() <= 0.3 * cache.dense_nbytes()


def test_spindlekv_words_gives_each_head_whole_words_by_shared_budget_without_codebooks(tiny_lm, prompt):
    press = build_press("spindlekv-words", ratio=0.3)
    assert press.unit == "word" and press.per_head and press.adaptive and not press.codebook
    units = words_of(N)
    cache = press.cache(tiny_lm.model, units)
    with torch.no_grad():
        tiny_lm.model(prompt, **with_cache(tiny_lm.model, cache))
    assert cache.nbytes() <= 0.3 * cache.dense_nbytes()
    dense, _ = reference_layers(tiny_lm.model, prompt)
    window = press.effective_window(N)
    differ = False
    for layer, (keys, _) in zip(cache.layers, dense):
        store = layer.store
        assert isinstance(store.keys, DenseColumns) and isinstance(store.values, DenseColumns)
        stored = store.keys.materialize()  # (kv_heads, columns, d)
        per_group = store.visible.shape[0] // stored.shape[0]
        seen = []
        for head, visible in enumerate(store.visible):
            group = head // per_group
            # the prompt position of every column this head sees: its key is that position's key
            found = torch.cdist(stored[group, visible], keys[0, group]).argmin(dim=-1)
            kept = set(found.tolist())
            seen.append(kept)
            cut = {int(u) for u in units.unique()
                   if 0 < sum(int(t) in kept for t in torch.nonzero(units == u)) < int((units == u).sum())}
            assert len(cut - {int(units[N - window])}) <= 1  # whole words but the window's first and the last
        differ = differ or any(seen[h] != seen[h - h % per_group] for h in range(len(seen)))
    assert differ  # heads of a group choose for themselves


def test_the_default_press_is_snapkv_over_whole_words(tiny_lm):
    press = press_with_budget(DEFAULT_METHOD)
    assert isinstance(press, SnapKV) and press.unit == "word" and press.unit_score == "max"
    assert press.ratio == 0.2 and press.name == "snapkv-words"
    result = answer_questions(tiny_lm, "alpha beta gamma 12345 delta " * 20, ["what?"], max_new_tokens=2)
    assert result[0].cache_bytes == result[0].full_cache_bytes  # answer_questions' own default stays full


def test_answering_with_word_eviction_finds_the_words_itself(tiny_lm):
    results = answer_questions(tiny_lm, "alpha beta gamma 12345 delta " * 20, ["what?"], "snapkv", ratio=0.3,
                               unit="word", max_new_tokens=3, question_aware=True)
    assert results[0].cache_bytes <= 0.3 * results[0].full_cache_bytes
    assert results[0].settings["unit"] == "word"


def test_word_eviction_refuses_what_it_cannot_do(tiny_lm, prompt):
    press = SnapKV(ratio=0.3, unit="word")
    with pytest.raises(InputError, match="token_words"):
        press.cache(tiny_lm.model)
    with pytest.raises(InputError, match="hook cannot see"), press(tiny_lm.model):
        pass
    cache = press.cache(tiny_lm.model, words_of(N - 1))
    with pytest.raises(InputError, match="words of 159 tokens; the prompt has 160"), torch.no_grad():
        tiny_lm.model(prompt, **with_cache(tiny_lm.model, cache))
    for options, match in (({"unit": "sentence"}, "unit must be one of token, word"),
                           ({"unit_score": "sum"}, "unit_score must be one of max, mean")):
        with pytest.raises(InputError, match=match):
            build_press("pyramidkv", ratio=0.3, **options)


@pytest.mark.parametrize("bits", [8, 4])
def test_eviction_in_fewer_bits_keeps_more_tokens_in_the_same_bytes(lm, prompt, bits):
    dense = SnapKV(ratio=0.3).cache(lm.model)
    quantized = SnapKV(ratio=0.3, bits=bits).cache(lm.model)
    for cache in (dense, quantized):
        with torch.no_grad():
            out = lm.model(prompt, **with_cache(lm.model, cache))
            lm.model(out.logits[:, -1:].argmax(-1), **with_cache(lm.model, cache))  # a decoding step
    assert quantized.nbytes() <= 0.3 * quantized.dense_nbytes()
    assert all(isinstance(layer.store, QuantizedStore) for layer in quantized.layers)
    kept_dense = sum(len(layer.store) for layer in dense.layers)
    kept_quantized = sum(len(layer.store) for layer in quantized.layers)
    assert kept_quantized > (1.8 if bits == 8 else 2.5) * kept_dense * 0.95  # a byte buys ~2.2x / ~3.7x tokens


def test_bits_are_checked():
    for options, match in (({"bits": 3}, "bits must be one of 8, 4, 2"), ({"bits": 4, "group": 0}, "group")):
        with pytest.raises(InputError, match=match):
            build_press("snapkv", ratio=0.3, **options)
    with pytest.raises(InputError, match="plain eviction only"):
        build_press("spindlekv", ratio=0.3, rest_bits=4)
    assert build_press("spindlekv", ratio=0.3, rest_bits=4, per_head=False, codebook=False).rest_bits == 4
    assert build_press("spindlekv", ratio=0.3, bits=4).bits == 4  # its headwise store takes bits too
    with pytest.raises(InputError, match="bits must be one of"):
        build_press("spindlekv-words", ratio=0.3, bits=3)
