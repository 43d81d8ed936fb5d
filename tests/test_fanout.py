"""One prefill shared by several presses gives each the cache a prefill of its own would."""

import pytest
import torch

from ctxpress.kv import FULL, CompressedContext, build_press
from ctxpress.kv.fanout import SharedPrefill, prefill_needs

from conftest import N

GROUPS = [  # presses that need the same from a prefill: no words; words; attention column sums
    [(FULL, {}), ("streaming", {"ratio": 0.3}), ("snapkv", {"ratio": 0.3}), ("pyramidkv", {"ratio": 0.2}),
     ("spindlekv", {"ratio": 0.3}), ("quantized", {"bits": 4})],
    [("snapkv-words", {"ratio": 0.3}), ("snapkv-tiered", {"ratio": 0.2}), ("spindlekv-words", {"ratio": 0.3})],
    [("h2o", {"ratio": 0.3}), ("h2o", {"ratio": 0.1})],  # the bench's case: one press at several ratios
    [("snapkv", {"ratio": 0.5}), ("snapkv", {"ratio": 0.1}), ("quantized", {"ratio": 0.2}),
     ("snapkv", {"ratio": 0.1, "bits": 8})],
]


@pytest.mark.parametrize("group", GROUPS)
def test_each_press_gets_the_cache_of_its_own_prefill(tiny_lm, group):
    torch.manual_seed(0)
    prefix = torch.randint(1, len(tiny_lm.tokenizer), (1, N))
    suffix = torch.randint(1, len(tiny_lm.tokenizer), (1, 6))
    shared = list(CompressedContext.sharing_prefill(tiny_lm, prefix, [build_press(n, **o) for n, o in group]))
    assert len(shared) == len(group) and len({id(context.cache) for context in shared}) == len(group)
    for (name, options), context in zip(group, shared):
        alone = CompressedContext(tiny_lm, prefix, build_press(name, **options))
        assert context.press.name == name
        assert context.cache_bytes == alone.cache_bytes and context.full_cache_bytes == alone.full_cache_bytes
        if name != FULL:
            assert context.cache_bytes < context.full_cache_bytes
        for mine, theirs in zip(context.cache.layers, alone.cache.layers):
            for a, b in zip(mine.store.materialize() if mine.store else (mine.keys, mine.values),
                            theirs.store.materialize() if theirs.store else (theirs.keys, theirs.values)):
                assert torch.equal(a, b)
        torch.testing.assert_close(context.next_token_logits(suffix), alone.next_token_logits(suffix),
                                   rtol=0, atol=0)
        new, _ = context.generate(suffix, 5)
        assert torch.equal(new, alone.generate(suffix, 5)[0])


def test_each_cache_is_built_once_and_the_dense_prefill_let_go(tiny_lm):
    torch.manual_seed(0)
    prefix = torch.randint(1, len(tiny_lm.tokenizer), (1, N))
    sharing = SharedPrefill([build_press("snapkv", ratio=0.3), build_press("streaming", ratio=0.3)])
    prefilled = CompressedContext(tiny_lm, prefix, sharing)
    dense = prefilled.cache.layers
    assert all(layer.keys is not None and layer.store is None for layer in dense)  # the prefill stays dense
    first = sharing.cache_for(0)
    assert all(layer.keys is not None for layer in dense)  # still needed by the second press
    with pytest.raises(ValueError, match="ask once"):
        sharing.cache_for(0)
    second = sharing.cache_for(1)
    assert all(layer.keys is None and layer.values is None for layer in dense) and not sharing.layers
    assert first.layers[0].store is not second.layers[0].store


def test_presses_with_different_needs_do_not_share():
    words, tokens = build_press("snapkv-words", ratio=0.3), build_press("snapkv", ratio=0.3)
    assert prefill_needs(words) != prefill_needs(tokens)
    with pytest.raises(ValueError, match="same words and attention"):
        SharedPrefill([words, tokens])
    with pytest.raises(ValueError, match="at least one press"):
        SharedPrefill([])
    sharing = SharedPrefill([tokens])
    with pytest.raises(ValueError, match="run the prefill first"):
        sharing.cache_for(0)
