"""One prefill shared by several presses gives each the cache a prefill of its own would."""

import pytest
import torch

from ctxpress.kv import CompressedContext, build_press
from ctxpress.kv.fanout import SharedPrefill, prefill_needs

from conftest import N

GROUPS = [  # presses that need the same from a prefill: no words; words; attention column sums
    [("full", {}), ("streaming", {"ratio": 0.3}), ("snapkv", {"ratio": 0.3}), ("pyramidkv", {"ratio": 0.2}),
     ("spindlekv", {"ratio": 0.3}), ("quantized", {"bits": 4})],
    [("snapkv-words", {"ratio": 0.3}), ("snapkv-tiered", {"ratio": 0.2}), ("spindlekv-words", {"ratio": 0.3})],
    [("h2o", {"ratio": 0.3})],
]


@pytest.mark.parametrize("group", GROUPS)
def test_each_press_gets_the_cache_of_its_own_prefill(tiny_lm, group):
    torch.manual_seed(0)
    prefix = torch.randint(1, len(tiny_lm.tokenizer), (1, N))
    suffix = torch.randint(1, len(tiny_lm.tokenizer), (1, 6))
    shared = CompressedContext.sharing_prefill(tiny_lm, prefix, [build_press(n, **o) for n, o in group])
    assert len(shared) == len(group)
    for (name, options), context in zip(group, shared):
        alone = CompressedContext(tiny_lm, prefix, build_press(name, **options))
        assert context.press.name == name
        assert context.cache_bytes == alone.cache_bytes and context.full_cache_bytes == alone.full_cache_bytes
        if name != "full":
            assert context.cache_bytes < context.full_cache_bytes
        for mine, theirs in zip(context.cache.layers, alone.cache.layers):
            for a, b in zip(mine.store.materialize() if mine.store else (mine.keys, mine.values),
                            theirs.store.materialize() if theirs.store else (theirs.keys, theirs.values)):
                assert torch.equal(a, b)
        torch.testing.assert_close(context.next_token_logits(suffix), alone.next_token_logits(suffix),
                                   rtol=0, atol=0)
        new, _ = context.generate(suffix, 5)
        assert torch.equal(new, alone.generate(suffix, 5)[0])
    # the contexts are independent: decoding from one left the others' caches as they were
    assert shared[0].cache_bytes == shared[0].cache.nbytes()


def test_presses_with_different_needs_do_not_share():
    words, tokens = build_press("snapkv-words", ratio=0.3), build_press("snapkv", ratio=0.3)
    assert prefill_needs(words) != prefill_needs(tokens)
    with pytest.raises(ValueError, match="same words and attention"):
        SharedPrefill([words, tokens])
