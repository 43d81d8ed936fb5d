"""Both transformers spellings of the cache keyword and of the mask-size query."""

import torch

from ctxpress.compat import cache_from_kwargs, cache_keyword, query_length, with_cache


class OldModel(torch.nn.Module):  # the oldest supported 5.x: forward(past_key_values=...)
    def forward(self, input_ids, past_key_values=None, use_cache=None):
        return past_key_values


class NewModel(torch.nn.Module):  # newer releases: forward(cache=...), past_key_values deprecated
    def forward(self, input_ids, cache=None, use_cache=None, **kwargs):
        return cache


def test_the_keyword_is_read_from_the_models_forward():
    cache = object()
    for model, name in ((OldModel(), "past_key_values"), (NewModel(), "cache")):
        assert cache_keyword(model) == name
        assert model(torch.zeros(1, 1), **with_cache(model, cache)) is cache


def test_the_installed_model_classes_take_what_with_cache_gives(tiny_lm):
    """The real model accepts the keyword without a deprecation warning (warnings are errors in this suite)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=tiny_lm.model.config)
    tiny_lm.model(torch.tensor([[1, 2, 3]]), use_cache=True, **with_cache(tiny_lm.model, cache))
    assert cache.get_seq_length() == 3


def test_an_attention_module_finds_the_cache_under_either_keyword():
    cache = object()
    assert cache_from_kwargs({"cache": cache}) is cache
    assert cache_from_kwargs({"past_key_values": cache, "cache": None}) is cache
    assert cache_from_kwargs({"position_ids": 3}) is None


def test_mask_sizes_are_asked_by_length_or_by_positions():
    assert query_length(5) == 5
    assert query_length(torch.arange(10, 15)) == 5  # the oldest 5.x passes cache_position
