"""KV presses on tiny random models (GQA and plain multi-head): budgets, options, the two ways in, decoding."""

import math

import pytest
import torch

from ctxpress.compat import with_cache
from ctxpress.errors import InputError
from ctxpress.kv import (
    DEFAULT_RATIO,
    FULL,
    H2O,
    PRESSES,
    KVPress,
    PyramidKV,
    SnapKV,
    SpindleKV,
    StreamingLLM,
    build_press,
    press_with_budget,
)
from ctxpress.kv.budget import pyramid_keep
from ctxpress.kv.stores.dense import ROOM, DenseStore

from conftest import N, compressed, greedy, reference_layers


def test_full_matches_plain_generate(lm, prompt):
    plain = greedy(lm.model, prompt)
    cache = KVPress().cache(lm.model)
    assert torch.equal(greedy(lm.model, prompt, **with_cache(lm.model, cache)), plain)
    with KVPress()(lm.model):
        assert torch.equal(greedy(lm.model, prompt), plain)
    assert cache.nbytes() == cache.dense_nbytes()


HOOKABLE = [n for n in PRESSES if n != FULL and build_press(n, ratio=0.3).needs_words() is None]


@pytest.mark.parametrize("name", HOOKABLE)
def test_both_forms_agree_and_shrink(lm, prompt, name):
    """(Presses over whole words need the token ids, which the context manager cannot see: test_kv_words.)"""
    press = build_press(name, ratio=0.3)
    cache = press.cache(lm.model)
    a = greedy(lm.model, prompt, **with_cache(lm.model, cache), min_new_tokens=12)
    with press(lm.model):
        b = greedy(lm.model, prompt, min_new_tokens=12)
    assert torch.equal(a, b)
    assert a.shape[1] == N + 12
    assert cache.nbytes() < 0.5 * cache.dense_nbytes()


def expected_keep(scores, kv_heads, keep, window):
    """Top-``keep`` per KV head of group-mean scores, the last ``window`` tokens forced."""
    b, heads, n = scores.shape
    s = scores.view(b, kv_heads, heads // kv_heads, n).mean(2).clone()
    s[..., n - window:] = float("inf")
    return s.topk(keep, dim=-1).indices.sort(dim=-1).values


@pytest.mark.parametrize("press_cls", [SnapKV, H2O, StreamingLLM, PyramidKV])
def test_eviction_keeps_exactly_the_top_scored_tokens(lm, prompt, press_cls):
    press = press_cls(ratio=0.25)
    cache = compressed(lm.model, press, prompt)
    dense, maps = reference_layers(lm.model, prompt)
    kv_heads = dense[0][0].shape[1]
    counts = press.keep_counts(N, len(dense))
    window = press.effective_window(N)
    for i, ((keys, values), attn, keep) in enumerate(zip(dense, maps, counts)):
        if press_cls is StreamingLLM:
            idx = torch.cat([torch.arange(4), torch.arange(N - keep + 4, N)]).expand(1, kv_heads, -1)
        else:
            if press_cls is H2O:
                scores = attn.sum(dim=2)  # every query row
            else:
                scores = torch.nn.functional.avg_pool1d(
                    attn[:, :, -window:].sum(dim=2).view(-1, 1, N), 5, 1, 2).view(1, -1, N)
            idx = expected_keep(scores, kv_heads, keep, window)
        store = cache.layers[i].store
        assert isinstance(store, DenseStore) and len(store) == keep
        gather = idx[..., None].expand(-1, -1, -1, keys.shape[-1])
        torch.testing.assert_close(store.keys, keys.gather(2, gather), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(store.values, values.gather(2, gather), atol=1e-5, rtol=1e-5)


def test_pyramid_budget_per_layer(tiny_lm, prompt):
    cache = compressed(tiny_lm.model, PyramidKV(ratio=0.3), prompt)
    kept = [len(layer.store) for layer in cache.layers]
    assert kept == pyramid_keep(N, math.floor(0.3 * N) / N, len(kept), 32)
    assert kept[0] > kept[-1] and sum(kept) == math.floor(0.3 * N) * len(kept)


@pytest.mark.parametrize("press,options,needle", [
    (SpindleKV, {"per_head": "maybe"}, "per_head must be true or false"),
    (SpindleKV, {"evict": 0}, "evict must be true or false"),
    (SpindleKV, {"encode_every": 0}, "encode_every"),
    (SpindleKV, {"window": 1.5}, "window must be an integer"),
    (SnapKV, {"window": 0}, "observation window"),
    (SnapKV, {"window": "abc"}, "window must be an integer"),
    (SnapKV, {"kernel": 0}, "kernel"),
    (SnapKV, {"normalize": "bogus"}, "normalize must be one of"),
    (PyramidKV, {"beta": -1.0}, "beta"),
    (PyramidKV, {"beta": 2}, "beta"),
    (StreamingLLM, {"sinks": -1}, "sinks"),
    (H2O, {"window": -5}, "window"),
    (KVPress, {"tokens": 2.5}, "tokens must be an integer"),
    (KVPress, {"tokens": True}, "tokens must be an integer"),
    (KVPress, {"ratio": True}, "ratio must be a number"),
    # codebook-only SpindleKV still checks every inherited option
    (SpindleKV, {"evict": False, "normalize": "bogus"}, "normalize must be one of"),
    (SpindleKV, {"evict": False, "window": -1}, "window"),
    (SpindleKV, {"evict": False, "beta": 3.0}, "beta"),
])
def test_press_options_are_checked_before_any_work(press, options, needle):
    budget = {"ratio": 0.3} if press.takes_budget(options) else {}
    with pytest.raises(InputError, match=needle):
        press(**budget, **options)


def test_a_press_subclass_may_have_options_of_other_types():
    from dataclasses import dataclass

    @dataclass
    class Tuned(SnapKV):
        layers_to_skip: tuple[int, ...] = (0,)

    assert Tuned(ratio=0.3, layers_to_skip=(1, 2)).layers_to_skip == (1, 2)
    with pytest.raises(InputError, match="window must be an integer"):
        Tuned(ratio=0.3, window="wide")


def test_pyramid_budget_keeps_a_token_in_every_layer():
    assert min(pyramid_keep(3, 0.001, 30, 0)) == 1 and min(pyramid_keep(9, 1 / 9, 30, 0)) == 1


@pytest.mark.parametrize("press", [SnapKV(ratio=0.001), SpindleKV(ratio=0.001)], ids=["snapkv", "spindlekv"])
def test_a_ratio_below_one_token_is_refused(tiny_lm, prompt, press):
    # one token per layer is the least a cache can hold; a smaller budget is an error, not exceeded silently
    with pytest.raises(InputError, match="smallest"):
        compressed(tiny_lm.model, press, prompt)


def test_beam_search_with_a_compressed_cache(tiny_lm, prompt):
    kw = dict(max_new_tokens=4, num_beams=2, do_sample=False, pad_token_id=0)
    plain = tiny_lm.model.generate(prompt, **kw)
    kept_all = tiny_lm.model.generate(prompt, **with_cache(tiny_lm.model, SnapKV(ratio=1.0).cache(tiny_lm.model)), **kw)
    assert torch.equal(plain, kept_all)  # nothing evicted: beams reorder the cache exactly as a dense one
    with SnapKV(ratio=0.3)(tiny_lm.model):
        assert tiny_lm.model.generate(prompt, **kw).shape == plain.shape
    with pytest.raises(InputError, match="one prompt at a time"):
        tiny_lm.model.generate(prompt, **with_cache(tiny_lm.model, SpindleKV(ratio=0.3).cache(tiny_lm.model)), **kw)


def test_a_request_too_long_for_the_model_fails_before_any_prefill(tiny_lm, monkeypatch):
    from ctxpress.kv import generation

    def no_prefill(*args, **kwargs):
        raise AssertionError("prefilled a request that cannot fit")

    monkeypatch.setattr(generation, "CompressedContext", no_prefill)
    with pytest.raises(InputError, match="the model handles 1024"):
        generation.answer_questions(tiny_lm, "a short context", ["Why?", "How?"], "snapkv", ratio=0.5,
                                    max_new_tokens=1020)


def test_attended_tokens_are_the_tokens_each_head_sees(tiny_lm, prompt):
    assert compressed(tiny_lm.model, KVPress(), prompt).attended_tokens() == N
    assert compressed(tiny_lm.model, SnapKV(ratio=0.3), prompt).attended_tokens() == math.floor(0.3 * N)
    budget = math.floor(0.3 * N)
    pyramid = compressed(tiny_lm.model, SpindleKV(tokens=budget, per_head=False, codebook=False), prompt)
    layers = len(pyramid.layers)
    assert pyramid.attended_tokens() == pytest.approx(sum(pyramid_keep(N, budget / N, layers, 32)) / layers)
    # per query head, with the same token budget: every head sees at least its layer's count
    spindle = compressed(tiny_lm.model, SpindleKV(tokens=budget, codebook=False), prompt)
    assert spindle.attended_tokens() >= pyramid.attended_tokens()
    with torch.no_grad():  # a decoded token is seen by every head
        tiny_lm.model(prompt[:, -1:], **with_cache(tiny_lm.model, spindle))
    assert spindle.attended_tokens() >= pyramid.attended_tokens() + 1


@pytest.mark.parametrize("r", [0.5, 0.2, 0.1])
def test_pyramid_schedule_matches_spec(r):
    n, window, layers = 1000, 32, 30
    kept = pyramid_keep(n, r, layers, window)
    r_c = (r * n - window) / (n - window)
    first, last = (2 * r_c - 0.05, 0.05) if r_c <= 0.525 else (1, 2 * r_c - 1)
    assert kept[0] == window + round(first * (n - window))
    assert abs(kept[-1] - (window + last * (n - window))) <= 1
    assert sum(kept) == round(r * n) * layers


def test_copy_serves_several_questions(tiny_lm, prompt):
    cache = compressed(tiny_lm.model, SpindleKV(ratio=0.3), prompt)
    size = cache.nbytes()
    q1, q2 = torch.randint(0, 300, (1, 6)), torch.randint(0, 300, (1, 9))
    first = greedy(tiny_lm.model, torch.cat([prompt, q1], 1), **with_cache(tiny_lm.model, cache.copy()))
    again = greedy(tiny_lm.model, torch.cat([prompt, q1], 1), **with_cache(tiny_lm.model, cache.copy()))
    greedy(tiny_lm.model, torch.cat([prompt, q2], 1), **with_cache(tiny_lm.model, cache.copy()))
    assert torch.equal(first, again)
    assert cache.nbytes() == size and cache.get_seq_length() == N


@pytest.mark.parametrize("press", [PyramidKV(ratio=0.3), SpindleKV(ratio=0.3, codebook=False),
                                   SpindleKV(ratio=0.3, dense_fallback=False)], ids=["pyramidkv", "heads", "coded"])
def test_question_after_compression_is_causal(tiny_lm, prompt, press):
    """A multi-token question over a compressed cache equals feeding it token by token."""
    q = torch.randint(0, 300, (1, 7))
    a = compressed(tiny_lm.model, press, prompt)
    b = a.copy()
    with torch.no_grad():
        together = tiny_lm.model(q, **with_cache(tiny_lm.model, a)).logits
        single = torch.cat([tiny_lm.model(q[:, i:i + 1], **with_cache(tiny_lm.model, b)).logits for i in range(7)], 1)
    torch.testing.assert_close(together, single, atol=1e-4, rtol=1e-4)


def test_batch_of_equal_prompts_and_padding_error(tiny_lm):
    torch.manual_seed(2)
    ids = torch.randint(1, 300, (2, 80))
    out = greedy(tiny_lm.model, ids, **with_cache(tiny_lm.model, SnapKV(ratio=0.5).cache(tiny_lm.model)))
    assert out.shape == (2, 92)
    with pytest.raises(InputError, match="batch size 1"):
        greedy(tiny_lm.model, ids, **with_cache(tiny_lm.model, SpindleKV(ratio=0.5).cache(tiny_lm.model)))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    with pytest.raises(InputError, match="unpadded"):
        cache = SnapKV(ratio=0.5).cache(tiny_lm.model)
        greedy(tiny_lm.model, ids, attention_mask=mask, **with_cache(tiny_lm.model, cache))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision(tokenizer, dtype):
    from conftest import make_model

    model = make_model(len(tokenizer), kv_heads=2).to(dtype)
    ids = torch.randint(1, 300, (1, 100))
    for press in (SnapKV(ratio=0.3), SpindleKV(ratio=0.3)):
        cache = press.cache(model)
        out = greedy(model, ids, **with_cache(model, cache))
        assert out.shape == (1, 112)
        room = ROOM if isinstance(press, SpindleKV) else 0  # dense parts reserve room for new tokens
        assert cache.nbytes() <= 0.3 * cache.dense_nbytes() + (12 + room) * cache.dense_nbytes() / 112 + 1


@pytest.mark.parametrize(
    "name,options,match",
    [
        ("snapkv", {}, "needs a budget"),
        ("snapkv", {"ratio": 1.5}, "ratio"),
        ("snapkv", {"ratio": 0.5, "tokens": 3}, "not both"),
        ("h2o", {"tokens": 0}, "tokens"),
        ("spindlekv", {"evict": False, "ratio": 0.2}, "no ratio"),
        ("spindlekv", {"ratio": 0.2, "theta_k": 2}, "theta_k"),
        ("snapkv", {"ratio": 0.2, "colour": "red"}, "colour"),
        ("lzw", {}, "unknown KV method"),
    ],
)
def test_bad_press_options(name, options, match):
    with pytest.raises(InputError, match=match):
        build_press(name, **options)


def test_positions_survive_eviction(tiny_lm, prompt):
    """Question tokens after eviction see exactly what a dense model sees when the
    evicted tokens are masked out: kept keys keep their original positions and new
    tokens continue from the full prompt length."""
    model = tiny_lm.model
    keep = 40
    cache = compressed(model, StreamingLLM(tokens=keep), prompt)  # same kept set in every layer
    question = torch.randint(1, 300, (1, 6))
    with torch.no_grad():
        got = model(question, **with_cache(model, cache)).logits
        full = torch.cat([prompt, question], dim=1)
        total = full.shape[1]
        visible = torch.ones(total, total, dtype=torch.bool).tril()
        kept = torch.zeros(N, dtype=torch.bool)
        kept[:4] = True
        kept[N - (keep - 4):] = True
        visible[N:, :N] &= kept  # question rows see only the kept context tokens
        mask = torch.where(visible, 0.0, float("-inf"))[None, None]
        want = model(full, attention_mask=mask).logits[:, N:]
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    # the same with positions restarted after the kept tokens differs: positions matter
    with torch.no_grad():
        short = torch.cat([prompt[:, kept], question], dim=1)
        assert not torch.allclose(model(short).logits[:, keep:], want, atol=1e-3)


@pytest.mark.parametrize("arch", ["mistral", "qwen2"])
def test_other_llama_family_decoders(arch):
    """Mistral (sliding-window config) and Qwen2 (attention biases) work unchanged."""
    from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    config_cls, model_cls = {"mistral": (MistralConfig, MistralForCausalLM),
                             "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[arch]
    torch.manual_seed(0)
    config = config_cls(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    model = model_cls(config).eval()
    ids = torch.randint(1, 300, (1, 120))
    plain = greedy(model, ids)
    assert torch.equal(greedy(model, ids, **with_cache(model, KVPress().cache(model))), plain)
    for press in (SnapKV(ratio=0.3), SpindleKV(ratio=0.3)):
        cache = compressed(model, press, ids[:, :-1])
        assert cache.nbytes() <= 0.3 * cache.dense_nbytes()
        out = greedy(model, ids, **with_cache(model, cache), min_new_tokens=12)
        assert out.shape == (1, 132)


def test_press_with_budget_defaults_and_refusals():
    assert press_with_budget("snapkv").ratio == DEFAULT_RATIO
    assert press_with_budget("snapkv", tokens=64).tokens == 64 and press_with_budget("snapkv", tokens=64).ratio is None
    assert press_with_budget("h2o", options={"ratio": 0.4}).ratio == 0.4
    codebook_only = press_with_budget("spindlekv", options={"evict": False})
    assert codebook_only.ratio is None and codebook_only.evict is False
    for name, kwargs, match in [(FULL, {"ratio": 0.5}, "takes no budget"),
                                ("spindlekv", {"tokens": 9, "options": {"evict": False}}, "with evict=false"),
                                ("snapkv", {"ratio": 0.5, "options": {"ratio": 0.3}}, "given twice")]:
        with pytest.raises(InputError, match=match):
            press_with_budget(name, **kwargs)


@pytest.mark.parametrize("template", [None, "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                                            "<|im_end|>\n{% endfor %}<|im_start|>assistant\n"])
def test_prompt_parts_depend_only_on_their_own_text(template):
    from ctxpress.chat import prompt_ids, question_ids

    from conftest import make_tokenizer

    tok = make_tokenizer()
    tok.chat_template = template
    first, second = prompt_ids(tok, "A context about lighthouses.", "Who built it?")
    assert torch.equal(second, question_ids(tok, "Who built it?"))  # questions are tokenized without the context
    assert torch.equal(first, prompt_ids(tok, "A context about lighthouses.", "Something else?")[0])
    assert not torch.equal(second, question_ids(tok, "Who paid for it?"))
