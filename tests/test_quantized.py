"""The quantized KV cache: exact bytes, reconstruction within half a step, decoding through the tail."""

import pytest
import torch

from ctxpress.compat import with_cache
from ctxpress.errors import InputError
from ctxpress.kv import PRESSES, QuantizedKV, build_press, press_with_budget
from ctxpress.kv.stores.quantized import Quantized, QuantizedColumns, QuantizedStore, _pack, _unpack
from ctxpress.kv.stores.tiered import TieredStore

from conftest import N, compressed, greedy, reference_layers


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_codes_pack_and_reconstruct_within_half_a_step(bits):
    torch.manual_seed(0)
    codes = torch.randint(0, 2**bits, (3, 5, 16), dtype=torch.uint8)
    assert torch.equal(_unpack(_pack(codes, bits), bits), codes)
    assert _pack(codes, bits).shape[-1] == 16 * bits // 8
    x = torch.randn(2, 3, 40, 16) * 3
    for dim in (-1, -2):
        q = Quantized.of(x, bits, dim)
        err = (q.values(bits, x.dtype) - x).abs()
        step = q.step.float().expand_as(x)
        assert bool((err <= step / 2 + 1e-2 * x.abs().amax()).all())  # half a step, plus float16 stats


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("n", [1, 31, 32, 33, 100])
def test_token_groups_in_one_pass_equal_one_group_at_a_time(bits, n):
    """A prompt quantized in one call has the codes and statistics of its groups quantized one by one."""
    torch.manual_seed(n)
    x = torch.randn(2, 3, n, 16) * torch.rand(16) * 4
    whole = Quantized.of(x, bits, dim=-2, group=32)
    parts = [Quantized.of(x[..., a : a + 32, :], bits, dim=-2) for a in range(0, n, 32)]
    assert torch.equal(whole.values(bits, x.dtype), torch.cat([p.values(bits, x.dtype) for p in parts], dim=-2))
    assert whole.nbytes() == sum(p.nbytes() for p in parts)


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_stores_decode_into_slices_as_the_formula_says(bits):
    """Several chunks and a tail, batch 2, written into a strided slice of a larger tensor: each chunk
    is code * step + minimum with its group's statistics, the tail as it is; a tiered store puts the
    rest first."""
    torch.manual_seed(bits)
    keys, values = torch.randn(2, 3, 45, 16), torch.randn(2, 3, 45, 16)
    store = QuantizedStore(keys[..., :37, :], values[..., :37, :], bits, group=8)
    for t in range(37, 45):  # one more full group of 8 is quantized as a chunk of its own
        store.append(keys[..., t : t + 1, :], values[..., t : t + 1, :], t)
    store.append(keys[..., :3, :], values[..., :3, :], 45)  # three more wait in the tail
    assert len(store.keys.chunks) == 2 and len(store.keys.tail) == len(store.values.tail) == 3

    def reference(chunk, group):
        codes = _unpack(chunk.codes, bits).float()
        low, step = chunk.low.float(), chunk.step.float()
        if group:  # one row of statistics per group of tokens, repeated over the group
            index = torch.arange(codes.shape[-2]) // group
            low, step = low[..., index, :], step[..., index, :]
        return codes * step + low

    want_k = torch.cat([*(reference(c, 8) for c in store.keys.chunks), store.keys.tail.materialize()], dim=-2)
    want_v = torch.cat([*(reference(c, None) for c in store.values.chunks), store.values.tail.materialize()], dim=-2)
    out = torch.zeros(2, 3, 60, 16)
    store.write_into(out[..., 5:53, :], out[..., 5:53, :].clone().zero_())
    torch.testing.assert_close(out[..., 5:53, :], want_k)
    assert not out[..., :5, :].any() and not out[..., 53:, :].any()
    for got, want in zip(store.materialize(), (want_k, want_v)):
        torch.testing.assert_close(got, want)
    rest = QuantizedStore(keys[..., :20, :], values[..., :20, :], 4, group=8)
    tiered = TieredStore(store, rest)
    for got, first, then in zip(tiered.materialize(), rest.materialize(), store.materialize()):
        assert torch.equal(got, torch.cat([first, then], dim=-2))


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_store_counts_its_bytes_and_decodes_through_the_tail(tiny_lm, prompt, bits):
    cache = compressed(tiny_lm.model, QuantizedKV(bits=bits, group=32), prompt)
    dense, _ = reference_layers(tiny_lm.model, prompt)
    b, h, n, d = dense[0][0].shape
    for layer, (keys, values) in zip(cache.layers, dense):
        store = layer.store
        assert isinstance(store, QuantizedStore) and len(store) == N
        assert store.nbytes() == QuantizedStore.nbytes_for(b, h, n, d, bits, 32)
        for got, want in zip(store.materialize(), (keys, values)):  # within a step of the group's range
            assert float((got - want).abs().amax()) <= 2 * float(want.abs().amax()) / (2**bits - 1) + 1e-3
    assert cache.nbytes() < (bits / 32 + 0.05) * cache.dense_nbytes()
    with torch.no_grad():  # 40 more tokens: one group of 32 quantized, 8 waiting dense
        for t in range(40):
            tiny_lm.model(prompt[:, t : t + 1], **with_cache(tiny_lm.model, cache))
    store = cache.layers[0].store
    assert len(store) == N + 40 and len(store.keys.tail) == len(store.values.tail) == 8
    # the prompt in one chunk, then one group of generated tokens
    assert len(store.keys.chunks) == len(store.values.chunks) == 2


def test_eight_bits_answer_like_the_full_cache(tiny_lm, prompt):
    plain = greedy(tiny_lm.model, prompt)
    out = greedy(tiny_lm.model, prompt, **with_cache(tiny_lm.model, QuantizedKV(bits=8).cache(tiny_lm.model)))
    assert torch.equal(out, plain)
    with QuantizedKV(bits=8)(tiny_lm.model):
        assert torch.equal(greedy(tiny_lm.model, prompt), plain)


def test_a_ratio_picks_the_most_bits_that_fit(tiny_lm, prompt):
    for ratio, bits in ((0.5, 8), (0.2, 4), (0.12, 2)):  # head dimension 16 here: the stats weigh more
        cache = compressed(tiny_lm.model, QuantizedKV(ratio=ratio), prompt)
        assert cache.layers[0].store.bits == bits
        assert cache.nbytes() <= ratio * cache.dense_nbytes()
    with pytest.raises(InputError, match="smallest quantized"):
        compressed(tiny_lm.model, QuantizedKV(ratio=0.05), prompt)


def test_options_and_budgets():
    assert "quantized" in PRESSES and press_with_budget("quantized").ratio is not None  # default ratio
    assert press_with_budget("quantized", options={"bits": 4}).ratio is None
    for options, match in (({"bits": 3}, "bits must be one of"), ({"bits": 8, "ratio": 0.3}, "with bits given"),
                           ({"tokens": 10}, "not tokens"), ({"ratio": 0.3, "group": 0}, "group")):
        with pytest.raises(InputError, match=match):
            build_press("quantized", **options)


@pytest.mark.parametrize("bits,ratio", [(None, 0.3), (8, 0.25)])
def test_rest_bits_demote_instead_of_evicting(tiny_lm, prompt, bits, ratio):
    """Every token stays; the ones eviction would keep are in ``bits`` (dense when None) and the others
    in ``rest_bits``; the bytes fit the ratio, and generated tokens join the kept part, last."""
    from ctxpress.kv import SnapKV
    evicting = compressed(tiny_lm.model, SnapKV(ratio=ratio, bits=bits, rest_bits=None), prompt)
    tiered = compressed(tiny_lm.model, SnapKV(ratio=ratio, bits=bits, rest_bits=2), prompt)
    assert tiered.nbytes() <= ratio * tiered.dense_nbytes()
    dense, _ = reference_layers(tiny_lm.model, prompt)
    for layer, alone, (keys, _) in zip(tiered.layers, evicting.layers, dense):
        store = layer.store
        assert isinstance(store, TieredStore) and len(store) == N
        # the rest is demoted, not dropped, so fewer tokens keep the high precision than eviction keeps
        assert 0 < len(store.kept) < len(alone.store) and len(store.rest) == N - len(store.kept)
        got_keys, _ = store.materialize()
        assert got_keys.shape[-2] == N
        if bits is None:  # the kept part is dense prompt keys (up to the eager reference's rounding), and last
            kept_keys = got_keys[..., len(store.rest):, :]
            nearest = torch.cdist(kept_keys[0], keys[0], compute_mode="donot_use_mm_for_euclid_dist").amin(-1)
            assert float(nearest.amax()) < 1e-4
    if bits is None:  # kept and rest together are the prompt's tokens, each once
        every = SnapKV(ratio=0.5, bits=None, rest_bits=8)  # 8-bit rest: close enough to match each key
        cache = compressed(tiny_lm.model, every, prompt)
        for layer, (keys, _) in zip(cache.layers, dense):
            assert isinstance(layer.store, TieredStore) and len(layer.store.rest) > 0
            got, _ = layer.store.materialize()
            dist = torch.cdist(keys[0], got[0], compute_mode="donot_use_mm_for_euclid_dist")  # (h, N, N)
            nearest = dist.argmin(-1)
            assert all(sorted(nearest[h].tolist()) == list(range(N)) for h in range(keys.shape[1]))
    before = [(len(layer.store.kept), len(layer.store.rest)) for layer in tiered.layers]
    out = greedy(tiny_lm.model, prompt, **with_cache(tiny_lm.model, tiered), min_new_tokens=12)
    assert out.shape[1] == N + 12
    for layer, (kept, rest) in zip(tiered.layers, before):  # new tokens join the kept part; the rest never grows
        assert len(layer.store.kept) > kept and len(layer.store.rest) == rest


def test_rest_bits_options():
    from ctxpress.kv import SnapKV

    with pytest.raises(InputError, match="more bits than the rest"):
        SnapKV(ratio=0.3, bits=4, rest_bits=4)
    with pytest.raises(InputError, match="rest_bits must be one of"):
        SnapKV(ratio=0.3, rest_bits=3)
    with pytest.raises(InputError, match="byte ratio"):
        SnapKV(tokens=30, rest_bits=4)


@pytest.mark.parametrize("ratio,tiers", [(0.5, (None, 8)), (0.2, (8, 4)), (0.1, (4, None)), (0.05, (4, None))])
def test_snapkv_tiered_takes_its_precisions_from_the_ratio(ratio, tiers):
    """For a float32 cache with 64-dimensional heads (SmolLM2): every token in the most bits that fit,
    8 or 4, the best words one precision higher; below a 4-bit cache, eviction in 4 bits, never 2."""
    from types import SimpleNamespace

    from ctxpress.kv import SnapKVTiered

    layers = [SimpleNamespace(keys=torch.zeros(1, 3, 1000, 64), seen=1000) for _ in range(4)]
    assert SnapKVTiered(ratio=ratio).tiers(layers) == tiers
    assert SnapKVTiered(ratio=ratio, bits=8, rest_bits=2).tiers(layers) == (8, 2)  # given: kept


def test_snapkv_tiered_keeps_every_token_within_its_bytes(tiny_lm, prompt):
    from ctxpress.kv import SnapKVTiered
    from ctxpress.words import token_words

    cache = SnapKVTiered(ratio=0.3).cache(tiny_lm.model, token_words(tiny_lm.tokenizer, prompt[0].tolist()))
    with torch.no_grad():
        tiny_lm.model(prompt, **with_cache(tiny_lm.model, cache))
    assert cache.nbytes() <= 0.3 * cache.dense_nbytes()
    assert all(isinstance(layer.store, TieredStore) and len(layer.store) == N for layer in cache.layers)
    with pytest.raises(InputError, match="byte ratio"):
        SnapKVTiered(tokens=40)


@pytest.mark.parametrize("per_channel", [True, False])
def test_quantized_columns_count_bytes_and_quantize_full_groups_of_new_columns(per_channel):
    data = torch.randn(2, 21, 16)
    part = QuantizedColumns(data, bits=4, group=8, per_channel=per_channel)
    assert len(part) == 21 and part.width == 16
    assert part.nbytes() == QuantizedColumns.nbytes_for(2, 21, 16, 4, 8, per_channel)
    assert torch.equal(part.materialize(), Quantized.of(data, 4, dim=-2 if per_channel else -1,
                                                        group=8 if per_channel else None).values(4, data.dtype))
    new = torch.randn(2, 11, 16)
    for t in range(11):
        part.append(new[:, t : t + 1], 21 + t)
    assert len(part) == 32 and len(part.tail) == 3 and len(part.chunks) == 2
    out = part.materialize()
    torch.testing.assert_close(out[:, 29:], new[:, 8:])  # the waiting columns as they came
    step = 2 * float(new.abs().amax()) / 15
    assert float((out[:, 21:29] - new[:, :8]).abs().amax()) <= step
    held = sum(t.numel() * t.element_size() for c in part.chunks for t in (c.codes, c.low, c.step))
    assert part.nbytes() == held + part.tail.buffer.numel() * 4
