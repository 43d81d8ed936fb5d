"""KV-cache compression on tiny random models (GQA and plain multi-head)."""

import math

import numpy as np
import pytest
import torch
from transformers import DynamicCache

from ctxpress.attention import bottom_right_attention
from ctxpress.compat import with_cache
from ctxpress.errors import InputError
from ctxpress.kv import (
    DEFAULT_RATIO,
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
from ctxpress.kv import codebook as cb
from ctxpress.kv.budget import pyramid_keep
from ctxpress.kv.rope import deinterleave, rotary_module
from ctxpress.kv.spindle import _LayerPlan
from ctxpress.kv.store import ROOM, CodedColumns, CodedKeys, DenseColumns, DenseStore, HeadwiseStore

N = 160  # prompt tokens


@pytest.fixture(params=["tiny_lm", "tiny_mha_lm"])
def lm(request):
    return request.getfixturevalue(request.param)


@pytest.fixture
def prompt(lm):
    torch.manual_seed(0)
    return torch.randint(1, len(lm.tokenizer), (1, N))  # 0 is the pad id


def greedy(model, ids, **kw):
    kw = {"max_new_tokens": 12, **kw}
    return model.generate(ids, do_sample=False, pad_token_id=0, **kw)


def compressed(model, press, ids):
    cache = press.cache(model)
    with torch.no_grad():
        model(ids, **with_cache(model, cache))
    return cache


def test_full_matches_plain_generate(lm, prompt):
    plain = greedy(lm.model, prompt)
    cache = KVPress().cache(lm.model)
    assert torch.equal(greedy(lm.model, prompt, **with_cache(lm.model, cache)), plain)
    with KVPress()(lm.model):
        assert torch.equal(greedy(lm.model, prompt), plain)
    assert cache.nbytes() == cache.dense_nbytes()


@pytest.mark.parametrize("name", [n for n in PRESSES if n != "full"])
def test_both_forms_agree_and_shrink(lm, prompt, name):
    press = build_press(name, ratio=0.3)
    cache = press.cache(lm.model)
    a = greedy(lm.model, prompt, **with_cache(lm.model, cache), min_new_tokens=12)
    with press(lm.model):
        b = greedy(lm.model, prompt, min_new_tokens=12)
    assert torch.equal(a, b)
    assert a.shape[1] == N + 12
    assert cache.nbytes() < 0.5 * cache.dense_nbytes()


def reference_layers(model, ids):
    """Dense keys/values and attention maps of a plain eager prefill."""
    from ctxpress.attention import attention_implementation

    cache = DynamicCache(config=model.config)
    with torch.no_grad(), attention_implementation(model, "eager"):
        out = model(ids, **with_cache(model, cache), output_attentions=True)
    return [(layer.keys, layer.values) for layer in cache.layers], out.attentions


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


def test_compression_outside_no_grad_keeps_no_graph(tiny_lm, prompt):
    cache = SpindleKV(ratio=0.3, dense_fallback=False, encode_every=2).cache(tiny_lm.model)
    tiny_lm.model(prompt[:, :-3], **with_cache(tiny_lm.model, cache))  # gradients on, as in a plain forward call
    for t in range(3):  # decoding encodes new tokens too
        tiny_lm.model(prompt[:, -3 + t :][:, :1], **with_cache(tiny_lm.model, cache))
    stores = [layer.store for layer in cache.layers]
    assert all(len(store.keys.index[0]) > len(store.visible[0]) - 2 for store in stores)  # a tail was encoded
    tensors = [t for store in stores for part in (store.keys, store.values) for t in vars(part).values()
               if isinstance(t, torch.Tensor)]
    assert tensors and not any(t.requires_grad for t in tensors)


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
])
def test_press_options_are_checked_before_any_work(press, options, needle):
    budget = {} if press is KVPress else {"ratio": 0.3}
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


def test_spindlekv_compresses_a_few_tokens(tiny_lm, prompt):
    for length in (2, 3, 5):
        cache = compressed(tiny_lm.model, SpindleKV(tokens=1), prompt[:, :length])
        assert all(len(layer.store) >= 1 for layer in cache.layers)
        with torch.no_grad():
            tiny_lm.model(prompt[:, length : length + 1], **with_cache(tiny_lm.model, cache))


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


def test_codebook_reconstructs_within_threshold_and_merges_copies():
    torch.manual_seed(0)
    base = torch.randn(40, 16)
    near = base[:10] + 0.01 * torch.randn(10, 16)  # almost the same directions
    vectors = torch.cat([base, base[:5].clone(), near * 3.0])  # exact copies and scaled near-copies
    book = cb.build(vectors, 0.98)
    rebuilt = book.decode()
    cos = torch.nn.functional.cosine_similarity(rebuilt, vectors, dim=-1)
    assert torch.all(cos > 0.98 - 1e-6)
    torch.testing.assert_close(rebuilt.norm(dim=-1), vectors.norm(dim=-1))
    assert torch.equal(book.index[40:45], book.index[:5])  # exact copies share one entry
    assert book.entries.shape[0] <= 40  # copies and near-copies add no entries


def test_greedy_cover_takes_highest_degree_first():
    # star: node 2 is similar to all others, who are not similar to each other
    exemplars, assign = cb.greedy_cover(5, np.array([0, 1, 2, 2]), np.array([2, 2, 3, 4]))
    assert exemplars.tolist() == [2] and assign.tolist() == [0] * 5
    # a path 0-1-2 (1 has the most neighbours), then pairs in order of their lower node, then a single
    exemplars, assign = cb.greedy_cover(8, np.array([6, 1, 4, 1]), np.array([5, 0, 3, 2]))
    assert exemplars.tolist() == [1, 3, 5, 7] and assign.tolist() == [0, 0, 0, 1, 1, 2, 2, 3]


def dense_algorithm_1(vectors: torch.Tensor, theta: float) -> tuple[list[int], list[int]]:
    """The paper's Algorithm 1, literally, on the full N x N graph (reference only)."""
    units = torch.nn.functional.normalize(vectors.double(), dim=-1)
    return dense_greedy((units @ units.T) > theta)


def dense_greedy(graph: torch.Tensor) -> tuple[list[int], list[int]]:
    """Algorithm 1's cover of a boolean adjacency matrix: one highest-degree pick at a time."""
    graph = graph.clone()
    graph.fill_diagonal_(True)
    exemplars, assign = [], [-1] * len(graph)
    while graph.any():
        best = int(graph.sum(dim=1).argmax())
        members = torch.nonzero(graph[best]).flatten()
        for m in members.tolist():
            assign[m] = len(exemplars)
        exemplars.append(best)
        graph[members, :] = False
        graph[:, members] = False
    return exemplars, assign


@pytest.mark.parametrize("seed", range(4))
def test_greedy_cover_equals_one_pick_at_a_time(seed):
    # small random graphs have many degree ties, several picks per degree level and leftover pairs
    rng = np.random.default_rng(seed)
    n = 60
    graph = torch.from_numpy(rng.random((n, n)) < 0.06)
    graph = torch.triu(graph, diagonal=1)
    rows, cols = (t.numpy() for t in torch.nonzero(graph, as_tuple=True))
    exemplars, assign = cb.greedy_cover(n, rows, cols)
    expected_exemplars, expected_assign = dense_greedy(graph | graph.T)
    assert exemplars.tolist() == expected_exemplars and assign.tolist() == expected_assign


@pytest.mark.parametrize("banded", [False, True], ids=["tiles", "banded"])
@pytest.mark.parametrize("theta", [0.9, 0.98])
def test_codebook_build_equals_the_dense_algorithm(theta, banded, monkeypatch):
    if banded:  # small sets skip the pruning by projection: force it, with several tiles
        monkeypatch.setattr(cb, "BANDED_FROM", 0)
        monkeypatch.setattr(cb, "BANDED_TILE", 32)
    else:
        monkeypatch.setattr(cb, "TILE", 64)
    torch.manual_seed(3)
    centres = torch.randn(12, 16, dtype=torch.float64)
    vectors = centres[torch.randint(0, 12, (300,))] + 0.15 * torch.randn(300, 16, dtype=torch.float64)
    book = cb.build(vectors, theta)
    exemplars, assign = dense_algorithm_1(vectors, theta)
    # the same cover, up to the order of the single-vector entries
    groups = {frozenset(torch.nonzero(book.index == e).flatten().tolist()) for e in range(len(book.entries))}
    expected = {frozenset(i for i, a in enumerate(assign) if a == e) for e in range(len(exemplars))}
    assert groups == expected
    assert 12 <= len(book.entries) < 300


def stored_tensor_bytes(obj, seen=None) -> int:
    """All tensor bytes reachable from a store (not through modules such as the rotary embedding)."""
    seen = set() if seen is None else seen
    if id(obj) in seen or isinstance(obj, torch.nn.Module):
        return 0
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    items = obj if isinstance(obj, (list, tuple)) else vars(obj).values() if hasattr(obj, "__dict__") else []
    return sum(stored_tensor_bytes(v, seen) for v in items)


@pytest.mark.parametrize("options", [{}, {"per_head": False}, {"codebook": False}, {"tokens": 40}])
def test_spindlekv_bytes_and_reconstruction(tiny_lm, prompt, options):
    ratio = None if "tokens" in options else 0.3
    # random weights give dissimilar vectors, where the codebook would not pay: force it
    press = SpindleKV(ratio=ratio, dense_fallback=False, **options)
    cache = compressed(tiny_lm.model, press, prompt)
    held = sum(stored_tensor_bytes(layer.store) for layer in cache.layers)
    assert cache.nbytes() == held  # nbytes counts exactly the tensors held
    if ratio is not None:
        assert cache.nbytes() <= ratio * cache.dense_nbytes()
        assert cache.nbytes() >= 0.8 * ratio * cache.dense_nbytes()  # calibration uses the budget
    dense, _ = reference_layers(tiny_lm.model, prompt)
    heads = tiny_lm.model.config.num_attention_heads
    for layer, (keys, values) in zip(cache.layers, dense):
        store = layer.store
        assert isinstance(store, HeadwiseStore)
        coded = options.get("codebook", True)
        assert isinstance(store.keys, CodedKeys if coded else DenseColumns)
        selectors = heads if options.get("per_head", True) else keys.shape[1]
        assert store.visible.shape[0] == selectors
        # the heads of a group keep their top tokens up to one bound: as many, or one more
        kept = store.visible.sum(dim=1).view(keys.shape[1], -1)
        assert int((kept.amax(dim=1) - kept.amin(dim=1)).max()) <= 1 and int(kept.max()) < N
        k, v = store.materialize()
        if store.interleaved:  # coded keys come back in the interleaved RoPE layout
            k = deinterleave(k)
        groups = selectors // keys.shape[1]
        for s in range(selectors):
            g = s // groups
            seen = store.visible[s]
            k_s, v_s = k[0, g, seen], v[0, g, seen]
            if coded:  # every kept vector is within its threshold of the original at its position
                pos = store.keys.positions[g, seen].long()
                cos_k = torch.nn.functional.cosine_similarity(k_s, keys[0, g, pos], dim=-1)
                cos_v = torch.nn.functional.cosine_similarity(v_s, values[0, g, pos], dim=-1)
                assert torch.all(cos_k > 0.98 - 1e-4) and torch.all(cos_v > 0.95 - 1e-4)
                torch.testing.assert_close(k_s.norm(dim=-1), keys[0, g, pos].norm(dim=-1))
            else:  # dense rows are the original vectors (up to the eager/SDPA difference)
                gap = (k_s[:, None] - keys[0, g][None]).abs().amax(dim=-1).min(dim=1).values
                assert bool((gap < 1e-4).all())


@pytest.mark.parametrize("fallback", [True, False])
def test_spindlekv_plans_count_the_bytes_stores_hold(tiny_lm, prompt, fallback):
    """Calibration relies on predicted sizes: they must equal what a store of that size holds."""
    checked = []

    class Checked(SpindleKV):
        def compress(self, state):
            rotary = rotary_module(state.model)
            for layer in state.layers:
                plan = _LayerPlan(layer, self, self.effective_window(N), rotary)
                plan.prepare(N)
                for keep in (3, N // 3, N - 5, N):
                    checked.append((plan.nbytes(keep), plan.store(keep).nbytes()))
            super().compress(state)

    compressed(tiny_lm.model, Checked(ratio=0.3, dense_fallback=fallback), prompt)
    predicted, held = zip(*checked)
    assert len(checked) == 4 * tiny_lm.model.config.num_hidden_layers
    assert predicted == held and len(set(held)) > 4


def test_codebook_used_only_where_it_saves_bytes(tokenizer, prompt):
    from conftest import make_model

    model = make_model(len(tokenizer), kv_heads=2)
    with torch.no_grad():  # layer 0's keys all point the same way: its key codebook collapses
        model.model.layers[0].self_attn.k_proj.weight[:] = model.model.layers[0].self_attn.k_proj.weight[:1]
    cache = compressed(model, SpindleKV(ratio=0.3), prompt)
    first, last = cache.layers[0].store, cache.layers[-1].store
    assert isinstance(first.keys, CodedKeys) and len(first.keys.entries) <= 4
    assert isinstance(last.keys, DenseColumns) and isinstance(last.values, DenseColumns)
    forced = compressed(model, SpindleKV(ratio=0.3, dense_fallback=False), prompt)
    assert isinstance(forced.layers[-1].store.keys, CodedKeys)
    assert cache.layers[-1].nbytes() <= forced.layers[-1].nbytes()


def test_min_saving_codes_only_parts_that_save_enough(tokenizer, prompt):
    from conftest import make_model

    model = make_model(len(tokenizer), kv_heads=2)
    with torch.no_grad():  # layer 0's keys all point the same way: its key codebook saves almost everything
        model.model.layers[0].self_attn.k_proj.weight[:] = model.model.layers[0].self_attn.k_proj.weight[:1]
    forced = compressed(model, SpindleKV(ratio=0.3, dense_fallback=False, min_saving=1.0), prompt)
    assert all(isinstance(layer.store.keys, CodedKeys) for layer in forced.layers)  # no fallback: the bar is moot
    coded = {}
    for bar in (0.0, 0.5, 1.0):
        cache = compressed(model, SpindleKV(ratio=0.3, min_saving=bar), prompt)
        assert cache.nbytes() <= 0.3 * cache.dense_nbytes()
        coded[bar] = [isinstance(layer.store.keys, CodedKeys) for layer in cache.layers]
    assert coded[0.5][0] and not any(coded[0.5][1:])  # only the collapsed layer saves half its bytes
    assert not any(coded[1.0])  # no codebook saves everything: all dense
    assert sum(coded[0.0]) >= sum(coded[0.5])
    with pytest.raises(InputError, match="min_saving"):
        SpindleKV(ratio=0.3, min_saving=1.5)


def test_spindlekv_per_head_selection_is_per_query_head(tiny_lm, prompt):
    cache = compressed(tiny_lm.model, SpindleKV(ratio=0.3, codebook=False), prompt)
    store = cache.layers[-1].store
    first, second = store.visible[0], store.visible[1]  # two query heads sharing KV head 0
    assert not torch.equal(first, second) and abs(int(first.sum()) - int(second.sum())) <= 1  # own choices
    both = first | second
    assert both.sum() < first.sum() + second.sum()  # tokens both keep are stored once
    # no column is wasted: every column of a group is seen by one of its heads
    assert all(bool((store.visible[2 * g] | store.visible[2 * g + 1]).all()) for g in range(2))
    assert len(store) == len(store.keys) == len(store.values)


def test_spindlekv_heads_see_their_own_top_tokens(lm, prompt):
    """Each query head sees exactly its best-scored tokens, at least its layer's budget
    (a narrower group's heads see a few more, in columns that would be padding)."""
    captured = {}

    class Captured(SpindleKV):
        def compress(self, state):
            layers = sorted(state.layers, key=lambda layer: layer.layer_idx)
            captured["scores"] = [layer.scores[0].clone() for layer in layers]
            super().compress(state)

        def _calibrate(self, plans, n):
            captured["keep"] = super()._calibrate(plans, n)
            return captured["keep"]

    press = Captured(ratio=0.3, dense_fallback=False)  # coded keys carry every column's position
    cache = compressed(lm.model, press, prompt)
    window = press.effective_window(N)
    for layer, scores, keep in zip(cache.layers, captured["scores"], captured["keep"], strict=True):
        store = layer.store
        scores[:, N - window :] = float("inf")  # the window is always kept
        group = scores.shape[0] // store.keys.index.shape[0]
        for s in range(scores.shape[0]):
            tokens = store.keys.positions[s // group, store.visible[s]].long()
            assert len(tokens) >= keep
            assert set(tokens.tolist()) == set(scores[s].topk(len(tokens)).indices.tolist())


def test_codebook_only_keeps_every_token(tiny_lm, prompt):
    cache = compressed(tiny_lm.model, SpindleKV(evict=False, dense_fallback=False), prompt)
    for layer in cache.layers:
        store = layer.store
        assert len(store) == N and isinstance(store.keys, CodedKeys) and isinstance(store.values, CodedColumns)
        positions = store.keys.positions.sort(dim=1).values  # every group holds every position once
        assert torch.equal(positions, torch.arange(N, dtype=positions.dtype).expand_as(positions))


def test_decode_growth_is_bounded(tiny_lm, prompt):
    for press in (SnapKV(ratio=0.3), SpindleKV(ratio=0.3), SpindleKV(ratio=0.3, codebook=False)):
        cache = compressed(tiny_lm.model, press, prompt[:, :-1])
        after_prefill, dense_prompt = cache.nbytes(), cache.dense_nbytes()
        out = greedy(tiny_lm.model, prompt, **with_cache(tiny_lm.model, cache), min_new_tokens=12)
        new = out.shape[1] - N
        # a new token costs at most its dense size plus, per layer and KV head, the
        # codebook's index and magnitude for K and V, its position and one mask
        # byte for each query head of the group; dense parts reserve room for ROOM tokens at a time
        layers, kv_heads = len(cache.layers), cache.layers[0].kv_heads
        group = tiny_lm.model.config.num_attention_heads // kv_heads
        meta = 2 * (4 + 4) + 4 + group
        per_token = dense_prompt / (N - 1) + layers * kv_heads * meta
        assert cache.get_seq_length() == N + new - 1  # the last token is never fed back
        room = ROOM if isinstance(press, SpindleKV) else 0
        assert cache.nbytes() <= after_prefill + (new + 1 + room) * per_token


def test_coded_columns_match_or_get_new_entries():
    torch.manual_seed(1)
    book = cb.build(torch.randn(8, 16), 0.95)
    tags = torch.zeros(len(book.entries), dtype=torch.int8)
    coded = CodedColumns(book.entries, tags, book.index[None].int(), book.magnitude[None], 0.95)
    index, _ = coded.encode(book.decode()[:2] * 2, torch.zeros(2, dtype=torch.long))
    assert index.tolist() == book.index[:2].tolist()  # same directions, same group: matched
    assert len(coded.entries) == len(book.entries)
    loose = torch.randn(3, 16)
    vectors = torch.cat([loose, book.decode()[:1]])
    index, magnitude = coded.encode(vectors, torch.tensor([0, 0, 0, 1]))
    # the loose rows of group 0 and the row of group 1 (whose codebook was empty) got entries
    assert len(coded.entries) > len(book.entries) and coded.entry_group.tolist().count(1) == 1
    assert coded.entry_group[index.long()].tolist() == [0, 0, 0, 1]
    rebuilt = coded.entries[index.long()] * magnitude[:, None]
    assert torch.all(torch.nn.functional.cosine_similarity(rebuilt, vectors, dim=-1) > 0.95)
    torch.testing.assert_close(rebuilt.norm(dim=-1), vectors.norm(dim=-1))


def test_dense_columns_fill_reserved_room_before_growing():
    torch.manual_seed(5)
    part = DenseColumns(torch.randn(2, 10, 8))
    expected = [part.materialize().clone()]
    buffers = []
    for step in range(ROOM + 2):
        new = torch.randn(2, 1, 8)
        part.append(new, 10 + step)
        expected.append(new)
        buffers.append(part.buffer.data_ptr())
        torch.testing.assert_close(part.materialize(), torch.cat(expected, dim=1), rtol=0, atol=0)
    # grown once for the first token (with ROOM to spare), again only when that room ran out
    assert len(set(buffers[: ROOM + 1])) == 1 and buffers[ROOM + 1] != buffers[ROOM]
    assert part.nbytes() == part.buffer.numel() * 4 and len(part) == 10 + ROOM + 2


@pytest.mark.parametrize("fallback", [True, False])
def test_decoded_tokens_wait_dense_then_encode(tiny_lm, prompt, fallback):
    press = SpindleKV(ratio=0.3, encode_every=4, dense_fallback=fallback)
    cache = compressed(tiny_lm.model, press, prompt[:, :-1])
    stores = [layer.store for layer in cache.layers]
    listed = [len(store) for store in stores]
    greedy(tiny_lm.model, prompt, **with_cache(tiny_lm.model, cache), min_new_tokens=6, max_new_tokens=6)
    # 6 tokens fed (the last prompt token and 5 generated): coded parts have encoded 4, 2 wait
    for store, before in zip(stores, listed):
        assert len(store) == before + 6 and bool(store.visible[:, -6:].all())  # every head sees every new token
        for part in (store.keys, store.values):
            assert len(part) == before + 6
            if isinstance(part, CodedColumns):
                assert part.tail.shape[1] == 2 and part.index.shape[1] == before + 4
    assert fallback or all(isinstance(store.keys, CodedColumns) for store in stores)  # random weights: all dense


def test_encoding_the_tail_keeps_each_token_at_its_position(tiny_lm, prompt):
    cache = compressed(tiny_lm.model, SpindleKV(ratio=0.3, encode_every=4, dense_fallback=False), prompt[:, :-3])
    with torch.no_grad():
        tiny_lm.model(prompt[:, -3:], **with_cache(tiny_lm.model, cache))  # three tokens wait in the tail
        for layer in cache.layers:
            assert layer.store.keys.tail.shape[1] == layer.store.values.tail.shape[1] == 3
        waiting = [layer.store.materialize() for layer in cache.layers]
        tiny_lm.model(torch.tensor([[7]]), **with_cache(tiny_lm.model, cache))  # the fourth: all four are encoded
    for layer, (k0, v0) in zip(cache.layers, waiting):
        assert layer.store.keys.tail.shape[1] == layer.store.values.tail.shape[1] == 0
        k1, v1 = layer.store.materialize()
        old_k, new_k = k0[0, :, -3:], k1[0, :, -4:-1]  # interleaved, post-RoPE: same layout before and after
        assert torch.all(torch.nn.functional.cosine_similarity(old_k, new_k, dim=-1) > 0.98 - 1e-4)
        assert torch.all(torch.nn.functional.cosine_similarity(v0[0, :, -3:], v1[0, :, -4:-1], dim=-1) > 0.95 - 1e-4)
        torch.testing.assert_close(old_k.norm(dim=-1), new_k.norm(dim=-1))
        # the new columns carry their sequence positions, in every group
        expected = torch.arange(N - 3, N + 1, dtype=torch.int32).expand(layer.store.keys.index.shape[0], 4)
        assert torch.equal(layer.store.keys.positions[:, -4:], expected)


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


def test_visible_mask_equals_attending_to_each_heads_own_tokens():
    torch.manual_seed(4)
    heads, kv_heads, columns, d = 6, 2, 20, 8
    query = torch.randn(1, heads, 3, d)
    key, value = torch.randn(1, kv_heads, columns, d), torch.randn(1, kv_heads, columns, d)
    visible = torch.rand(heads, columns) < 0.6
    visible[:, -3:] = True  # the three new tokens, seen by every head
    out = bottom_right_attention(query, key, value, 0.3, visible)
    for h in range(heads):
        g = h // (heads // kv_heads)
        own = torch.nonzero(visible[h]).flatten()  # this head's tokens, the new ones last
        k, v = key[0, g, own], value[0, g, own]
        weights = (query[0, h] @ k.T * 0.3).masked_fill(
            torch.arange(len(own))[None, :] > torch.arange(3)[:, None] + len(own) - 3, float("-inf")).softmax(-1)
        torch.testing.assert_close(out[0, :, h], weights @ v)


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
    for name, kwargs, match in [("full", {"ratio": 0.5}, "takes no budget"),
                                ("spindlekv", {"tokens": 9, "options": {"evict": False}}, "with evict=false"),
                                ("snapkv", {"ratio": 0.5, "options": {"ratio": 0.3}}, "given twice")]:
        with pytest.raises(InputError, match=match):
            press_with_budget(name, **kwargs)


@pytest.mark.parametrize("template", [None, "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                                            "<|im_end|>\n{% endfor %}<|im_start|>assistant\n"])
def test_prompt_parts_depend_only_on_their_own_text(template):
    from ctxpress.kv.generation import prompt_ids, question_ids

    from conftest import make_tokenizer

    tok = make_tokenizer()
    tok.chat_template = template
    first, second = prompt_ids(tok, "A context about lighthouses.", "Who built it?")
    assert torch.equal(second, question_ids(tok, "Who built it?"))  # questions are tokenized without the context
    assert torch.equal(first, prompt_ids(tok, "A context about lighthouses.", "Something else?")[0])
    assert not torch.equal(second, question_ids(tok, "Who paid for it?"))
