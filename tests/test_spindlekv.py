"""SpindleKV: per-head selection, byte calibration, codebooks and the coded store while decoding."""


import pytest
import torch

from ctxpress.compat import with_cache
from ctxpress.errors import InputError
from ctxpress.kv import (
    SnapKV,
    SpindleKV,
)
from ctxpress.kv.presses.spindle_plan import LayerPlan
from ctxpress.kv.rope import deinterleave, rotary_module
from ctxpress.kv.scores import pooled_ranks
from ctxpress.kv.stores import (
    ROOM,
    CodedColumns,
    CodedKeys,
    DenseColumns,
    DenseStore,
    HeadwiseStore,
    QuantizedColumns,
)

from conftest import N, compressed, greedy, reference_layers


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


def test_spindlekv_compresses_a_few_tokens(tiny_lm, prompt):
    for length in (2, 3, 5):
        cache = compressed(tiny_lm.model, SpindleKV(tokens=1), prompt[:, :length])
        assert all(len(layer.store) >= 1 for layer in cache.layers)
        with torch.no_grad():
            tiny_lm.model(prompt[:, length : length + 1], **with_cache(tiny_lm.model, cache))


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


@pytest.mark.parametrize("options", [{}, {"per_head": False}, {"codebook": False}, {"tokens": 40},
                                     {"adaptive": True}])
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
        # the heads of a group keep their top tokens up to one bound: as many, or one more (adaptive
        # budgets differ by head)
        kept = store.visible.sum(dim=1).view(keys.shape[1], -1)
        assert int(kept.max()) < N
        assert options.get("adaptive") or int((kept.amax(dim=1) - kept.amin(dim=1)).max()) <= 1
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


@pytest.mark.parametrize("options", [{"dense_fallback": True}, {"dense_fallback": False},
                                     {"bits": 8}, {"bits": 4, "codebook": False},
                                     {"bits": 4, "codebook": False, "head_masks": False}])
def test_spindlekv_plans_count_the_bytes_stores_hold(tiny_lm, prompt, options):
    """Calibration relies on predicted sizes: they must equal what a store of that size holds."""
    checked = []

    class Checked(SpindleKV):
        def compress(self, layers, model):
            rotary = rotary_module(model)
            for layer in layers:
                plan = LayerPlan(layer, self, self.effective_window(N), rotary)
                plan.prepare(N)
                for keep in (3, N // 3, N - 5, N):
                    checked.append((plan.nbytes(keep), plan.store(keep).nbytes()))
            super().compress(layers, model)

    compressed(tiny_lm.model, Checked(ratio=0.3, **options), prompt)
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


def test_without_head_masks_a_group_stores_its_heads_union_densely(tiny_lm, prompt):
    """head_masks=false: a group stores the union of its heads' choices (the plan's order) as plain
    vectors in prompt order, every head sees all of them, and no mask bytes are spent."""
    plans = []

    class Captured(SpindleKV):
        def calibrate(self, layer_plans, n):
            plans.extend(layer_plans)
            return super().calibrate(layer_plans, n)

    masked = compressed(tiny_lm.model, SpindleKV(ratio=0.3, codebook=False), prompt)
    cache = compressed(tiny_lm.model, Captured(ratio=0.3, codebook=False, head_masks=False), prompt)
    assert cache.nbytes() == sum(stored_tensor_bytes(layer.store) for layer in cache.layers)
    assert 0.8 * 0.3 * cache.dense_nbytes() <= cache.nbytes() <= 0.3 * cache.dense_nbytes()
    # no mask bytes: never fewer columns than with masks (on this tiny model, often the same)
    assert all(len(a.store) >= len(b.store) for a, b in zip(cache.layers, masked.layers))
    dense, _ = reference_layers(tiny_lm.model, prompt)
    for layer, plan, (keys, values) in zip(cache.layers, plans, dense, strict=True):
        store = layer.store
        assert isinstance(store, DenseStore)
        for g in range(keys.shape[1]):
            tokens = plan.order[g, : len(store)].sort().values
            torch.testing.assert_close(store.keys[0, g], keys[0, g, tokens], atol=1e-4, rtol=0)
            torch.testing.assert_close(store.values[0, g], values[0, g, tokens], atol=1e-4, rtol=0)
    with pytest.raises(InputError, match="codebook=false"):
        SpindleKV(ratio=0.3, head_masks=False).validate()


def test_spindlekv_heads_see_their_own_top_tokens(lm, prompt):
    """Each query head sees exactly its best-scored tokens, at least its layer's budget
    (a narrower group's heads see a few more, in columns that would be padding)."""
    captured = {}

    class Captured(SpindleKV):
        def compress(self, layers, model):
            captured["scores"] = [layer.scores[0].clone() for layer in layers]
            super().compress(layers, model)

        def calibrate(self, plans, n):
            captured["keep"] = super().calibrate(plans, n)
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


def test_adaptive_budgets_give_heads_the_best_pairs_of_their_layer(tiny_lm, prompt):
    """adaptive=true: every (head, token) pair among the layer's best keep x heads is seen, the pairs seen
    in a group are its best by score, and heads of one group keep different numbers of tokens."""
    captured = []

    class Captured(SpindleKV):
        def calibrate(self, plans, n):
            counts = super().calibrate(plans, n)
            captured.extend(zip(plans, counts, [plan.layer.scores[0].clone() for plan in plans]))
            return counts

    press = Captured(ratio=0.3, codebook=False, adaptive=True)
    cache = compressed(tiny_lm.model, press, prompt)
    assert cache.nbytes() == sum(stored_tensor_bytes(layer.store) for layer in cache.layers)
    assert 0.8 * 0.3 * cache.dense_nbytes() <= cache.nbytes() <= 0.3 * cache.dense_nbytes()
    window = press.effective_window(N)
    dense, _ = reference_layers(tiny_lm.model, prompt)
    uneven = False
    for layer, (plan, keep, scores), (keys, _values) in zip(cache.layers, captured, dense, strict=True):
        store = layer.store
        k, _ = store.materialize()
        heads, group = scores.shape[0], scores.shape[0] // k.shape[1]
        seen = torch.zeros(heads, N, dtype=torch.bool)
        for g in range(k.shape[1]):
            # the prompt position of every stored column, found back by its key
            positions = (k[0, g][:, None] - keys[0, g][None]).abs().amax(dim=-1).argmin(dim=1)
            for h in range(g * group, (g + 1) * group):
                seen[h, positions[store.visible[h]]] = True
            counts = seen[g * group : (g + 1) * group].sum(dim=1)
            uneven |= bool(counts.max() - counts.min() > 1)  # equal budgets differ by one at most
        assert bool(seen[plan.rank < keep * heads].all())  # the layer's best pairs, whichever head
        scores[:, N - window :] = float("inf")
        for g in range(k.shape[1]):
            pairs, kept = scores[g * group : (g + 1) * group], seen[g * group : (g + 1) * group]
            assert float(pairs[~kept].max()) <= float(pairs[kept].min())
    assert uneven


def test_pooled_ranks_order_pairs_across_heads_and_share_ties_token_by_token():
    primary = torch.tensor([[5.0, 1.0, 3.0, float("inf")], [2.0, 4.0, 3.0, float("inf")]])
    secondary = torch.tensor([[4.0, 1.0, 2.0, 9.0], [1.0, 3.0, 2.0, 9.0]])
    ranks = pooled_ranks(primary, secondary)
    # inf pairs first (token 3, head 0 then head 1), then 5, 4, the two 3s by secondary (equal: by token
    # then head), 2, 1
    assert ranks.tolist() == [[2, 7, 4, 0], [6, 3, 5, 1]]
    shuffled = pooled_ranks(torch.rand(3, 50), torch.rand(3, 50))
    assert sorted(shuffled.flatten().tolist()) == list(range(150))


def test_adaptive_budgets_over_kv_groups_are_not_plain_pyramidkv(tiny_lm, prompt):
    cache = compressed(tiny_lm.model, SpindleKV(ratio=0.3, codebook=False, per_head=False, adaptive=True), prompt)
    assert all(isinstance(layer.store, HeadwiseStore) for layer in cache.layers)
    assert cache.nbytes() <= 0.3 * cache.dense_nbytes()
    with pytest.raises(InputError, match="adaptive=false"):
        SpindleKV(ratio=0.3, codebook=False, per_head=False, adaptive=True, rest_bits=4).validate()


@pytest.mark.parametrize("options", [{"codebook": False}, {"codebook": False, "adaptive": True},
                                     {"dense_fallback": True}])
def test_low_bit_columns_keep_more_tokens_in_the_same_bytes(tiny_lm, prompt, options):
    """bits: the vectors a layer keeps are stored in 8 bits, so the calibration fits more of them;
    each stored column is its token's vector up to the quantization step, and decoding goes on."""
    plain = compressed(tiny_lm.model, SpindleKV(ratio=0.3, **options), prompt)
    cache = compressed(tiny_lm.model, SpindleKV(ratio=0.3, bits=8, group=16, **options), prompt)
    assert cache.nbytes() == sum(stored_tensor_bytes(layer.store) for layer in cache.layers)
    assert 0.8 * 0.3 * cache.dense_nbytes() <= cache.nbytes() <= 0.3 * cache.dense_nbytes()
    seen = [layer.store.attended_tokens() for layer in cache.layers]
    assert sum(seen) > 1.5 * sum(layer.store.attended_tokens() for layer in plain.layers)
    dense, _ = reference_layers(tiny_lm.model, prompt)
    for layer, (keys, values) in zip(cache.layers, dense):
        store = layer.store
        assert isinstance(store.values, QuantizedColumns) and store.values.bits == 8
        if isinstance(store.keys, CodedKeys):  # the codebook won on keys: its entries stay as they were
            continue
        assert isinstance(store.keys, QuantizedColumns)
        k, v = store.materialize()
        for got, want in ((k, keys), (v, values)):  # each column is within a step of some original token
            step = 2 * float(want.abs().amax()) / 255
            gap = (got[0, :, :, None] - want[0, :, None]).abs().amax(dim=-1).amin(dim=-1)
            assert float(gap.max()) <= step + 1e-4
    press = SpindleKV(ratio=0.3, bits=8, group=16, **options)
    cache = compressed(tiny_lm.model, press, prompt[:, :-1])
    stored = [len(layer.store) for layer in cache.layers]
    out = greedy(tiny_lm.model, prompt, **with_cache(tiny_lm.model, cache), max_new_tokens=20, min_new_tokens=20)
    assert out.shape[1] == N + 20  # 20 columns added: one group of 16 quantized, 4 waiting
    assert [len(layer.store) for layer in cache.layers] == [s + 20 for s in stored]
    assert all(len(layer.store.values.chunks) == 2 and len(layer.store.values.tail) == 4 for layer in cache.layers)


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
